"""The session's frame preparation: a defect file (a stuck column the hot-pixel search cannot see), super-resolution
movies binned by Fourier cropping, the gain applied before binning, and what the outputs say about pixel sizes."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import starfile
import torch

from cryolive.config import MotionSettings, Optics, Settings
from cryolive.io.movies import MovieError, open_movie
from cryolive.session.pipeline import (
    StageFunctions,
    _cached_defects,
    prepare_movie,
    process_exposure,
    read_and_align_movie,
    stage_hashes,
)
from cryolive.simulate.movies import MovieSimulator, SimulationSettings


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm(dim=-1).pow(2).mean().sqrt())


def _write_mrc(path, frames):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.ascontiguousarray(frames, dtype=np.int16))
    return path


def _align(path, settings, defects=None):
    fns = StageFunctions().resolved()
    movie = open_movie(path)
    mask = _cached_defects(defects, tuple(movie.shape[1:])) if defects else None
    source, gain = prepare_movie(movie, None, mask, settings, fns)
    motion, found, _ = read_and_align_movie(source, gain, settings, settings.dose_per_frame, fns, torch.device("cpu"))
    return motion, found


@pytest.mark.parametrize("seed,pixel_size,dose", [(11, 1.0, 2.0), (12, 1.2, 1.5)])
def test_stuck_column_is_replaced_only_with_the_defect_file(tmp_path, seed, pixel_size, dose):
    """A column stuck at a constant count about 1.5× the mean — too faint per frame for the hot-pixel search —
    stays in the micrograph as a streak along the trajectory; with a SerialEM defect list naming it, the streak is
    gone and the trajectory is the clean movie's (< 0.1 px)."""
    s = SimulationSettings(image_shape_px=(512, 512), n_frames=20, dose_per_frame=dose, pixel_size_angstrom=pixel_size,
                           max_drift_angstrom=12.0, local_motion_angstrom=0.0, gain_variation=0.0, n_hot_pixels=0,
                           particles_per_micrograph=20, junk_per_micrograph=0, oversampling=1, seed=seed)
    sim = MovieSimulator(s, 0)
    clean = torch.stack([f.float() for f in sim.frames()]).numpy()  # (t, h, w) counts
    col = 263
    stuck = clean.copy()
    stuck[:, :, col] = round(1.5 * float(clean.mean()))  # 3 counts where the mean is about 2
    p_clean, p_stuck = _write_mrc(tmp_path / "clean.mrc", clean), _write_mrc(tmp_path / "stuck.mrc", stuck)
    defects = tmp_path / "defects.txt"
    defects.write_text(f"CameraSizeX 512\nCameraSizeY 512\nBadColumns {col}\n")
    settings = Settings(optics=Optics(pixel_size_angstrom=pixel_size), dose_per_frame=dose,
                        motion=MotionSettings(patch_grid=(1, 1)), defect_path=str(defects))
    ref, _ = _align(p_clean, settings)
    without, found = _align(p_stuck, settings)
    with_file, _ = _align(p_stuck, settings, defects=str(defects))
    assert int(found[:, col].sum()) < 0.05 * 512  # the hot-pixel search does not see the column
    truth = sim.truth().shifts_yx_px
    assert _rms(ref.shifts_yx_px, truth - truth[0]) < 0.25
    assert _rms(with_file.shifts_yx_px, ref.shifts_yx_px) < 0.1
    # without the file the trajectory hardly moves (0.002-0.03 px here): a single faint column weighs little against
    # the specimen in the B-factor-weighted correlation; it is the micrograph that keeps it
    assert _rms(without.shifts_yx_px, ref.shifts_yx_px) < 0.1

    # the column's excess counts in the aligned sum (spread along the trajectory), in units of the noise of the
    # band's sum (Poisson counts of twice the band: a conservative scale)
    def excess(m):
        diff = (m.micrograph_nodw - ref.micrograph_nodw).numpy()
        band = diff[:, col - 20 : col + 21]
        return float(band.sum() / np.sqrt(2.0 * clean.mean() * band.size * clean.shape[0]))

    assert excess(without) > 4  # visible
    assert abs(excess(with_file)) < 0.5  # replaced by its neighbours' counts


def _super_resolution_movie(s: SimulationSettings, gain_sr: np.ndarray, seed: int):
    """Raw super-resolution counts (t, 2h, 2w): the simulator's expected counts per physical pixel, Fourier-upsampled
    ×2 (a quarter per sub-pixel), seen through a detector of sensitivity 1/gain_sr, Poisson."""
    from cryolive.fourier import fourier_pad_2d

    sim = MovieSimulator(s, 0)
    expected = torch.stack([f.float() for f in sim.expected_frames()])
    t, h, w = expected.shape
    sr = (fourier_pad_2d(expected, (2 * h, 2 * w)) / 4.0).clamp(min=0) / torch.from_numpy(gain_sr)
    g = torch.Generator().manual_seed(seed)
    return torch.poisson(sr, generator=g).numpy(), sim.truth()


def test_process_exposure_bins_super_resolution_movies(tmp_path):
    """--bin 2 on a super-resolution movie with a super-resolution gain and a defect map: outputs at the physical
    pixel (micrograph h/2 × w/2 with pixel size 2×; RELION's motion STAR: binning 2, original pixel size and
    shifts in movie pixels; data_optics of the CTF at the binned size), the drift of the truth recovered."""
    px_sr = 0.55
    s = SimulationSettings(image_shape_px=(384, 384), n_frames=16, dose_per_frame=2.0, pixel_size_angstrom=2 * px_sr,
                           max_drift_angstrom=10.0, local_motion_angstrom=0.0, gain_variation=0.0, n_hot_pixels=0,
                           particles_per_micrograph=15, junk_per_micrograph=0, oversampling=1, seed=21)
    rng = np.random.default_rng(21)
    gain_sr = (1.0 / (1.0 + 0.15 * rng.standard_normal((768, 768)))).clip(0.5, 2.0).astype(np.float32)
    raw, truth = _super_resolution_movie(s, gain_sr, seed=21)
    raw[:, 100, :] = 7  # a bad super-resolution row, named in the defect map
    movie = _write_mrc(tmp_path / "sr.mrc", raw)
    gain_path = tmp_path / "gain_sr.mrc"
    with mrcfile.new(gain_path) as m:
        m.set_data(gain_sr)
    defect_map = np.zeros((768, 768), np.uint8)
    defect_map[100, :] = 1
    defect_path = tmp_path / "defects.mrc"
    with mrcfile.new(defect_path) as m:
        m.set_data(defect_map)
    settings = Settings(optics=Optics(pixel_size_angstrom=px_sr, voltage_kv=300.0), dose_per_frame=2.0,
                        n_workers=0, gain_path=str(gain_path), defect_path=str(defect_path), movie_bin=2,
                        motion=MotionSettings(patch_grid=(1, 1)))
    assert settings.micrograph_pixel_size_angstrom == pytest.approx(2 * px_sr)
    outcome = process_exposure(movie, settings, tmp_path / "out")
    assert outcome.ok, outcome.error
    motion = next(st for st in outcome.stages if st.stage == "motion")
    assert motion.metrics["movie_bin"] == 2 and motion.metrics["n_defect_file_pixels"] == 768
    assert motion.metrics["frame_shape"] == [768, 768]  # the movie's
    with mrcfile.open(tmp_path / "out" / "micrographs" / "sr.mrc") as m:
        assert m.data.shape == (384, 384)
        assert float(m.voxel_size.x) == pytest.approx(2 * px_sr, rel=1e-4)
        mic = np.asarray(m.data, dtype=np.float64)
    # counts per physical pixel: the gain-corrected dose (2 e/Å² per frame at 1.1 Å/px ≈ 2.42 counts per frame),
    # and the bad row is not in the micrograph
    assert abs(mic.mean() / (16 * 2.0 * (2 * px_sr) ** 2) - 1.0) < 0.05
    assert abs(mic[50, :].mean() - mic[40:60].mean()) < 4 * mic[40:60].std() / np.sqrt(384)
    star = starfile.read(tmp_path / "out" / "motion" / "sr.star", always_dict=True)
    general = star["general"]
    assert float(general["rlnMicrographBinning"]) == 2.0
    assert float(general["rlnMicrographOriginalPixelSize"]) == pytest.approx(px_sr)
    assert int(general["rlnImageSizeX"]) == 768
    shifts = torch.tensor(star["global_shift"][["rlnMicrographShiftY", "rlnMicrographShiftX"]].to_numpy())
    true = truth.shifts_yx_px - truth.shifts_yx_px[0]  # physical px = binned px
    assert _rms(shifts / 2, true.double()) < 0.25  # the STAR's shifts are in movie (super-resolution) pixels
    ctf = starfile.read(tmp_path / "out" / "ctf" / "sr.star", always_dict=True)["ctf"]
    value = ctf["rlnMicrographPixelSize"]
    assert float(value.iloc[0] if hasattr(value, "iloc") else value) == pytest.approx(2 * px_sr)
    # the options change the motion stage's hash; defaults keep the hashes sessions had before these options
    base = Settings(optics=Optics(pixel_size_angstrom=px_sr), dose_per_frame=2.0)
    assert stage_hashes(base) != stage_hashes(base.model_copy(update={"movie_bin": 2}))
    assert stage_hashes(base) != stage_hashes(base.model_copy(update={"gain_rotate": 90}))
    assert stage_hashes(base) != stage_hashes(base.model_copy(update={"defect_path": str(defect_path)}))
    assert base.frame_preparation() == {}


def test_unusable_defect_file_or_size_is_a_clear_failure(tmp_path):
    frames = np.random.default_rng(0).poisson(2.0, size=(4, 66, 64))
    movie = _write_mrc(tmp_path / "m.mrc", frames)
    bad = tmp_path / "defects.txt"
    bad.write_text("BadPixels 1\n")
    out = process_exposure(movie, Settings(defect_path=str(bad), n_workers=0), tmp_path / "out")
    assert not out.ok and not out.transient and "line 1: BadPixels needs at least 2 values" in out.error
    out = process_exposure(movie, Settings(movie_bin=2, n_workers=0), tmp_path / "out")
    assert not out.ok and "cannot be binned by 2 to an even size" in out.error
    with pytest.raises(MovieError, match="no such file"):
        _cached_defects(str(tmp_path / "missing.txt"), (66, 64))


def test_cli_frame_options(tmp_path):
    """--gain-rotate/--gain-flip/--bin/--defect-file reach Settings (checked), and a defect file that does not fit
    the movies stops the command before any work, with the reason."""
    import typer
    from typer.testing import CliRunner

    from cryolive.cli import _frame_options, app

    base = Settings()
    s = _frame_options(base, 90, "x", None, 2)
    assert (s.gain_rotate, s.gain_flip, s.movie_bin, s.defect_path) == (90, "x", 2, None)
    assert s.gain_orientation == (270, True)
    for args, msg in (((45, "none", None, 1), "--gain-rotate must be 0, 90, 180 or 270"),
                      ((0, "z", None, 1), "--gain-flip must be none, y or x"),
                      ((0, "none", None, 0), "--bin must be an integer ≥ 1"),
                      ((0, "none", tmp_path / "nope.txt", 1), "no such file")):
        with pytest.raises(typer.BadParameter, match=msg):
            _frame_options(base, *args)
    with pytest.raises(typer.BadParameter, match="contradict"):
        _frame_options(Settings(gain_flip_y=True), 0, "x", None, 1)
    movies = tmp_path / "movies"
    movies.mkdir()
    _write_mrc(movies / "m.mrc", np.random.default_rng(0).poisson(2.0, size=(3, 64, 64)))
    defect_map = tmp_path / "map.mrc"
    with mrcfile.new(defect_map) as m:
        m.set_data(np.zeros((32, 32), np.uint8))
    res = CliRunner().invoke(app, ["process", str(movies), "--out", str(tmp_path / "o"), "--pixel-size", "1",
                                   "--dose-per-frame", "1", "--defect-file", str(defect_map), "--workers", "0"])
    assert res.exit_code == 2 and "differs from the movie frames 64×64" in res.output
    assert not (tmp_path / "o" / "session.sqlite").exists()


def test_super_resolution_hot_pixels_leave_no_ringing_after_binning():
    """Hot super-resolution pixels (2-50 extra counts per frame) become ringing blobs after Fourier binning; the
    session flags them on the binned sum with their neighbours, so no 7×7 window around one stands out of the
    micrograph's noise (< 4.5 sd; without the neighbours the worst reached 8.7 sd)."""
    from pathlib import Path

    from cryolive.io.movies import Movie

    class ArrayMovie(Movie):
        def __init__(self, frames):
            super().__init__(Path("a.mrc"), "mrc", frames.shape, np.dtype(np.float32))
            self.frames = frames

        def read_frames(self, start=0, stop=None):
            return self.frames[start:stop].copy()

    rng = np.random.default_rng(0)
    raw = rng.poisson(0.5, size=(16, 512, 512)).astype(np.float32)
    hot = rng.integers(20, 492, size=(10, 2))
    for (y, x), rate in zip(hot, [2, 5, 10, 20, 50] * 2):
        raw[:, y, x] += rng.poisson(rate, size=16)
    settings = Settings(movie_bin=2, motion=MotionSettings(patch_grid=(1, 1)))
    fns = StageFunctions().resolved()
    source, gain = prepare_movie(ArrayMovie(raw), None, None, settings, fns)
    motion, mask, _ = read_and_align_movie(source, gain, settings, 1.0, fns, torch.device("cpu"))
    mic = motion.micrograph_nodw.numpy()
    worst = max(np.abs(mic[y // 2 - 3 : y // 2 + 4, x // 2 - 3 : x // 2 + 4] - mic.mean()).max() for y, x in hot)
    assert worst < 4.5 * mic.std()
    assert int(mask.sum()) < 40 * 9  # a few flagged pixels and their neighbours, not the image
