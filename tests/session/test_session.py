"""Orchestration: outputs per CONTRACT.md, failures isolated with their reasons, resume without repeats."""

from __future__ import annotations

import math

import mrcfile
import numpy as np

from cryolive.config import AcceptanceSettings
from cryolive.io.star import read_star
from cryolive.session.pipeline import STAGES
from cryolive.session.session import Session

EXPOSURE_COLUMNS = {
    "rlnMicrographMovieName", "rlnMicrographName", "rlnOpticsGroup", "rlnAccumMotionTotal",
    "rlnAccumMotionEarly", "rlnAccumMotionLate", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
    "rlnCtfAstigmatism", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit",
    "cryoliveIceThicknessAngstrom", "cryoliveParticleCount", "cryoliveAccepted", "cryoliveRejectionReason",
}
OPTICS_COLUMNS = {"rlnOpticsGroup", "rlnOpticsGroupName", "rlnMicrographOriginalPixelSize", "rlnMicrographPixelSize",
                  "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast"}
PARTICLE_COLUMNS = {"rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnDefocusU",
                    "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup"}


def test_bad_movies_fail_with_reasons_and_the_others_complete(tmp_path, movie_writer, fake_stages,
                                                             small_settings):
    movies = tmp_path / "movies"
    movies.mkdir()
    for i in range(3):
        movie_writer(movies / f"good_{i}.mrc", seed=i)
    movie_writer(movies / "good_3.tif", seed=3)
    cut = movie_writer(movies / "cut.mrc")
    with open(cut, "r+b") as f:
        f.truncate(cut.stat().st_size - 100)
    with mrcfile.new(movies / "small.mrc") as m:  # registered after the good ones set the frame size
        m.set_data(np.zeros((4, 32, 32), np.uint8))
    out = tmp_path / "out"
    with Session(out, small_settings, stages=fake_stages) as s:
        s.add_movies(sorted(movies.glob("good_*")))
        status = s.process([movies])
        failed = {e.name: e.error for e in s.store.exposures("failed")}
    assert status.n_done == 4 and status.n_failed == 2
    assert "truncated" in failed["cut"] and "frame size 32×32 differs from the session's 64×64" in failed["small"]

    ex = read_star(out / "exposures.star")
    assert OPTICS_COLUMNS <= set(ex["optics"].columns)
    mics = ex["micrographs"]
    assert EXPOSURE_COLUMNS <= set(mics.columns) and len(mics) == 4
    assert (mics["rlnDefocusU"] == 15000.0).all() and mics["cryoliveIceThicknessAngstrom"].isna().all()
    for name in mics["rlnMicrographName"]:
        assert (out / name).is_file()
    parts = read_star(out / "particles.star")
    assert OPTICS_COLUMNS | {"rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"} <= set(parts["optics"])
    p = parts["particles"]
    assert PARTICLE_COLUMNS <= set(p.columns)
    assert len(p) == int(mics["cryoliveParticleCount"].sum()) == 4 * 16
    idx, stack = p["rlnImageName"].iloc[17].split("@")
    with mrcfile.open(out / stack) as m:  # 1-based index into the per-movie stack
        assert m.data.shape == (16, 16, 16) and 1 <= int(idx) <= 16
    motion = read_star(out / "motion" / "good_0.star")
    assert motion["general"]["rlnImageSizeZ"] == 4 and motion["general"]["rlnImageSizeX"] == 64
    assert list(motion["global_shift"]["rlnMicrographFrameNumber"]) == [1, 2, 3, 4]
    assert (out / "provenance.json").is_file()


def test_unreadable_gain_fails_each_exposure_with_the_reason(tmp_path, movie_writer, fake_stages, small_settings):
    movie_writer(tmp_path / "a.mrc")
    (tmp_path / "gain.mrc").write_bytes(b"garbage")
    settings = small_settings.model_copy(update={"gain_path": str(tmp_path / "gain.mrc")})
    with Session(tmp_path / "out", settings, stages=fake_stages) as s:
        status = s.process([tmp_path / "a.mrc"])
        (exp,) = s.store.exposures()
    assert status.n_failed == 1 and exp.status == "failed" and "gain reference gain.mrc" in exp.error


def test_rejected_exposure_keeps_its_particles_out_of_particles_star(tmp_path, movie_writer, fake_stages,
                                                                     small_settings):
    movie_writer(tmp_path / "a.mrc")
    strict = small_settings.model_copy(update={"acceptance": AcceptanceSettings(max_ctf_resolution_angstrom=4.0)})
    with Session(tmp_path / "out", strict, stages=fake_stages) as s:
        s.process([tmp_path / "a.mrc"])
    mics = read_star(tmp_path / "out" / "exposures.star")["micrographs"]
    assert mics["cryoliveAccepted"].tolist() == [0]
    assert mics["cryoliveRejectionReason"].iloc[0] == "ctf_resolution_angstrom>4"  # fit holds to 5 Å only
    assert not (tmp_path / "out" / "particles.star").exists()


def test_live_stopped_and_restarted_processes_each_movie_once(tmp_path, movie_writer, fake_stages,
                                                             small_settings):
    watch = tmp_path / "watch"
    watch.mkdir()
    for i in range(4):
        movie_writer(watch / f"m{i}.mrc", seed=i)
    out = tmp_path / "out"
    with Session(out, small_settings, stages=fake_stages) as s:
        first = s.live(watch, settle_s=0.05, poll_s=0.02, max_exposures=2)
    assert first.n_done == 2
    movie_writer(watch / "m4.tif", seed=4)  # arrives while the session is stopped
    with Session(out, small_settings, stages=fake_stages) as s:
        second = s.live(watch, settle_s=0.05, poll_s=0.02, stop_after_idle_s=0.5)
        exposures = s.store.exposures()
        assert second.n_done == 5
        for e in exposures:
            assert e.attempts == 1, e
            for stage in STAGES:
                assert s.store.count_stage_results(e.id, stage) == 1
    mics = read_star(out / "exposures.star")["micrographs"]
    assert sorted(mics["rlnMicrographName"]) == [f"micrographs/m{i}.mrc" for i in range(5)]
    assert all(math.isfinite(v) for v in mics["rlnCtfMaxResolution"])


def test_missing_gain_and_gain_of_the_wrong_shape(tmp_path, movie_writer, fake_stages, small_settings):
    movie_writer(tmp_path / "a.mrc")
    with mrcfile.new(tmp_path / "gain.mrc") as m:
        m.set_data(np.ones((32, 32), np.float32))
    for gain, reason in [(tmp_path / "none.mrc", "no such file"), (tmp_path / "gain.mrc", "differs from the movie")]:
        settings = small_settings.model_copy(update={"gain_path": str(gain)})
        with Session(tmp_path / f"out_{gain.stem}", settings, stages=fake_stages) as s:
            s.process([tmp_path / "a.mrc"])
            (exp,) = s.store.exposures()
        assert exp.status == "failed" and reason in exp.error, exp.error


def test_worker_process_dying_fails_only_its_movie(tmp_path, movie_writer, crashing_stages, small_settings):
    """Worker processes (spawn) really run the chain; a worker that dies is replaced and its movie retried,
    then recorded failed; the other movies complete."""
    movies = tmp_path / "movies"
    movies.mkdir()
    movie_writer(movies / "a.mrc", t=4)
    movie_writer(movies / "dies.mrc", t=3)
    movie_writer(movies / "b.mrc", t=4, seed=2)
    settings = small_settings.model_copy(update={"n_workers": 3})  # all three in flight at once
    with Session(tmp_path / "out", settings, stages=crashing_stages, max_attempts=2) as s:
        status = s.process([movies])
        by_name = {e.name: e for e in s.store.exposures()}
    assert status.n_done == 2 and status.n_failed == 1
    assert by_name["dies"].status == "failed" and "worker process died 2 times" in by_name["dies"].error
    assert by_name["a"].status == by_name["b"].status == "done"


def test_2d_state_is_saved_and_reloaded_on_resume(tmp_path, movie_writer, fake_stages, small_settings):
    import torch

    from cryolive.classify2d import StreamingClassifier2D
    from cryolive.config import Class2DSettings

    settings = small_settings.model_copy(
        update={"class2d": Class2DSettings(n_classes=2, min_particles_to_start=20, batch_size=16, n_psi=4,
                                           max_shift_px=1)})
    for i in range(3):
        movie_writer(tmp_path / f"m{i}.mrc", seed=i)
    out = tmp_path / "out"
    with Session(out, settings, stages=fake_stages) as s:
        s.process([tmp_path / "m0.mrc", tmp_path / "m1.mrc"])  # 32 particles ≥ 20: 2D starts
    table = read_star(out / "class2d" / "classes.star")["model_classes"]
    assert table["rlnReferenceImage"].tolist() == ["000001@class2d/classes.mrcs", "000002@class2d/classes.mrcs"]
    with Session(out, settings, stages=fake_stages) as s:
        s.process([tmp_path / "m2.mrc"])
    clf = StreamingClassifier2D(2, 16, 2.0, settings.optics, settings.class2d, "cpu")
    clf.load_state_dict(torch.load(out / "class2d" / "state.pt", weights_only=False))
    assert clf.snapshot().n_particles_seen == 48  # 32 before the restart + 16 after: the state was reloaded
    p = read_star(out / "particles.star")["particles"]
    assert len(p) == 48 and set(p["rlnClassNumber"]) <= {1, 2} and (p["rlnClassNumber"] > 0).all()


def test_algorithm_error_is_recorded_with_its_stage_and_no_partial_results(tmp_path, movie_writer,
                                                                           failing_ctf_stages, small_settings):
    movie_writer(tmp_path / "a.mrc")
    with Session(tmp_path / "out", small_settings, stages=failing_ctf_stages) as s:
        status = s.process([tmp_path / "a.mrc"])
        (exp,) = s.store.exposures()
        assert s.store.count_stage_results(exp.id) == 0  # motion ran, but the exposure is recorded as a whole
    assert status.n_failed == 1 and exp.error == "ctf: ValueError: no Thon rings" and exp.attempts == 1
