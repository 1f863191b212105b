"""``align_movie(..., defects=...)``: defect pixels found on the sum of all frames are replaced before alignment.
With an opened movie the spectra computed while decoding are updated for the change (sparse DFT or transformed
again); either way the result equals correcting the frames first and aligning them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolive.config import MotionSettings
from cryolive.io.movies import open_movie
from cryolive.io.prepared import GainCorrectedMovie
from cryolive.preprocess import motion
from cryolive.preprocess.motion import align_movie, correct_defects, detect_hot_pixels
from cryolive.simulate.dataset import write_movie
from cryolive.simulate.movies import MovieSimulator, SimulationSettings


@pytest.mark.parametrize("layout", ["scattered", "rows", "columns"])
def test_sparse_spectrum_of_a_change_equals_its_fft(layout):
    g = torch.Generator().manual_seed(1)
    t, h, w, hc, wc = 3, 90, 128, 40, 62
    if layout == "scattered":
        yy, xx = torch.randint(0, h, (25,), generator=g), torch.randint(0, w, (25,), generator=g)
    elif layout == "rows":  # a dead row and a few pixels: grouped by row
        yy = torch.cat([torch.full((w,), 17), torch.tensor([3, 80])])
        xx = torch.cat([torch.arange(w), torch.tensor([5, 127])])
    else:  # two dead columns: grouped by column
        yy = torch.cat([torch.arange(h), torch.arange(h)])
        xx = torch.cat([torch.full((h,), 0), torch.full((h,), 77)])
    key = torch.unique(yy * w + xx)
    yy, xx = key // w, key % w
    change = torch.randn(t, len(yy), generator=g) * 50
    image = torch.zeros(t, h, w)
    image[:, yy, xx] = change
    ref = motion._crop_rfft(torch.fft.rfft2(image), h, hc, wc)
    got = motion._sparse_crop_rfft(change, yy, xx, (h, w), hc, wc)
    assert float((got - ref).abs().max()) < 1e-5 * float(ref.abs().max())


@pytest.fixture(scope="module")
def movie_with_hot_pixels(tmp_path_factory):
    """A simulated LZW TIFF movie with drift, a gain and 15 hot pixels: ``(settings, simulator, path, gain)``."""
    s = SimulationSettings(image_shape_px=(384, 448), n_frames=12, dose_per_frame=3.0, pixel_size_angstrom=1.2,
                           particles_per_micrograph=12, junk_per_micrograph=0, max_drift_angstrom=10.0,
                           local_motion_angstrom=0.0, oversampling=1, gain_variation=0.2, n_hot_pixels=15,
                           movie_format="tiff", seed=11)
    sim = MovieSimulator(s, 0)
    path = write_movie(sim, tmp_path_factory.mktemp("defects") / sim.name)
    return s, sim, path, sim.detector.gain.numpy().astype(np.float32)


@pytest.mark.parametrize("force_fft", [False, True], ids=["sparse-update", "transform-again"])
def test_movie_with_defects_hook_equals_correcting_the_frames_first(movie_with_hot_pixels, monkeypatch, force_fft):
    if force_fft:  # the update used when defects span many rows and columns
        monkeypatch.setattr(motion, "_SPARSE_DFT_ADVANTAGE", 0.0)
    s, sim, path, gain = movie_with_hot_pixels
    settings = MotionSettings(patch_grid=(1, 1))

    # the old way: decode, gain, hot pixels on the sum, correct, align the stack
    frames = torch.from_numpy(open_movie(path).read_all() * gain[None])
    hot = detect_hot_pixels(frames.sum(0))
    ref = align_movie(correct_defects(frames, hot), s.pixel_size_angstrom, s.dose_per_frame, s.voltage_kv, settings)
    # the stack with the hook (its input is not modified), and the movie decoded while aligning
    before = frames.clone()
    on_stack = align_movie(frames, s.pixel_size_angstrom, s.dose_per_frame, s.voltage_kv, settings,
                           defects=detect_hot_pixels)
    assert torch.equal(frames, before)
    movie = GainCorrectedMovie(open_movie(path), gain)
    on_movie = align_movie(movie, s.pixel_size_angstrom, s.dose_per_frame, s.voltage_kv, settings,
                           defects=detect_hot_pixels)
    assert ref.defect_mask is None
    assert torch.equal(on_stack.defect_mask, hot) and torch.equal(on_movie.defect_mask, hot)
    assert {tuple(p) for p in sim.detector.hot_pixels_yx.tolist()} <= {tuple(p) for p in torch.nonzero(hot).tolist()}
    for res in (on_stack, on_movie):
        assert float((res.shifts_yx_px - ref.shifts_yx_px).abs().max()) < 1e-3
        tol = 1e-4 * float(ref.micrograph.std())
        assert float((res.micrograph - ref.micrograph).abs().max()) < tol
        assert float((res.micrograph_nodw - ref.micrograph_nodw).abs().max()) < tol
    truth = sim.truth().shifts_yx_px
    err = on_movie.shifts_yx_px - (truth - truth[0])
    assert float(err.norm(dim=-1).pow(2).mean().sqrt()) < 0.25


@pytest.mark.parametrize("hint", ["same", "partly-wrong", "none-found"])
def test_a_hint_of_the_defects_changes_only_the_work(movie_with_hot_pixels, monkeypatch, hint):
    """Pixels corrected as the frames arrive (the previous movie's mask): same result whatever the hint; with
    the right one no spectrum needs updating afterwards."""
    s, sim, path, gain = movie_with_hot_pixels
    settings = MotionSettings(patch_grid=(1, 1))
    args = (s.pixel_size_angstrom, s.dose_per_frame, s.voltage_kv, settings)
    ref = align_movie(GainCorrectedMovie(open_movie(path), gain), *args, defects=detect_hot_pixels)
    mask = ref.defect_mask
    if hint == "same":
        given = mask.clone()
    elif hint == "partly-wrong":  # 5 of the hot pixels missing, a row of good pixels in excess
        given = mask.clone()
        missing = torch.nonzero(mask)[:5]
        given[missing[:, 0], missing[:, 1]] = False
        given[200, 100:140] = True
    else:
        given = mask.clone()
    updates = []
    real = motion._sparse_crop_rfft
    monkeypatch.setattr(motion, "_sparse_crop_rfft", lambda change, yy, *a, **k: updates.append(len(yy)) or
                        real(change, yy, *a, **k))
    defects = (lambda f: torch.zeros(f.shape, dtype=torch.bool)) if hint == "none-found" else detect_hot_pixels
    got = align_movie(GainCorrectedMovie(open_movie(path), gain), *args, defects=defects, defects_hint=given)
    if hint == "none-found":  # the hinted pixels are put back as decoded: as aligning without any correction
        plain = align_movie(GainCorrectedMovie(open_movie(path), gain), *args)
        assert updates == [int(mask.sum())] and not bool(got.defect_mask.any())
        ref = plain
    else:
        assert torch.equal(got.defect_mask, mask)
        assert updates == ([] if hint == "same" else [5 + 40])
    assert float((got.shifts_yx_px - ref.shifts_yx_px).abs().max()) < 1e-3
    assert float((got.micrograph - ref.micrograph).abs().max()) < 1e-4 * float(ref.micrograph.std())


def test_no_defects_found_leaves_the_frames_alone():
    g = torch.Generator().manual_seed(3)
    frames = torch.poisson(torch.full((6, 128, 128), 2.0), generator=g)
    none = align_movie(frames, 1.0, 2.0, settings=MotionSettings(patch_grid=(1, 1)),
                       defects=lambda s: torch.zeros(s.shape, dtype=torch.bool))
    plain = align_movie(frames, 1.0, 2.0, settings=MotionSettings(patch_grid=(1, 1)))
    assert not bool(none.defect_mask.any())
    assert torch.equal(none.shifts_yx_px, plain.shifts_yx_px) and torch.equal(none.micrograph, plain.micrograph)
