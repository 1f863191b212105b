"""Gain orientation: the simulator's detector, raw Poisson frames, and gain references turned every way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolive.io.movies import read_gain
from cryolive.preprocess.gain import (
    check_gain_orientation,
    detect_gain_orientation,
    gain_orientation_scores,
    orient_gain_2d,
)
from cryolive.simulate.movies import make_detector


def _raw_sum(shape=(192, 192), counts_per_frame=4.0, n_frames=40, seed=0):
    det = make_detector(shape, gain_variation=0.1, n_hot_pixels=6, seed=seed)
    g = torch.Generator().manual_seed(seed)
    rate = counts_per_frame * det.sensitivity
    total = torch.zeros(shape)
    for _ in range(n_frames):
        frame = torch.poisson(rate, generator=g)
        frame[det.hot_pixels_yx[:, 0], det.hot_pixels_yx[:, 1]] += det.hot_rates
        total += frame
    return total, det.gain


def test_true_orientation_is_found():
    total, gain = _raw_sum()
    best = detect_gain_orientation(total, gain)
    assert (best.rotation_deg, best.flip_y) == (0, False)
    scores = gain_orientation_scores(total, gain)
    assert len(scores) == 8
    # flat: near the Poisson floor 1/mean; any other orientation adds the sensitivity pattern twice
    assert best.score < 1.3 / total.mean().item()
    assert scores[1].score > 1.5 * best.score
    assert check_gain_orientation(total, gain) is None


@pytest.mark.parametrize("rotation_deg,flip_y", [(0, True), (90, False), (270, True), (180, False)])
def test_a_turned_gain_file_is_detected(tmp_path, rotation_deg, flip_y):
    import mrcfile

    total, gain = _raw_sum(seed=1)
    # a gain file stored turned: undo(orient) must give the true gain, so store the inverse turn
    stored = gain.numpy()
    if flip_y:
        stored = stored[::-1]
    stored = np.rot90(stored, -(rotation_deg // 90))
    path = tmp_path / "gain.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.ascontiguousarray(stored, dtype=np.float32))
    as_given = torch.from_numpy(read_gain(path))
    best = detect_gain_orientation(total, as_given)
    assert (best.rotation_deg, best.flip_y) == (rotation_deg, flip_y)
    # read_gain with the reported options gives back the true gain
    fixed = read_gain(path, flip_y=best.flip_y, rotate=best.rotation_deg)
    np.testing.assert_allclose(fixed, gain.numpy(), rtol=1e-6)
    torch.testing.assert_close(orient_gain_2d(as_given, rotation_deg, flip_y), gain)
    warning = check_gain_orientation(total, as_given)
    assert warning is not None
    assert (f"rotated by {rotation_deg}° counter-clockwise" in warning) == (rotation_deg != 0)
    assert ("flipped in Y" in warning) == flip_y


def test_non_square_tries_only_shape_preserving_turns():
    total, gain = _raw_sum(shape=(96, 160), counts_per_frame=8.0, n_frames=20, seed=2)
    scores = gain_orientation_scores(total, gain.flip(0))
    assert {s.rotation_deg for s in scores} == {0, 180} and len(scores) == 4
    assert (scores[0].rotation_deg, scores[0].flip_y) == (0, True)
    with pytest.raises(ValueError, match="no orientation"):
        gain_orientation_scores(total, gain[:50])


def test_cli_warns_when_the_gain_file_is_flipped(tmp_path, caplog):
    import logging

    import mrcfile

    from cryolive.cli import _check_gain_orientation
    from cryolive.config import Settings

    det = make_detector((128, 128), gain_variation=0.1, n_hot_pixels=3, seed=4)
    g = torch.Generator().manual_seed(4)
    frames = torch.stack([torch.poisson(8.0 * det.sensitivity, generator=g) for _ in range(20)])
    (tmp_path / "movies").mkdir()
    with mrcfile.new(tmp_path / "movies" / "m1.mrc") as m:
        m.set_data(frames.numpy().astype(np.int16))
    for name, stored in (("good.mrc", det.gain), ("flipped.mrc", det.gain.flip(0))):
        with mrcfile.new(tmp_path / name) as m:
            m.set_data(stored.numpy().astype(np.float32))
    movies = [str(tmp_path / "movies")]
    with caplog.at_level(logging.WARNING, logger="cryolive"):
        assert _check_gain_orientation(Settings(gain_path=str(tmp_path / "good.mrc")), movies) is None
        assert not caplog.records
        warning = _check_gain_orientation(Settings(gain_path=str(tmp_path / "flipped.mrc")), movies)
    assert warning is not None and "; flipped in Y it fits" in warning
    assert caplog.records and "flipped.mrc" in caplog.records[-1].getMessage()
    # with the flip given, it fits
    fixed = Settings(gain_path=str(tmp_path / "flipped.mrc"), gain_flip_y=True)
    assert _check_gain_orientation(fixed, movies) is None


def _relion_turn(gain: np.ndarray, gain_rot: int, gain_flip: int) -> np.ndarray:
    """RELION's --gain_rot / --gain_flip as its documentation and ImageOp::rotate90 define them: each rotation
    step puts source pixel (row y, column x) at (row x, column h − 1 − y) (clockwise as relion_display shows it),
    then flip 1 = upside down (rows), 2 = left to right (columns)."""
    out = gain
    for _ in range(gain_rot):
        h = out.shape[0]
        turned = np.empty((out.shape[1], h), dtype=out.dtype)
        yy, xx = np.indices(out.shape)
        turned[xx, h - 1 - yy] = out
        out = turned
    if gain_flip == 1:
        out = out[::-1]
    elif gain_flip == 2:
        out = out[:, ::-1]
    return out


@pytest.mark.parametrize("gain_rot", [0, 1, 2, 3])
@pytest.mark.parametrize("gain_flip", [0, 1, 2])
def test_options_mirror_relion_gain_rot_and_flip(tmp_path, gain_rot, gain_flip):
    """--gain-rotate (360 − 90·N) % 360 and --gain-flip none/y/x read a gain exactly as RELION's --gain_rot N
    --gain_flip 0/1/2 turn it, through Settings.gain_orientation and read_gain."""
    import mrcfile

    from cryolive.config import Settings
    from cryolive.preprocess.gain import orientation_options

    stored = np.random.default_rng(gain_rot * 3 + gain_flip).random((6, 10)).astype(np.float32) + 0.5
    path = tmp_path / "gain.mrc"
    with mrcfile.new(path) as m:
        m.set_data(stored)
    s = Settings(gain_path=str(path), gain_rotate=(360 - 90 * gain_rot) % 360,
                 gain_flip={0: "none", 1: "y", 2: "x"}[gain_flip])
    rotate, flip_y = s.gain_orientation
    np.testing.assert_array_equal(read_gain(path, flip_y=flip_y, rotate=rotate),
                                  _relion_turn(stored, gain_rot, gain_flip))
    if gain_flip < 2:  # the canonical terms of a rotate + flip-Y orientation round-trip to RELION's
        assert orientation_options(rotate, flip_y).endswith(f"--gain_rot {gain_rot} --gain_flip {gain_flip})")


def test_cli_reports_the_fitting_orientation_in_its_options_terms(tmp_path, caplog):
    """A gain stored turned (undone by rotating 90° counter-clockwise, then flipping upside down) is reported as
    the options that read it back, and RELION's equivalent; with those options (or an equivalent pair) given, no
    warning."""
    import logging

    import mrcfile

    from cryolive.cli import _check_gain_orientation
    from cryolive.config import Settings

    det = make_detector((128, 128), gain_variation=0.1, n_hot_pixels=3, seed=5)
    g = torch.Generator().manual_seed(5)
    frames = torch.stack([torch.poisson(8.0 * det.sensitivity, generator=g) for _ in range(20)])
    (tmp_path / "movies").mkdir()
    with mrcfile.new(tmp_path / "movies" / "m1.mrc") as m:
        m.set_data(frames.numpy().astype(np.int16))
    # stored so that rotating 90° counter-clockwise, then flipping upside down, gives the true gain
    stored = np.rot90(det.gain.numpy()[::-1], -1)
    with mrcfile.new(tmp_path / "gain.mrc") as m:
        m.set_data(np.ascontiguousarray(stored, dtype=np.float32))
    np.testing.assert_array_equal(read_gain(tmp_path / "gain.mrc", flip_y=True, rotate=90), det.gain.numpy())
    movies = [str(tmp_path / "movies")]
    with caplog.at_level(logging.WARNING, logger="cryolive"):
        warning = _check_gain_orientation(Settings(gain_path=str(tmp_path / "gain.mrc")), movies)
    assert warning is not None
    assert "as given (--gain-rotate 0 --gain-flip none" in warning
    assert "use --gain-rotate 90 --gain-flip y (RELION/MotionCor2: --gain_rot 3 --gain_flip 1)" in warning
    for ok in (Settings(gain_path=str(tmp_path / "gain.mrc"), gain_rotate=90, gain_flip="y"),
               Settings(gain_path=str(tmp_path / "gain.mrc"), gain_rotate=270, gain_flip="x")):  # the same turn
        assert _check_gain_orientation(ok, movies) is None
    wrong = _check_gain_orientation(Settings(gain_path=str(tmp_path / "gain.mrc"), gain_flip_y=True), movies)
    assert wrong is not None and "as given (--gain-rotate 0 --gain-flip y" in wrong
