"""Super-resolution movies binned by Fourier cropping on reading (io.prepared.PreparedMovie, Settings.movie_bin).

Ground truth: cryolive.simulate's expected counts at the physical pixel; the super-resolution movie holds the same
specimen sampled twice as finely (the expected counts Fourier-upsampled, a quarter per sub-pixel, plus detail beyond
the physical Nyquist frequency that a super-resolution detector records), with its own Poisson noise.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cryolive.fourier import fourier_pad_2d
from cryolive.io.movies import Movie, MovieError
from cryolive.io.prepared import PreparedMovie
from cryolive.preprocess.motion import align_movie, correct_defects

from _synthetic_movies import rms_px, simulated_movie_with_local_motion


class ArrayMovie(Movie):
    """A movie held in memory (frames float32 (t, h, w)), read like a file."""

    def __init__(self, frames, name="array.mrc"):
        from pathlib import Path

        super().__init__(Path(name), "mrc", tuple(frames.shape), np.dtype(np.float32))
        self.frames = np.ascontiguousarray(frames, dtype=np.float32)

    def read_frames(self, start=0, stop=None):
        stop = self.shape[0] if stop is None else min(stop, self.shape[0])
        return self.frames[start:stop].copy()


def _super_resolution(expected, detail=0.0, seed=0):
    """Expected counts per super-resolution pixel (t, 2h, 2w): ``expected (t, h, w)`` Fourier-upsampled ×2, a quarter
    per sub-pixel, plus ``detail`` × the mean × a pattern of frequencies between the physical and the
    super-resolution Nyquist frequency (0.3–0.45 cycles per sub-pixel, on the frame's Fourier grid)."""
    t, h, w = expected.shape
    up = fourier_pad_2d(expected, (2 * h, 2 * w)) / 4.0
    if detail:
        g = torch.Generator().manual_seed(seed)
        yy, xx = torch.meshgrid(torch.arange(2 * h, dtype=torch.float32), torch.arange(2 * w, dtype=torch.float32),
                                indexing="ij")
        pattern = torch.zeros(2 * h, 2 * w)
        for _ in range(6):
            ky = int(2 * h * (0.3 + 0.15 * torch.rand(1, generator=g)))
            kx = int(2 * w * (0.3 + 0.15 * torch.rand(1, generator=g)))
            phase = 6.28 * float(torch.rand(1, generator=g))
            pattern += torch.cos(2 * math.pi * (ky * yy / (2 * h) + kx * xx / (2 * w)) + phase)
        up = up + detail * up.mean() * pattern / 6.0
    return up.clamp(min=0)


def test_fourier_binning_keeps_the_band_exactly_and_does_not_alias():
    """Binned noiseless super-resolution frames equal the direct simulation at the physical pixel (the detail beyond
    the physical Nyquist is cut, not folded back); 2×2 summing in real space folds it back into the band."""
    expected, _, _ = simulated_movie_with_local_motion(size=128, n_frames=3, local_motion_angstrom=0.0, noise=False,
                                                       seed=3)
    sr = _super_resolution(expected, detail=0.5)
    binned = PreparedMovie(ArrayMovie(sr.numpy()), bin_factor=2).read_all()
    assert binned.shape == (3, 128, 128)
    direct = expected.numpy()
    # counts per physical pixel: same mean, same band-limited content
    np.testing.assert_allclose(binned.mean(), direct.mean(), rtol=1e-5)
    np.testing.assert_allclose(binned, direct, atol=1e-4 * direct.mean())
    # real-space 2×2 sums alias the super-resolution detail into the band (the check has teeth)
    summed = sr.numpy().reshape(3, 128, 2, 128, 2).sum((2, 4))
    alias = np.abs(np.fft.rfft2(summed - direct)).mean() / np.abs(np.fft.rfft2(binned - direct)).mean()
    assert alias > 100


@pytest.mark.parametrize("seed,pixel_size", [(4, 1.0), (5, 0.8)])
def test_binned_super_resolution_aligns_as_the_physical_movie(seed, pixel_size):
    """Drift recovered from a Poisson super-resolution movie binned ×2 on reading matches the drift of the same
    electrons counted at the physical pixel (each physical pixel holds the sum of its 2×2 sub-pixels, as a
    counting camera out of super-resolution mode records them) within 0.1 px (binned px), and both match the truth
    within the issue's 0.25 px; the binned sum keeps the counts per physical pixel."""
    expected, truth, _ = simulated_movie_with_local_motion(size=384, n_frames=24, pixel_size_angstrom=pixel_size,
                                                           local_motion_angstrom=0.0, max_drift_angstrom=12.0,
                                                           noise=False, seed=seed)
    g = torch.Generator().manual_seed(seed)
    sr = torch.poisson(_super_resolution(expected, detail=0.3, seed=seed), generator=g)  # (t, 768, 768)
    t, h2, w2 = sr.shape
    physical = sr.reshape(t, h2 // 2, 2, w2 // 2, 2).sum((2, 4))  # the same electrons per physical pixel
    from cryolive.config import MotionSettings

    ms = MotionSettings(patch_grid=(1, 1))
    binned_movie = PreparedMovie(ArrayMovie(sr.numpy()), bin_factor=2)
    assert binned_movie.shape == (t, 384, 384)
    a = align_movie(binned_movie, pixel_size, 1.0, settings=ms)  # pixel size of the binned frames
    b = align_movie(physical, pixel_size, 1.0, settings=ms)
    assert rms_px(a.shifts_yx_px, b.shifts_yx_px) < 0.1
    assert rms_px(a.shifts_yx_px, truth.shifts_yx_px) < 0.25 and rms_px(b.shifts_yx_px, truth.shifts_yx_px) < 0.25
    np.testing.assert_allclose(a.micrograph_nodw.mean().item(), b.micrograph_nodw.mean().item(), rtol=0.01)


def test_gain_and_defects_are_applied_before_binning():
    """The gain is at the super-resolution sampling and applied first; a bad super-resolution column is replaced
    before binning, so the binned frames carry neither."""
    rng = np.random.default_rng(0)
    t, h, w = 4, 64, 96
    sensitivity = (1.0 + 0.2 * rng.standard_normal((h, w))).astype(np.float32).clip(0.5)
    counts = rng.poisson(20.0, size=(t, h, w)).astype(np.float32)
    raw = counts * sensitivity
    raw[:, :, 37] = 500.0  # a stuck column
    mask = np.zeros((h, w), dtype=bool)
    mask[:, 37] = True
    prepared = PreparedMovie(ArrayMovie(raw), gain=1.0 / sensitivity, defect_mask=mask, correct=correct_defects,
                             bin_factor=2)
    out = prepared.read_all()
    assert out.shape == (t, 32, 48)
    clean = PreparedMovie(ArrayMovie(counts), bin_factor=2).read_all()
    # the stuck column is gone: column profile of the binned frames is flat (within the Poisson noise)
    profile = out.mean((0, 1))
    assert np.abs(profile - profile.mean()).max() < 6 * profile.std() + 1e-6
    assert abs(profile[18] - np.median(profile)) < 4 * np.sqrt(80.0 / (t * 32))
    np.testing.assert_allclose(out.mean(), clean.mean(), rtol=0.01)
    # chunked reading gives the same frames
    np.testing.assert_allclose(np.concatenate([f for _, f in prepared.iter_chunks(3)]), out, rtol=1e-6)


def test_sizes_that_cannot_be_binned_are_refused():
    with pytest.raises(MovieError, match="cannot be binned by 2 to an even size"):
        PreparedMovie(ArrayMovie(np.zeros((2, 60, 66), np.float32)), bin_factor=2)
    with pytest.raises(MovieError, match="gain reference shape"):
        PreparedMovie(ArrayMovie(np.zeros((2, 64, 64), np.float32)), gain=np.ones((32, 32), np.float32))
