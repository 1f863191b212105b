"""Defocus landscape (stage tilt) and relative ice thickness of a micrograph, from its power spectrum.

:func:`estimate_ctf_patches` fits the mean defocus of a grid of patches with the astigmatism fixed to the
global fit (:func:`cryolive.preprocess.ctf_fit.estimate_ctf`), then a robust plane through them::

    defocus(x, y) = d0 + a·(x − w/2) + b·(y − h/2)        (Å; x = column, y = row, pixels)

The plane gives the stage tilt ``atan(|(a, b)| / pixel_size)`` (degrees, ≥ 0) and the tilt axis angle φ
(degrees from the X axis, in [0, 360)) with the convention of :mod:`cryolive.simulate.movies`: the defocus
increases along the direction ``(−sin φ, cos φ)`` in (x, y). The returned :class:`CTFLandscape` is callable,
``landscape(coords_yx_px (n, 2)) -> (n,)`` defocus offset in Å relative to the global fit, which is taken as the
defocus at the micrograph centre (the spectrum of a symmetric plane averages to its centre value); pass it to
:func:`cryolive.preprocess.extraction.per_particle_defocus`.

Method per patch: the patch (``2h/ny × 2w/nx`` pixels, twice the grid cell, so neighbours overlap) gives a
power spectrum (:func:`average_power_spectrum_2d`; by default one tapered tile of the whole patch); it is
flattened by a smooth radial curve and scored, as in the global fit, by the R² of ``B(k) + E(k)·CTF²`` over the
band ``[settings.min_resolution, max(global fit resolution, settings.max_resolution)]``, for trial mean defoci
``global ± search_range_angstrom`` (steps of ≤ π/8 phase at the band's edge), then refined by a bounded 1D
minimisation. Patches whose best R² is below a quarter of the median patch's, or which disagree with the plane (beyond 3.5 robust standard
deviations, iteratively) are left out of the plane fit.

:func:`estimate_ice_thickness` gives a *relative* ice thickness: the excess power in the band of the
amorphous-water ring (0.25–0.29 Å⁻¹, ≈ 3.7 Å) over the neighbouring lower band (0.20–0.23 Å⁻¹), divided by the
squared mean of the image (so it is the fractional-contrast power of the ring, independent of the dose for
shot-noise-limited counting data), in the spirit of Rheinberger et al. (2021) Acta Cryst D 77:565. It ranks
micrographs of one dataset by thickness; it is not in Å. NaN when Nyquist does not reach the ring (pixel >
1.7 Å).

Example::

    glob = estimate_ctf(mic_nodw, 1.0, 300, 2.7, 0.1)
    land = estimate_ctf_patches(mic_nodw, 1.0, 300, 2.7, 0.1, global_result=glob)
    land.stage_tilt_deg, land.tilt_axis_deg
    du, dv, da = per_particle_defocus(coords_yx, glob, landscape=land)
    ice = estimate_ice_thickness(mic_nodw, 1.0).relative_thickness
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from ..config import CTFSettings
from ..ctf import electron_wavelength_angstrom
from ..fourier import frequency_grid_2d
from .ctf_fit import CTFResult, _LinearFit, _legendre_basis, average_power_spectrum_2d, estimate_ctf

__all__ = ["CTFLandscape", "IceEstimate", "SpecimenAssessment", "assess_specimen", "estimate_ctf_patches",
           "estimate_ice_thickness", "fit_defocus_plane"]

_MIN_RELATIVE_PATCH_R2 = 0.25  # patches whose best R² is below this fraction of the median are not used
_PATCH_ENLARGE = 2.0  # patch side / grid cell side: neighbouring patches overlap (more pixels, finer rings)


@dataclass
class CTFLandscape:
    """Defocus over a micrograph: per-patch fits and the plane through them.

    - ``patch_centres_yx_px (m, 2)``, ``patch_defocus_angstrom (m,)`` mean defocus, ``patch_score (m,)`` R²,
      ``patch_used (m,)`` bool (in the final plane fit);
    - plane ``defocus = plane_d0_angstrom + gradient_xy[0]·(x − w/2) + gradient_xy[1]·(y − h/2)``, gradient in
      Å/px; ``stage_tilt_deg`` ≥ 0; ``tilt_axis_deg`` in [0, 360) (defocus increases along (−sin φ, cos φ));
    - ``reference_defocus_angstrom``: the global mean defocus the offsets are relative to;
    - ``image_shape (h, w)``, ``pixel_size_angstrom``.
    """

    patch_centres_yx_px: np.ndarray
    patch_defocus_angstrom: np.ndarray
    patch_score: np.ndarray
    patch_used: np.ndarray
    plane_d0_angstrom: float
    gradient_xy: tuple[float, float]
    stage_tilt_deg: float
    tilt_axis_deg: float
    reference_defocus_angstrom: float
    image_shape: tuple[int, int]
    pixel_size_angstrom: float

    def __call__(self, coords_yx_px) -> torch.Tensor:
        """Defocus offset (Å, positive = more underfocus) at ``coords_yx_px (n, 2)`` → ``(n,)``: the plane's slope
        only, relative to the micrograph centre (where the global fit applies)."""
        c = torch.as_tensor(coords_yx_px, dtype=torch.float32).reshape(-1, 2)
        h, w = self.image_shape
        a, b = self.gradient_xy
        return a * (c[:, 1] - w / 2) + b * (c[:, 0] - h / 2)


@dataclass
class IceEstimate:
    """Relative ice thickness (dimensionless, ranks micrographs; NaN when Nyquist misses the water ring).

    ``ring_ratio``: mean power in the ring band / in the reference band. ``flag``: "ok", "thick_ice" (relative
    thickness above ``thick_threshold``), "no_ice_ring" (no excess power in the ring: carbon, empty hole or a
    very thin layer), or "not_measurable".
    """

    relative_thickness: float
    ring_ratio: float
    flag: str


def fit_defocus_plane(centres_yx_px: np.ndarray, defocus: np.ndarray, image_shape: tuple[int, int],
                      weights: np.ndarray | None = None, n_iter: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Robust least-squares plane ``d0 + a·(x − w/2) + b·(y − h/2)`` through ``defocus (m,)`` at ``centres (m, 2)``.

    Iteratively refits without points farther than 3.5 robust standard deviations (1.4826 × MAD, at least
    20 Å) from the plane. Returns ``(coef [d0, a, b], used (m,) bool)``.
    """
    h, w = image_shape
    c = np.asarray(centres_yx_px, dtype=np.float64)
    d = np.asarray(defocus, dtype=np.float64)
    wt = np.ones_like(d) if weights is None else np.asarray(weights, dtype=np.float64)
    x = np.stack([np.ones_like(d), c[:, 1] - w / 2, c[:, 0] - h / 2], -1)
    used = np.isfinite(d) & (wt > 0)
    coef = np.array([np.nanmedian(d) if used.any() else np.nan, 0.0, 0.0])
    for _ in range(n_iter):
        if used.sum() < 3:
            break
        sw = np.sqrt(wt[used])
        coef = np.linalg.lstsq(x[used] * sw[:, None], d[used] * sw, rcond=None)[0]
        res = d - x @ coef
        sigma = max(20.0, 1.4826 * float(np.median(np.abs(res[used] - np.median(res[used])))))
        new = np.isfinite(d) & (wt > 0) & (np.abs(res) <= 3.5 * sigma)
        if np.array_equal(new, used):
            break
        used = new
    return coef, used


def _patch_fitter(pixel_size, voltage_kv, cs_mm, q, k_lo, k_hi, n, device):
    """Frequency-band quantities of an ``(n, n//2+1)`` spectrum: returns ``prepare(ps) -> (y, bg, env)`` and the
    band geometry ``(k², cos 2θ, sin 2θ)``."""
    ky, kx = frequency_grid_2d((n, n), pixel_size, True, device)
    k = torch.sqrt(ky**2 + kx**2)
    half = torch.ones_like(k, dtype=torch.bool)
    half[n // 2 + 1 :, 0] = False
    half[n // 2 + 1 :, -1] = False
    band = (k >= k_lo) & (k <= k_hi) & half
    kb = k[band]
    u = (2 * (kb - k_lo) / (k_hi - k_lo) - 1).clamp(-1.5, 1.5)
    log_basis = _legendre_basis(u, 6)
    theta = torch.atan2(ky[band], kx[band])
    geometry = (kb**2, torch.cos(2 * theta), torch.sin(2 * theta))
    bg, env = _legendre_basis(u, 4), _legendre_basis(u, 3)

    def prepare(ps: torch.Tensor) -> torch.Tensor:
        p = ps[band]
        coef = torch.linalg.lstsq(log_basis, torch.log(p.clamp(min=1e-30))[:, None]).solution
        return p / torch.exp((log_basis @ coef)[:, 0])

    return prepare, geometry, bg, env


def estimate_ctf_patches(
    image: torch.Tensor,
    pixel_size_angstrom: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    settings: CTFSettings = CTFSettings(),
    global_result: CTFResult | None = None,
    n_patches: tuple[int, int] | None = None,
    search_range_angstrom: float | None = None,
    patch_tile_px: int | None = None,
) -> CTFLandscape:
    """Defocus landscape of ``image (h, w)`` (non-dose-weighted sum, counts) on an ``n_patches = (ny, nx)`` grid.

    pixel_size_angstrom: Å/px; voltage_kv: kV; cs_mm: mm; amplitude_contrast: fraction; settings: the fit band
    and tile size of the global fit; global_result: the global :class:`CTFResult` (fitted here if None; its
    astigmatism and angle are kept fixed for the patches). n_patches: grid (rows, columns), default
    ``settings.landscape_patches``. search_range_angstrom: ± range of the per-patch search around the global mean
    defocus, default ``settings.landscape_search_range_angstrom``. patch_tile_px: tile size of the patch spectra (default and at most: the patch, one tapered tile,
    which keeps the dense Thon rings of high defocus resolved).
    Returns a :class:`CTFLandscape` (see the module docstring for the plane and angle conventions).
    """
    n_patches = tuple(settings.landscape_patches if n_patches is None else n_patches)
    if search_range_angstrom is None:
        search_range_angstrom = settings.landscape_search_range_angstrom
    if global_result is None:
        global_result = estimate_ctf(image, pixel_size_angstrom, voltage_kv, cs_mm, amplitude_contrast, settings)
    img = image.to(torch.float32)
    dev = img.device
    h, w = img.shape[-2:]
    ny, nx = n_patches
    ph_, pw_ = h / ny, w / nx
    size_y, size_x = min(h, int(round(_PATCH_ENLARGE * ph_))), min(w, int(round(_PATCH_ENLARGE * pw_)))
    tile = min(patch_tile_px or max(size_y, size_x), size_y, size_x)
    tile -= tile % 2
    lam = electron_wavelength_angstrom(voltage_kv)
    cs = cs_mm * 1e7
    q = amplitude_contrast
    k_nyq = 0.5 / pixel_size_angstrom
    fit_res = global_result.max_resolution_angstrom
    max_res = max(settings.max_resolution_angstrom, 2.2 * pixel_size_angstrom,
                  fit_res if math.isfinite(fit_res) else 0.0)
    k_hi = min(1.0 / max_res, 0.95 * k_nyq)
    k_lo = min(1.0 / settings.min_resolution_angstrom, 0.5 * k_hi)
    prepare, (k2, cos2, sin2), bg, env = _patch_fitter(pixel_size_angstrom, voltage_kv, cs_mm, q, k_lo, k_hi,
                                                       tile, dev)
    mean0 = 0.5 * (global_result.defocus_u + global_result.defocus_v)
    astig = global_result.defocus_u - global_result.defocus_v
    ang = math.radians(global_result.defocus_angle_deg)
    a1, a2 = astig * math.cos(2 * ang), astig * math.sin(2 * ang)
    ast_term = 0.5 * (a1 * cos2 + a2 * sin2)  # (p,) Å
    sq = math.sqrt(1 - q * q)
    phase0 = math.radians(global_result.phase_shift_deg)

    def ctf2(mean_df: torch.Tensor) -> torch.Tensor:  # (m,) → (m, p)
        g = math.pi * lam * (mean_df[:, None] + ast_term) * k2 - 0.5 * math.pi * cs * lam**3 * k2**2 + phase0
        return (sq * torch.sin(g) + q * torch.cos(g)) ** 2

    step = min(100.0, 1.0 / (8 * lam * k_hi**2))
    lo = max(settings.min_defocus_angstrom, mean0 - search_range_angstrom)
    trials = torch.arange(lo, mean0 + search_range_angstrom + step, step, device=dev, dtype=torch.float32)
    centres, dfs, scores = [], [], []
    for iy in range(ny):
        cy = (iy + 0.5) * ph_
        y0 = int(round(min(max(cy - size_y / 2, 0), h - size_y)))
        for ix in range(nx):
            cx = (ix + 0.5) * pw_
            x0 = int(round(min(max(cx - size_x / 2, 0), w - size_x)))
            ps = average_power_spectrum_2d(img[y0 : y0 + size_y, x0 : x0 + size_x], tile)
            y = prepare(ps)
            fit = _LinearFit(y, bg, env)
            r2 = torch.cat([fit.score(ctf2(trials[i : i + 128])) for i in range(0, len(trials), 128)])
            j = int(r2.argmax())
            d_best = float(trials[j])

            def neg(df, fit=fit):
                return -float(fit.score(ctf2(torch.tensor([df], device=dev, dtype=torch.float32)))[0])

            res = minimize_scalar(neg, bounds=(d_best - step, d_best + step), method="bounded",
                                  options=dict(xatol=1.0))
            centres.append((y0 + size_y / 2, x0 + size_x / 2))
            dfs.append(float(res.x) if -res.fun >= float(r2[j]) else d_best)
            scores.append(max(-float(res.fun), float(r2[j])))
    centres = np.array(centres)
    dfs = np.array(dfs)
    scores = np.array(scores)
    good = scores >= max(0.0, _MIN_RELATIVE_PATCH_R2 * float(np.median(scores)))
    coef, used = fit_defocus_plane(centres, dfs, (h, w), weights=good.astype(np.float64))
    a, b = float(coef[1]), float(coef[2])
    grad = math.hypot(a, b)
    tilt = math.degrees(math.atan(grad / pixel_size_angstrom))
    axis = math.degrees(math.atan2(-a, b)) % 360.0
    return CTFLandscape(
        patch_centres_yx_px=centres, patch_defocus_angstrom=dfs, patch_score=scores, patch_used=used,
        plane_d0_angstrom=float(coef[0]), gradient_xy=(a, b), stage_tilt_deg=tilt, tilt_axis_deg=axis,
        reference_defocus_angstrom=mean0, image_shape=(int(h), int(w)), pixel_size_angstrom=float(pixel_size_angstrom),
    )


RING_BAND_INV_ANGSTROM = (0.25, 0.29)
OUTER_BAND_INV_ANGSTROM = (0.31, 0.35)


def estimate_ice_thickness(
    image: torch.Tensor,
    pixel_size_angstrom: float,
    tile_size_px: int = 512,
    power_spectrum: torch.Tensor | None = None,
    thick_threshold: float = float("inf"),
    no_ring_threshold: float = 0.0,
) -> IceEstimate:
    """Relative ice thickness of ``image (h, w)`` (non-dose-weighted sum of gain-corrected counts).

    ``(P_ring − mean) / mean²``: ``P_ring`` the mean power (:func:`average_power_spectrum_2d`, or
    ``power_spectrum`` if given, rfft layout) in the water-ring band 0.25–0.29 Å⁻¹, ``mean`` the mean count per
    pixel, which is the shot-noise power of counting data. The result is the fractional-contrast power of the
    ring: the ice's scattering (∝ thickness, × the inelastic loss) independent of the dose. Dimensionless; only
    its ranking within a dataset (same detector and optics) is meaningful. ``ring_ratio`` (diagnostic): ring
    power over the power in 0.31–0.35 Å⁻¹ (NaN beyond Nyquist). ``thick_threshold`` / ``no_ring_threshold`` set
    the flag (uncalibrated defaults: never "thick_ice"; "no_ice_ring" when the ring has no power above shot
    noise). NaN with flag "not_measurable" when Nyquist (0.5/pixel) does not reach the ring band (pixel > 1.7 Å).
    """
    nan = float("nan")
    if 0.5 / pixel_size_angstrom < RING_BAND_INV_ANGSTROM[1] * 1.01:
        return IceEstimate(nan, nan, "not_measurable")
    ps = average_power_spectrum_2d(image, tile_size_px) if power_spectrum is None else power_spectrum
    n = ps.shape[-2]
    ky, kx = frequency_grid_2d((n, n), pixel_size_angstrom, True, ps.device)
    k = torch.sqrt(ky**2 + kx**2)

    def band_mean(lo_hi):
        m = (k >= lo_hi[0]) & (k <= lo_hi[1])
        return float(ps[m].mean()) if bool(m.any()) else nan

    ring = band_mean(RING_BAND_INV_ANGSTROM)
    outer = band_mean(OUTER_BAND_INV_ANGSTROM) if 0.5 / pixel_size_angstrom >= OUTER_BAND_INV_ANGSTROM[1] else nan
    mean = float(image.to(torch.float32).mean())
    if not mean > 0:
        return IceEstimate(nan, nan, "not_measurable")
    rel = (ring - mean) / mean**2
    flag = "thick_ice" if rel > thick_threshold else ("no_ice_ring" if rel <= no_ring_threshold else "ok")
    return IceEstimate(rel, ring / outer, flag)


LOW_BAND_INV_ANGSTROM = (1 / 40, 1 / 12)


@dataclass
class SpecimenAssessment:
    """Carbon / thick-ice flags of a micrograph (see :func:`assess_specimen`).

    - ``ice_ring_power``: excess power of the water ring over shot noise as a fractional-contrast power density,
      Å² (``relative_thickness × pixel²``: independent of dose and pixel size); NaN if Nyquist misses the ring;
    - ``carbon_heterogeneity``: mean of the top decile of tile powers in the 12–40 Å band over the median tile;
    - ``flags``: a tuple of "carbon", "thick_ice" (empty when neither); ``flag``: "ok" or the flags joined by "+".
    """

    ice_ring_power: float
    carbon_heterogeneity: float
    flags: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "+".join(self.flags) if self.flags else "ok"


def assess_specimen(
    image: torch.Tensor,
    pixel_size_angstrom: float,
    settings: CTFSettings = CTFSettings(),
    ice: IceEstimate | None = None,
    tile_angstrom: float = 128.0,
) -> SpecimenAssessment:
    """Flag a micrograph ``(h, w)`` (non-dose-weighted sum of gain-corrected counts) that shows a carbon film or
    thick ice. A heuristic, from the image and its spectrum:

    - **carbon**: a carbon film scatters far more than vitreous ice at low resolution (its structure factor stays
      ~0.3 at low q, where water's is ~0.06, and carbon is twice as dense in atoms), and it covers a contiguous
      region with no particles in it. The image is band-passed to 12–40 Å (where ice contributes little and the
      film's Thon rings and texture are strong), cut into tiles of ``tile_angstrom``, and the fractional power of
      each tile is measured; ``carbon_heterogeneity`` = mean of the top decile of tiles / median tile. A film
      over 10–50 % of the image gives ≥ ``settings.carbon_heterogeneity_threshold`` (default 1.35; micrographs of
      particles, junk aggregates and ice of 200–1200 Å give 1.05–1.2 in the simulator). A micrograph entirely on
      carbon has no contrast between tiles and is not flagged by this rule.
    - **thick_ice**: the water ring (3.7 Å) grows with the amount of water in the beam (Rheinberger et al. 2021):
      ``ice_ring_power`` ≥ ``settings.thick_ice_ring_power`` (default 0.045 Å², reached near 900 Å of ice in the
      simulator, a perfect counting detector). A real detector's DQE at 3.7 Å lowers the measure, so the
      threshold is per detector: calibrate it on a few micrographs of known thickness or set it from the
      session's distribution (the measure ranks exposures either way).
    """
    img = image.to(torch.float32)
    px = float(pixel_size_angstrom)
    if ice is None:
        ice = estimate_ice_thickness(img, px, settings.tile_size_px)
    ring_power = ice.relative_thickness * px * px
    h, w = img.shape[-2:]
    t = max(8, int(round(tile_angstrom / px)))
    ny, nx = h // t, w // t
    het = float("nan")
    if ny * nx >= 16 and 0.5 / px > LOW_BAND_INV_ANGSTROM[1]:
        ky, kx = frequency_grid_2d((h, w), px, True, img.device)
        k = torch.sqrt(ky**2 + kx**2)
        band = ((k >= LOW_BAND_INV_ANGSTROM[0]) & (k <= LOW_BAND_INV_ANGSTROM[1])).to(torch.float32)
        bp = torch.fft.irfft2(torch.fft.rfft2(img) * band, s=(h, w))
        tiles = bp[: ny * t, : nx * t].reshape(ny, t, nx, t).pow(2).mean(dim=(1, 3)).flatten()  # (ny·nx,)
        ordered = tiles.sort().values
        top = ordered[-max(1, len(ordered) // 10):].mean()
        het = float(top / ordered.median().clamp(min=1e-30))
    flags = []
    if het >= settings.carbon_heterogeneity_threshold:
        flags.append("carbon")
    if ring_power >= settings.thick_ice_ring_power:
        flags.append("thick_ice")
    return SpecimenAssessment(float(ring_power), het, tuple(flags))
