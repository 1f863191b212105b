"""EER movies through the session's per-exposure chain and the command line: fractions, dose per fraction,
sub-pixel rendering, settings hash, and the motion STAR against the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _synthetic_movies import rms_px, simulated_movie_with_local_motion, true_displacement, true_mean_displacement
from cryolive.config import EerSettings, Optics, Settings
from cryolive.io.star import read_star
from cryolive.session.pipeline import process_exposure, stage_hashes


def _write_eer_movie(path, size=384, n_fractions=16, raw_per_fraction=6, dose=2.0, seed=23):
    from cryolive.simulate.eer import poisson_eer_frames, write_eer

    expected, truth, _ = simulated_movie_with_local_motion(size, n_fractions, 1.0, dose, 12.0, 2.0, seed=seed,
                                                           noise=False)
    raw = []
    for i, lam in enumerate(expected.numpy()):
        raw.extend(poisson_eer_frames(lam, raw_per_fraction, seed=seed * 100 + i))
    raw.extend(raw[:2])  # two trailing raw frames that do not fill a fraction: dropped
    write_eer(path, raw)
    return truth


@pytest.mark.parametrize("upsampling", [1, 2])
def test_eer_movie_through_the_chain(tmp_path, upsampling):
    truth = _write_eer_movie(tmp_path / "m.eer")
    n_raw = 16 * 6 + 2
    # the session is told the total dose and the dose per fraction it wants; 6 raw frames per fraction result
    settings = Settings(optics=Optics(pixel_size_angstrom=1.0), dose_per_frame=2.0, n_workers=0,
                        eer=EerSettings(upsampling=upsampling, total_dose=2.0 * n_raw / 6))
    outcome = process_exposure(tmp_path / "m.eer", settings, tmp_path / "out")
    assert outcome.ok, outcome.error
    assert outcome.frame_shape == (384, 384)  # rendered finer, binned back to the physical pixels
    motion = read_star(tmp_path / "out" / "motion" / "m.star")
    assert motion["general"]["rlnImageSizeZ"] == 16
    assert motion["general"]["rlnMicrographDoseRate"] == pytest.approx(2.0)
    shifts = motion["global_shift"]
    est = torch.tensor(np.stack([shifts["rlnMicrographShiftY"], shifts["rlnMicrographShiftX"]], -1),
                       dtype=torch.float32)
    assert rms_px(est, true_mean_displacement(truth)) < 0.35
    # local shifts: global + local at the patch centres against the truth there
    loc = motion["local_shift"]
    centres = torch.tensor(np.stack([loc["rlnCoordinateY"], loc["rlnCoordinateX"]], -1), dtype=torch.float32)
    n_p = int((loc["rlnMicrographFrameNumber"] == 1).sum())
    centres = centres[:n_p]
    field = torch.tensor(np.stack([loc["rlnMicrographShiftY"], loc["rlnMicrographShiftX"]], -1),
                         dtype=torch.float32).reshape(16, n_p, 2) + est[:, None]
    assert rms_px(field, true_displacement(truth, centres)) < 0.5


def test_eer_settings_change_the_motion_hash_and_the_cli_builds_them():
    from cryolive.cli import _settings

    base = Settings()
    assert stage_hashes(base)["motion"] != stage_hashes(Settings(eer=EerSettings(upsampling=2)))["motion"]
    assert stage_hashes(base)["motion"] != stage_hashes(Settings(eer=EerSettings(fraction_frames=10)))["motion"]
    s = _settings(1.0, 300.0, 2.7, 0.1, 1.0, None, False, 150.0, "C1", "cpu", 0, 20, 500, "*.eer", False,
                  eer_upsampling=2, eer_fraction_frames=None, eer_total_dose=40.0, motion_patches="7x5")
    assert s.eer == EerSettings(upsampling=2, total_dose=40.0)
    assert s.motion.patch_grid == (7, 5)
    import typer

    with pytest.raises(typer.BadParameter):
        _settings(1.0, 300.0, 2.7, 0.1, 1.0, None, False, 150.0, "C1", "cpu", 0, 20, 500, "*.eer", False,
                  eer_upsampling=3)
    with pytest.raises(typer.BadParameter):
        _settings(1.0, 300.0, 2.7, 0.1, 1.0, None, False, 150.0, "C1", "cpu", 0, 20, 500, "*.eer", False,
                  motion_patches="five")
