"""Curation on a session: thresholds and overrides persisted, every exposure re-decided from the stored metrics
(nothing recomputed, nothing deleted), the decision reflected in exposures.star, particles.star and 2D."""

from __future__ import annotations

import dataclasses
import json
import sqlite3
from types import SimpleNamespace

import numpy as np
import pytest
from typer.testing import CliRunner

from cryolive.cli import app
from cryolive.config import Class2DSettings, Settings
from cryolive.io.star import read_star
from cryolive.preprocess.curation import ACCEPTED, PENDING, REJECTED, Thresholds
from cryolive.session import curation as cur
from cryolive.session.session import Session
from cryolive.session.store import SessionStore


def ctf_from_counts(image, pixel_size_angstrom, voltage_kv, cs_mm, amplitude_contrast, settings):
    """A CTF "fit" whose resolution is the mean count of the sum: 2 e/px per frame → 2·t Å for a t-frame movie."""
    res = float(round(float(image.mean())))
    return SimpleNamespace(defocus_u=15000.0, defocus_v=14000.0, defocus_angle_deg=30.0, astigmatism=1000.0,
                           max_resolution_angstrom=res, figure_of_merit=0.3)


FRAMES = {"m2": 2, "m3": 3, "m4": 4, "m5": 5}  # → CTF resolution 4, 6, 8, 10 Å


@pytest.fixture
def stages(fake_stages):
    return dataclasses.replace(fake_stages, estimate_ctf=ctf_from_counts)


@pytest.fixture
def session_out(tmp_path, movie_writer, small_settings, stages):
    """A processed session of four movies whose CTF resolutions are 4, 6, 8 and 10 Å."""
    movies = tmp_path / "movies"
    movies.mkdir()
    for i, (name, t) in enumerate(FRAMES.items()):
        movie_writer(movies / f"{name}.mrc", t=t, seed=i)
    out = tmp_path / "out"
    with Session(out, small_settings, stages=stages) as s:
        s.process([movies])
    return out


def _decisions(out):
    mics = read_star(out / "exposures.star")["micrographs"]
    names = mics["rlnMicrographMovieName"].map(lambda p: p.rsplit("/", 1)[-1][:-4])
    return dict(zip(names, mics["cryoliveDecision"])), dict(zip(names, mics["cryoliveRejectionReason"]))


def _particle_mics(out):
    p = read_star(out / "particles.star")["particles"]
    return sorted(set(p["rlnMicrographName"].map(lambda m: m.rsplit("/", 1)[-1][:-4])))


def test_threshold_change_redecides_every_exposure_and_rewrites_outputs(session_out):
    out = session_out
    dec, _ = _decisions(out)
    assert dec == {"m2": "accepted", "m3": "accepted", "m4": "accepted", "m5": "accepted"}  # default: ≤ 10 Å
    assert _particle_mics(out) == ["m2", "m3", "m4", "m5"]
    with SessionStore(out / "session.sqlite") as store:
        n_results = store.count_stage_results()
        created = [r["metrics"]["seconds"] for r in store.stage_results()]
    stacks = sorted(p.name for p in (out / "particles").glob("*.mrcs"))

    summary = cur.set_thresholds(out, {"max_ctf_resolution_angstrom": 7.0})
    assert summary.counts == {"accepted": 2, "rejected": 2, "pending": 0}
    dec, why = _decisions(out)
    assert dec == {"m2": "accepted", "m3": "accepted", "m4": "rejected", "m5": "rejected"}
    assert why == {"m2": "none", "m3": "none", "m4": "ctf_resolution_angstrom>7", "m5": "ctf_resolution_angstrom>7"}
    assert _particle_mics(out) == ["m2", "m3"]
    # a second bound on top of the first (the dict changes only the bounds it names)
    p_before = read_star(out / "particles.star")["particles"]
    summary = cur.set_thresholds(out, {"min_ctf_resolution_angstrom": 5.0})
    assert summary.thresholds.max_ctf_resolution_angstrom == 7.0
    assert _decisions(out)[0] == {"m2": "rejected", "m3": "accepted", "m4": "rejected", "m5": "rejected"}
    # back to a loose threshold: everything returns, rows identical to before (nothing was deleted or redone)
    cur.set_thresholds(out, Thresholds(max_ctf_resolution_angstrom=9.0))
    assert _particle_mics(out) == ["m2", "m3", "m4"]
    p_after = read_star(out / "particles.star")["particles"]
    keep = p_after["rlnMicrographName"].isin(p_before["rlnMicrographName"])
    assert p_after[keep].reset_index(drop=True).equals(p_before.reset_index(drop=True))
    with SessionStore(out / "session.sqlite") as store:
        assert store.count_stage_results() == n_results
        assert [r["metrics"]["seconds"] for r in store.stage_results()] == created
        assert [h["source"] for h in store.thresholds_history()] == ["curate"] * 3
        assert sorted(s for s, _ in store.decisions().values()) == [REJECTED, ACCEPTED, ACCEPTED, ACCEPTED]
    assert sorted(p.name for p in (out / "particles").glob("*.mrcs")) == stacks


def test_cli_curate_set_accept_reject_and_errors(session_out):
    out = str(session_out)
    runner = CliRunner()
    r = runner.invoke(app, ["curate", out, "--set", "max_ctf_resolution_angstrom=7", "--set", "min_particle_count=1"])
    assert r.exit_code == 0, r.output
    assert "2 accepted, 2 rejected, 0 pending" in r.output
    assert "max_ctf_resolution_angstrom=7" in r.output and "min_particle_count=1" in r.output
    r = runner.invoke(app, ["curate", out, "--reject", "m2", "--accept", "m5.mrc"])
    assert r.exit_code == 0, r.output and "2 accepted, 2 rejected" in r.output
    dec, why = _decisions(session_out)
    assert dec == {"m2": "rejected", "m3": "accepted", "m4": "rejected", "m5": "accepted"}
    assert why["m2"] == "manual_reject"
    mics = read_star(session_out / "exposures.star")["micrographs"]
    assert sorted(mics["cryoliveManualOverride"]) == ["accept", "none", "none", "reject"]
    assert _particle_mics(session_out) == ["m3", "m5"]
    r = runner.invoke(app, ["curate", out, "--clear-override", "m2", "--set", "max_ctf_resolution_angstrom=none"])
    assert r.exit_code == 0 and "4 accepted, 0 rejected" in r.output, r.output
    r = runner.invoke(app, ["curate", out])  # no change: prints the state
    assert r.exit_code == 0 and "thresholds: min_particle_count=1" in r.output and "4 accepted" in r.output
    for args, msg in [(["--set", "max_motion=3"], "unknown threshold"), (["--reject", "nope"], "no exposure"),
                      (["--set", "min_particle_count=5", "--set", "max_particle_count=2"], "above max_particle_count")]:
        r = runner.invoke(app, ["curate", out, *args])
        assert r.exit_code == 2 and msg in r.output, r.output
    r = runner.invoke(app, ["curate", str(session_out.parent / "nothing")])
    assert r.exit_code == 2 and "no cryolive session" in r.output


def test_pending_exposures_wait_and_do_not_go_downstream(session_out, movie_writer, small_settings, stages):
    out = session_out
    with Session(out, small_settings, stages=stages) as s:  # a movie registered, not processed yet
        movie_writer(out.parent / "movies" / "m9.mrc", t=2, seed=9)
        s.add_movies([out.parent / "movies" / "m9.mrc"])
        # m3's and m4's picking was redone by a picker that records no pick scores (as before they existed)
        for e in s.store.exposures():
            if e.name in ("m3", "m4"):
                s.store.record_stage(e.id, "picking", "older-picker", {"seconds": 1.0, "n_picks": 16})
        summary = cur.set_thresholds(out, {"min_mean_pick_score": 0.4, "max_ctf_resolution_angstrom": 7.0},
                                     store=s.store)
        by_name = dict(zip(summary.table.frame["name"], summary.decision.status.tolist()))
        reasons = dict(zip(summary.table.frame["name"], summary.decision.reasons))
    # m9: nothing computed → pending; m3: score pending, CTF fine → pending; m4: score pending but CTF fails
    assert by_name == {"m2": ACCEPTED, "m3": PENDING, "m4": REJECTED, "m5": REJECTED, "m9": PENDING}
    assert reasons["m3"] == ["mean_pick_score_pending"]
    assert reasons["m4"] == ["ctf_resolution_angstrom>7", "mean_pick_score_pending"]
    dec, why = _decisions(out)  # exposures.star: the exposures done
    assert dec == {"m2": "accepted", "m3": "pending", "m4": "rejected", "m5": "rejected"}
    assert why["m3"] == "mean_pick_score_pending"
    mics = read_star(out / "exposures.star")["micrographs"]
    assert mics.loc[mics["cryoliveDecision"] == "pending", "cryoliveAccepted"].tolist() == [0]
    assert _particle_mics(out) == ["m2"]


def test_running_session_picks_up_thresholds_changed_elsewhere(session_out, small_settings, stages):
    out = session_out
    with Session(out, small_settings, stages=stages, output_interval_s=0.0) as s:
        # another process (the CLI, the dashboard) changes the thresholds without writing files
        with SessionStore(out / "session.sqlite") as other:
            cur.set_thresholds(out, {"max_ctf_resolution_angstrom": 5.0}, write_files=False, store=other)
        assert _decisions(out)[0]["m3"] == "accepted"  # files not rewritten yet
        s.step(timeout=0.1)
        assert _decisions(out)[0] == {"m2": "accepted", "m3": "rejected", "m4": "rejected", "m5": "rejected"}
        assert _particle_mics(out) == ["m2"]


def test_thresholds_given_at_start_are_kept_on_resume(tmp_path, movie_writer, small_settings, stages):
    movie_writer(tmp_path / "m3.mrc", t=3)
    out = tmp_path / "out"
    with Session(out, small_settings, stages=stages, thresholds=Thresholds(max_ctf_resolution_angstrom=5.0)) as s:
        s.process([tmp_path / "m3.mrc"])
    assert _decisions(out)[0] == {"m3": "rejected"}
    cur.set_thresholds(out, {"max_ctf_resolution_angstrom": 6.5})
    with Session(out, small_settings, stages=stages) as s:  # resumed without thresholds: the saved ones stand
        s.process([tmp_path / "m3.mrc"])
        assert [h["source"] for h in s.store.thresholds_history()] == ["start", "curate"]
    assert _decisions(out)[0] == {"m3": "accepted"}
    # --thresholds FILE and --threshold key=value on the command line
    (tmp_path / "t.json").write_text(json.dumps({"max_ctf_resolution_angstrom": 4.0, "min_particle_count": 3}))
    r = CliRunner().invoke(app, ["process", str(tmp_path / "m3.mrc"), "--out", str(tmp_path / "o2"),
                                 "--pixel-size", "2", "--dose-per-frame", "1", "--thresholds",
                                 str(tmp_path / "t.json"), "--threshold", "max_motion_total_angstrom=50",
                                 "--threshold", "max_ctf_resolution_angstrom=nan"])
    assert r.exit_code == 2 and "finite" in r.output
    r = CliRunner().invoke(app, ["process", str(tmp_path / "none.mrc"), "--out", str(tmp_path / "o3"),
                                 "--pixel-size", "2", "--dose-per-frame", "1", "--thresholds",
                                 str(tmp_path / "t.json"), "--threshold", "max_motion_total_angstrom=50",
                                 "--workers", "0"])
    with SessionStore(tmp_path / "o3" / "session.sqlite") as store:
        _, saved = store.current_thresholds()
    assert saved["max_ctf_resolution_angstrom"] == 4.0 and saved["min_particle_count"] == 3
    assert saved["max_motion_total_angstrom"] == 50


def test_store_round_trip_and_older_store_gets_the_curation_tables(tmp_path):
    path = tmp_path / "session.sqlite"
    db = sqlite3.connect(path)  # a store as issue 2 wrote it: no curation tables
    db.executescript("""
        CREATE TABLE exposures (id INTEGER PRIMARY KEY AUTOINCREMENT, path TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
            size INTEGER, mtime REAL, status TEXT NOT NULL DEFAULT 'pending', error TEXT,
            attempts INTEGER NOT NULL DEFAULT 0, n_particles INTEGER, fed_2d INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL, updated REAL NOT NULL, finished REAL);
        CREATE TABLE stage_results (exposure_id INTEGER NOT NULL, stage TEXT NOT NULL, settings_hash TEXT NOT NULL,
            metrics TEXT NOT NULL, outputs TEXT NOT NULL, created REAL NOT NULL,
            PRIMARY KEY (exposure_id, stage, settings_hash));
        INSERT INTO exposures (path, name, status, n_particles, created, updated)
            VALUES ('/d/a.tif', 'a', 'done', 40, 0, 0);
        INSERT INTO stage_results VALUES (1, 'ctf', 'h',
            '{"max_resolution_angstrom": 6.0, "defocus_u": NaN, "defocus_v": 14000.0}', '{}', 0);
    """)
    db.commit()
    db.close()
    with SessionStore(path) as store:
        assert store.current_thresholds() is None
        t1 = store.save_thresholds(Thresholds(max_ctf_resolution_angstrom=5.0).model_dump(), source="start")
        t2 = store.save_thresholds(Thresholds(max_ctf_resolution_angstrom=8.0).model_dump(), source="dashboard")
        store.set_override(1, -1, note="ice")
        store.set_override(1, 1)
        with pytest.raises(ValueError):
            store.set_override(1, 2)
        table = cur.exposure_table(store)
        d = cur.curate(store, settings=Settings())
    assert t2 > t1
    f = table.frame.iloc[0]
    assert f["ctf_resolution_angstrom"] == 6.0 and np.isnan(f["rlnDefocusU"]) and f["particle_count"] == 40
    assert bool(table.pending["defocus_angstrom"].iloc[0]) is False  # measured as NaN: not pending
    assert bool(table.pending["motion_total_angstrom"].iloc[0]) is True  # no motion result: pending
    assert d.decision.status.tolist() == [ACCEPTED]  # the manual accept wins over the pending motion
    with SessionStore(path) as store:  # reopened: everything persisted
        tid, thresholds = store.current_thresholds()
        assert tid == t2 and thresholds["max_ctf_resolution_angstrom"] == 8.0
        assert [h["source"] for h in store.thresholds_history()] == ["start", "dashboard"]
        assert store.overrides() == {1: 1}
        assert store.decisions() == {1: (ACCEPTED, "")}
        store.set_override(1, None)
        assert store.overrides() == {}


def test_rejected_after_2d_keeps_its_classes_but_leaves_particles_star(tmp_path, movie_writer, small_settings, stages):
    movies = tmp_path / "movies"
    movies.mkdir()
    for i, (name, t) in enumerate(FRAMES.items()):
        movie_writer(movies / f"{name}.mrc", t=t, seed=i)
    settings = small_settings.model_copy(update={"class2d": Class2DSettings(
        n_classes=2, min_particles_to_start=8, batch_size=16, n_psi=4, max_shift_px=1)})
    out = tmp_path / "out"
    with Session(out, settings, stages=stages) as s:
        s.process([movies])
        seen = s.class2d.n_particles_seen
        ids = {e.name: e.id for e in s.store.exposures()}
        classes_m5 = s.store.particle_classes(ids["m5"])
    p = read_star(out / "particles.star")["particles"]
    assert seen == len(p) > 0 and len(classes_m5) > 0 and "rlnClassNumber" in p
    cur.set_thresholds(out, {"max_ctf_resolution_angstrom": 9.0})
    assert _particle_mics(out) == ["m2", "m3", "m4"]
    with Session(out, settings, stages=stages) as s:
        s.process([movies])  # nothing new: the classifier is not fed again, m5's classes stay in the store
        assert s.class2d.n_particles_seen == seen
        assert s.store.particle_classes(ids["m5"]) == classes_m5
    cur.set_override(out, {"m5": 1})  # accepted again: back in particles.star with its classes
    p2 = read_star(out / "particles.star")["particles"]
    assert len(p2) == len(p) and (p2["rlnClassNumber"].to_numpy() == p["rlnClassNumber"].to_numpy()).all()
