"""Patch motion on movies without local motion: the fitted local field must be no larger than the noise of the patch
trajectories, so that a drift-only movie reports (nearly) no local motion — the exposure metric
``max_local_deviation_angstrom`` is a curation threshold — while real deformation is kept."""

from __future__ import annotations

import pytest
import torch

from _synthetic_movies import rms_px, simulated_movie_with_local_motion, true_displacement
from cryolive.config import MotionSettings
from cryolive.preprocess.motion import align_movie, correct_defects, detect_hot_pixels


def _grid_positions(size: int, n: int = 6) -> torch.Tensor:
    margin = size // 10
    ys, xs = torch.meshgrid(torch.linspace(margin, size - 1 - margin, n),
                            torch.linspace(margin, size - 1 - margin, n), indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], -1)


@pytest.mark.parametrize(
    "size, n_frames, pixel_size, dose_per_frame, drift_angstrom, seed",
    [
        (512, 40, 1.0, 1.0, 20.0, 21),  # 40 e/Å², 1 count/px/frame
        (512, 40, 0.8, 0.8, 10.0, 22),  # fine pixels, 0.5 count/px/frame: the noisiest patches
        (512, 24, 1.5, 2.0, 5.0, 23),   # coarse pixels, high dose per frame, little drift
    ],
)
def test_drift_only_movie_reports_no_local_motion(size, n_frames, pixel_size, dose_per_frame, drift_angstrom,
                                                   seed):
    frames, truth, _ = simulated_movie_with_local_motion(size, n_frames, pixel_size, dose_per_frame,
                                                        drift_angstrom, 0.0, seed=seed)
    frames = correct_defects(frames, detect_hot_pixels(frames.sum(0)))
    res = align_movie(frames, pixel_size, dose_per_frame, 300.0, MotionSettings())
    model = res.local_motion
    assert model is not None and model.control_grid == (5, 5)
    # the truth has no local motion: the field (deviation from the frame's mean motion) stays near zero
    where = _grid_positions(size)
    field = model.shifts_at(where)  # (t, n, 2) px
    assert rms_px(field, torch.zeros_like(field)) < 0.15, rms_px(field, torch.zeros_like(field))
    assert res.max_local_deviation_angstrom < 0.5, res.max_local_deviation_angstrom
    assert model.shrinkage < 0.6, model.shrinkage  # the patch trajectories were found consistent with noise
    # and the total motion at those points is the drift
    assert rms_px(res.shifts_at(where), true_displacement(truth, where)) < 0.35


def test_real_local_motion_is_kept_by_the_noise_test():
    """The same check on a movie with 3 Å of local deformation keeps the field (κ near 1) and recovers it."""
    frames, truth, _ = simulated_movie_with_local_motion(512, 20, 1.0, 2.0, 14.0, 3.0, seed=17)
    frames = correct_defects(frames, detect_hot_pixels(frames.sum(0)))
    res = align_movie(frames, 1.0, 2.0, 300.0, MotionSettings())
    assert res.local_motion.shrinkage > 0.9, res.local_motion.shrinkage
    assert res.max_local_deviation_angstrom > 1.5, res.max_local_deviation_angstrom
    where = _grid_positions(512)
    glob = align_movie(frames, 1.0, 2.0, 300.0, MotionSettings(patch_grid=(1, 1)))
    truth_field = true_displacement(truth, where)
    err, err_global_only = rms_px(res.shifts_at(where), truth_field), rms_px(glob.shifts_at(where), truth_field)
    assert err < 0.5 and err < 0.6 * err_global_only, (err, err_global_only)
