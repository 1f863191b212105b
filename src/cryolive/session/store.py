"""The session's state in SQLite (``OUT/session.sqlite``, WAL journal): the source of truth for resuming.

Tables:
  * ``exposures``: one row per movie seen (path unique), its status (pending, processing, done, failed),
    the reason of a failure, its particle count, timestamps and the number of processing attempts.
  * ``stage_results``: one row per (exposure, stage, settings hash) with metrics and outputs as JSON.
    Recording the same key again is a no-op, so repeating work with the same settings changes nothing.
  * ``particle_classes``: the 2D class of each particle (exposure, 0-based index in its stack).
  * ``kv``: session state (settings, path of the 2D classifier state, ...), values as JSON.
  * ``curation_thresholds``: every thresholds setting ever made (JSON of
    :class:`cryolive.preprocess.curation.Thresholds`, its source: "start", "curate", "dashboard"...); the last
    row is the current one. ``curation_overrides``: manual decisions per exposure (+1 accept, -1 reject).
    ``curation_decisions``: the last decision per exposure (status 1 accepted, 0 rejected, 2 pending; reasons
    joined by ","; the thresholds row it used). ``curation_metrics``: a cache of each exposure's curation metrics
    (a float64 blob whose ``layout`` the curation module names), derived from ``stage_results`` and refreshed
    when an exposure's ``stamp`` (its latest stage result's rowid) changes. See :mod:`cryolive.session.curation`.
    These tables are created on opening an older store (``CREATE TABLE IF NOT EXISTS``): nothing to migrate.

Only the session process writes; workers return results to it. One connection guarded by a lock, so the
orchestrator's threads may share a :class:`SessionStore`.

Example::

    store = SessionStore("OUT/session.sqlite")
    eid, new = store.add_exposure("movies/a.tif")
    store.record_stage(eid, "motion", "abc123", {"seconds": 1.2}, {"micrograph": "micrographs/a.mrc"})
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("pending", "processing", "done", "failed")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS exposures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    path TEXT NOT NULL UNIQUE,
    name TEXT NOT NULL,
    size INTEGER,
    mtime REAL,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    n_particles INTEGER,
    fed_2d INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS stage_results (
    exposure_id INTEGER NOT NULL REFERENCES exposures(id),
    stage TEXT NOT NULL,
    settings_hash TEXT NOT NULL,
    metrics TEXT NOT NULL,
    outputs TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (exposure_id, stage, settings_hash)
);
CREATE TABLE IF NOT EXISTS particle_classes (
    exposure_id INTEGER NOT NULL REFERENCES exposures(id),
    particle_index INTEGER NOT NULL,
    class_number INTEGER NOT NULL,
    PRIMARY KEY (exposure_id, particle_index)
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS curation_thresholds (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    thresholds TEXT NOT NULL,
    source TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS curation_overrides (
    exposure_id INTEGER PRIMARY KEY REFERENCES exposures(id),
    decision INTEGER NOT NULL,
    note TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS curation_metrics (
    exposure_id INTEGER PRIMARY KEY REFERENCES exposures(id),
    stamp INTEGER NOT NULL,
    layout TEXT NOT NULL,
    vals BLOB NOT NULL,
    micrograph TEXT
);
CREATE TABLE IF NOT EXISTS curation_decisions (
    exposure_id INTEGER PRIMARY KEY REFERENCES exposures(id),
    status INTEGER NOT NULL,
    reasons TEXT NOT NULL,
    thresholds_id INTEGER,
    decided REAL NOT NULL
);
"""


@dataclass(frozen=True)
class Exposure:
    """One row of the exposures table."""

    id: int
    path: str
    name: str
    size: int | None
    mtime: float | None
    status: str
    error: str | None
    attempts: int
    n_particles: int | None
    fed_2d: bool
    created: float
    updated: float
    finished: float | None


class SessionStore:
    """SQLite store of one session (single writer: the session process)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, timeout=30.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _tx(self):
        return _Transaction(self._db, self._lock)

    # ------------------------------------------------------------------ exposures
    def add_exposure(self, path: str | os.PathLike, size: int | None = None, mtime: float | None = None,
                     status: str = "pending", error: str | None = None) -> tuple[int, bool]:
        """Register a movie (absolute path); return ``(id, created)``. An existing path is left unchanged."""
        p = str(Path(path).resolve())
        now = time.time()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO exposures (path, name, size, mtime, status, error, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (p, Path(p).stem, size, mtime, status, error, now, now),
            )
            created = cur.rowcount == 1
            eid = db.execute("SELECT id FROM exposures WHERE path = ?", (p,)).fetchone()[0]
        return int(eid), created

    def has_exposure(self, path: str | os.PathLike) -> bool:
        p = str(Path(path).resolve())
        with self._lock:
            return self._db.execute("SELECT 1 FROM exposures WHERE path = ?", (p,)).fetchone() is not None

    def known_paths(self) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute("SELECT path FROM exposures")}

    def get_exposure(self, exposure_id: int) -> Exposure:
        with self._lock:
            row = self._db.execute("SELECT * FROM exposures WHERE id = ?", (exposure_id,)).fetchone()
        if row is None:
            raise KeyError(exposure_id)
        return _exposure(row)

    def exposures(self, status: str | None = None) -> list[Exposure]:
        """All exposures (optionally of one status), in the order they were registered."""
        with self._lock:
            if status is None:
                rows = self._db.execute("SELECT * FROM exposures ORDER BY id").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM exposures WHERE status = ? ORDER BY id", (status,)).fetchall()
        return [_exposure(r) for r in rows]

    def counts(self) -> dict[str, int]:
        """Number of exposures per status (every status present, 0 if none)."""
        out = {s: 0 for s in STATUSES}
        with self._lock:
            for status, n in self._db.execute("SELECT status, COUNT(*) FROM exposures GROUP BY status"):
                out[status] = int(n)
        return out

    def mark_processing(self, exposure_id: int) -> None:
        """Mark an exposure taken by a worker; counts an attempt."""
        with self._tx() as db:
            db.execute("UPDATE exposures SET status='processing', attempts = attempts + 1, updated=? WHERE id=?",
                       (time.time(), exposure_id))

    def mark_done(self, exposure_id: int, n_particles: int | None) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE exposures SET status='done', error=NULL, n_particles=?, updated=?, finished=? "
                       "WHERE id=?", (n_particles, now, now, exposure_id))

    def mark_failed(self, exposure_id: int, error: str) -> None:
        now = time.time()
        with self._tx() as db:
            db.execute("UPDATE exposures SET status='failed', error=?, updated=?, finished=? WHERE id=?",
                       (error, now, now, exposure_id))

    def mark_pending(self, exposure_id: int, error: str | None = None) -> None:
        """Put an exposure back in the queue (a transient failure, or a crash while processing)."""
        with self._tx() as db:
            db.execute("UPDATE exposures SET status='pending', error=?, updated=? WHERE id=?",
                       (error, time.time(), exposure_id))

    def requeue_interrupted(self) -> int:
        """On resume: exposures left 'processing' by a stopped session go back to 'pending'. Returns how many."""
        with self._tx() as db:
            cur = db.execute("UPDATE exposures SET status='pending', updated=? WHERE status='processing'",
                             (time.time(),))
            return int(cur.rowcount)

    def mark_fed_2d(self, exposure_ids) -> None:
        with self._tx() as db:
            db.executemany("UPDATE exposures SET fed_2d=1 WHERE id=?", [(int(i),) for i in exposure_ids])

    def mark_unfed_2d(self, exposure_ids) -> None:
        """Feed these exposures' particles to 2D again (e.g. after re-extraction)."""
        with self._tx() as db:
            db.executemany("UPDATE exposures SET fed_2d=0 WHERE id=?", [(int(i),) for i in exposure_ids])

    # ------------------------------------------------------------------ stage results
    def record_stage(self, exposure_id: int, stage: str, settings_hash: str, metrics: dict,
                     outputs: dict | None = None) -> bool:
        """Record a stage's result; return False (and change nothing) if this key is already recorded."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO stage_results (exposure_id, stage, settings_hash, metrics, outputs, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (exposure_id, stage, settings_hash, json.dumps(metrics, default=_json_default),
                 json.dumps(outputs or {}, default=_json_default), time.time()),
            )
            return cur.rowcount == 1

    def stage_result(self, exposure_id: int, stage: str, settings_hash: str | None = None) -> dict | None:
        """``{"metrics": ..., "outputs": ..., "settings_hash": ...}`` of a stage (latest if no hash given)."""
        with self._lock:
            if settings_hash is None:
                row = self._db.execute(
                    "SELECT * FROM stage_results WHERE exposure_id=? AND stage=? ORDER BY created DESC LIMIT 1",
                    (exposure_id, stage)).fetchone()
            else:
                row = self._db.execute(
                    "SELECT * FROM stage_results WHERE exposure_id=? AND stage=? AND settings_hash=?",
                    (exposure_id, stage, settings_hash)).fetchone()
        if row is None:
            return None
        return {"metrics": json.loads(row["metrics"]), "outputs": json.loads(row["outputs"]),
                "settings_hash": row["settings_hash"]}

    def stage_results(self, stage: str | None = None) -> list[dict]:
        """Every recorded stage result (optionally of one stage) with its exposure id."""
        with self._lock:
            q = "SELECT * FROM stage_results" + (" WHERE stage=?" if stage else "") + " ORDER BY exposure_id, created"
            rows = self._db.execute(q, (stage,) if stage else ()).fetchall()
        return [{"exposure_id": r["exposure_id"], "stage": r["stage"], "settings_hash": r["settings_hash"],
                 "metrics": json.loads(r["metrics"]), "outputs": json.loads(r["outputs"])} for r in rows]

    def stage_metrics_after(self, stage: str, after_rowid: int = 0) -> list[tuple[int, int, dict]]:
        """``(rowid, exposure id, metrics)`` of one stage's results recorded after ``after_rowid``, in rowid order
        (for readers that keep what they have already parsed)."""
        with self._lock:
            rows = self._db.execute("SELECT rowid, exposure_id, metrics FROM stage_results WHERE stage=? AND rowid>? "
                                    "ORDER BY rowid", (stage, int(after_rowid))).fetchall()
        return [(int(r[0]), int(r[1]), json.loads(r[2])) for r in rows]

    def count_stage_results(self, exposure_id: int | None = None, stage: str | None = None) -> int:
        q, args = "SELECT COUNT(*) FROM stage_results WHERE 1=1", []
        if exposure_id is not None:
            q, args = q + " AND exposure_id=?", args + [exposure_id]
        if stage is not None:
            q, args = q + " AND stage=?", args + [stage]
        with self._lock:
            return int(self._db.execute(q, args).fetchone()[0])

    # ------------------------------------------------------------------ particles' classes
    def set_particle_classes(self, exposure_id: int, indices, classes) -> None:
        """Store the 2D class (1-based) of particles of one exposure (0-based indices in its stack)."""
        rows = [(int(exposure_id), int(i), int(c)) for i, c in zip(indices, classes)]
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO particle_classes VALUES (?, ?, ?)", rows)

    def clear_particle_classes(self, exposure_id: int) -> None:
        """Forget the 2D classes of an exposure's particles (its particle stack changed)."""
        with self._tx() as db:
            db.execute("DELETE FROM particle_classes WHERE exposure_id=?", (int(exposure_id),))

    def particle_classes(self, exposure_id: int) -> dict[int, int]:
        with self._lock:
            rows = self._db.execute("SELECT particle_index, class_number FROM particle_classes WHERE exposure_id=?",
                                    (exposure_id,)).fetchall()
        return {int(i): int(c) for i, c in rows}

    # ------------------------------------------------------------------ curation
    def save_thresholds(self, thresholds: dict, source: str = "") -> int:
        """Make ``thresholds`` (a JSON-able dict) the current thresholds; return the id of the new row."""
        with self._tx() as db:
            cur = db.execute("INSERT INTO curation_thresholds (thresholds, source, created) VALUES (?, ?, ?)",
                             (json.dumps(thresholds, sort_keys=True), source, time.time()))
            return int(cur.lastrowid)

    def current_thresholds(self) -> tuple[int, dict] | None:
        """``(id, thresholds dict)`` of the current thresholds, or None if none were ever saved."""
        with self._lock:
            row = self._db.execute("SELECT id, thresholds FROM curation_thresholds ORDER BY id DESC LIMIT 1").fetchone()
        return None if row is None else (int(row[0]), json.loads(row[1]))

    def thresholds_history(self) -> list[dict]:
        """Every thresholds setting, oldest first: ``{"id", "thresholds", "source", "created"}``."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM curation_thresholds ORDER BY id").fetchall()
        return [{"id": r["id"], "thresholds": json.loads(r["thresholds"]), "source": r["source"],
                 "created": r["created"]} for r in rows]

    def set_override(self, exposure_id: int, decision: int | None, note: str | None = None) -> None:
        """Manual decision on one exposure: +1 accept, -1 reject, None/0 removes the override."""
        with self._tx() as db:
            if not decision:
                db.execute("DELETE FROM curation_overrides WHERE exposure_id=?", (int(exposure_id),))
            else:
                if decision not in (1, -1):
                    raise ValueError(f"override must be +1 (accept), -1 (reject) or None, got {decision!r}")
                db.execute("INSERT OR REPLACE INTO curation_overrides VALUES (?, ?, ?, ?)",
                           (int(exposure_id), int(decision), note, time.time()))

    def overrides(self) -> dict[int, int]:
        """Manual decisions: exposure id → +1 (accept) or -1 (reject)."""
        with self._lock:
            return {int(e): int(d) for e, d in self._db.execute("SELECT exposure_id, decision FROM curation_overrides")}

    def curation_version(self) -> tuple:
        """Changes whenever thresholds or overrides change (a running session polls it to re-decide)."""
        with self._lock:
            t = self._db.execute("SELECT MAX(id) FROM curation_thresholds").fetchone()[0]
            o = self._db.execute("SELECT COUNT(*), MAX(created), TOTAL(decision * exposure_id) "
                                 "FROM curation_overrides").fetchone()
        return (t, *o)

    def save_decisions(self, exposure_ids, status, reasons, thresholds_id: int | None) -> None:
        """Record the decision on many exposures at once (arrays aligned; replaces earlier decisions)."""
        now = time.time()
        rows = zip(map(int, exposure_ids), map(int, status), map(str, reasons))
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO curation_decisions VALUES (?, ?, ?, ?, ?)",
                           ((e, s, r, thresholds_id, now) for e, s, r in rows))

    def decisions(self) -> dict[int, tuple[int, str]]:
        """The last recorded decision per exposure: id → (status 1/0/2, reasons joined by ",")."""
        with self._lock:
            return {int(e): (int(s), r) for e, s, r in
                    self._db.execute("SELECT exposure_id, status, reasons FROM curation_decisions")}

    def latest_stage_metrics(self, stages, exposure_ids=None) -> dict[tuple[int, str], dict]:
        """``{(exposure id, stage): {"metrics": ..., "outputs": ...}}`` of the latest result of each stage, for
        every exposure (or those of ``exposure_ids``) at once (for curation and the aggregate STAR files)."""
        stages = list(stages)
        q = ("SELECT exposure_id, stage, metrics, outputs FROM stage_results WHERE stage IN (%s)"
             % ",".join("?" * len(stages)))
        with self._lock:
            if exposure_ids is None:
                rows = self._db.execute(q + " ORDER BY exposure_id, created", stages).fetchall()
            else:
                ids = [int(i) for i in exposure_ids]
                rows = []
                for i in range(0, len(ids), 500):
                    chunk = ids[i : i + 500]
                    rows += self._db.execute(q + " AND exposure_id IN (%s) ORDER BY exposure_id, created"
                                             % ",".join("?" * len(chunk)), stages + chunk).fetchall()
        loads = json.loads
        return {(r[0], r[1]): {"metrics": loads(r[2]), "outputs": loads(r[3])} for r in rows}

    def stage_stamps(self) -> dict[int, int]:
        """Exposure id → rowid of its latest stage result (changes whenever a stage result is recorded)."""
        with self._lock:
            return dict(self._db.execute("SELECT exposure_id, MAX(rowid) FROM stage_results GROUP BY exposure_id"))

    def exposure_summaries(self) -> list[tuple]:
        """``(id, path, name, status, n_particles)`` of every exposure not failed, in id order (one query)."""
        with self._lock:
            return self._db.execute("SELECT id, path, name, status, n_particles FROM exposures "
                                    "WHERE status != 'failed' ORDER BY id").fetchall()

    def metrics_cache(self) -> dict[int, tuple[int, str, bytes, str | None]]:
        """Exposure id → (stamp, layout, vals blob, micrograph) of the curation metrics cache."""
        with self._lock:
            return {r[0]: (r[1], r[2], r[3], r[4]) for r in
                    self._db.execute("SELECT exposure_id, stamp, layout, vals, micrograph FROM curation_metrics")}

    def save_metrics_cache(self, rows) -> None:
        """``rows``: ``(exposure id, stamp, layout, vals blob, micrograph)`` tuples (replace earlier ones)."""
        with self._tx() as db:
            db.executemany("INSERT OR REPLACE INTO curation_metrics VALUES (?, ?, ?, ?, ?)", rows)

    # ------------------------------------------------------------------ key-value state
    def set_value(self, key: str, value) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)",
                       (key, json.dumps(value, default=_json_default)))

    def get_value(self, key: str, default=None):
        with self._lock:
            row = self._db.execute("SELECT value FROM kv WHERE key=?", (key,)).fetchone()
        return default if row is None else json.loads(row[0])


class _Transaction:
    """``with`` block: hold the store's lock and run statements in one IMMEDIATE transaction."""

    def __init__(self, db: sqlite3.Connection, lock):
        self.db, self.lock = db, lock

    def __enter__(self):
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise
        return self.db

    def __exit__(self, exc_type, exc, tb):
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            self.lock.release()


def _exposure(row: sqlite3.Row) -> Exposure:
    d = dict(row)
    d["fed_2d"] = bool(d["fed_2d"])
    return Exposure(**d)


def _json_default(obj):
    """JSON for numpy / torch scalars and paths."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    return str(obj)
