"""Patch-based local motion: per-patch trajectories and a smooth spatio-temporal model, and the local sum.

Used by :func:`cryolive.preprocess.motion.align_movie` after the full-frame (global) alignment; the pieces
are public so that they can be used on their own.

Model
-----
The specimen point at ``p = (y, x)`` (pixels of frame 1) is seen in frame ``t`` at ``p + g_t + L_t(p)``:
``g_t`` is the global trajectory (free per frame) and the residual field ::

    L_t(p) = Σ_j  z_t^(j+1) · Σ_{a,b} Wy_a(y) Wx_b(x) C[j, a, b]          z_t = t / (T − 1),  j = 0..degree−1

is a polynomial in time without constant term (``L_0 = 0``: frame 1 is the reference, as for ``g``) times a
cubic-convolution (Catmull–Rom) interpolation in space between control points on a ``(ky, kx)`` grid spanning
the frame corner to corner. RELION and MotionCor2 use a polynomial in both; the control grid follows
non-polynomial deformations (a bent or domed ice layer) as well. Shifts are ``(…, 2)`` in (y, x) order, px.

Fitting (:func:`estimate_local_motion`)
---------------------------------------
1. Low-pass (B-factor crop) images of the globally aligned frames are cut into a ``(ny, nx)`` grid of
   tapered patches, twice the size of a grid cell (half-overlapping), clipped to the frame.
2. Each patch of each frame is cross-correlated with the *leave-one-out* sum of the same patch in all other
   frames, aligned by the current model (so that a frame's own shot noise never correlates with itself); the
   cross power spectrum is weighted by ``exp(−B k²/4)``; the integer peak is refined to sub-pixel precision by
   Newton steps on the band-limited correlation function (as for the global alignment).
3. The model is fitted to all (frame, patch) measurements by weighted least squares — each measurement is
   compared with the model *averaged over its patch window* — with a per-patch offset (the leave-one-out
   reference's own origin), a Gaussian prior on the field's size weighed against the measurement noise (so
   that noise alone gives a small field), an optional curvature penalty across the control grid, and Huber weights
   re-estimated from the residuals (iteratively reweighted, so that a patch on a contaminant or a carbon edge
   does not pull the field). The local part of the field (its deviation from its area mean) is then multiplied by
   a factor κ from its energy ``E`` against the energy ``E₀`` the same fit would give if the patch trajectories were
   noise around the global motion (noise level from the residuals, correlated between overlapping patches as their
   squared windows overlap): κ = 0 when ``E`` is within the 99 % range of noise alone (χ² with the noise's
   effective degrees of freedom), else the Wiener gain ``1 − E₀/E``. Trajectories consistent with noise give no
   local field; real deformation, far above the noise, is kept (κ ≈ 1).
4. Steps 2–3 repeat until the model moves by less than 0.02 px anywhere, or ``max_iterations``; the first
   round searches the correlation maps (integer peak, parabolic offset), later rounds only refine the previous
   peaks by Newton steps.

Summation (:func:`sum_frames_local`)
------------------------------------
Each frame is shifted by ``−g_t`` exactly (Fourier phase) and dose-filtered (Grant & Grigorieff); consecutive
frames whose residual fields differ by less than ``group_tolerance_px`` are accumulated in Fourier space, and
each group sum is warped once in real space by its mean residual field (bicubic interpolation), so the cost
grows with the number of distinct deformation states rather than with the frame count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..ctf import dose_filter_2d
from ..fourier import phase_shift_2d

__all__ = ["LocalMotionModel", "estimate_local_motion", "sum_frames_local", "catmull_rom_matrix"]


def catmull_rom_matrix(coords: torch.Tensor, n_knots: int, extent: float) -> torch.Tensor:
    """Interpolation weights ``(n, n_knots)`` of Catmull–Rom cubic convolution at ``coords (n,)``.

    Knots at ``linspace(0, extent − 1, n_knots)`` (corner to corner, like ``align_corners=True``); beyond the
    outer knots the end values are repeated (indices clamped). ``n_knots == 1``: a constant.
    """
    n = coords.shape[0]
    dev = coords.device
    if n_knots == 1:
        return torch.ones(n, 1, device=dev, dtype=coords.dtype)
    u = coords / max(extent - 1, 1e-9) * (n_knots - 1)  # knot units
    i0 = torch.floor(u).clamp(0, n_knots - 2)
    f = (u - i0).clamp(0, 1)  # beyond the ends: the end value (clamped, as torch does)
    # Catmull–Rom (a = −0.5) weights of knots i0−1 .. i0+2
    f2, f3 = f * f, f * f * f
    w = torch.stack([-0.5 * f3 + f2 - 0.5 * f,
                     1.5 * f3 - 2.5 * f2 + 1.0,
                     -1.5 * f3 + 2.0 * f2 + 0.5 * f,
                     0.5 * f3 - 0.5 * f2], -1)  # (n, 4)
    idx = (i0.long()[:, None] + torch.arange(-1, 3, device=dev)[None]).clamp(0, n_knots - 1)
    out = torch.zeros(n, n_knots, device=dev, dtype=coords.dtype)
    out.scatter_add_(1, idx, w)
    return out


def time_basis(n_frames: int, degree: int, device=None) -> torch.Tensor:
    """``(t, degree)`` polynomial time basis ``z^1 … z^degree`` with ``z = t / (T − 1)`` (0 at frame 1)."""
    z = torch.arange(n_frames, device=device, dtype=torch.float32) / max(n_frames - 1, 1)
    return torch.stack([z ** (j + 1) for j in range(degree)], -1)


@dataclass
class LocalMotionModel:
    """Smooth residual motion ``L_t(y, x)`` (px) on top of the global trajectory (see the module docstring).

    coefficients: ``(degree, ky, kx, 2)`` control-point values (y, x) of each time power, px.
    image_shape: ``(h, w)`` of the frames; n_frames: ``t``.
    patch_centres_yx_px: ``(n, 2)`` centres of the patches that were measured (full-frame px).
    patch_shifts_yx_px: ``(t, n, 2)`` the per-patch measurements (residual to the global trajectory, with the
        per-patch offset of the fit removed), px — what a plot of "patch trajectories" shows.
    n_iterations: measurement/fit rounds used.
    shrinkage: the factor κ the local part of the fitted field was multiplied by in the last round (0: the patch
        trajectories were consistent with noise around the global motion; ≈ 1: deformation far above the noise).
    """

    coefficients: torch.Tensor
    image_shape: tuple[int, int]
    n_frames: int
    patch_centres_yx_px: torch.Tensor
    patch_shifts_yx_px: torch.Tensor
    n_iterations: int = 0
    shrinkage: float = 1.0

    @property
    def degree(self) -> int:
        return int(self.coefficients.shape[0])

    @property
    def control_grid(self) -> tuple[int, int]:
        return int(self.coefficients.shape[1]), int(self.coefficients.shape[2])

    def shifts_at(self, coords_yx_px: torch.Tensor) -> torch.Tensor:
        """Residual shifts ``(t, n, 2)`` (px, y x) at positions ``coords_yx_px (n, 2)`` (px of frame 1)."""
        c = self.coefficients
        coords = torch.as_tensor(coords_yx_px, dtype=torch.float32, device=c.device).reshape(-1, 2)
        ky, kx = self.control_grid
        h, w = self.image_shape
        wy = catmull_rom_matrix(coords[:, 0], ky, h)  # (n, ky)
        wx = catmull_rom_matrix(coords[:, 1], kx, w)  # (n, kx)
        spatial = torch.einsum("na,jabc,nb->jnc", wy, c, wx)  # (degree, n, 2)
        bt = time_basis(self.n_frames, self.degree, c.device)  # (t, degree)
        return torch.einsum("tj,jnc->tnc", bt, spatial)

    def field(self, weights_t: torch.Tensor) -> torch.Tensor:
        """Dense field ``(2, h, w)`` (y, x px) of ``Σ_t weights_t[t] · L_t`` (e.g. the mean over a frame group)."""
        c = self.coefficients
        h, w = self.image_shape
        ky, kx = self.control_grid
        bt = time_basis(self.n_frames, self.degree, c.device)  # (t, degree)
        cw = torch.einsum("t,tj,jabc->cab", weights_t.to(c.device, torch.float32), bt, c)  # (2, ky, kx)
        wy = catmull_rom_matrix(torch.arange(h, device=c.device, dtype=torch.float32), ky, h)  # (h, ky)
        wx = catmull_rom_matrix(torch.arange(w, device=c.device, dtype=torch.float32), kx, w)  # (w, kx)
        return wy[None] @ cw @ wx.T[None]  # (2, h, w)

    def area_mean(self) -> tuple[torch.Tensor, LocalMotionModel]:
        """``(m (t, 2), model − m)``: the field's mean over the whole frame per frame (px), and the model with
        that mean removed (a constant is subtracted from every control point, which the interpolation
        reproduces exactly)."""
        c = self.coefficients
        h, w = self.image_shape
        ky, kx = self.control_grid
        wy = catmull_rom_matrix(torch.arange(h, device=c.device, dtype=torch.float32), ky, h).mean(0)  # (ky,)
        wx = catmull_rom_matrix(torch.arange(w, device=c.device, dtype=torch.float32), kx, w).mean(0)  # (kx,)
        mean_j = torch.einsum("a,jabc,b->jc", wy, c, wx)  # (degree, 2)
        m = time_basis(self.n_frames, self.degree, c.device) @ mean_j  # (t, 2)
        centred = LocalMotionModel(
            coefficients=c - mean_j[:, None, None, :], image_shape=self.image_shape, n_frames=self.n_frames,
            patch_centres_yx_px=self.patch_centres_yx_px,
            patch_shifts_yx_px=self.patch_shifts_yx_px - m[:, None, :].to(self.patch_shifts_yx_px.device),
            n_iterations=self.n_iterations, shrinkage=self.shrinkage)
        return m, centred

    def max_deviation_px(self, coords_yx_px: torch.Tensor | None = None) -> float:
        """Largest local deviation from the frame's mean motion, px: ``max_{t,p} |L_t(p) − mean_p L_t(p)|``
        over ``coords_yx_px`` (default: the patch centres)."""
        coords = self.patch_centres_yx_px if coords_yx_px is None else coords_yx_px
        s = self.shifts_at(coords)  # (t, n, 2)
        return float((s - s.mean(1, keepdim=True)).norm(dim=-1).max()) if s.numel() else 0.0


def _tukey_1d(n: int, device, edge_fraction: float = 0.15) -> torch.Tensor:
    e = max(1, int(round(edge_fraction * n)))
    w = torch.ones(n, device=device)
    ramp = 0.5 * (1 - torch.cos(math.pi * (torch.arange(e, device=device, dtype=torch.float32) + 0.5) / e))
    w[:e] = ramp
    w[n - e :] = ramp.flip(0)
    return w


def _second_difference(n: int, device) -> torch.Tensor:
    """``(max(n−2, 0), n)`` second-difference operator."""
    eye = torch.eye(n, dtype=torch.float64, device=device)
    return eye[:-2] - 2 * eye[1:-1] + eye[2:] if n >= 3 else torch.zeros(0, n, dtype=torch.float64, device=device)


def _fit_model(meas: torch.Tensor, bt: torch.Tensor, m_space: torch.Tensor, control_grid: tuple[int, int],
               smoothness: float, prior_px: float | None = None, n_irls: int = 6,
               noise_corr: torch.Tensor | None = None, area_weights: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Robust fit of ``meas (t, p, 2) ≈ offset_p + Σ_{j,k} bt[t, j] m_space[p, k] C[j, k]``.

    bt: ``(t, J)`` time basis; m_space: ``(p, K)`` spatial basis averaged over each patch window.
    prior_px: expected RMS of the field (px): a Gaussian prior on the field, weighted against the measurement
    noise estimated from the residuals (``σ² · (J / t) / prior² · Σ_t Σ_k |L_t(control point k)|²``), so that
    noise alone (few counts, small patches) fits a small field rather than a large one. With ``area_weights (K,)``
    (the control points' weights in the field's area mean) the local part of the fit is then shrunk by
    :func:`_local_shrinkage` (``noise_corr (p, p)``: correlation of the patches' measurement noise). Returns
    ``(C (J, K, 2), offsets (p, 2), weights (t, p))`` (float32, on meas's device) and κ (1 without area_weights).
    """
    t, p, _ = meas.shape
    J, K = bt.shape[1], m_space.shape[1]
    dev = meas.device
    b64, m64 = bt.to(torch.float64), m_space.to(torch.float64)
    # design: columns [offsets (p) | C (J·K)], rows (t·p)
    a_off = torch.eye(p, dtype=torch.float64, device=dev).repeat(t, 1)  # (t·p, p)
    a_c = torch.einsum("tj,pk->tpjk", b64, m64).reshape(t * p, J * K)
    a = torch.cat([a_off, a_c], 1)
    # penalty: second differences across the control grid (per time power), tiny ridge for identifiability
    ky, kx = control_grid
    dy, dx = _second_difference(ky, dev), _second_difference(kx, dev)
    eye_y, eye_x = torch.eye(ky, dtype=torch.float64, device=dev), torch.eye(kx, dtype=torch.float64, device=dev)
    d_sp = torch.cat([torch.kron(dy, eye_x), torch.kron(eye_y, dx)], 0)  # (·, K)
    r_sp = d_sp.T @ d_sp
    n_cols = p + J * K
    reg = torch.zeros(n_cols, n_cols, dtype=torch.float64, device=dev)
    # Σ_t |curvature of L_t over the control grid|², i.e. of the field itself (not of each time power's
    # coefficients, which may be large and of opposite signs)
    reg[p:, p:] = torch.kron(b64.T @ b64, r_sp) * smoothness
    reg += 1e-6 * t * torch.eye(n_cols, dtype=torch.float64, device=dev)
    y = meas.reshape(t * p, 2).to(torch.float64)
    wts = torch.ones(t * p, dtype=torch.float64, device=dev)
    prior = torch.zeros_like(reg)
    if prior_px:
        # on the field's values at the control points, Σ_groups Σ_k |L(k)|² (scaled by J / t: the groups are not
        # independent draws), so that directions the data barely constrain (control points beyond the outer
        # patch centres, differences between heavily overlapping patches) shrink towards no local motion
        prior[p:, p:] = torch.kron(b64.T @ b64, torch.eye(K, dtype=torch.float64, device=dev)) * (J / t) / prior_px**2
    sigma2 = 0.0  # noise variance per component, from the residuals of the previous round
    for it in range(n_irls):
        aw = a * wts[:, None]
        lhs = aw.T @ a + reg + sigma2 * prior
        x = torch.linalg.solve(lhs, aw.T @ y)  # (n_cols, 2)
        res = (y - a @ x).norm(dim=-1)
        sigma2 = float(res.median() / 1.1774) ** 2  # Rayleigh median of |residual| = 1.1774 σ
        scale = 1.4826 * res.median() * 1.2 + 1e-6  # |residual| of 2D Gaussian noise: median ≈ 1.18 σ
        delta = 1.5 * scale
        new = torch.clamp(delta / res.clamp(min=1e-12), max=1.0)  # Huber weights
        if it >= 2 and float((new - wts).abs().max()) < 1e-3:
            wts = new
            break
        wts = new
    kappa = 1.0
    if area_weights is not None:
        kappa = _local_shrinkage(a, aw, lhs, x, res, b64, m64, area_weights.to(torch.float64), noise_corr)
        c64 = x[p:].reshape(J, K, 2)
        mean = torch.einsum("k,jkc->jc", area_weights.to(torch.float64), c64)[:, None]  # (J, 1, 2) area mean
        c64 = (mean + kappa * (c64 - mean)).reshape(J * K, 2)
        # offsets re-estimated for the shrunk field (weighted mean residual per patch)
        pred = (a[:, p:] @ c64).reshape(t, p, 2)
        w2 = wts.reshape(t, p, 1)
        off = ((y.reshape(t, p, 2) - pred) * w2).sum(0) / w2.sum(0).clamp(min=1e-12)
        x = torch.cat([off, c64], 0)
    c = x[p:].reshape(J, K, 2).to(torch.float32)
    return c, x[:p].to(torch.float32), wts.reshape(t, p).to(torch.float32), kappa


def _local_shrinkage(a: torch.Tensor, aw: torch.Tensor, lhs: torch.Tensor, x: torch.Tensor, res: torch.Tensor,
                     bt: torch.Tensor, m_space: torch.Tensor, area_weights: torch.Tensor,
                     noise_corr: torch.Tensor | None, level: float = 0.99) -> float:
    """Shrinkage factor κ of the local part of a fitted field: 0 unless its energy is significantly above noise, then
    the Wiener / James–Stein gain ``1 − E₀ / E``.

    ``E``: energy of the fitted field's deviation from its area mean over the patch windows,
    ``Σ_{t,p} |L_t(p) − L̄_t|²``; ``E₀``: its expectation if the patch trajectories were noise around the global
    motion, i.e. the same linear estimator ``x = lhs⁻¹ AᵀW y`` applied to noise of variance ``σ²`` (robust, from the
    residuals' median, corrected for the parameters fitted) correlated between overlapping patches as
    ``noise_corr (p, p)`` (None: independent): ``E₀ = 2 σ² tr(C)``, ``C = P lhs⁻¹ AᵀW Σ W A lhs⁻¹ Pᵀ``. Under noise
    alone ``E / E₀`` is distributed about as ``χ²_d / d``, ``d = 2 tr(C)² / tr(C²)``; a field whose energy stays
    below that distribution's ``level`` quantile is consistent with noise (κ = 0); above it, κ is the Wiener gain of
    a field whose energy is ``E − E₀`` above the noise (≈ 1 when it is far larger). All float64; a: ``(t·p, p + J·K)`` design, aw: a times the IRLS weights; bt
    ``(t, J)``, m_space ``(p, K)``, area_weights ``(K,)`` as in :func:`_fit_model`.
    """
    t, J = bt.shape
    p, K = m_space.shape
    n = a.shape[0]
    inv = torch.linalg.inv(lhs)
    loc = torch.einsum("tj,pk->tpjk", bt, m_space - area_weights[None, :]).reshape(n, J * K)
    proj = torch.cat([torch.zeros(n, p, dtype=a.dtype, device=a.device), loc], 1)  # x ↦ deviation at the windows
    energy = float((proj @ x).square().sum())
    corr_aw = aw if noise_corr is None else torch.einsum(
        "pq,tqn->tpn", noise_corr.to(a.dtype), aw.reshape(t, p, -1)).reshape(n, -1)
    gain = proj @ inv  # (t·p, n_cols)
    cov_x = aw.T @ corr_aw  # AᵀW Σ W A
    mix = cov_x @ (gain.T @ gain)  # tr(mix) = tr(C), tr(mix²) = tr(C²), C the deviation's noise covariance / σ²
    trace = float(torch.trace(mix))
    n_par = float(torch.trace(inv @ (aw.T @ a)))  # effective number of parameters fitted
    sigma2 = float(res.median() / 1.1774) ** 2 * n / max(n - n_par, 1.0)  # Rayleigh median of |r| = 1.1774 σ
    e0 = 2 * sigma2 * trace
    if not energy > 0 or not e0 > 0:
        return 0.0 if not energy > 0 else 1.0
    # under noise alone E / E₀ ~ χ²_d / d with d = 2 (tr C)² / tr(C²) (Satterthwaite; two components): below its
    # upper `level` quantile (Wilson–Hilferty) the field is no larger than noise would make it
    d = 2 * trace**2 / max(float(torch.trace(mix @ mix)), 1e-300)
    z = {0.95: 1.645, 0.99: 2.326, 0.999: 3.090}[level]
    q = (1 - 2 / (9 * d) + z * math.sqrt(2 / (9 * d))) ** 3
    if energy < q * e0:
        return 0.0
    return 1.0 - e0 / energy


def _parabolic_offset(cc: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sub-pixel offsets ``(n, 2)`` (y, x) of the maxima ``idx (n,)`` of ``cc (n, h, w)`` (periodic) by a
    parabola through the peak and its two neighbours along each axis (clamped to ±0.5)."""
    n, h, w = cc.shape
    iy, ix = idx // w, idx % w
    rows = torch.arange(n, device=cc.device)

    def at(dy, dx):
        return cc[rows, (iy + dy) % h, (ix + dx) % w]

    c0 = at(0, 0)
    out = []
    for m, p in ((at(-1, 0), at(1, 0)), (at(0, -1), at(0, 1))):
        m = torch.where(torch.isfinite(m), m, c0)
        p = torch.where(torch.isfinite(p), p, c0)
        den = m - 2 * c0 + p
        off = torch.where(den < 0, 0.5 * (m - p) / den.clamp(max=-1e-30), torch.zeros_like(den))
        out.append(off.clamp(-0.5, 0.5))
    return torch.stack(out, -1)


def _patch_layout(h: int, w: int, grid: tuple[int, int], overlap: float = 2.0):
    """Patch windows on a ``(ny, nx)`` grid: boxes ``overlap`` × the cell size, clipped to the frame.

    Returns ``(centres (n, 2) float px, boxes [(y0, x0)], (ph, pw))`` in px of a frame ``(h, w)``.
    """
    ny, nx = grid
    ph = min(h, int(round(overlap * h / ny)))
    pw = min(w, int(round(overlap * w / nx)))
    ph -= ph % 2
    pw -= pw % 2
    boxes, centres = [], []
    for i in range(ny):
        cy = (i + 0.5) * h / ny
        y0 = int(round(min(max(cy - ph / 2, 0), h - ph)))
        for j in range(nx):
            cx = (j + 0.5) * w / nx
            x0 = int(round(min(max(cx - pw / 2, 0), w - pw)))
            boxes.append((y0, x0))
            centres.append((y0 + (ph - 1) / 2, x0 + (pw - 1) / 2))
    return torch.tensor(centres, dtype=torch.float32), boxes, (ph, pw)


def estimate_local_motion(
    small: torch.Tensor,
    global_shifts: torch.Tensor,
    full_shape: tuple[int, int],
    crop_shape: tuple[int, int],
    pixel_size_angstrom: float,
    bfactor_angstrom2: float,
    patch_grid: tuple[int, int] = (5, 5),
    control_grid: tuple[int, int] | None = None,
    time_degree: int = 3,
    smoothness: float = 0.0,
    max_iterations: int = 6,
    max_local_shift_px: float = 12.0,
    patch_size_factor: float = 2.0,
    frame_group: int = 1,
    prior_px: float | None = None,
) -> LocalMotionModel:
    """Per-patch trajectories and the smooth model fitted to them (see the module docstring).

    small: ``(t, hc, wc//2+1)`` low-frequency rfft block of the (unaligned) frames, as
    :func:`cryolive.preprocess.motion.align_movie` keeps it (``crop_shape = (hc, wc)`` of the full
    ``full_shape = (h, w)``); global_shifts: ``(t, 2)`` px. patch_grid: ``(ny, nx)`` patches;
    control_grid: ``(ky, kx)`` spatial control points of the model (default: the patch grid);
    time_degree: polynomial degree in time; smoothness: weight of the control-grid curvature penalty;
    max_local_shift_px: largest residual searched per patch; patch_size_factor: patch side in grid cells
    (2: half-overlapping patches); frame_group: consecutive frames summed per patch measurement;
    prior_px: expected RMS of the local field, px (see ``_fit_model``; None: no prior). Returns a :class:`LocalMotionModel`.
    """
    from .motion import _refine_peaks, _rfft_weights, _separable_phase  # shared numerics of the global aligner

    from .motion import _alignment_crop, _chunk_for, _crop_rfft

    (h, w), (hc, wc) = full_shape, crop_shape
    t = small.shape[0]
    dev = small.device
    control_grid = tuple(control_grid or patch_grid)
    # patches need only the band the (local) B-factor leaves visible: crop further when it is narrower
    hl, wl = _alignment_crop((h, w), pixel_size_angstrom, bfactor_angstrom2)
    if hl < hc or wl < wc:
        hl, wl = min(hl, hc), min(wl, wc)
        small = _crop_rfft(small, hc, hl, wl)
        hc, wc = hl, wl
    sy, sx = h / hc, w / wc  # full px per crop px
    ky_c = torch.fft.fftfreq(hc, device=dev)
    ky_c = torch.cat([ky_c[: hc // 2], ky_c[hc - hc // 2 :]]) * (hc / h)  # cycles per full px of the crop rows
    kx_c = torch.arange(wc // 2 + 1, device=dev, dtype=torch.float32) / w
    # patches in crop pixels
    _, boxes, (ph, pw) = _patch_layout(hc, wc, patch_grid, patch_size_factor)
    n_p = len(boxes)
    win_y, win_x = _tukey_1d(ph, dev), _tukey_1d(pw, dev)
    win = win_y[:, None] * win_x[None, :]
    # consecutive frames summed in groups of `frame_group` (more signal per measurement, less work)
    frame_group = max(1, min(int(frame_group), t // 3))
    group_index = torch.arange(t, device=dev) // frame_group  # (t,)
    n_g = int(group_index[-1]) + 1
    # patch spectra of the globally aligned frames, accumulated per group: (g, p, ph, pw'); frames are brought
    # back to real space a few at a time, so that neither the aligned stack nor all frames' patches exist at once
    fa = torch.zeros(n_g, n_p, ph, pw // 2 + 1, dtype=torch.complex64, device=dev)
    ck = _chunk_for(max(hc * wc * 4, n_p * ph * pw * 4))
    for i in range(0, t, ck):
        img = torch.fft.irfft2(small[i : i + ck] * _separable_phase(global_shifts[i : i + ck], ky_c, kx_c),
                               s=(hc, wc))  # (c, hc, wc)
        patches = torch.stack([img[:, y0 : y0 + ph, x0 : x0 + pw] for (y0, x0) in boxes], 1)  # (c, p, ph, pw)
        del img
        patches -= patches.mean(dim=(-2, -1), keepdim=True)
        patches *= win
        fa.index_add_(0, group_index[i : i + ck], torch.fft.rfft2(patches))
        del patches
    avg = torch.zeros(n_g, t, device=dev)
    avg[group_index, torch.arange(t, device=dev)] = 1.0
    avg = avg / avg.sum(1, keepdim=True)  # (g, t) mean over each group's frames
    pky = torch.fft.fftfreq(ph, device=dev)  # cycles per crop px
    pkx = torch.fft.rfftfreq(pw, device=dev)
    k2 = ((pky[:, None] / sy) ** 2 + (pkx[None, :] / sx) ** 2) / pixel_size_angstrom**2  # 1/Å²
    wgt = torch.exp(-bfactor_angstrom2 * k2 / 4.0)
    wgt[0, 0] = 0.0
    mult = _rfft_weights(ph, pw, dev)
    gy = torch.fft.fftfreq(ph, d=1.0 / ph, device=dev)  # integer lags, crop px
    gx = torch.fft.fftfreq(pw, d=1.0 / pw, device=dev)
    window = ((gy[:, None] * sy) ** 2 + (gx[None, :] * sx) ** 2) <= max_local_shift_px**2
    to_full = torch.tensor([sy, sx], device=dev)

    # model geometry in full px: patch centres and window-averaged spatial basis
    centres = torch.tensor([((y0 + (ph - 1) / 2) * sy, (x0 + (pw - 1) / 2) * sx) for (y0, x0) in boxes],
                           dtype=torch.float32, device=dev)
    kyn, kxn = control_grid
    m_rows = []
    for (y0, x0) in boxes:
        yy = (y0 + torch.arange(ph, device=dev, dtype=torch.float32)) * sy
        xx = (x0 + torch.arange(pw, device=dev, dtype=torch.float32)) * sx
        wy = (catmull_rom_matrix(yy, kyn, h) * win_y[:, None]).sum(0) / win_y.sum()
        wx = (catmull_rom_matrix(xx, kxn, w) * win_x[:, None]).sum(0) / win_x.sum()
        m_rows.append((wy[:, None] * wx[None, :]).reshape(-1))
    m_space = torch.stack(m_rows)  # (p, K)
    # the field's mean over the whole frame as weights of the control points (they sum to 1)
    area_weights = (catmull_rom_matrix(torch.arange(h, device=dev, dtype=torch.float32), kyn, h).mean(0)[:, None]
                    * catmull_rom_matrix(torch.arange(w, device=dev, dtype=torch.float32), kxn, w).mean(0)[None, :]
                    ).reshape(-1)  # (K,)
    # shift errors of overlapping patches are correlated: a patch's shot noise enters its correlation weighted
    # by the window squared (patch and reference both windowed), so ρ_ij = Σ w_i² w_j² / (‖w_i²‖ ‖w_j²‖)
    prof_y = torch.zeros(n_p, hc, device=dev)
    prof_x = torch.zeros(n_p, wc, device=dev)
    for i, (y0, x0) in enumerate(boxes):
        prof_y[i, y0 : y0 + ph] = win_y.square()
        prof_x[i, x0 : x0 + pw] = win_x.square()
    prof_y = prof_y / prof_y.norm(dim=1, keepdim=True)
    prof_x = prof_x / prof_x.norm(dim=1, keepdim=True)
    noise_corr = (prof_y @ prof_y.T) * (prof_x @ prof_x.T)  # (p, p)
    bt_frames = time_basis(t, time_degree, dev)  # (t, J)
    bt = avg @ bt_frames  # (g, J): a group's measurement is the mean of its frames' shifts

    pred = torch.zeros(n_g, n_p, 2, device=dev)  # model residual at the patches, full px
    coeff = torch.zeros(time_degree, kyn * kxn, 2, device=dev)
    offsets = torch.zeros(n_p, 2, device=dev)
    meas = pred
    pck = _chunk_for(n_g * ph * (pw // 2 + 1) * 8)  # patches per chunk of the measurement loop
    n_iter = 0
    for n_iter in range(1, max_iterations + 1):
        # cross power spectra with the leave-one-out references, fa·w·conj(Σ_u a_u − a_t), a_t = fa_t·e_t, written
        # as fa·w·conj(S) − |fa|²·w·conj(e_t) (one pass less over the stack); peak at the patch's residual shift.
        # Patches are independent: a few at a time, so that the temporaries stay small
        new_meas = torch.empty(n_g, n_p, 2, device=dev)
        for j in range(0, n_p, pck):
            ps = slice(j, j + pck)
            fa_p = fa[:, ps]  # (g, c, ph, pw')
            phase = _separable_phase(pred[:, ps] / to_full, pky, pkx)  # (g, c, ph, pw')
            total = (fa_p * phase).sum(0, keepdim=True).conj_physical_().mul_(wgt)  # (1, c, ph, pw')
            cps = fa_p * total
            del total
            power = fa_p.real.square().add_(fa_p.imag.square()).mul_(wgt)  # |fa|²·w (3× faster than abs²)
            cps.sub_(phase.conj_physical_().mul_(power))
            del power
            del phase
            cps = cps.reshape(-1, ph, pw // 2 + 1)
            if n_iter == 1:  # search: integer peak of the correlation map, parabolic sub-pixel offset
                cc = torch.fft.irfft2(cps, s=(ph, pw))
                cc.masked_fill_(~window, -torch.inf)
                idx = cc.flatten(1).argmax(1)
                m = torch.stack([gy[idx // pw], gx[idx % pw]], -1) + _parabolic_offset(cc, idx)
                del cc
            else:  # refine: Newton steps on the band-limited correlation from the previous round's peaks
                m = _refine_peaks(cps, pky, pkx, mult, (meas[:, ps] / to_full).reshape(-1, 2), 1.0, n_steps=2)
            del cps
            new_meas[:, ps] = m.reshape(n_g, -1, 2) * to_full
        meas = new_meas
        coeff, offsets, _, kappa = _fit_model(meas, bt, m_space, control_grid, smoothness, prior_px,
                                          noise_corr=noise_corr, area_weights=area_weights)
        new_pred = torch.einsum("tj,pk,jkc->tpc", bt, m_space, coeff)
        change = float((new_pred - pred).norm(dim=-1).max())
        pred = new_pred
        if n_iter > 1 and change < 0.02:
            break
    return LocalMotionModel(
        coefficients=coeff.reshape(time_degree, kyn, kxn, 2),
        image_shape=(h, w),
        n_frames=t,
        patch_centres_yx_px=centres,
        patch_shifts_yx_px=(meas - offsets[None])[group_index],
        n_iterations=n_iter,
        shrinkage=kappa,
    )


def warp_groups(model: LocalMotionModel, tolerance_px: float) -> list[list[int]]:
    """Consecutive frame groups whose residual fields (at the patch centres) stay within ``tolerance_px`` of
    the group mean; each group is warped once."""
    s = model.shifts_at(model.patch_centres_yx_px).cpu()  # (t, n, 2)
    groups, cur = [], [0]
    for i in range(1, s.shape[0]):
        cand = cur + [i]
        dev = (s[cand] - s[cand].mean(0, keepdim=True)).norm(dim=-1).max()
        if float(dev) <= tolerance_px:
            cur = cand
        else:
            groups.append(cur)
            cur = [i]
    groups.append(cur)
    return groups


def _warp(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """``out(p) = image(p + field(p))`` for ``image (h, w)``, ``field (2, h, w)`` (y, x px), bicubic."""
    h, w = image.shape
    yy = torch.arange(h, device=image.device, dtype=torch.float32)[:, None] + field[0]
    xx = torch.arange(w, device=image.device, dtype=torch.float32)[None, :] + field[1]
    grid = torch.stack([xx * (2.0 / max(w - 1, 1)) - 1.0, yy * (2.0 / max(h - 1, 1)) - 1.0], -1)[None]
    return F.grid_sample(image[None, None], grid, mode="bicubic", padding_mode="border", align_corners=True)[0, 0]


def sum_frames_local(
    frames: torch.Tensor,
    global_shifts: torch.Tensor,
    model: LocalMotionModel | None,
    pixel_size_angstrom: float,
    dose_per_frame: float,
    voltage_kv: float,
    pre_exposure: float = 0.0,
    dose_weighting: bool = True,
    want_plain: bool = True,
    group_tolerance_px: float = 0.2,
    chunk: int = 8,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Aligned sums ``(dose-weighted (h, w) or None, plain (h, w) or None)`` of ``frames (t, h, w)``.

    Frame ``t`` is shifted by ``−global_shifts[t]`` (Fourier phase) and, with a ``model``, warped by its
    residual field ``L_t`` (bicubic, frames grouped as :func:`warp_groups` says). Dose weights are those of
    Grant & Grigorieff (2015): ``q_t(k) · sqrt(T / Σ_t q_t(k)²)`` with ``q_t = dose_filter_2d`` at the frame's
    mid exposure, so each frequency keeps the noise power of the plain sum and the DC term equals it.
    """
    t, h, w = frames.shape
    dev = frames.device
    dose = pre_exposure + dose_per_frame * (torch.arange(t, device=dev, dtype=torch.float32) + 0.5)
    want_dw = dose_weighting
    if not want_dw and not want_plain:
        return None, None
    if want_dw:
        norm = torch.zeros(h, w // 2 + 1, device=dev)
        for i in range(0, t, chunk):
            norm += (dose_filter_2d(dose[i : i + chunk], (h, w), pixel_size_angstrom, voltage_kv) ** 2).sum(0)
        scale = torch.sqrt(t / norm.clamp(min=1e-30))
        del norm
    groups = warp_groups(model, group_tolerance_px) if model is not None else [list(range(t))]
    group_of = torch.empty(t, dtype=torch.long)
    for gi, g in enumerate(groups):
        group_of[g] = gi
    out_dw = torch.zeros(h, w, device=dev) if want_dw else None
    out_plain = torch.zeros(h, w, device=dev) if want_plain else None
    acc_dw = torch.zeros(h, w // 2 + 1, dtype=torch.complex64, device=dev) if want_dw else None
    acc_plain = torch.zeros(h, w // 2 + 1, dtype=torch.complex64, device=dev) if want_plain else None

    def flush(g: list[int]):
        fld, phase = None, None
        if model is not None:
            wt = torch.zeros(t)
            wt[g] = 1.0 / len(g)
            fld = model.field(wt)  # (2, h, w)
            # the field's mean is applied exactly (Fourier phase), only the rest by interpolation, so that a
            # nearly uniform field costs no interpolation blur
            mean = fld.mean(dim=(1, 2))
            phase = phase_shift_2d(-mean, (h, w))
            fld = fld - mean[:, None, None]
            if float(fld.abs().max()) < 0.01:
                fld = None
        for acc, out, sc in ((acc_dw, out_dw, scale if want_dw else None), (acc_plain, out_plain, None)):
            if acc is None:
                continue
            spec = acc * sc if sc is not None else acc
            if phase is not None:
                spec = spec * phase
            img = torch.fft.irfft2(spec, s=(h, w))
            out += _warp(img, fld) if fld is not None else img
            acc.zero_()

    from .motion import _separable_phase

    ky_f = torch.fft.fftfreq(h, device=dev)
    kx_f = torch.fft.rfftfreq(w, device=dev)
    for i in range(0, t, chunk):
        ft = torch.fft.rfft2(frames[i : i + chunk].to(torch.float32))
        ft.mul_(_separable_phase(global_shifts[i : i + chunk].to(torch.float32), ky_f, kx_f))  # shift by −s
        q = dose_filter_2d(dose[i : i + chunk], (h, w), pixel_size_angstrom, voltage_kv) if want_dw else None
        for j in range(ft.shape[0]):
            fi = i + j
            if want_plain:
                acc_plain += ft[j]
            if want_dw:
                acc_dw.add_(ft[j] * q[j])
            last_of_group = fi == t - 1 or int(group_of[fi + 1]) != int(group_of[fi])
            if last_of_group:
                flush(groups[int(group_of[fi])])
    return out_dw, out_plain
