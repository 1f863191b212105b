"""CTF estimation of a micrograph: defocus U/V, astigmatism angle, optional phase shift, fit resolution.

Conventions follow :mod:`cryolive.ctf` (RELION): defocus in Å, positive underfocus, ``defocus_u ≥
defocus_v``, ``defocus_angle_deg`` is the angle of the U axis from the X axis (columns) towards +rows. The
model spectrum is built on exactly the frequency grid of :func:`cryolive.ctf.calculate_ctf_2d`, so an
image filtered by ``calculate_ctf_2d(U, V, θ, ...)`` is fitted with angle θ.

Method
------
1. Average power spectrum of overlapping (50 %), mean-subtracted, edge-tapered tiles of
   ``settings.tile_size_px`` (periodogram averaging), in rfft layout ``(n, n//2+1)``.
2. The spectrum is flattened by a smooth radial curve (``exp`` of a polynomial in k fitted to the log of
   the rotational average) and then modelled, for every trial CTF, as ``B(k) + E(k)·CTF²`` with smooth
   background ``B`` and envelope ``E`` (low-order polynomials in k solved by linear least squares), in the
   band ``[min_resolution, max_resolution]``. The score is the fraction of variance explained (R²).
3. An exhaustive 1D search over the mean defocus (rotational average, steps fine enough that the phase
   at the highest fitted frequency moves by ≤ π/8 per step) finds the Thon-ring family; then a grid over
   the astigmatism and a Nelder–Mead refinement of (mean defocus, astigmatism vector
   ``(Δ cos 2θ, Δ sin 2θ)``[, phase shift]) maximise R² on the 2D spectrum.
4. The fit resolution comes from the correlation between the equiphase average of the spectrum (pixels
   binned by the frequency an unastigmatic CTF would need to have the same phase) and the fitted CTF²,
   in sliding windows of about one Thon ring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize

from ..config import CTFSettings
from ..ctf import calculate_ctf_1d, electron_wavelength_angstrom
from ..fourier import frequency_grid_2d

__all__ = ["CTFResult", "estimate_ctf", "average_power_spectrum_2d", "ctf_diagnostic_image_2d"]

_POLY_BG = 4  # background polynomial terms (in flattened units)
_POLY_ENV = 3  # envelope polynomial terms
_FIT_RES_THRESHOLD = 0.3  # windowed correlation below which the fit is no longer trusted


@dataclass
class CTFResult:
    """Result of :func:`estimate_ctf`. Defocus values in Å, angles in degrees.

    frequencies_inv_angstrom, spectrum_1d, fit_1d: ``(n,)`` numpy arrays for plots: the equiphase average
    of the background-subtracted spectrum and the fitted envelope × CTF² at the same frequencies (1/Å).
    fit_correlation_1d: ``(n,)`` the windowed (about one Thon ring) correlation of the two, which sets
    ``max_resolution_angstrom``. power_spectrum: the ``(n, n//2+1)`` averaged spectrum that was fitted (rfft
    layout), for :func:`ctf_diagnostic_image_2d`.
    """

    defocus_u: float
    defocus_v: float
    defocus_angle_deg: float
    astigmatism: float
    phase_shift_deg: float
    max_resolution_angstrom: float
    figure_of_merit: float
    frequencies_inv_angstrom: np.ndarray
    spectrum_1d: np.ndarray
    fit_1d: np.ndarray
    fit_correlation_1d: np.ndarray | None = None
    power_spectrum: torch.Tensor | None = None


def _taper_2d(n: int, device, edge_fraction: float = 0.1) -> torch.Tensor:
    """Separable Tukey window ``(n, n)``: flat centre, raised-cosine edges of ``edge_fraction·n`` pixels."""
    m = max(1, int(round(edge_fraction * n)))
    w = torch.ones(n, device=device)
    ramp = 0.5 * (1 - torch.cos(math.pi * (torch.arange(m, device=device, dtype=torch.float32) + 0.5) / m))
    w[:m] = ramp
    w[n - m :] = ramp.flip(0)
    return w[:, None] * w[None, :]


def average_power_spectrum_2d(image: torch.Tensor, tile_size_px: int = 512, overlap: float = 0.5) -> torch.Tensor:
    """Average power spectrum of overlapping tiles of ``image (h, w)`` → ``(n, n//2+1)`` (rfft layout).

    ``n = tile_size_px`` (reduced to the largest even size that fits the image). Tiles are mean-subtracted
    and tapered at the edges; the result is normalised by the window energy (units: counts² per pixel).
    """
    h, w = image.shape[-2:]
    n = min(tile_size_px, h, w)
    n -= n % 2
    step = max(1, int(round(n * (1 - overlap))))
    ys = list(range(0, h - n + 1, step))
    xs = list(range(0, w - n + 1, step))
    if ys[-1] != h - n:
        ys.append(h - n)
    if xs[-1] != w - n:
        xs.append(w - n)
    win = _taper_2d(n, image.device)
    img = image.to(torch.float32)
    acc = torch.zeros(n, n // 2 + 1, device=image.device)
    count = 0
    for y in ys:
        tiles = torch.stack([img[y : y + n, x : x + n] for x in xs])  # (m, n, n)
        tiles = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
        acc += (torch.fft.rfft2(tiles * win).abs() ** 2).sum(0)
        count += len(xs)
    return acc / (count * float((win**2).sum()))


def _legendre_basis(x: torch.Tensor, n_terms: int) -> torch.Tensor:
    """``(..., n_terms)`` Legendre polynomials P_0..P_{n-1} of ``x`` in [-1, 1]."""
    out = [torch.ones_like(x)]
    if n_terms > 1:
        out.append(x)
    for j in range(2, n_terms):
        out.append(((2 * j - 1) * x * out[-1] - (j - 1) * out[-2]) / j)
    return torch.stack(out, -1)


class _LinearFit:
    """R² of the linear model ``y ≈ basis_bg·a + c2·(basis_env·b)`` for many trial ``c2``, with the products of
    ``y`` and the bases that do not depend on ``c2`` computed once (see :func:`_fit_score`)."""

    def __init__(self, y: torch.Tensor, basis_bg: torch.Tensor, basis_env: torch.Tensor):
        f64 = torch.float64
        self.bb = basis_bg.to(f64)  # (n, p)
        self.ee = basis_env.to(f64)  # (n, q)
        self.y = y.to(f64)
        n = self.y.shape[0]
        self.p, self.q = self.bb.shape[-1], self.ee.shape[-1]
        self.be = (self.bb[:, :, None] * self.ee[:, None, :]).reshape(n, self.p * self.q)
        self.eee = (self.ee[:, :, None] * self.ee[:, None, :]).reshape(n, self.q * self.q)
        self.eey = self.ee * self.y[:, None]
        self.bty = self.bb.T @ self.y
        self.btb = self.bb.T @ self.bb
        self.yty = self.y @ self.y
        self.tss = ((self.y - self.y.mean()) ** 2).sum()
        self.ee_mean = self.ee.mean(0)
        self.eye = torch.eye(self.p + self.q, dtype=f64, device=self.y.device)

    def score(self, c2: torch.Tensor, return_model: bool = False):
        # normal equations from moments, no (..., n, p + q) design matrix: with c = c2,
        # XᵀX = [[BᵀB, Bᵀdiag(c)E], [·, Eᵀdiag(c²)E]], Xᵀy = [Bᵀy, Eᵀdiag(c)y]
        p, q = self.p, self.q
        lead = c2.shape[:-1]
        n = c2.shape[-1]
        c = c2.reshape(-1, n).to(torch.float64)  # (m, n)
        m = c.shape[0]
        xtx = torch.empty(m, p + q, p + q, dtype=torch.float64, device=c.device)
        xtx[:, :p, :p] = self.btb
        cbe = (c @ self.be).reshape(m, p, q)
        xtx[:, :p, p:] = cbe
        xtx[:, p:, :p] = cbe.transpose(-1, -2)
        xtx[:, p:, p:] = ((c * c) @ self.eee).reshape(m, q, q)
        xty = torch.cat([self.bty.expand(m, p), c @ self.eey], -1)  # (m, p + q)
        ridge = 1e-9 * xtx.diagonal(dim1=-2, dim2=-1).mean(-1)[:, None, None] * self.eye
        coef = torch.linalg.solve(xtx + ridge, xty)  # (m, p + q)
        # residual sum of squares yᵀy − 2 coefᵀXᵀy + coefᵀXᵀX coef (exact for any coef)
        rss = self.yty - 2 * (coef * xty).sum(-1) + (coef[:, None, :] @ xtx @ coef[:, :, None])[:, 0, 0]
        r2 = (1 - rss / self.tss).to(torch.float32)
        # a negative envelope would turn CTF² into 1 − CTF² (a 90° phase alias): such fits score negative
        env_mean = coef[:, p:] @ self.ee_mean  # (m,) mean over the samples of basis_env·b
        r2 = torch.where(env_mean > 0, r2, -r2.abs()).reshape(lead)
        if return_model:
            bg = (coef[:, :p] @ self.bb.T).reshape(*lead, n)
            env = (coef[:, p:] @ self.ee.T).reshape(*lead, n)
            return r2, bg.to(torch.float32), env.to(torch.float32)
        return r2


def _fit_score(y: torch.Tensor, c2: torch.Tensor, basis_bg: torch.Tensor, basis_env: torch.Tensor,
               return_model: bool = False):
    """R² of the linear model ``y ≈ basis_bg·a + c2·(basis_env·b)`` (batched over leading dims of ``c2``).

    Fits whose envelope ``basis_env·b`` is negative on average get ``−|R²|``.

    y: ``(n,)``; c2: ``(..., n)``; basis_bg: ``(n, p)``; basis_env: ``(n, q)``. For many calls with the same
    ``y`` and bases, build a :class:`_LinearFit` once.
    """
    return _LinearFit(y, basis_bg, basis_env).score(c2, return_model)


def _gamma_2d(mean_df, a1, a2, phase_deg, k2, cos2, sin2, lam, cs):
    """Phase shift γ of the CTF on samples with |k|² = ``k2`` (1/Å²) and direction cos/sin(2θ)."""
    dfz = mean_df + 0.5 * (a1 * cos2 + a2 * sin2)
    return math.pi * lam * dfz * k2 - 0.5 * math.pi * cs * lam**3 * k2**2 + math.radians(phase_deg)


def estimate_ctf(
    image: torch.Tensor,
    pixel_size_angstrom: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    settings: CTFSettings = CTFSettings(),
    phase_shift: bool = False,
    input_is_power_spectrum: bool = False,
) -> CTFResult:
    """Estimate the CTF of a micrograph.

    image: ``(h, w)`` non-dose-weighted aligned sum (counts), or, with ``input_is_power_spectrum``, a
        power spectrum ``(n, n//2+1)`` in rfft layout as :func:`average_power_spectrum_2d` returns.
    pixel_size_angstrom: Å/px of ``image``; voltage_kv: kV; cs_mm: mm; amplitude_contrast: fraction.
    settings: fit band ``min/max_resolution_angstrom`` (the high end is clamped to ≥ 2.2 × pixel size),
        defocus search range ``min/max_defocus_angstrom``, ``tile_size_px``.
    phase_shift: also fit a phase-plate phase shift (0–180°).

    Returns a :class:`CTFResult` (RELION conventions, ``defocus_u ≥ defocus_v``).
    """
    device = image.device
    if input_is_power_spectrum:
        ps = image.to(torch.float32)
        n = ps.shape[-2]
    else:
        ps = average_power_spectrum_2d(image, settings.tile_size_px)
        n = ps.shape[-2]
    lam = electron_wavelength_angstrom(voltage_kv)
    cs = cs_mm * 1e7
    q = amplitude_contrast
    ky, kx = frequency_grid_2d((n, n), pixel_size_angstrom, True, device)
    k = torch.sqrt(ky**2 + kx**2)
    k_nyq = 0.5 / pixel_size_angstrom
    k_lo = 1.0 / settings.min_resolution_angstrom
    k_hi = 1.0 / max(settings.max_resolution_angstrom, 2.2 * pixel_size_angstrom)
    k_hi = min(k_hi, 0.95 * k_nyq)
    k_lo = min(k_lo, 0.5 * k_hi)
    # rfft half plane: drop the redundant negative-ky part of column 0 (and Nyquist column)
    half = torch.ones_like(k, dtype=torch.bool)
    half[n // 2 + 1 :, 0] = False
    half[n // 2 + 1 :, -1] = False
    band = (k >= k_lo) & (k <= k_hi) & half
    # --- flatten by a smooth radial curve (log-polynomial of the rotational average) ---
    dk = 1.0 / (n * pixel_size_angstrom)
    shell = torch.round(k / dk).long()
    n_sh = int(shell.max()) + 1
    sel = half & (k > 0)
    sums = torch.zeros(n_sh, device=device).index_add_(0, shell[sel], ps[sel])
    cnts = torch.zeros(n_sh, device=device).index_add_(0, shell[sel], torch.ones_like(ps[sel]))
    k1 = torch.arange(n_sh, device=device, dtype=torch.float32) * dk
    ps1 = sums / cnts.clamp(min=1)
    in1 = (k1 >= k_lo) & (k1 <= k_hi) & (cnts > 0)
    kx1 = k1[in1]

    def unit(kk):  # map band to [-1, 1]
        return (2 * (kk - k_lo) / (k_hi - k_lo) - 1).clamp(-1.5, 1.5)

    log_basis = _legendre_basis(unit(kx1), 6)
    coef = torch.linalg.lstsq(log_basis, torch.log(ps1[in1].clamp(min=1e-30))[:, None]).solution
    base_1d = torch.exp((log_basis @ coef)[:, 0])
    y1 = ps1[in1] / base_1d  # flattened rotational average in band, (m,)
    kb = k[band]
    base_2d = torch.exp((_legendre_basis(unit(kb), 6) @ coef)[:, 0])
    y2 = ps[band] / base_2d  # flattened 2D spectrum in band, (p,)
    bg1, env1 = _legendre_basis(unit(kx1), _POLY_BG), _legendre_basis(unit(kx1), _POLY_ENV)
    bg2, env2 = _legendre_basis(unit(kb), _POLY_BG), _legendre_basis(unit(kb), _POLY_ENV)

    fit1 = _LinearFit(y1, bg1, env1)
    fit2 = _LinearFit(y2, bg2, env2)

    # --- exhaustive 1D search over the mean defocus (and phase shift) ---
    step = min(100.0, 1.0 / (8 * lam * k_hi**2))
    dfs = torch.arange(settings.min_defocus_angstrom, settings.max_defocus_angstrom + step, step, device=device)
    phases = torch.arange(0.0, 180.0, 10.0, device=device) if phase_shift else torch.zeros(1, device=device)
    best = (-math.inf, 0.0, 0.0)
    for ph in phases:
        r2 = torch.cat([
            fit1.score(calculate_ctf_1d(dfs[i : i + 256], voltage_kv, cs_mm, q, kx1, float(ph)) ** 2)
            for i in range(0, len(dfs), 256)
        ])
        j = int(r2.argmax())
        if float(r2[j]) > best[0]:
            best = (float(r2[j]), float(dfs[j]), float(ph))
    _, df0, ph0 = best

    # --- 2D refinement: astigmatism grid, then Nelder-Mead on (mean, a1, a2[, phase]) ---
    k2b = kb**2
    theta = torch.atan2(ky[band], kx[band])
    cos2, sin2 = torch.cos(2 * theta), torch.sin(2 * theta)
    sq = math.sqrt(1 - q * q)

    def ctf2_2d(mean_df, a1, a2, ph):
        g = _gamma_2d(mean_df, a1, a2, ph, k2b, cos2, sin2, lam, cs)
        return (sq * torch.sin(g) + q * torch.cos(g)) ** 2

    amax = max(1500.0, 0.1 * df0)
    grid = torch.linspace(-amax, amax, 11, device=device)
    ga1, ga2 = torch.meshgrid(grid, grid, indexing="ij")
    ga1, ga2 = ga1.flatten(), ga2.flatten()
    keep = ga1**2 + ga2**2 <= amax**2 * 1.01
    ga1, ga2 = ga1[keep], ga2[keep]
    start = None
    for dm in (df0 - step, df0, df0 + step):
        for i in range(len(ga1)):
            s = float(fit2.score(ctf2_2d(dm, ga1[i], ga2[i], ph0)[None])[0])
            if start is None or s > start[0]:
                start = (s, dm, float(ga1[i]), float(ga2[i]))
    _, dm0, a10, a20 = start

    def objective(p):
        ph = float(p[3]) if phase_shift else ph0
        return -float(fit2.score(ctf2_2d(float(p[0]), float(p[1]), float(p[2]), ph)[None])[0])

    x0 = [dm0, a10, a20] + ([ph0] if phase_shift else [])
    simplex_step = [step * 2, amax / 5, amax / 5] + ([10.0] if phase_shift else [])
    init = np.array([x0] + [np.array(x0) + np.eye(len(x0))[i] * simplex_step[i] for i in range(len(x0))])
    res = minimize(objective, np.array(x0), method="Nelder-Mead",
                   options=dict(initial_simplex=init, xatol=1.0, fatol=1e-7, maxiter=600))
    mean_df, a1, a2 = (float(v) for v in res.x[:3])
    ph_fit = float(res.x[3]) % 180.0 if phase_shift else ph0
    fom = -float(res.fun)
    astig = math.hypot(a1, a2)
    angle = 0.5 * math.degrees(math.atan2(a2, a1))
    defocus_u, defocus_v = mean_df + astig / 2, mean_df - astig / 2

    # --- equiphase 1D average and fit resolution ---
    freqs, spec1d, fit1d, corr1d, max_res = _equiphase_profile(
        ps, k, ky, kx, half, k_lo, k_nyq, mean_df, a1, a2, ph_fit, voltage_kv, cs_mm, q, pixel_size_angstrom, n)
    return CTFResult(
        defocus_u=defocus_u,
        defocus_v=defocus_v,
        defocus_angle_deg=angle,
        astigmatism=defocus_u - defocus_v,
        phase_shift_deg=ph_fit,
        max_resolution_angstrom=max_res,
        figure_of_merit=fom,
        frequencies_inv_angstrom=freqs,
        spectrum_1d=spec1d,
        fit_1d=fit1d,
        fit_correlation_1d=corr1d,
        power_spectrum=ps,
    )


def _equiphase_profile(ps, k, ky, kx, half, k_lo, k_nyq, mean_df, a1, a2, ph, voltage_kv, cs_mm, q, pixel_size, n):
    """Equiphase average of the spectrum, the fitted envelope·CTF² and the fit resolution (Å)."""
    lam = electron_wavelength_angstrom(voltage_kv)
    cs = cs_mm * 1e7
    sel = half & (k >= k_lo) & (k <= k_nyq)
    kk = k[sel]
    theta = torch.atan2(ky[sel], kx[sel])
    g = _gamma_2d(mean_df, a1, a2, 0.0, kk**2, torch.cos(2 * theta), torch.sin(2 * theta), lam, cs)
    # |k|² of an unastigmatic CTF (defocus = mean) with the same phase: a x² − b x + g = 0, x = k²
    a_coef = 0.5 * math.pi * cs * lam**3
    b_coef = math.pi * lam * mean_df
    if a_coef > 0:
        disc = (b_coef**2 - 4 * a_coef * g).clamp(min=0)
        x = (b_coef - torch.sqrt(disc)) / (2 * a_coef)
    else:
        x = g / b_coef
    keff = torch.sqrt(x.clamp(min=0))
    dk = 1.0 / (n * pixel_size)
    idx = torch.round(keff / dk).long()
    n_bins = int(round(k_nyq / dk)) + 1
    ok = idx < n_bins
    sums = torch.zeros(n_bins, device=ps.device).index_add_(0, idx[ok], ps[sel][ok])
    cnts = torch.zeros(n_bins, device=ps.device).index_add_(0, idx[ok], torch.ones_like(kk[ok]))
    freqs = torch.arange(n_bins, device=ps.device, dtype=torch.float32) * dk
    use = (cnts > 0) & (freqs >= k_lo)
    f = freqs[use]
    prof = sums[use] / cnts[use]
    # flatten, then fit background + envelope·CTF² over the whole range
    u = 2 * (f - f[0]) / (f[-1] - f[0]) - 1
    lb = _legendre_basis(u, 8)
    coef = torch.linalg.lstsq(lb, torch.log(prof.clamp(min=1e-30))[:, None]).solution
    base = torch.exp((lb @ coef)[:, 0])
    y = prof / base
    c2 = calculate_ctf_1d(mean_df, voltage_kv, cs_mm, q, f, ph) ** 2
    _, bg, env = _fit_score(y, c2[None], _legendre_basis(u, 6), _legendre_basis(u, 5), return_model=True)
    spec = (y - bg[0]).cpu().numpy()
    fit = (env[0] * c2).cpu().numpy()
    # windowed correlation of spectrum and CTF², window ≈ one Thon ring (at least 7 samples)
    fk = f.cpu().numpy()
    c2n = c2.cpu().numpy()
    corr = np.zeros_like(fk)
    for i in range(len(fk)):
        period = 1.0 / max(lam * abs(mean_df) * fk[i], 1e-6)
        half_w = max(3 * dk, 0.75 * period)
        m = np.abs(fk - fk[i]) <= half_w
        if m.sum() < 5:
            continue
        a = spec[m] - spec[m].mean()
        b = c2n[m] - c2n[m].mean()
        den = math.sqrt(float((a * a).sum() * (b * b).sum()))
        corr[i] = float((a * b).sum()) / den if den > 0 else 0.0
    # first frequency (beyond the first ring) where the correlation drops below the threshold
    k_first_zero = math.sqrt(1.0 / (lam * max(abs(mean_df), 1.0)))
    max_k = fk[0]
    for i in range(len(fk)):
        if fk[i] < k_first_zero:
            max_k = fk[i]
            continue
        if corr[i] < _FIT_RES_THRESHOLD:
            break
        max_k = fk[i]
    max_res = 1.0 / max(max_k, 1e-6)
    return fk, spec, fit, corr, float(max(max_res, 2.0 * pixel_size))



def _full_centred_spectrum(ps: torch.Tensor) -> torch.Tensor:
    """``(n, n//2+1)`` rfft-layout spectrum → ``(n, n)`` full spectrum with the origin at ``(n//2, n//2)``."""
    n = ps.shape[-2]
    full = torch.empty(n, n, dtype=ps.dtype, device=ps.device)
    m = ps.shape[-1]
    full[:, :m] = ps
    # Hermitian symmetry: P(ky, kx) = P(-ky, -kx) for the columns rfft leaves out
    rows = (-torch.arange(n, device=ps.device)) % n
    cols = n - torch.arange(m, n, device=ps.device)
    full[:, m:] = ps[rows][:, cols]
    return torch.fft.fftshift(full, dim=(-2, -1))


def ctf_diagnostic_image_2d(
    result: CTFResult,
    pixel_size_angstrom: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    settings: CTFSettings = CTFSettings(),
) -> torch.Tensor:
    """CTFFIND-style half-and-half diagnostic ``(n, n)`` of a fit, origin at ``(n//2, n//2)`` (row, column).

    Columns ``< n//2`` (left half): the fitted power spectrum (``result.power_spectrum``), smoothed over 3 × 3
    pixels, minus its smooth radial background (exp of a polynomial in k fitted to the log of the ring means,
    too smooth to follow Thon rings) and divided by the smooth radial RMS of the rest. Columns ``≥ n//2``
    (right half): the fitted CTF² (U, V, angle, phase shift of ``result``) as ``(CTF² − ½)·√8`` (zero mean, unit
    standard deviation over a ring), so Thon rings of the data continue into
    the model across the vertical centre line when the fit is right. Frequencies below
    ``settings.min_resolution_angstrom`` are 0; values are clipped to ±3. Same frequency grid as
    :func:`cryolive.ctf.calculate_ctf_2d` (x = column, y = row), so the rings appear as the micrograph's would.
    """
    if result.power_spectrum is None:
        raise ValueError("result has no power_spectrum (fit with cryolive.preprocess.ctf_fit.estimate_ctf)")
    ps = result.power_spectrum.to(torch.float32)
    n = ps.shape[-2]
    dev = ps.device
    full = _full_centred_spectrum(ps)
    c = torch.arange(n, device=dev, dtype=torch.float32) - n // 2
    ky = c[:, None].expand(n, n) / (n * pixel_size_angstrom)
    kx = c[None, :].expand(n, n) / (n * pixel_size_angstrom)
    k = torch.sqrt(ky**2 + kx**2)
    k_lo = 1.0 / settings.min_resolution_angstrom
    k_nyq = 0.5 / pixel_size_angstrom
    lam = electron_wavelength_angstrom(voltage_kv)
    cs = cs_mm * 1e7
    q = amplitude_contrast
    mean_df = 0.5 * (result.defocus_u + result.defocus_v)
    ang = math.radians(result.defocus_angle_deg)
    a1, a2 = result.astigmatism * math.cos(2 * ang), result.astigmatism * math.sin(2 * ang)
    theta = torch.atan2(ky, kx)
    g = _gamma_2d(mean_df, a1, a2, result.phase_shift_deg, k**2, torch.cos(2 * theta), torch.sin(2 * theta), lam, cs)
    model = (math.sqrt(1 - q * q) * torch.sin(g) + q * torch.cos(g)) ** 2
    shell = torch.round(k * n * pixel_size_angstrom).long()
    n_sh = int(shell.max()) + 1
    valid = (k >= k_lo) & (k <= k_nyq)
    sv = shell[valid]
    kv = torch.arange(n_sh, device=dev, dtype=torch.float32) / (n * pixel_size_angstrom)
    u1 = (2 * (kv - k_lo) / (k_nyq - k_lo) - 1).clamp(-1, 1)
    cnt = torch.zeros(n_sh, device=dev).index_add_(0, sv, torch.ones_like(sv, dtype=torch.float32))
    use = cnt > 0
    basis = _legendre_basis(u1[use], 8)

    def smooth_radial(values: torch.Tensor) -> torch.Tensor:
        """Per-pixel ``exp`` of a degree-7 polynomial in k fitted to the log of the ring means of ``values``."""
        mean = torch.zeros(n_sh, device=dev).index_add_(0, sv, values) / cnt.clamp(min=1)
        coef = torch.linalg.lstsq(basis, torch.log(mean[use].clamp(min=1e-30))[:, None]).solution
        curve = torch.zeros(n_sh, device=dev)
        curve[use] = torch.exp((basis @ coef)[:, 0])
        return curve[sv]

    # 3 × 3 box smoothing of the data (periodogram noise); background = smooth radial curve (wider than a Thon
    # ring, so the rings stay), scale = smooth radial RMS of what is left
    smooth = torch.nn.functional.avg_pool2d(full[None, None], 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    resid = smooth[valid] - smooth_radial(smooth[valid])
    scale = smooth_radial(resid**2).sqrt()
    data = torch.zeros_like(full)
    data[valid] = (resid / scale.clamp(min=1e-30)).clamp(-3, 3)
    # CTF² in [0, 1] has mean 1/2 and standard deviation 1/√8 over a Thon ring
    fit = torch.zeros_like(full)
    fit[valid] = ((model[valid] - 0.5) * math.sqrt(8.0)).clamp(-3, 3)
    out = torch.where(torch.arange(n, device=dev)[None, :] < n // 2, data, fit)
    return out
