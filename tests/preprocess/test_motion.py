"""Global motion correction against ground truth on synthetic Poisson movies (~1 count/px/frame)."""

from __future__ import annotations

import math

import pytest
import torch

from _synthetic_movies import drift_trajectory, simulate_movie
from cryolive.config import MotionSettings
from cryolive.fourier import fourier_ring_correlation
from cryolive.preprocess.motion import accumulated_motion, align_movie, correct_defects, detect_hot_pixels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rms_error(est: torch.Tensor, truth: torch.Tensor) -> float:
    return float((est.cpu() - truth).norm(dim=-1).pow(2).mean().sqrt())


@pytest.mark.parametrize("device", DEVICES)
def test_drift_recovered_1024_at_one_count_per_pixel(device):
    """The bar: 1024², 24 frames, 1 Å/px, 1 e/Å²/frame Poisson → global drift RMS error < 0.5 px (aim 0.25)."""
    frames, truth = simulate_movie(shape=(1024, 1024), n_frames=24, seed=2)  # no local motion here
    assert abs(float(frames.mean()) - 1.0) < 0.05  # really ~1 count per pixel per frame
    res = align_movie(frames.to(device), 1.0, 1.0)
    assert res.shifts_yx_px.shape == (24, 2) and res.shifts_yx_px.device.type == device
    assert torch.all(res.shifts_yx_px[0] == 0)
    err = rms_error(res.shifts_yx_px, truth["shifts_yx_px"])
    assert err < 0.35, err
    # an unaligned answer would be far off: the drift itself is ~12 px
    assert rms_error(torch.zeros(24, 2), truth["shifts_yx_px"]) > 5


@pytest.mark.parametrize(
    "pixel_size, total_px, angle_deg, seed",
    [(1.5, 25.0, -120.0, 3), (0.8, 6.0, 70.0, 4), (1.0, 2.0, 10.0, 5)],
)
def test_drift_recovered_across_pixel_sizes_and_drift(pixel_size, total_px, angle_deg, seed):
    """512² movies: large and small drifts, 0.8–1.5 Å/px (counts/px scale with pixel area)."""
    shifts = drift_trajectory(20, total_px=total_px, angle_deg=angle_deg, seed=seed)
    frames, truth = simulate_movie(shape=(512, 512), n_frames=20, pixel_size_angstrom=pixel_size,
                                   shifts_yx_px=shifts, seed=seed)
    # the whole-frame aligner (no local motion in these movies; the patch model's noise is measured in
    # test_motion_local.py::test_no_local_motion_gives_a_small_field)
    res = align_movie(frames, pixel_size, 1.0, settings=MotionSettings(patch_grid=(1, 1)))
    err = rms_error(res.shifts_yx_px, truth["shifts_yx_px"])
    assert err < 0.5, err


def test_shift_convention_specimen_displacement():
    """frame_t(r) = frame_1(r − s_t) (content moved by +s_t) must give shifts_yx_px[t] = s_t, and the
    aligned sum must lie in frame 1's coordinates."""
    g = torch.Generator().manual_seed(0)
    base = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 256, 256, generator=g), 5, 1, 2)[0, 0] * 40
    s = torch.tensor([[0, 0], [3, -2], [5, -4], [6, -7], [8, -9]])
    frames = torch.stack([torch.roll(base, (int(a), int(b)), dims=(0, 1)) for a, b in s]).float()
    res = align_movie(frames, 1.0, 1.0, settings=MotionSettings(dose_weighting=False))
    assert torch.allclose(res.shifts_yx_px, s.float(), atol=0.05), res.shifts_yx_px
    assert torch.allclose(res.micrograph_nodw, 5 * base, atol=1e-2 * float(base.max()))
    assert torch.allclose(res.micrograph, res.micrograph_nodw)


def test_sums_frc_and_dose_weighting():
    """Aligned sum beats the unaligned sum against the noiseless truth; dose weighting keeps the mean
    and the noise power, and raises the high-frequency FRC (later frames are damaged)."""
    frames, truth = simulate_movie(shape=(512, 512), n_frames=24, seed=6)
    res = align_movie(frames, 1.0, 1.0)
    clean = truth["micrograph"]
    frc_aligned = fourier_ring_correlation(res.micrograph_nodw, clean)
    frc_unaligned = fourier_ring_correlation(frames.sum(0), clean)
    frc_dw = fourier_ring_correlation(res.micrograph, clean)
    mid = slice(40, 160)  # 12.8–3.2 Å
    assert float(frc_aligned[mid].mean()) > float(frc_unaligned[mid].mean()) + 0.1
    assert math.isclose(float(res.micrograph.mean()), float(res.micrograph_nodw.mean()), rel_tol=1e-4)
    assert math.isclose(float(res.micrograph_nodw.mean()), float(frames.sum(0).mean()), rel_tol=1e-4)
    high = slice(50, 150)  # 10–3.4 Å: damage matters (measured gain ≈ 0.014 over 3 seeds)
    assert float(frc_dw[high].mean()) > float(frc_aligned[high].mean()) + 0.005
    # noise power per frequency stays that of the plain sum (DW at most slightly below); measured on the
    # global-only sums, exact Fourier shifts (the local warp's interpolation damps the plain sum's high
    # frequencies, mostly noise, a little more than the dose-weighted sum's)
    glob = align_movie(frames, 1.0, 1.0, settings=MotionSettings(patch_grid=(1, 1)))
    assert glob.local_motion is None
    assert 0.7 < float(glob.micrograph.var() / glob.micrograph_nodw.var()) <= 1.01


def test_inputs_not_modified_and_accumulated_motion():
    frames, truth = simulate_movie(shape=(256, 256), n_frames=10, seed=7)
    copy = frames.clone()
    res = align_movie(frames, 1.0, 1.0, settings=MotionSettings(max_iterations=3))
    assert torch.equal(frames, copy)
    assert 1 <= res.n_iterations <= 3
    total, early, late = accumulated_motion(res.shifts_yx_px, 1.0, 1.0)
    assert (res.accum_motion_total, res.accum_motion_early, res.accum_motion_late) == (total, early, late)
    # hand-computed: steps of 3-4-5 triangles (5 Å each at 1 Å/px), dose 2 e/Å²: first two steps ≤ 4 e/Å²
    tr = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0], [9.0, 12.0], [12.0, 16.0]])
    total, early, late = accumulated_motion(tr, 1.0, 2.0)
    assert (total, early, late) == pytest.approx((20.0, 10.0, 10.0))
    total, early, late = accumulated_motion(tr, 0.5, 2.0, pre_exposure=3.0)
    assert (total, early, late) == pytest.approx((10.0, 0.0, 10.0))


def test_smoothness_prior_is_harmless_on_smooth_drift():
    shifts = drift_trajectory(24, total_px=8.0, tau_frames=20.0, jitter_px=0.0, seed=8)
    frames, truth = simulate_movie(shape=(512, 512), n_frames=24, shifts_yx_px=shifts, seed=8)
    free = rms_error(align_movie(frames, 1.0, 1.0).shifts_yx_px, truth["shifts_yx_px"])
    smooth = rms_error(align_movie(frames, 1.0, 1.0, smoothness=5.0).shifts_yx_px, truth["shifts_yx_px"])
    assert smooth < 0.5 and smooth < free + 0.1, (free, smooth)


def test_hot_pixels_found_removed_and_particles_kept():
    frames, truth = simulate_movie(shape=(512, 512), n_frames=24, seed=9, particle_contrast=0.3)
    g = torch.Generator().manual_seed(1)
    n_hot = 40
    yy = torch.randint(0, 512, (n_hot,), generator=g)
    xx = torch.randint(0, 512, (n_hot,), generator=g)
    hot = frames.clone()
    hot[:, yy, xx] += torch.poisson(torch.full((24, n_hot), 2.0), generator=g)  # +2 counts/frame: subtle
    before = hot.clone()
    mask = detect_hot_pixels(hot.sum(0), 6.0)
    truth_mask = torch.zeros(512, 512, dtype=torch.bool)
    truth_mask[yy, xx] = True
    assert int((mask & truth_mask).sum()) == int(truth_mask.sum())  # all found
    assert int((mask & ~truth_mask).sum()) <= 2  # (almost) no false positives ...
    assert int(detect_hot_pixels(frames.sum(0), 6.0).sum()) <= 2  # ... also on a clean movie with dark, strong particles
    fixed = correct_defects(hot, mask)
    assert torch.equal(hot, before)  # input untouched
    # corrected pixels look like their surroundings: the sum at hot pixels back near the clean sum
    resid = (fixed.sum(0) - frames.sum(0))[truth_mask]
    assert float(resid.abs().mean()) < 3 * math.sqrt(24.0)
    assert float((hot.sum(0) - frames.sum(0))[truth_mask].mean()) > 40
    assert torch.equal(fixed[:, ~mask], hot[:, ~mask])


def test_against_cryolive_simulate_movie_with_local_motion():
    """cryolive.simulate (atomic models, physical ice, detector gain and hot pixels, 3 Å local motion):
    1024², 24 frames, 1 e/Å²/frame — global drift RMS error < 0.5 px, hot pixels found."""
    from cryolive.simulate import movies
    st = movies.SimulationSettings(n_movies=1, image_shape_px=(1024, 1024), n_frames=24, seed=0)
    det = movies.make_detector(st.image_shape_px, st.gain_variation, st.n_hot_pixels, st.seed)
    sim = movies.MovieSimulator(st, 1, det)
    frames = torch.stack([torch.as_tensor(f) for f in sim.frames()]).float() * det.gain  # gain-corrected
    truth = sim.truth()
    hot = detect_hot_pixels(frames.sum(0))
    assert bool(hot[det.hot_pixels_yx[:, 0], det.hot_pixels_yx[:, 1]].all())
    assert int(hot.sum()) < 50  # a few extra flags at most (1M pixels, ±10 % per-pixel gain)
    res = align_movie(correct_defects(frames, hot), st.pixel_size_angstrom, st.dose_per_frame, st.voltage_kv)
    err = rms_error(res.shifts_yx_px, truth.shifts_yx_px)
    assert err < 0.5, err


def _write_lzw_tiff(frames, path):
    """Counts of ``frames (t, h, w)`` as uint8, written as an LZW TIFF of one page per frame → (counts, path)."""
    import numpy as np
    import tifffile

    counts = frames.numpy().round().clip(0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tw:
        for f in counts:
            tw.write(f, compression="lzw", contiguous=False)
    return counts, path


def test_threaded_tiff_decoding_returns_the_pages_in_order(tmp_path):
    """LZW TIFF pages decoded on several threads equal the counts written, page for page, for any frame range."""
    import numpy as np

    from cryolive.io.movies import open_movie

    frames, _ = simulate_movie(shape=(192, 160), n_frames=9, seed=11)
    counts, path = _write_lzw_tiff(frames, tmp_path / "movie.tif")
    movie = open_movie(path)
    for threads in (1, 3, 16):
        movie.threads = threads
        np.testing.assert_array_equal(movie.read_all(), counts.astype(np.float32))
        np.testing.assert_array_equal(movie.read_frames(2, 7), counts[2:7].astype(np.float32))


def test_align_movie_from_an_opened_tiff_equals_aligning_the_decoded_frames(tmp_path):
    """Passing the opened movie (decoded ahead on threads, overlapped with the first pass) gives the same
    trajectory and sums as aligning the frames read beforehand, and recovers the drift."""
    import numpy as np

    from cryolive.io.movies import open_movie

    frames, truth = simulate_movie(shape=(512, 448), n_frames=12, seed=12, dose_per_frame=2.0)
    counts, path = _write_lzw_tiff(frames, tmp_path / "movie.tif")
    movie = open_movie(path)
    movie.threads = 2
    st = MotionSettings(patch_grid=(1, 1))
    ref = align_movie(torch.from_numpy(counts.astype(np.float32)), 1.0, 2.0, settings=st)
    res = align_movie(movie, 1.0, 2.0, settings=st)
    torch.testing.assert_close(res.shifts_yx_px, ref.shifts_yx_px)
    torch.testing.assert_close(res.micrograph, ref.micrograph)
    # and it is a real alignment: the drift (~10 px) is recovered
    assert rms_error(res.shifts_yx_px, truth["shifts_yx_px"]) < 0.4
    assert rms_error(torch.zeros(12, 2), truth["shifts_yx_px"]) > 4
