"""The session store: idempotent stage results, exposure life cycle, resume bookkeeping."""

from __future__ import annotations

import sqlite3

from cryolive.session.store import SessionStore


def test_same_stage_and_settings_hash_is_a_no_op(tmp_path):
    store = SessionStore(tmp_path / "session.sqlite")
    eid, created = store.add_exposure(tmp_path / "a.tif", 10, 1.0)
    assert created
    assert store.record_stage(eid, "motion", "h1", {"seconds": 1.0}, {"micrograph": "micrographs/a.mrc"})
    assert not store.record_stage(eid, "motion", "h1", {"seconds": 99.0}, {"micrograph": "other.mrc"})
    assert store.count_stage_results(eid, "motion") == 1
    assert store.stage_result(eid, "motion", "h1")["metrics"] == {"seconds": 1.0}
    # other settings: a new result beside the first
    assert store.record_stage(eid, "motion", "h2", {"seconds": 2.0})
    assert store.count_stage_results(eid, "motion") == 2


def test_duplicate_paths_and_life_cycle(tmp_path):
    store = SessionStore(tmp_path / "session.sqlite")
    eid, _ = store.add_exposure(tmp_path / "a.tif")
    eid2, created = store.add_exposure(tmp_path / "sub" / ".." / "a.tif")
    assert eid2 == eid and not created
    assert store.has_exposure(tmp_path / "a.tif")
    store.mark_processing(eid)
    assert store.counts()["processing"] == 1
    # a session stopped while processing: on resume the exposure goes back to the queue
    store.close()
    store = SessionStore(tmp_path / "session.sqlite")
    assert store.requeue_interrupted() == 1
    exp = store.get_exposure(eid)
    assert exp.status == "pending" and exp.attempts == 1
    store.mark_processing(eid)
    store.mark_failed(eid, "truncated: ...")
    assert store.get_exposure(eid).error == "truncated: ..." and store.get_exposure(eid).attempts == 2
    store.set_value("x", {"a": [1, 2]})
    assert store.get_value("x") == {"a": [1, 2]}
    assert store.get_value("missing", 5) == 5


def test_wal_journal(tmp_path):
    SessionStore(tmp_path / "s.sqlite").close()
    with sqlite3.connect(tmp_path / "s.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
