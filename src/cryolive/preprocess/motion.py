"""Motion correction of a movie (full-frame, then local by patches), dose-weighted summation, defect correction.

Conventions (see docs/CONVENTIONS.md): frames are ``(t, h, w)`` float32 tensors of gain-corrected counts,
row 0 first. ``shifts_yx_px[t]`` is the displacement of the specimen in frame ``t`` relative to frame 1
(index 0), ``frame_t(r) ≈ frame_1(r − s_t)``, so frame ``t`` is aligned by shifting it by ``−s_t`` and the
aligned sum lies in frame 1's coordinates.

Method
------
1. Every frame is Fourier transformed once (in chunks); only the low-frequency block that the B-factor
   weighting leaves visible is kept for alignment.
2. Each frame is cross-correlated with the aligned sum of all *other* frames (leave-one-out, so that a
   frame's own shot noise never correlates with itself and pulls shifts towards zero). The cross power
   spectrum is weighted by ``exp(-B k² / 4)`` (``settings.bfactor_angstrom2``), its DC term removed.
3. The integer peak of the correlation map is refined to sub-pixel precision with Newton steps on the
   band-limited correlation function itself (evaluated exactly in Fourier space), so there is no
   interpolation bias of a parabola fit.
4. Steps 2–3 repeat with the updated reference until the shifts change by less than 0.01 px or
   ``settings.max_iterations`` is reached. An optional smoothness prior (``smoothness > 0``) regularises the
   trajectory with a second-difference penalty, useful at very low dose per frame.
5. Local motion (``settings.patch_grid`` other than ``(1, 1)``): per-patch trajectories against leave-one-out
   patch references and a smooth spatio-temporal model fitted robustly to them, iterated to convergence
   (:mod:`cryolive.preprocess.motion_patch`). The global trajectory then becomes the mean motion of the
   whole frame (uniform weight over the area, where the whole-frame correlation weights the strongest features)
   and the model the residual ``L_t(y, x)`` on top of it, zero on average over the frame
   (``MotionResult.local_motion``).
6. The aligned frames are summed plainly and with dose weights (Grant & Grigorieff 2015): frame ``t``
   gets ``q_t(k) · sqrt(T / Σ_t q_t(k)²)``, with ``q_t = ctf.dose_filter_2d`` at the frame's mid exposure,
   so each frequency keeps the noise power of the plain sum and the mean (DC, q = 1) equals the plain sum's.
   Frames are shifted by ``−s_t`` exactly (Fourier phase) and then, with local motion, warped by their residual
   field (bicubic), frames with nearly the same field together.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import MotionSettings
from ..fourier import good_fft_size
from .motion_patch import LocalMotionModel, estimate_local_motion, sum_frames_local

__all__ = [
    "MotionResult",
    "LocalMotionModel",
    "align_movie",
    "tile_power_spectrum",
    "accumulated_motion",
    "detect_hot_pixels",
    "correct_defects",
]

_CHUNK = 8  # frames transformed at once at most (bounds memory for large movies)
_CHUNK_BYTES = 96 * 2**20  # budget of one chunk's temporary stack


def _chunk_for(bytes_per_frame: int) -> int:
    """Frames per chunk so that a temporary stack of ``bytes_per_frame`` each stays within ``_CHUNK_BYTES``."""
    return max(1, min(_CHUNK, _CHUNK_BYTES // max(int(bytes_per_frame), 1)))
_MIN_PATCH_PX = 192  # smallest patch (full-size pixels) worth aligning on its own


@dataclass
class MotionResult:
    """Result of :func:`align_movie`.

    shifts_yx_px: ``(t, 2)`` specimen displacement of every frame relative to frame 1, pixels, (y, x).
    micrograph: ``(h, w)`` aligned, dose-weighted sum (same mean as the plain sum); equals the plain sum
        when dose weighting is switched off.
    micrograph_nodw: ``(h, w)`` aligned plain sum.
    power_spectrum: ``(n, n//2+1)`` power spectrum of the plain sum averaged over half-overlapping tiles
        (:func:`tile_power_spectrum`, ``settings.power_spectrum_tile_px``), or None unless
        ``settings.power_spectrum``.
    accum_motion_total/early/late: RELION's accumulated motion, Å (sum of frame-to-frame displacements of the
        global trajectory; early = displacements while the exposure is ≤ 4 e/Å², late = the rest).
    n_iterations: global alignment iterations used.
    local_motion: the :class:`LocalMotionModel` (residual field on top of ``shifts_yx_px``; its
        ``shifts_at(coords)`` gives ``(t, n, 2)`` px), or None when aligned globally only.
    max_local_deviation_angstrom: largest deviation of the local motion from the frame's mean motion over the
        patch centres and frames, Å (0 without local motion).
    defect_mask: ``(h, w)`` bool, the pixels replaced in every frame (``defects`` of :func:`align_movie`), or None.
    """

    shifts_yx_px: torch.Tensor
    micrograph: torch.Tensor
    micrograph_nodw: torch.Tensor
    power_spectrum: torch.Tensor | None
    accum_motion_total: float
    accum_motion_early: float
    accum_motion_late: float
    n_iterations: int
    local_motion: LocalMotionModel | None = None
    max_local_deviation_angstrom: float = 0.0
    defect_mask: torch.Tensor | None = None

    def shifts_at(self, coords_yx_px: torch.Tensor) -> torch.Tensor:
        """Total specimen displacement ``(t, n, 2)`` (px, y x) at positions ``coords_yx_px (n, 2)`` of frame 1:
        the global trajectory plus the local residual."""
        coords = torch.as_tensor(coords_yx_px, dtype=torch.float32, device=self.shifts_yx_px.device).reshape(-1, 2)
        total = self.shifts_yx_px[:, None, :].expand(-1, coords.shape[0], -1)
        if self.local_motion is None:
            return total.clone()
        return total + self.local_motion.shifts_at(coords).to(total.device)


def _alignment_crop(shape: tuple[int, int], pixel_size_angstrom: float, bfactor: float) -> tuple[int, int]:
    """Even FFT-friendly box ``(hc, wc)`` holding the frequencies where the B weight exceeds ~2 %."""
    h, w = shape
    if bfactor > 0:
        k_cut = math.sqrt(4.0 * math.log(50.0) / bfactor) * pixel_size_angstrom  # cycles/px
    else:
        k_cut = 0.5
    k_cut = min(k_cut, 0.5)
    hc = min(h, good_fft_size(int(math.ceil(2 * k_cut * h))))
    wc = min(w, good_fft_size(int(math.ceil(2 * k_cut * w))))
    hc -= hc % 2
    wc -= wc % 2
    return max(hc, 2), max(wc, 2)


def _crop_rfft(ft: torch.Tensor, h: int, hc: int, wc: int) -> torch.Tensor:
    """Low-frequency block ``(..., hc, wc//2+1)`` of an rfft ``(..., h, w//2+1)``."""
    return torch.cat([ft[..., : hc // 2, : wc // 2 + 1], ft[..., h - hc // 2 :, : wc // 2 + 1]], dim=-2)


def _crop_frequencies(h: int, w: int, hc: int, wc: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequencies (cycles per full-size pixel) of the samples of :func:`_crop_rfft`, each ``(hc, wc//2+1)``."""
    ky_full = torch.fft.fftfreq(h, device=device)
    ky = torch.cat([ky_full[: hc // 2], ky_full[h - hc // 2 :]])
    kx = torch.arange(wc // 2 + 1, device=device, dtype=torch.float32) / w
    return torch.meshgrid(ky, kx, indexing="ij")


def _rfft_weights(hc: int, wc: int, device) -> torch.Tensor:
    """Multiplicity of rfft columns in a full-plane sum: 1 for DC and Nyquist columns, 2 otherwise."""
    m = torch.full((wc // 2 + 1,), 2.0, device=device)
    m[0] = 1.0
    if wc % 2 == 0:
        m[-1] = 1.0
    return m.expand(hc, wc // 2 + 1)


def _separable_phase(s: torch.Tensor, ky1: torch.Tensor, kx1: torch.Tensor) -> torch.Tensor:
    """``exp(+2πi k·s)`` on an rfft grid from 1D frequency vectors: ``s (..., 2)`` → ``(..., ny, nx)``."""
    ay = 2.0 * math.pi * ky1 * s[..., 0, None]  # (..., ny)
    ax = 2.0 * math.pi * kx1 * s[..., 1, None]  # (..., nx)
    ey = torch.polar(torch.ones_like(ay), ay)
    ex = torch.polar(torch.ones_like(ax), ax)
    return ey[..., :, None] * ex[..., None, :]


def _refine_peaks(
    cps: torch.Tensor, ky1: torch.Tensor, kx1: torch.Tensor, mult: torch.Tensor, s0: torch.Tensor, step_px: float,
    n_steps: int = 4,
) -> torch.Tensor:
    """Newton refinement of the maxima of ``f(s) = Σ_k Re(C(k) e^{2πi k·s})``.

    cps: ``(n, ny, nx)`` weighted cross power spectra (rfft layout, ``mult (ny, nx)`` column multiplicities);
    ky1 ``(ny,)``, kx1 ``(nx,)``: frequencies in cycles/px; s0: ``(n, 2)`` starting points (integer-grid
    peaks) in px. Steps are limited to ``step_px`` per iteration; a non-concave point keeps its start.

    The phase is separable per axis, so the value's derivatives ``M[p, q] = Σ_k ky^p kx^q C(k) e^{2πi k·s}``
    (p, q ≤ 2) come from two small batched matrix products, ``(n, 3, ny) @ (n, ny, nx) @ (n, nx, 3)``,
    without any full-size temporary.
    """
    two_pi = 2.0 * math.pi
    s = s0.clone()
    ky1 = ky1.to(torch.float32)
    kx1 = kx1.to(torch.float32)
    mx = mult[0].to(torch.float32) if mult.ndim == 2 else mult.to(torch.float32)  # multiplicity per column
    pow_y = torch.stack([torch.ones_like(ky1), ky1, ky1 * ky1])  # (3, ny)
    pow_x = torch.stack([mx, mx * kx1, mx * kx1 * kx1])  # (3, nx)
    for _ in range(n_steps):
        ay = two_pi * s[:, 0, None] * ky1  # (n, ny)
        ax = two_pi * s[:, 1, None] * kx1  # (n, nx)
        ey = torch.polar(torch.ones_like(ay), ay)[:, None, :] * pow_y  # (n, 3, ny)
        ex = torch.polar(torch.ones_like(ax), ax)[:, None, :] * pow_x  # (n, 3, nx)
        m = torch.bmm(torch.bmm(ey, cps), ex.transpose(1, 2))  # (n, 3, 3)
        gy = -two_pi * m[:, 1, 0].imag
        gx = -two_pi * m[:, 0, 1].imag
        hyy = -(two_pi**2) * m[:, 2, 0].real
        hxx = -(two_pi**2) * m[:, 0, 2].real
        hxy = -(two_pi**2) * m[:, 1, 1].real
        det = hyy * hxx - hxy * hxy
        concave = (hyy < 0) & (det > 0)
        det = torch.where(concave, det, torch.ones_like(det))
        dy = -(hxx * gy - hxy * gx) / det
        dx = -(-hxy * gy + hyy * gx) / det
        d = torch.stack([dy, dx], -1)
        d = torch.where(concave[:, None], d, torch.zeros_like(d))
        norm = d.norm(dim=-1, keepdim=True)
        d = d * torch.clamp(step_px / norm.clamp(min=1e-12), max=1.0)
        s = s + d
        if float(norm.max()) < 1e-3:
            break
    # never wander further than one coarse grid step from the starting point
    off = s - s0
    too_far = off.norm(dim=-1) > 1.5 * step_px
    return torch.where(too_far[:, None], s0, s)


def _smooth_trajectory(shifts: torch.Tensor, smoothness: float) -> torch.Tensor:
    """Penalised least squares ``argmin |x − s|² + λ |D² x|²`` per axis (D² = second difference), ``(t, 2)``."""
    t = shifts.shape[0]
    if smoothness <= 0 or t < 3:
        return shifts
    eye = torch.eye(t, dtype=torch.float64, device=shifts.device)
    d2 = eye[:-2] - 2 * eye[1:-1] + eye[2:]
    a = eye + smoothness * d2.T @ d2
    return torch.linalg.solve(a, shifts.to(torch.float64)).to(shifts.dtype)


def accumulated_motion(
    shifts_yx_px: torch.Tensor, pixel_size_angstrom: float, dose_per_frame: float, pre_exposure: float = 0.0
) -> tuple[float, float, float]:
    """RELION's accumulated motion (total, early, late) in Å from a trajectory ``(t, 2)`` in pixels.

    The displacement between frames ``i-1`` and ``i`` counts as early when the exposure at the start of
    frame ``i`` (``pre_exposure + i·dose_per_frame``) is ≤ 4 e/Å², late otherwise.
    """
    s = shifts_yx_px.detach().to(torch.float64).cpu()
    if s.shape[0] < 2:
        return 0.0, 0.0, 0.0
    step = (s[1:] - s[:-1]).norm(dim=-1) * pixel_size_angstrom  # (t-1,)
    exposure = pre_exposure + dose_per_frame * torch.arange(1, s.shape[0], dtype=torch.float64)
    early = exposure <= 4.0
    return float(step.sum()), float(step[early].sum()), float(step[~early].sum())


def align_movie(
    frames: torch.Tensor,
    pixel_size_angstrom: float,
    dose_per_frame: float,
    voltage_kv: float = 300.0,
    settings: MotionSettings = MotionSettings(),
    pre_exposure: float = 0.0,
    smoothness: float = 0.0,
    max_shift_px: float | None = None,
    device: str | torch.device | None = None,
    defects: Callable[[torch.Tensor], torch.Tensor] | None = None,
    defects_hint: torch.Tensor | None = None,
) -> MotionResult:
    """Align the frames of a movie (globally, then locally by patches) and sum them (dose-weighted and plain).

    frames: ``(t, h, w)`` gain-corrected counts (any real dtype; computed in float32 on ``frames.device``,
        which is the device everything runs on), or an opened movie (:class:`cryolive.io.movies.Movie`, frames
        already gain-corrected counts): it is then decoded on background threads while the first pass
        transforms the frames already read (computed on ``device``, default CPU).
    pixel_size_angstrom: Å/px; dose_per_frame: e/Å² per frame; voltage_kv: kV (for the dose filter);
    pre_exposure: e/Å² received before frame 1.
    settings (:class:`cryolive.config.MotionSettings`): ``bfactor_angstrom2`` (weight ``exp(-B k²/4)`` on the
        cross power spectra), ``max_iterations`` (global), ``patch_grid`` ``(ny, nx)`` (``(1, 1)``: global only),
        ``local_time_degree``, ``local_smoothness``, ``local_max_iterations``, ``max_local_shift_px``,
        ``dose_weighting``, ``power_spectrum`` (also return the tile-averaged power spectrum of the plain sum).
    smoothness: weight λ of a second-difference prior on the global trajectory (0: none; ~1–10 at very low dose).
    max_shift_px: largest global shift searched relative to the reference (default: a quarter of the frame).
    defects: optional function from the sum of all frames ``(h, w)`` to a boolean mask ``(h, w)`` of pixels to
        replace in every frame as :func:`correct_defects` does, before alignment (e.g. :func:`detect_hot_pixels`).
        With an opened movie the sum is accumulated while decoding; afterwards the decoded frames are corrected
        in place and the low-frequency spectra already computed are updated exactly for the sparse change
        (a separable DFT of the changed pixels, or the spectra recomputed when that is cheaper), so the result
        equals aligning the corrected frames. The mask is returned as ``MotionResult.defect_mask``.
    defects_hint: ``(h, w)`` bool, the defects expected (e.g. the previous movie's ``defect_mask``; opened movies
        with ``defects`` only): these pixels are corrected as the frames arrive, so that only the difference from
        the final mask needs the spectra updated. The result is the same with any hint.

    Returns a :class:`MotionResult`; the inputs are not modified.
    """
    movie = None
    if not isinstance(frames, torch.Tensor) and hasattr(frames, "iter_chunks"):
        movie = frames
        dev = torch.device(device if device is not None else "cpu")
    elif frames.ndim != 3:
        raise ValueError(f"align_movie: frames must be (t, h, w), got {tuple(frames.shape)}")
    else:
        dev = frames.device
    if len(frames.shape) != 3:
        raise ValueError(f"align_movie: frames must be (t, h, w), got {tuple(frames.shape)}")
    t, h, w = (int(n) for n in frames.shape)
    if max_shift_px is None:
        max_shift_px = min(h, w) / 4
    hc, wc = _alignment_crop((h, w), pixel_size_angstrom, settings.bfactor_angstrom2)
    ky, kx = _crop_frequencies(h, w, hc, wc, dev)  # cycles/px, (hc, wc')
    mult = _rfft_weights(hc, wc, dev)
    k2 = (ky**2 + kx**2) / pixel_size_angstrom**2  # 1/Å²
    weight = torch.exp(-settings.bfactor_angstrom2 * k2 / 4.0)
    weight[0, 0] = 0.0

    # low-frequency transforms of all frames, (t, hc, wc'): the only stack kept (complex64, a fraction of the
    # movie's size); frames are transformed a few at a time so that no full-size stack is ever built
    small = torch.empty(t, hc, wc // 2 + 1, dtype=torch.complex64, device=dev)
    ck_full = _chunk_for(h * (w // 2 + 1) * 8)
    defect_mask = None
    if movie is not None:
        # decode ahead (threaded) while the frames already read are transformed; the frames are kept for the sum
        buf = torch.empty((t, h, w), dtype=torch.float32, device=dev)
        frame_sum = torch.zeros((h, w), dtype=torch.float32, device=dev) if defects is not None else None
        hint = None
        if frame_sum is not None and defects_hint is not None:
            hint = defects_hint.to(device=dev, dtype=torch.bool)
            hint = hint if bool(hint.any()) else None
        if hint is not None:  # the expected defects are corrected as the frames arrive; their values kept
            hy, hx = torch.nonzero(hint, as_tuple=True)
            hint_values = torch.empty(t, hy.numel(), dtype=torch.float32, device=dev)  # (t, n) before correction
        for s, arr in movie.iter_chunks(max(ck_full, 4), prefetch=1):
            chunk = torch.from_numpy(arr).to(dev)
            n = chunk.shape[0]
            buf[s : s + n] = chunk
            if frame_sum is not None:
                frame_sum += chunk.sum(0)  # the defects are found on the sum of the frames as decoded
            del chunk, arr
            if hint is not None:
                hint_values[s : s + n] = buf[s : s + n, hy, hx]
                _correct_defects_(buf[s : s + n], hint)
            for i in range(0, n, ck_full):
                ft = torch.fft.rfft2(buf[s + i : s + min(i + ck_full, n)])
                small[s + i : s + i + ft.shape[0]] = _crop_rfft(ft, h, hc, wc)
                del ft
        frames = buf
        if frame_sum is not None:
            defect_mask = defects(frame_sum).to(device=dev, dtype=torch.bool)
            del frame_sum
            if hint is not None:
                _update_spectra_for_defects(buf, defect_mask, small, hc, wc, ck_full,
                                            corrected=(hint, hy, hx, hint_values))
            elif bool(defect_mask.any()):
                _update_spectra_for_defects(buf, defect_mask, small, hc, wc, ck_full)
    elif defects is not None:
        defect_mask = defects(frames.sum(0, dtype=torch.float32)).to(device=dev, dtype=torch.bool)
        if bool(defect_mask.any()):
            frames = correct_defects(frames.to(torch.float32), defect_mask)
    for i in range(0, t, ck_full) if movie is None else ():
        ft = torch.fft.rfft2(frames[i : i + ck_full].to(torch.float32))
        small[i : i + ck_full] = _crop_rfft(ft, h, hc, wc)
        del ft
    # integer-grid step of the cropped correlation map in full-size pixels, and its search window
    step_y, step_x = h / hc, w / wc
    gy = torch.fft.fftfreq(hc, d=1.0 / hc, device=dev) * step_y  # (hc,) full px
    gx = torch.fft.fftfreq(wc, d=1.0 / wc, device=dev) * step_x
    window = (gy[:, None] ** 2 + gx[None, :] ** 2) <= max_shift_px**2  # (hc, wc)
    ky1, kx1 = ky[:, 0].contiguous(), kx[0].contiguous()
    ck = _chunk_for(hc * (wc // 2 + 1) * 8)

    shifts = torch.zeros(t, 2, dtype=torch.float32, device=dev)
    n_iter = 0
    local = None
    if t > 1:
        change = math.inf
        for n_iter in range(1, settings.max_iterations + 1):
            # frame t aligned: shift by -s_t; the aligned sum accumulated chunk by chunk
            total = torch.zeros(hc, wc // 2 + 1, dtype=torch.complex64, device=dev)
            for i in range(0, t, ck):
                total += (small[i : i + ck] * _separable_phase(shifts[i : i + ck], ky1, kx1)).sum(0)
            # search the correlation map while the trajectory still moves by more than a fraction of a pixel;
            # afterwards Newton steps from the previous estimates suffice
            search = n_iter == 1 or change > 0.5
            new = torch.empty_like(shifts)
            for i in range(0, t, ck):
                sl = slice(i, i + ck)
                # leave-one-out references Σ_u a_u − a_t; cross power spectrum small_t · conj(ref) · w, peak at +s_t
                cps = (small[sl] * _separable_phase(shifts[sl], ky1, kx1)).neg_().add_(total).conj_physical_()
                cps.mul_(small[sl]).mul_(weight)
                if search:
                    cc = torch.fft.irfft2(cps, s=(hc, wc))
                    cc.masked_fill_(~window, -torch.inf)
                    idx = cc.flatten(1).argmax(1)
                    del cc
                    s0 = torch.stack([gy[idx // wc], gx[idx % wc]], -1)
                else:
                    s0 = shifts[sl]  # the reference lies in frame 1's coordinates: frame t's peak is near s_t
                new[sl] = _refine_peaks(cps, ky1, kx1, mult, s0, max(step_y, step_x))
                del cps
            new = _smooth_trajectory(new, smoothness)
            new = new - new[0:1]
            change = float((new - shifts).norm(dim=-1).max())
            shifts = new
            if change < 0.01:
                break
        del total
        grid = _usable_patch_grid((h, w), tuple(settings.patch_grid))
        if grid[0] * grid[1] > 1 and t >= 3:
            local = estimate_local_motion(
                small, shifts, (h, w), (hc, wc), pixel_size_angstrom,
                settings.local_bfactor_angstrom2 or settings.bfactor_angstrom2,
                patch_grid=grid, time_degree=min(settings.local_time_degree, t - 1),
                smoothness=settings.local_smoothness, max_iterations=settings.local_max_iterations,
                max_local_shift_px=settings.max_local_shift_px, patch_size_factor=settings.patch_size_factor,
                frame_group=settings.local_frame_group or max(1, round(2.0 / max(dose_per_frame, 1e-6))),
                prior_px=(settings.local_prior_angstrom / pixel_size_angstrom) if settings.local_prior_angstrom else None)
            # the global trajectory becomes the mean motion of the whole frame (the whole-frame correlation
            # follows the strongest features instead), the local field the deviation from it
            mean_motion, local = local.area_mean()
            shifts = shifts + mean_motion.to(shifts.dtype)
    del small

    mic, mic_nodw = sum_frames_local(frames, shifts, local, pixel_size_angstrom, dose_per_frame, voltage_kv,
                                     pre_exposure, settings.dose_weighting, want_plain=True,
                                     group_tolerance_px=settings.warp_group_tolerance_px,
                                     chunk=_chunk_for(h * (w // 2 + 1) * 8))
    if mic is None:
        mic = mic_nodw.clone()
    power = tile_power_spectrum(mic_nodw, settings.power_spectrum_tile_px) if settings.power_spectrum else None
    total_m, early_m, late_m = accumulated_motion(shifts, pixel_size_angstrom, dose_per_frame, pre_exposure)
    return MotionResult(
        shifts_yx_px=shifts,
        micrograph=mic,
        micrograph_nodw=mic_nodw,
        power_spectrum=power,
        accum_motion_total=total_m,
        accum_motion_early=early_m,
        accum_motion_late=late_m,
        n_iterations=n_iter,
        local_motion=local,
        max_local_deviation_angstrom=(local.max_deviation_px() * pixel_size_angstrom) if local is not None else 0.0,
        defect_mask=defect_mask,
    )


def _usable_patch_grid(shape: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
    """The patch grid, reduced where patches (twice a grid cell) would be smaller than ``_MIN_PATCH_PX``."""
    h, w = shape
    ny = max(1, min(int(grid[0]), (2 * h) // _MIN_PATCH_PX))
    nx = max(1, min(int(grid[1]), (2 * w) // _MIN_PATCH_PX))
    return ny, nx


def tile_power_spectrum(image: torch.Tensor, tile_px: int = 512) -> torch.Tensor:
    """Power spectrum ``(n, n//2+1)`` (rfft layout) of ``image (h, w)`` averaged over half-overlapping
    ``n × n`` tiles (``n = min(tile_px, h, w)``, even), each with its mean removed."""
    h, w = image.shape
    n = min(int(tile_px), h, w)
    n -= n % 2
    tiles = image.unfold(0, n, n // 2).unfold(1, n, n // 2).reshape(-1, n, n)
    tiles = tiles - tiles.mean(dim=(-2, -1), keepdim=True)
    acc = torch.zeros(n, n // 2 + 1, device=image.device)
    for i in range(0, tiles.shape[0], 16):
        acc += torch.fft.rfft2(tiles[i : i + 16]).abs().square().sum(0)
    return acc / tiles.shape[0]


def _local_median_3x3(image: torch.Tensor, band_rows: int = 256) -> torch.Tensor:
    """Median of the 3×3 neighbourhood (edges replicated) of ``image (h, w)``, in bands of ``band_rows`` rows so
    that the 9-fold stack of neighbours stays small (about 9 × band_rows × w values at a time)."""
    padded = torch.nn.functional.pad(image[None, None], (1, 1, 1, 1), mode="replicate")[0, 0]
    h, w = image.shape
    out = torch.empty_like(image)
    for y0 in range(0, h, band_rows):
        n = min(band_rows, h - y0)
        stack = torch.stack([padded[y0 + dy : y0 + dy + n, dx : dx + w] for dy in range(3) for dx in range(3)], 0)
        out[y0 : y0 + n] = stack.median(0).values
    return out


def detect_hot_pixels(frames_sum: torch.Tensor, n_sigma: float = 6.0) -> torch.Tensor:
    """Boolean mask ``(h, w)`` of hot pixels in a (gain-corrected) sum of frames ``(h, w)``.

    A pixel is hot when it exceeds the median of its 3×3 neighbourhood by more than ``n_sigma`` robust
    standard deviations of that residual (1.4826 × median absolute deviation over the image). Particles
    and other real features span many pixels, so the local median follows them and they are not flagged.
    """
    img = frames_sum.to(torch.float32)
    resid = img - _local_median_3x3(img)
    flat = resid.flatten()
    if flat.numel() > 2_000_000:  # robust scale from a regular subsample
        flat = flat[:: flat.numel() // 1_000_000]
    med = flat.median()
    sigma = 1.4826 * (flat - med).abs().median()
    sigma = torch.clamp(sigma, min=1e-6)
    return (resid - med) > n_sigma * sigma


def correct_defects(frames: torch.Tensor, mask: torch.Tensor, radius_px: int = 2) -> torch.Tensor:
    """Replace the pixels in ``mask (h, w)`` of every frame ``(t, h, w)`` (or one image ``(h, w)``).

    Each flagged pixel gets the mean of the unflagged pixels of the same frame within a
    ``(2·radius_px+1)²`` window (or the frame mean if there are none). Returns a new tensor.
    """
    out = frames.clone()
    if not bool(mask.any()):
        return out
    single = out.ndim == 2
    if single:
        out = out[None]
    _correct_defects_(out, mask, radius_px)
    return out[0] if single else out


def _correct_defects_(frames: torch.Tensor, mask: torch.Tensor, radius_px: int = 2):
    """:func:`correct_defects` in place on ``frames (t, h, w)``, a few frames at a time (bounded temporaries).

    Returns ``(yy, xx, change)``: the flagged pixels' rows and columns ``(n,)`` and the change ``new − old`` of
    their values ``(t, n)``.
    """
    t, h, w = frames.shape
    yy, xx = torch.nonzero(mask, as_tuple=True)  # (n,)
    offs = torch.arange(-radius_px, radius_px + 1, device=frames.device)
    oy, ox = torch.meshgrid(offs, offs, indexing="ij")
    ny = (yy[:, None] + oy.flatten()[None]).clamp(0, h - 1)  # (n, m)
    nx = (xx[:, None] + ox.flatten()[None]).clamp(0, w - 1)
    good = (~mask[ny, nx]).to(frames.dtype)  # (n, m)
    count = good.sum(-1)  # (n,)
    change = torch.empty(t, yy.numel(), dtype=frames.dtype, device=frames.device)
    ck = _chunk_for(max(ny.numel(), 1) * frames.element_size())
    for i in range(0, t, ck):
        out = frames[i : i + ck]
        vals = out[:, ny, nx]  # (c, n, m)
        fill = (vals * good).sum(-1) / count.clamp(min=1)  # (c, n)
        frame_mean = out.flatten(1).mean(1, keepdim=True).expand_as(fill)
        fill = torch.where(count[None] > 0, fill, frame_mean)
        change[i : i + ck] = fill - out[:, yy, xx]
        out[:, yy, xx] = fill
        del vals
    return yy, xx, change


def _sparse_crop_rfft(change: torch.Tensor, yy: torch.Tensor, xx: torch.Tensor, shape: tuple[int, int],
                      hc: int, wc: int, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`_crop_rfft` of ``rfft2`` of images ``(t, h, w)`` that are zero except ``change (t, n)`` at pixels
    ``(yy, xx)``, computed directly: ``Σ_p change_tp e^{-2πi(ky·y_p + kx·x_p)}`` is separable, so pixels sharing
    a row (or column) are first combined along x (or y), then one matrix product per frame does the other axis.
    Phases are exact (integer products reduced modulo the frame size). Returns ``(t, hc, wc//2+1)`` complex64, or
    adds it to ``add_to`` (same shape) in place, chunk by chunk, and returns that."""
    h, w = shape
    dev = change.device
    t = change.shape[0]
    iy = torch.cat([torch.arange(hc // 2, device=dev), torch.arange(h - hc // 2, h, device=dev)])  # (hc,)
    ix = torch.arange(wc // 2 + 1, device=dev)  # (wc',)

    def phase(k: torch.Tensor, r: torch.Tensor, n: int) -> torch.Tensor:  # exp(-2πi k r / n), (len k, len r)
        ang = (k[:, None] * r[None, :]).remainder(n).to(torch.float64) * (-2.0 * math.pi / n)
        return torch.polar(torch.ones_like(ang), ang).to(torch.complex64)

    val = change.to(torch.complex64)
    out = torch.empty(t, hc, wc // 2 + 1, dtype=torch.complex64, device=dev) if add_to is None else add_to
    rows, r_idx = torch.unique(yy, return_inverse=True)
    cols, c_idx = torch.unique(xx, return_inverse=True)
    n = yy.numel()
    if rows.numel() <= cols.numel():
        ex = phase(xx, ix, w)  # (n, wc')
        ey = phase(iy, rows, h)  # (hc, |R|)
        ck = _chunk_for(n * (wc // 2 + 1) * 8 + hc * (wc // 2 + 1) * 8)
        for i in range(0, t, ck):
            part = val[i : i + ck, :, None] * ex  # (c, n, wc')
            g = torch.zeros(part.shape[0], rows.numel(), wc // 2 + 1, dtype=torch.complex64, device=dev)
            g.index_add_(1, r_idx, part)  # pixels of one row combined, (c, |R|, wc')
            if add_to is None:
                out[i : i + ck] = ey @ g
            else:
                out[i : i + ck] += ey @ g
    else:
        ey = phase(iy, yy, h)  # (hc, n)
        ex = phase(cols, ix, w)  # (|C|, wc')
        ck = _chunk_for(n * hc * 8 + hc * (wc // 2 + 1) * 8)
        for i in range(0, t, ck):
            part = val[i : i + ck, None, :] * ey  # (c, hc, n)
            g = torch.zeros(part.shape[0], hc, cols.numel(), dtype=torch.complex64, device=dev)
            g.index_add_(2, c_idx, part)  # pixels of one column combined, (c, hc, |C|)
            if add_to is None:
                out[i : i + ck] = g @ ex
            else:
                out[i : i + ck] += g @ ex
    return out


def _update_spectra_for_defects(frames: torch.Tensor, mask: torch.Tensor, small: torch.Tensor, hc: int, wc: int,
                                chunk: int, corrected=None) -> None:
    """Correct the defects ``mask`` of ``frames (t, h, w)`` in place and bring their cropped spectra ``small``
    (computed before) up to date: by the sparse DFT of the change, or by transforming the frames again when that
    costs less (many defect rows and columns).

    ``corrected``: ``(hint, hy, hx, values)`` when the frames (and spectra) already had the pixels of ``hint``
    corrected, ``values (t, n)`` being their values before; those are restored first, and only pixels whose value
    changes in the end enter the update (none when ``hint`` equals ``mask``).
    """
    t, h, w = frames.shape
    if corrected is None:
        yy, xx, change = _correct_defects_(frames, mask)
    else:
        hint, hy, hx, values = corrected
        yy, xx = torch.nonzero(mask | hint, as_tuple=True)
        before = frames[:, yy, xx]  # (t, n) as transformed
        frames[:, hy, hx] = values
        if bool(mask.any()):
            _correct_defects_(frames, mask)
        change = frames[:, yy, xx] - before
        moved = (change != 0).any(0)
        yy, xx, change = yy[moved], xx[moved], change[:, moved]
        if yy.numel() == 0:
            return
    m = min(int(torch.unique(yy).numel()), int(torch.unique(xx).numel()))
    sparse_flops = 8.0 * hc * (wc // 2 + 1) * m  # per frame: one complex matrix product over m rows/columns
    fft_flops = 2.5 * h * w * math.log2(h * w)  # per frame: a real 2D FFT
    if sparse_flops <= _SPARSE_DFT_ADVANTAGE * fft_flops:
        _sparse_crop_rfft(change, yy, xx, (h, w), hc, wc, add_to=small)
        return
    for i in range(0, t, chunk):
        ft = torch.fft.rfft2(frames[i : i + chunk])
        small[i : i + chunk] = _crop_rfft(ft, h, hc, wc)
        del ft


#: a complex matrix product runs this many times more flops per second than an FFT (choice of the defect update)
_SPARSE_DFT_ADVANTAGE = 2.0
