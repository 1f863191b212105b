"""Live exposure curation on a session: thresholds and manual overrides in the store, every exposure re-decided
at once from the metrics already recorded (nothing upstream is recomputed), and the outputs rewritten.

The decision itself is :func:`cryolive.preprocess.curation.decide` (pure, columnar). This module:

- :func:`exposure_table` — one row per exposure that is not failed (done, or still queued / processing), with
  the exposures.star columns, the curation metrics and, per metric, whether it is still *pending* (its stage
  has not run, or ran without it). Loaded with one query.
- :func:`current_thresholds` / :func:`set_thresholds` / :func:`set_override` — what the CLI
  (``cryolive curate``) and the dashboard call. ``set_thresholds`` persists the new thresholds, re-decides every
  exposure, records the decisions and (``write_files=True``) rewrites ``OUT/exposures.star`` and
  ``OUT/particles.star``; it returns a :class:`CurationSummary` with the counts.
- :func:`curate` — load, decide, record (what the session runs before writing its outputs).

What a decision changes downstream (the session and ``cryolive curate`` alike):

- ``exposures.star`` lists every exposure done with ``cryoliveAccepted`` (1 only when accepted),
  ``cryoliveDecision`` (accepted / rejected / pending), ``cryoliveRejectionReason`` ("none" or the reasons, see
  :mod:`cryolive.preprocess.curation`) and ``cryoliveManualOverride`` (accept / reject / none).
- ``particles.star`` holds the particles of *accepted* exposures only. Rejected and pending exposures' particles
  stay on disk (``OUT/particles/<movie>.mrcs``, ``.star``) and in the store: nothing is deleted, so accepting
  the exposure again brings them back at once.
- 2D: particles of an exposure are fed to the streaming classifier only while it is accepted. Particles already
  fed before their exposure was rejected stay in the classifier's statistics (an online EM cannot take them
  out; later updates dilute them) and keep their class in the store, but are not in ``particles.star`` — the
  exported set that 3D and the user take on. An exposure rejected before it was fed and accepted later is fed
  then.

Example::

    from cryolive.session.curation import set_thresholds
    summary = set_thresholds("OUT", {"max_ctf_resolution_angstrom": 6.0, "max_motion_total_angstrom": 40.0})
    summary.counts      # {"accepted": 812, "rejected": 95, "pending": 3}
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import Settings
from ..preprocess.curation import (
    ACCEPTED,
    METRICS,
    OVERRIDE_ACCEPT,
    OVERRIDE_REJECT,
    STATUS_NAMES,
    Decision,
    Thresholds,
    decide,
)
from .store import SessionStore

# metric name → (stage, key in that stage's metrics); defocus_angstrom and particle_count are derived below
STORE_KEYS = {
    "motion_total_angstrom": ("motion", "accum_motion_total"),
    "motion_early_angstrom": ("motion", "accum_motion_early"),
    "motion_late_angstrom": ("motion", "accum_motion_late"),
    "max_local_motion_angstrom": ("motion", "max_local_deviation_angstrom"),
    "ctf_resolution_angstrom": ("ctf", "max_resolution_angstrom"),
    "ctf_figure_of_merit": ("ctf", "figure_of_merit"),
    "astigmatism_angstrom": ("ctf", "astigmatism"),
    "ice_thickness": ("ctf", "ice_thickness_angstrom"),
    "stage_tilt_deg": ("ctf", "stage_tilt_deg"),
    "carbon_heterogeneity": ("ctf", "carbon_heterogeneity"),
    "mean_pick_score": ("picking", "mean_pick_score"),
    "median_pick_score": ("picking", "median_pick_score"),
}
STAGES = ("motion", "ctf", "picking", "extraction")

# exposures.star column → (stage, key) for the columns that are not curation metrics
_STAR_EXTRA = {
    "rlnDefocusU": ("ctf", "defocus_u"), "rlnDefocusV": ("ctf", "defocus_v"),
    "rlnDefocusAngle": ("ctf", "defocus_angle_deg"), "cryoliveTiltAxisDeg": ("ctf", "tilt_axis_deg"),
}

EXPOSURES_STAR_COLUMNS = [
    "rlnMicrographMovieName", "rlnMicrographName", "rlnOpticsGroup", "rlnAccumMotionTotal",
    "rlnAccumMotionEarly", "rlnAccumMotionLate", "cryoliveMaxLocalMotionAngstrom", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle",
    "rlnCtfAstigmatism", "rlnCtfMaxResolution", "rlnCtfFigureOfMerit", "cryoliveIceThicknessAngstrom",
    "cryoliveStageTiltDeg", "cryoliveTiltAxisDeg", "cryoliveCarbonHeterogeneity", "cryoliveParticleCount", "cryoliveMeanPickScore",
    "cryoliveMedianPickScore", "cryoliveAccepted", "cryoliveDecision", "cryoliveRejectionReason",
    "cryoliveManualOverride",
]


@dataclass
class ExposureTable:
    """Every exposure that is not failed, as columns (rows in the store's order).

    ``frame``: ``exposure_id``, ``name``, ``path``, ``status`` (store status), ``micrograph`` (relative path),
    the raw exposures.star values (``rlnDefocusU``, ...) and one float column per curation metric;
    ``pending``: one bool column per metric (True: not computed yet); ``overrides (n,)`` int8.
    """

    frame: pd.DataFrame
    pending: pd.DataFrame
    overrides: np.ndarray


@dataclass
class CurationSummary:
    """What a (re-)decision did: the thresholds used, the counts, and the seconds it took."""

    thresholds: Thresholds
    counts: dict[str, int]
    seconds: float
    decision: Decision | None = field(default=None, repr=False)
    table: ExposureTable | None = field(default=None, repr=False)


def _nan(x) -> float:
    if x is None:
        return np.nan
    try:
        return float(x)
    except (TypeError, ValueError):
        return np.nan


# the cached fields, in the order of the cache's blob: (stage, key) of the stage metrics
_CACHE_FIELDS = [*STORE_KEYS.values(), ("ctf", "defocus_u"), ("ctf", "defocus_v"), *_STAR_EXTRA.values()]
_CACHE_FIELDS = list(dict.fromkeys(_CACHE_FIELDS))
_CACHE_LAYOUT = "v1:" + ",".join(f"{st}.{k}" for st, k in _CACHE_FIELDS)
_FIELD_INDEX = {f: i for i, f in enumerate(_CACHE_FIELDS)}


def _cache_rows(store: SessionStore, stamps: dict[int, int], exposure_ids: list[int]) -> list[tuple]:
    """Cache rows (values and "present" flags of every field, as float64 bytes) for these exposures."""
    results = store.latest_stage_metrics(STAGES, exposure_ids)
    f = len(_CACHE_FIELDS)
    empty = {"metrics": {}, "outputs": {}}
    rows = []
    for eid in exposure_ids:
        vec = np.full(2 * f, np.nan)
        vec[f:] = 0.0
        for j, (stage, key) in enumerate(_CACHE_FIELDS):
            m = results.get((eid, stage), empty)["metrics"]
            if key in m:
                vec[j], vec[f + j] = _nan(m[key]), 1.0
        mic = results.get((eid, "motion"), empty)["outputs"].get("micrograph")
        rows.append((int(eid), int(stamps[eid]), _CACHE_LAYOUT, vec.tobytes(), mic))
    return rows


def exposure_table(store: SessionStore) -> ExposureTable:
    """Every non-failed exposure's metrics, as columns.

    The stage metrics come from the store's ``curation_metrics`` cache; exposures whose stage results changed
    since they were cached (or never were) are parsed from ``stage_results`` and cached first, so a threshold
    change reads one blob per exposure and parses no JSON.
    """
    ex = store.exposure_summaries()
    n = len(ex)
    ids = np.fromiter((r[0] for r in ex), dtype=np.int64, count=n)
    status = [r[3] for r in ex]
    done = np.fromiter((s == "done" for s in status), dtype=bool, count=n)
    stamps = store.stage_stamps()
    cache = store.metrics_cache()
    stale = [int(i) for i in ids.tolist() if i in stamps and (
        i not in cache or cache[i][0] != stamps[i] or cache[i][1] != _CACHE_LAYOUT)]
    if stale:
        new_rows = _cache_rows(store, stamps, stale)
        store.save_metrics_cache(new_rows)
        cache.update({r[0]: r[1:] for r in new_rows})
    f = len(_CACHE_FIELDS)
    blank = np.concatenate([np.full(f, np.nan), np.zeros(f)]).tobytes()
    blobs = [cache[i][2] if i in stamps else blank for i in ids.tolist()]
    mat = np.frombuffer(b"".join(blobs), dtype=np.float64).reshape(n, 2 * f)
    values, present = mat[:, :f], mat[:, f:] > 0.5

    def col(stage: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        j = _FIELD_INDEX[(stage, key)]
        return values[:, j], ~present[:, j]

    frame = {"exposure_id": ids, "name": [r[2] for r in ex], "path": [r[1] for r in ex], "status": status}
    pending = {}
    for name, (stage, key) in STORE_KEYS.items():
        frame[name], pending[name] = col(stage, key)
    (du, du_wait), (dv, dv_wait) = col("ctf", "defocus_u"), col("ctf", "defocus_v")
    frame["defocus_angstrom"], pending["defocus_angstrom"] = 0.5 * (du + dv), du_wait | dv_wait
    frame["particle_count"] = np.array([np.nan if r[4] is None else float(r[4]) for r in ex], dtype=np.float64)
    pending["particle_count"] = ~done
    for column, (stage, key) in _STAR_EXTRA.items():
        frame[column] = col(stage, key)[0]
    frame["micrograph"] = [cache[i][3] if i in stamps else None for i in ids.tolist()]
    frame_df = pd.DataFrame(frame)
    pending_df = pd.DataFrame(pending)[list(METRICS)]
    ov_map = store.overrides()
    overrides = np.array([ov_map.get(int(i), 0) for i in ids], dtype=np.int8) if ov_map else np.zeros(n, np.int8)
    return ExposureTable(frame=frame_df, pending=pending_df, overrides=overrides)


def current_thresholds(store: SessionStore, settings: Settings | None = None) -> tuple[int | None, Thresholds]:
    """``(id, thresholds)`` saved in the store; if none ever were, the default from the settings
    (``max_ctf_resolution_angstrom = settings.acceptance.max_ctf_resolution_angstrom``) with id None."""
    rec = store.current_thresholds()
    if rec is not None:
        return rec[0], Thresholds(**rec[1])
    if settings is None:
        settings = stored_settings(store)
    return None, default_thresholds(settings)


def default_thresholds(settings: Settings) -> Thresholds:
    return Thresholds(max_ctf_resolution_angstrom=settings.acceptance.max_ctf_resolution_angstrom)


def curate(store: SessionStore, settings: Settings | None = None, table: ExposureTable | None = None,
           record: bool = True) -> CurationSummary:
    """Decide every exposure with the current thresholds and overrides; record the decisions in the store."""
    t0 = time.perf_counter()
    tid, thresholds = current_thresholds(store, settings)
    table = exposure_table(store) if table is None else table
    decision = decide(table.frame, thresholds, pending=table.pending, overrides=table.overrides)
    if record:
        store.save_decisions(table.frame["exposure_id"].to_numpy(), decision.status, decision.reason_text, tid)
    return CurationSummary(thresholds, decision.counts(), time.perf_counter() - t0, decision, table)


def exposures_star_frame(table: ExposureTable, decision: Decision) -> pd.DataFrame:
    """The ``data_micrographs`` rows of exposures.star (exposures done only), decision columns included."""
    f = table.frame
    done = (f["status"] == "done").to_numpy()
    micrograph = f["micrograph"].to_numpy(dtype=object)
    missing = pd.isna(micrograph)
    if missing.any():
        from .pipeline import movie_stem

        micrograph = micrograph.copy()
        micrograph[missing] = [f"micrographs/{movie_stem(p)}.mrc" for p in f["path"].to_numpy()[missing]]
    reasons = np.where(decision.reason_text == "", "none", decision.reason_text)
    ov = table.overrides
    out = pd.DataFrame({
        "rlnMicrographMovieName": f["path"].to_numpy(),
        "rlnMicrographName": micrograph,
        "rlnOpticsGroup": np.ones(len(f), dtype=int),
        "rlnAccumMotionTotal": f["motion_total_angstrom"].to_numpy(),
        "rlnAccumMotionEarly": f["motion_early_angstrom"].to_numpy(),
        "rlnAccumMotionLate": f["motion_late_angstrom"].to_numpy(),
        "cryoliveMaxLocalMotionAngstrom": f["max_local_motion_angstrom"].to_numpy(),
        "rlnDefocusU": f["rlnDefocusU"].to_numpy(), "rlnDefocusV": f["rlnDefocusV"].to_numpy(),
        "rlnDefocusAngle": f["rlnDefocusAngle"].to_numpy(),
        "rlnCtfAstigmatism": f["astigmatism_angstrom"].to_numpy(),
        "rlnCtfMaxResolution": f["ctf_resolution_angstrom"].to_numpy(),
        "rlnCtfFigureOfMerit": f["ctf_figure_of_merit"].to_numpy(),
        "cryoliveIceThicknessAngstrom": f["ice_thickness"].to_numpy(),
        "cryoliveStageTiltDeg": f["stage_tilt_deg"].to_numpy(),
        "cryoliveTiltAxisDeg": f["cryoliveTiltAxisDeg"].to_numpy(),
        "cryoliveCarbonHeterogeneity": f["carbon_heterogeneity"].to_numpy(),
        "cryoliveParticleCount": np.nan_to_num(f["particle_count"].to_numpy()).astype(int),
        "cryoliveMeanPickScore": f["mean_pick_score"].to_numpy(),
        "cryoliveMedianPickScore": f["median_pick_score"].to_numpy(),
        "cryoliveAccepted": (decision.status == ACCEPTED).astype(int),
        "cryoliveDecision": pd.Categorical.from_codes(decision.status, [STATUS_NAMES[i] for i in range(3)])
        .astype(str),
        "cryoliveRejectionReason": reasons,
        "cryoliveManualOverride": np.where(ov == OVERRIDE_ACCEPT, "accept",
                                           np.where(ov == OVERRIDE_REJECT, "reject", "none")),
    }, columns=EXPOSURES_STAR_COLUMNS)
    out["_exposure_id"] = f["exposure_id"].to_numpy()
    return out[done].reset_index(drop=True)


def stored_settings(store: SessionStore) -> Settings:
    stored = store.get_value("settings")
    if stored is None:
        raise ValueError(f"{store.path} holds no session settings: is it a cryolive session store?")
    return Settings.model_validate(stored)


def open_session_store(out: str | os.PathLike) -> SessionStore:
    """The store of an existing session folder (clear error if there is none)."""
    path = Path(out) / "session.sqlite"
    if not path.is_file():
        raise FileNotFoundError(f"no cryolive session in {out} ({path} does not exist)")
    return SessionStore(path)


def set_thresholds(out: str | os.PathLike, thresholds: Thresholds | dict, replace: bool = False,
                   source: str = "curate", write_files: bool = True,
                   store: SessionStore | None = None, particles: bool = True) -> CurationSummary:
    """Change the thresholds of a session (running or not) and re-decide every exposure at once.

    ``thresholds``: a :class:`Thresholds` (replaces all bounds) or a dict of bounds to change (``None`` removes
    one), applied to the current thresholds unless ``replace``. Persists them (with ``source``), records every
    exposure's new decision, and with ``write_files`` rewrites ``OUT/exposures.star`` and ``OUT/particles.star``
    atomically (a running session also notices the change and rewrites its outputs); ``particles=False`` leaves
    particles.star to the running session. Nothing upstream is recomputed and nothing is deleted. ``store``: an
    open store of ``out`` to use (default: open and close one).
    """
    own = store is None
    store = open_session_store(out) if own else store
    try:
        settings = stored_settings(store)
        if isinstance(thresholds, Thresholds):
            new = thresholds
        elif replace:
            new = Thresholds(**thresholds)
        else:
            new = current_thresholds(store, settings)[1].updated(**thresholds)
        store.save_thresholds(new.model_dump(), source=source)
        return recurate(out, store, settings, write_files=write_files, particles=particles)
    finally:
        if own:
            store.close()


def set_override(out: str | os.PathLike, exposures: dict[str | int, int | None], source: str = "curate",
                 write_files: bool = True, store: SessionStore | None = None) -> CurationSummary:
    """Manually accept (+1) / reject (-1) / un-override (None) exposures given by id or movie name (stem or path),
    then re-decide and (optionally) rewrite the outputs. Unknown names raise KeyError."""
    own = store is None
    store = open_session_store(out) if own else store
    try:
        by_name = {}
        for e in store.exposures():
            by_name[e.name] = e.id
            by_name[e.path] = e.id
            by_name[Path(e.path).name] = e.id
        for key, value in exposures.items():
            eid = key if isinstance(key, int) else by_name.get(str(key))
            if eid is None:
                raise KeyError(f"no exposure {key!r} in {out}")
            store.set_override(eid, value, note=source)
        return recurate(out, store, stored_settings(store), write_files=write_files)
    finally:
        if own:
            store.close()


def recurate(out: str | os.PathLike, store: SessionStore, settings: Settings, write_files: bool = True,
             particles: bool = True) -> CurationSummary:
    """Re-decide every exposure, record the decisions, and rewrite exposures.star (and particles.star)."""
    t0 = time.perf_counter()
    summary = curate(store, settings)
    if write_files:
        from .session import write_exposures_star, write_particles_star

        out = Path(out)
        write_exposures_star(out, store, settings, summary=summary)
        if particles:
            write_particles_star(out, store, settings, summary=summary)
    summary.seconds = time.perf_counter() - t0
    return summary
