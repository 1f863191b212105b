"""A processing session: the store, the workers, the streaming 2D classifier and the session's files.

:class:`Session` is the only writer of ``OUT/session.sqlite``. It registers movies, sends them to workers
(:func:`cryolive.session.pipeline.process_exposure`), records what comes back, feeds new particles to the
streaming 2D classifier in batches, and rewrites the aggregate files atomically (CONTRACT.md)::

    OUT/exposures.star         data_optics + data_micrographs (+ ice thickness, particle count, acceptance)
    OUT/particles.star         data_optics + data_particles of accepted exposures (rlnClassNumber once known)
    OUT/class2d/classes.mrcs   current class averages;  OUT/class2d/classes.star  their table
    OUT/class2d/state.pt       the classifier's state (torch.save), reloaded on resume
    OUT/provenance.json        version, time, command line, settings

cryolive's own columns: exposures.star ``cryoliveIceThicknessAngstrom`` (a *relative*, dimensionless ice
thickness despite the name, for ranking exposures: :func:`cryolive.preprocess.ctf_landscape.estimate_ice_thickness`;
NaN when not measurable), ``cryoliveStageTiltDeg`` and ``cryoliveTiltAxisDeg`` (from the defocus landscape; NaN
for micrographs smaller than two CTF tiles),
``cryoliveParticleCount``, ``cryoliveMeanPickScore``, ``cryoliveMedianPickScore``, ``cryoliveAccepted`` (1/0),
``cryoliveDecision`` (accepted / rejected / pending), ``cryoliveRejectionReason`` ("none" or the reasons, comma-joined
tokens without spaces) and ``cryoliveManualOverride`` (accept / reject / none) — see :mod:`.curation`; particles.star ``cryolivePickScore``; classes.star ``cryoliveParticleCount``,
``cryoliveSelected`` (1/0, :func:`cryolive.classify2d.select_classes` unless the dashboard's manual selection is set),
``cryoliveClassScore``, ``cryoliveEffectiveSampleSize`` (:func:`cryolive.classify2d.class_statistics`).

Starting a session again on the same OUT resumes: exposures done are not processed again, exposures
interrupted while processing are queued again, and the 2D classifier state is reloaded.

Examples::

    with Session("OUT", settings) as s:
        s.process(["movies/"])                       # everything there, then exit

    with Session("OUT", settings) as s:
        s.live("/data/watch", settle_s=3, stop_after_idle_s=600)
"""

from __future__ import annotations

import concurrent.futures as cf
import glob
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import Settings
from .executor import make_executor
from .pipeline import ExposureOutcome, StageFunctions, movie_stem, process_exposure
from .store import SessionStore
from .watcher import MovieWatcher, find_movies

log = logging.getLogger("cryolive.session")


@dataclass
class SessionStatus:
    """A snapshot for progress displays."""

    n_seen: int
    n_pending: int
    n_processing: int
    n_done: int
    n_failed: int
    n_particles: int
    n_classes: int
    n_particles_classified: int
    exposures_per_hour: float
    last_error: str | None
    elapsed_s: float


def expand_movie_args(items: Iterable[str | os.PathLike], patterns: str) -> list[Path]:
    """Files, glob patterns or folders → sorted unique movie paths (folders searched recursively)."""
    out: list[Path] = []
    for item in items:
        s = str(item)
        p = Path(s)
        if p.is_dir():
            out.extend(find_movies(p, patterns))
        elif any(ch in s for ch in "*?["):
            out.extend(Path(m) for m in sorted(glob.glob(s, recursive=True)) if Path(m).is_file())
        else:
            out.append(p)
    seen, unique = set(), []
    for p in out:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


class Session:
    """One session folder ``out_dir`` processed with ``settings``.

    ``stages``: the algorithms (default: cryolive's; tests may inject others, see
    :class:`~cryolive.session.pipeline.StageFunctions`). ``executor``: where exposures run (default:
    ``make_executor(settings.n_workers)``). ``progress(status)`` is called after each step.
    ``output_interval_s``: least time between two rewrites of the aggregate STAR files while running.
    ``thresholds``: exposure curation thresholds (:class:`cryolive.preprocess.curation.Thresholds`) to start with;
    None keeps those saved in the store (changed by ``cryolive curate`` or the dashboard), or else the default
    from ``settings.acceptance``. Thresholds changed while the session runs are picked up at the next output.
    """

    def __init__(self, out_dir: str | os.PathLike, settings: Settings, stages: StageFunctions | None = None,
                 executor=None, progress: Callable[[SessionStatus], None] | None = None,
                 output_interval_s: float = 5.0, max_attempts: int = 3, thresholds=None):
        from ..config import resolve_device
        from ..io.provenance import write_provenance

        self.out = Path(out_dir).resolve()
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = resolve_device(settings.device)  # resolved once, passed down (workers get its name)
        settings = settings.model_copy(update={"device": str(self.device)})
        self.settings = settings
        self.stages = stages
        self.store = SessionStore(self.out / "session.sqlite")
        previous = self.store.get_value("settings")
        current = settings.model_dump(mode="json")
        if previous is not None and previous != current:
            log.warning("settings differ from the previous run on %s; exposures already done are kept", self.out)
        self.store.set_value("settings", current)
        n_requeued = self.store.requeue_interrupted()
        if n_requeued:
            log.info("resuming: %d interrupted exposures queued again", n_requeued)
        self._own_executor = executor is None
        self.executor = executor if executor is not None else make_executor(settings.n_workers)
        self.progress = progress
        self.output_interval_s = float(output_interval_s)
        self.max_attempts = int(max_attempts)
        self._in_flight: dict[cf.Future, int] = {}
        self._suspects: set[int] = set()  # exposures in flight when a worker died
        self._crashes: dict[int, int] = {}  # exposure id → worker deaths while it ran alone
        self._last_output = 0.0
        self._dirty = False
        self._particles_cache: dict[int, object] = {}
        self._t0 = time.time()
        self._done_this_run = 0
        self.last_error: str | None = None
        if thresholds is not None:
            from .curation import current_thresholds

            if current_thresholds(self.store, settings)[1] != thresholds or self.store.current_thresholds() is None:
                self.store.save_thresholds(thresholds.model_dump(), source="start")
        self._curation_version = self.store.curation_version()
        self.class2d = Class2DStage(self.out, settings, self.store, self.device)
        from .acquisition import AcquisitionStage

        self.acquisition = AcquisitionStage(self.store, settings)  # metadata beside each movie, optics groups
        write_provenance(self.out, current)

    # ------------------------------------------------------------------ registering movies
    @property
    def frame_shape(self) -> tuple[int, int] | None:
        fs = self.store.get_value("frame_shape")
        return tuple(fs) if fs else None

    def add_movies(self, paths: Iterable[str | os.PathLike]) -> list[int]:
        """Register movies (duplicates ignored); return the ids of the new ones."""
        new = []
        for p in paths:
            p = Path(p)
            try:
                st = p.stat()
                size, mtime = st.st_size, st.st_mtime
            except OSError:
                size = mtime = None
            eid, created = self.store.add_exposure(p, size, mtime)
            if created:
                new.append(eid)
        return new

    def add_failed(self, path: str | os.PathLike, reason: str) -> None:
        """Register a movie found bad before processing (e.g. by the watcher)."""
        eid, created = self.store.add_exposure(path)
        if created:
            self.store.mark_failed(eid, reason)
            self.last_error = f"{Path(path).name}: {reason}"
            self._dirty = True

    # ------------------------------------------------------------------ running
    @property
    def paused(self) -> bool:
        """Paused from the dashboard (store key ``paused``): no new exposure is started; work in flight finishes."""
        value = self.store.get_value("paused") or {}
        return bool(value.get("paused")) if isinstance(value, dict) else bool(value)

    def _submit_pending(self) -> None:
        if self.paused:
            return
        if self.settings.picking.templates_from_2d:
            self.class2d.apply_selection()  # a selection made on the dashboard becomes templates before submitting
        capacity = getattr(self.executor, "capacity", 1)
        busy = set(self._in_flight.values())
        pending = self.store.exposures("pending")
        suspects = [e for e in pending if e.id in self._suspects]
        if suspects:  # after a worker crash: suspects run alone until each has finished once
            if not self._in_flight:
                pending = suspects[:1]
            else:
                return
        for exp in pending:
            if len(self._in_flight) >= capacity:
                break
            if exp.id in busy:
                continue
            self.store.mark_processing(exp.id)
            fut = self.executor.submit(process_exposure, exp.path, self.submission_settings(), str(self.out),
                                       self.stages, self.frame_shape)
            self._in_flight[fut] = exp.id

    def submission_settings(self) -> Settings:
        """The settings a new exposure is processed with: the session's, except that with
        ``picking.templates_from_2d`` the picker becomes ``template`` on ``OUT/class2d/templates.mrcs`` once the
        2D stage has written templates from selected classes (their picking results carry that settings hash)."""
        picking = self.settings.picking
        if not picking.templates_from_2d or picking.picker == "template":
            return self.settings
        info = self.store.get_value(TEMPLATES_KEY)
        if not info or not info.get("n"):
            return self.settings
        path = self.out / info["path"]
        if not path.is_file():
            return self.settings
        new = picking.model_copy(update={"picker": "template", "templates_path": str(path),
                                         "templates_pixel_size_angstrom": None})
        return self.settings.model_copy(update={"picking": new})

    def step(self, timeout: float | None = 1.0) -> int:
        """Submit pending exposures, wait up to ``timeout`` s for results, record them. Returns how many."""
        self._submit_pending()
        if not self._in_flight:
            self._maybe_write_outputs()
            if timeout and self.paused:
                time.sleep(min(timeout, 1.0))  # paused with work queued: wait, do not spin
            return 0
        done, _ = cf.wait(list(self._in_flight), timeout=timeout, return_when=cf.FIRST_COMPLETED)
        n = 0
        for fut in done:
            if fut not in self._in_flight:  # already requeued after a worker crash
                continue
            eid = self._in_flight.pop(fut)
            try:
                outcome = fut.result()
            except cf.process.BrokenProcessPool as exc:
                self._worker_crashed(eid, exc)
                continue
            except Exception as exc:  # the worker raised outside process_exposure's own handling
                outcome = ExposureOutcome(path=self.store.get_exposure(eid).path, name="", ok=False,
                                          error=f"worker error: {type(exc).__name__}: {exc}")
            self._record(eid, outcome)
            n += 1
        if n:
            self.class2d.feed(final=False)
        self._maybe_write_outputs()
        return n

    def _worker_crashed(self, eid: int, exc: BaseException) -> None:
        """A worker process died (segfault, out of memory, killed): the pool is gone with its tasks.

        The tasks that were in flight are suspects: they are requeued and then run one at a time, so that a
        crash can be pinned on one movie. A movie that crashes a worker on its own ``max_attempts`` times is
        recorded as failed; the others go on.
        """
        ids = [eid] + list(self._in_flight.values())
        self._in_flight.clear()
        if len(ids) == 1:
            self._crashes[eid] = self._crashes.get(eid, 0) + 1
            name = self.store.get_exposure(eid).name
            log.warning("a worker died while processing %s alone (%d times): %s", name, self._crashes[eid], exc)
            if self._crashes[eid] >= self.max_attempts:
                self.store.mark_failed(eid, f"worker process died {self._crashes[eid]} times on this movie: {exc}")
                self._suspects.discard(eid)
                self.last_error = f"{name}: worker process died"
                self._dirty = True
            else:
                self.store.mark_pending(eid, f"worker process died: {exc}")
                self._suspects.add(eid)
        else:
            log.warning("a worker died with %d exposures in flight; retrying them one at a time", len(ids))
            for i in ids:
                self.store.mark_pending(i, f"worker process died: {exc}")
                self._suspects.add(i)
        self.executor.restart()

    def _record(self, eid: int, outcome: ExposureOutcome) -> None:
        """Record a worker's outcome (its files are already written)."""
        exp = self.store.get_exposure(eid)
        self._dirty = True
        self._suspects.discard(eid)
        if outcome.ok:
            for st in outcome.stages:
                self.store.record_stage(eid, st.stage, st.settings_hash, st.metrics, st.outputs)
            if outcome.frame_shape and self.frame_shape is None:
                self.store.set_value("frame_shape", list(outcome.frame_shape))
            self.store.mark_done(eid, outcome.n_particles)
            try:  # the metadata never stops a session (the exposure is done and its results kept)
                self.acquisition.record(eid, exp.path, next((st.metrics.get("n_frames") for st in outcome.stages
                                                             if st.stage == "motion"), None))
            except Exception as exc:
                log.warning("%s: acquisition metadata not recorded: %s: %s", exp.name, type(exc).__name__, exc)
            self._done_this_run += 1
            log.info("%s: done, %d particles (%.1f s)", outcome.name, outcome.n_particles, outcome.seconds)
            return
        if outcome.transient and exp.attempts < self.max_attempts:
            self.store.mark_pending(eid, outcome.error)
            log.info("%s: not ready (%s); will retry", exp.name, outcome.error)
            return
        self.store.mark_failed(eid, outcome.error or "unknown error")
        self.last_error = f"{exp.name}: {outcome.error}"
        log.warning("%s: failed: %s", exp.name, outcome.error)

    def run_until_done(self) -> None:
        """Process every pending exposure, then return."""
        while self.store.counts()["pending"] or self._in_flight:
            self.step(timeout=1.0)
            self._report()

    def process(self, movies: Iterable[str | os.PathLike]) -> SessionStatus:
        """Process the given movies (files, globs, folders) to the end of the pipeline; return the status."""
        paths = expand_movie_args(movies, self.settings.movie_pattern)
        self.add_movies(paths)
        self.run_until_done()
        self.finalize()
        return self.status()

    def live(self, watch_dir: str | os.PathLike, settle_s: float = 3.0, stop_after_idle_s: float | None = None,
             max_exposures: int | None = None, poll_s: float = 1.0, give_up_s: float = 120.0,
             should_stop: Callable[[], bool] | None = None) -> SessionStatus:
        """Watch ``watch_dir`` and process movies as they are finished, until stopped.

        Stops on Ctrl-C, when ``should_stop()`` is true, after ``stop_after_idle_s`` seconds with nothing new
        and nothing to do, or once ``max_exposures`` exposures of this session are processed (done or failed).
        """
        watcher = MovieWatcher(watch_dir, self.settings.movie_pattern, settle_s=settle_s, give_up_s=give_up_s,
                               is_known=self.store.has_exposure, expected_frame_shape=self.frame_shape)
        last_activity = time.monotonic()
        try:
            while True:
                if should_stop is not None and should_stop():
                    break
                finished = self._n_finished()
                if max_exposures is not None and finished >= max_exposures and not self._in_flight:
                    break
                room = None if max_exposures is None else max_exposures - len(self.store.known_paths())
                if room is None or room > 0:
                    watcher.expected_frame_shape = self.frame_shape
                    ready, failed = watcher.poll()
                    for path, reason in failed[: room if room is not None else None]:
                        self.add_failed(path, reason)
                    if room is not None:
                        room -= min(len(failed), room)
                        ready = ready[:room]
                    if ready or failed:
                        self.add_movies(ready)
                        last_activity = time.monotonic()
                busy = bool(self._in_flight) or self.store.counts()["pending"] > 0
                if busy:
                    if self.step(timeout=poll_s):
                        last_activity = time.monotonic()
                    if self._in_flight or watcher.waiting:
                        last_activity = time.monotonic()
                else:
                    if watcher.waiting:
                        last_activity = time.monotonic()
                    if self.class2d.feed(final=True):  # caught up: bring the classes up to date
                        self._dirty = True
                    self._maybe_write_outputs()
                    time.sleep(poll_s)
                self._report()
                if (stop_after_idle_s is not None and not self._in_flight
                        and time.monotonic() - last_activity >= stop_after_idle_s):
                    log.info("no new movies for %.0f s: stopping", stop_after_idle_s)
                    break
        except KeyboardInterrupt:
            log.info("stopped by the user")
        self.finalize()
        return self.status()

    def _n_finished(self) -> int:
        c = self.store.counts()
        return c["done"] + c["failed"]

    def finalize(self) -> None:
        """Wait for work in flight, feed the remaining particles to 2D, write every output."""
        while self._in_flight:
            self.step(timeout=1.0)
        self.class2d.feed(final=True, end_of_run=True)
        try:  # exposures still waiting for their optics group get it now
            self.acquisition.finish()
        except Exception as exc:  # the outputs below are still written
            log.warning("optics groups not completed at the end of the run: %s: %s", type(exc).__name__, exc)
        self.write_outputs()
        self._report()

    def close(self) -> None:
        if self._own_executor:
            self.executor.shutdown(wait=True, cancel_futures=True)
        self.store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ status
    def status(self) -> SessionStatus:
        c = self.store.counts()
        done = self.store.exposures("done")
        elapsed = time.time() - self._t0
        return SessionStatus(
            n_seen=sum(c.values()), n_pending=c["pending"], n_processing=c["processing"], n_done=c["done"],
            n_failed=c["failed"], n_particles=sum(e.n_particles or 0 for e in done),
            n_classes=self.class2d.n_classes_active, n_particles_classified=self.class2d.n_particles_seen,
            exposures_per_hour=3600.0 * self._done_this_run / max(elapsed, 1e-6),
            last_error=self.last_error, elapsed_s=elapsed,
        )

    def _report(self) -> None:
        if self.progress is not None:
            self.progress(self.status())

    # ------------------------------------------------------------------ outputs
    def _maybe_write_outputs(self) -> None:
        self.class2d.apply_selection()  # a class selection saved by the dashboard
        if self.store.curation_version() != self._curation_version:  # thresholds/overrides changed elsewhere
            self._dirty = True
        if self._dirty and time.monotonic() - self._last_output >= self.output_interval_s:
            self.write_outputs()

    def write_outputs(self) -> None:
        """Re-decide every exposure (curation), then rewrite exposures.star and particles.star atomically."""
        from .curation import curate

        self._curation_version = self.store.curation_version()
        summary = curate(self.store, self.settings)
        write_exposures_star(self.out, self.store, self.settings, summary=summary)
        write_particles_star(self.out, self.store, self.settings, self._particles_cache, summary=summary)
        self._last_output = time.monotonic()
        self._dirty = False


# ---------------------------------------------------------------------------------------------- STAR files
def optics_table(settings: Settings, image_pixel_size: float | None = None, image_size: int | None = None,
                 n_groups: int = 1):
    """RELION's data_optics: groups 1..``n_groups`` (one by default; beam-shift groups, see
    :mod:`.acquisition`), all with the session's optics, with the image columns for particles when given."""
    import pandas as pd

    o = settings.optics
    rows = []
    for g in range(1, int(n_groups) + 1):
        row = {
            "rlnOpticsGroup": g, "rlnOpticsGroupName": f"opticsGroup{g}",
            # the movie's pixel size, and the micrographs' (× Settings.movie_bin), as RELION's motion correction
            "rlnMicrographOriginalPixelSize": o.pixel_size_angstrom,
            "rlnMicrographPixelSize": settings.micrograph_pixel_size_angstrom,
            "rlnVoltage": o.voltage_kv, "rlnSphericalAberration": o.cs_mm, "rlnAmplitudeContrast": o.amplitude_contrast,
        }
        if image_pixel_size is not None:
            row.update({"rlnImagePixelSize": float(image_pixel_size), "rlnImageSize": int(image_size),
                        "rlnImageDimensionality": 2})
        rows.append(row)
    return pd.DataFrame(rows)


def _with_optics_groups(df, store: SessionStore, settings: Settings):
    """Rows (with ``_exposure_id``) with their exposure's optics group; with grouping on, rows of exposures still
    waiting for a group are left out (see :mod:`.acquisition`). Returns (rows, number of groups)."""
    from .acquisition import optics_group_assignment, optics_group_count

    groups = optics_group_assignment(store, settings)
    if groups is None or "_exposure_id" not in df.columns:
        return df, 1
    group = df["_exposure_id"].map(lambda e: groups.get(int(e), 0)).astype(int)
    df = df.assign(rlnOpticsGroup=group.to_numpy())
    return df[group.to_numpy() > 0], optics_group_count(store, settings)


def exposure_rows(store: SessionStore, settings: Settings) -> list[dict]:
    """One dict per exposure done: its exposures.star columns (decision included) and ``_exposure_id``."""
    from .curation import curate, exposures_star_frame

    summary = curate(store, settings)
    return exposures_star_frame(summary.table, summary.decision).to_dict("records")


def _nan_if_none(x) -> float:
    return float("nan") if x is None else float(x)


def write_exposures_star(out: Path, store: SessionStore, settings: Settings, summary=None) -> Path:
    """``OUT/exposures.star``: data_optics + data_micrographs of the exposures done, with the curation decision
    (see :mod:`cryolive.session.curation`). ``summary``: a :class:`~.curation.CurationSummary` already made
    (default: decide now, with the store's thresholds, and record the decisions)."""
    from ..io.star import write_star
    from .curation import EXPOSURES_STAR_COLUMNS, curate, exposures_star_frame

    summary = curate(store, settings) if summary is None else summary
    df, n_groups = _with_optics_groups(exposures_star_frame(summary.table, summary.decision), store, settings)
    from .acquisition import metadata_star_columns

    extra = metadata_star_columns(store, df["_exposure_id"].tolist()) or {}  # the microscope's metadata, if any
    df = df[EXPOSURES_STAR_COLUMNS].assign(**extra)
    return write_star(out / "exposures.star", {"optics": optics_table(settings, n_groups=n_groups),
                                               "micrographs": df}, fast=True)


def accepted_particles(out: Path, store: SessionStore, settings: Settings, cache: dict | None = None, summary=None):
    """Particle rows of the accepted exposures → (DataFrame with ``_exposure_id``/``_index``, extraction metrics).

    ``summary``: a :class:`~.curation.CurationSummary` already made (default: decide now)."""
    import pandas as pd

    from ..io.star import read_star
    from .curation import curate

    cache = {} if cache is None else cache
    summary = curate(store, settings, record=False) if summary is None else summary  # recorded by write_outputs
    table = summary.table.frame
    keep = summary.decision.accepted & (table["status"] == "done").to_numpy()
    keep &= np.nan_to_num(table["particle_count"].to_numpy()) > 0
    frames, ext_metrics = [], None
    for eid in table["exposure_id"].to_numpy()[keep].tolist():
        ext = store.stage_result(eid, "extraction")
        if ext is None:
            continue
        ext_metrics = ext_metrics or ext["metrics"]
        key = (eid, ext["outputs"]["particles_star"])  # a re-extraction writes a new file
        if key not in cache:
            df = read_star(out / ext["outputs"]["particles_star"])["particles"].copy()
            df["_exposure_id"] = eid
            df["_index"] = np.arange(len(df))
            cache[key] = df
        frames.append(cache[key])
    if not frames:
        return pd.DataFrame(), None
    return pd.concat(frames, ignore_index=True), ext_metrics


def write_particles_star(out: Path, store: SessionStore, settings: Settings, cache: dict | None = None,
                         summary=None) -> Path | None:
    """``OUT/particles.star``: data_optics + data_particles of the accepted exposures (with 2D classes).

    When no exposure is accepted (any more), an existing particles.star is rewritten with no particle rows."""
    from ..io.star import write_star

    df, ext = accepted_particles(out, store, settings, cache, summary)
    if ext is None:
        if not (out / "particles.star").exists():
            return None
        import pandas as pd

        ext = next((r["metrics"] for r in store.stage_results("extraction")), None)
        if ext is None:
            return None
        df = pd.DataFrame(columns=["rlnImageName", "rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY",
                                   "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnOpticsGroup",
                                   "_exposure_id", "_index"])
    df, n_groups = _with_optics_groups(df.copy(), store, settings)
    classes = []
    for eid, sub in df.groupby("_exposure_id", sort=False):
        known = store.particle_classes(int(eid))
        classes.append(sub["_index"].map(lambda i, k=known: k.get(int(i), 0)))
    if classes:
        import pandas as pd

        cls = pd.concat(classes).reindex(df.index)
        if (cls > 0).any():
            df["rlnClassNumber"] = cls.astype(int)
    df = df.drop(columns=["_exposure_id", "_index"])
    optics = optics_table(settings, ext["particle_pixel_size_angstrom"], ext["output_box_size_px"], n_groups=n_groups)
    return write_star(out / "particles.star", {"optics": optics, "particles": df}, fast=True)


# ---------------------------------------------------------------------------------------------- 2D
MIN_PARTICLES_PER_CLASS = 10  # at the end of a run, 2D starts with fewer particles than asked, but not fewer than this per class


class Class2DStage:
    """Feeds accepted particles to :class:`cryolive.classify2d.StreamingClassifier2D` in batches.

    The classifier starts once ``settings.class2d.min_particles_to_start`` accepted particles exist (all of
    them are fed then); after that new particles are fed once ``batch_size`` have come, or all remaining ones
    at ``feed(final=True)`` (the session calls it when it has caught up with the microscope, and at the end). After
    each feed its state is saved (``OUT/class2d/state.pt``) and classes.mrcs / classes.star are rewritten.
    """

    def __init__(self, out: Path, settings: Settings, store: SessionStore, device):
        self.out, self.settings, self.store, self.device = out, settings, store, device
        self.classifier = None
        self.n_particles_seen = int(store.get_value("class2d_particles_seen", 0))
        self.n_classes_active = int(store.get_value("class2d_n_classes", 0))
        self.state_path = out / "class2d" / "state.pt"
        self._cache: dict = {}

    def _create(self, box: int, pixel_size: float):
        from ..classify2d import StreamingClassifier2D

        s = self.settings
        clf = StreamingClassifier2D(s.class2d.n_classes, box, pixel_size, s.optics, s.class2d, self.device)
        rel = self.store.get_value("class2d_state")
        if rel and (self.out / rel).is_file():
            import torch

            clf.load_state_dict(torch.load(self.out / rel, map_location=self.device, weights_only=False))
            log.info("2D: classifier state reloaded from %s", rel)
        return clf

    def feed(self, final: bool = False, end_of_run: bool = False) -> int:
        """Feed unfed accepted particles if enough have come; return how many were fed.

        ``end_of_run``: the session is ending (``process`` done, ``live`` stopped): start the classes even with
        fewer than ``min_particles_to_start`` particles, as long as there are ``MIN_PARTICLES_PER_CLASS`` per class.
        """
        s = self.settings.class2d
        df, ext = accepted_particles(self.out, self.store, self.settings, self._cache)
        if ext is None or df.empty:
            return 0
        fed_ids = {e.id for e in self.store.exposures("done") if e.fed_2d}
        unfed = df[~df["_exposure_id"].isin(fed_ids)]
        if unfed.empty:
            return 0
        starting = False
        if self.classifier is None:
            resuming = self.store.get_value("class2d_state") is not None
            needed = s.min_particles_to_start
            if end_of_run:
                needed = min(needed, MIN_PARTICLES_PER_CLASS * s.n_classes)
            if not resuming and len(df) < needed:
                return 0
            starting = not resuming  # the first classes: use every particle there is now
            self.classifier = self._create(int(ext["output_box_size_px"]), float(ext["particle_pixel_size_angstrom"]))
        if not final and not starting and len(unfed) < s.batch_size:
            return 0
        import torch

        images = self._load_images(unfed)  # (n, b, b)
        du = torch.as_tensor(unfed["rlnDefocusU"].to_numpy(np.float32))
        dv = torch.as_tensor(unfed["rlnDefocusV"].to_numpy(np.float32))
        da = torch.as_tensor(unfed["rlnDefocusAngle"].to_numpy(np.float32))
        classes = np.full(len(unfed), -1, dtype=np.int64)  # 0-based; -1: not assigned yet
        bs = max(1, int(s.batch_size))
        for i in range(0, len(unfed), bs):
            sl = slice(i, i + bs)
            result = self.classifier.update(images[sl], du[sl], dv[sl], da[sl])
            classes[sl] = result.class_index.cpu().numpy()
        if end_of_run and not self.classifier.initialised:
            self.classifier.start()  # a short run: classes from what there is
        buffered = np.flatnonzero(classes < 0)  # arrived before the classifier had its first classes
        if len(buffered) and self.classifier.initialised:
            for i in range(0, len(buffered), bs):
                idx = buffered[i : i + bs]
                t_idx = torch.as_tensor(idx)
                result = self.classifier.assign(images[t_idx], du[t_idx], dv[t_idx], da[t_idx])
                classes[idx] = result.class_index.cpu().numpy()
        for eid, sub in unfed.assign(_class=classes + 1).groupby("_exposure_id", sort=False):
            sub = sub[sub["_class"] > 0]
            self.store.set_particle_classes(int(eid), sub["_index"].to_numpy(), sub["_class"].to_numpy())
        self.store.mark_fed_2d(unfed["_exposure_id"].unique())
        self.n_particles_seen += len(unfed)
        self._save()
        return len(unfed)

    def _load_images(self, df):
        import mrcfile
        import torch

        out = []
        for stack_rel, sub in df.groupby(df["rlnImageName"].str.split("@").str[1], sort=False):
            with mrcfile.mmap(self.out / stack_rel, mode="r", permissive=True) as m:
                data = np.asarray(m.data, dtype=np.float32)
                if data.ndim == 2:
                    data = data[None]
                out.append(data[sub["_index"].to_numpy()])
        return torch.from_numpy(np.concatenate(out, axis=0))

    def _save(self) -> None:
        import torch

        from ..io.atomic import atomic_path
        from ..io.mrc import write_mrc
        from ..io.star import write_star

        with atomic_path(self.state_path) as tmp:
            torch.save(self.classifier.state_dict(), tmp)
        self.store.set_value("class2d_state", os.path.relpath(self.state_path, self.out))
        snap = self.classifier.snapshot()
        averages = snap.averages.numpy()  # (K, b, b)
        k = averages.shape[0]
        dist = snap.class_distribution.numpy().astype(np.float64)
        res = snap.resolution_angstrom.numpy().astype(np.float64)
        from ..classify2d import class_statistics
        from ..classify2d import select_classes as select_good_classes

        stats = class_statistics(snap)  # score: resolution, count, centring, contrast (classify2d.selection)
        selected = select_good_classes(stats).numpy()
        manual = self.store.get_value(MANUAL_SELECTION_KEY)
        if manual:  # the user's selection (dashboard) wins over the automatic one
            selected = np.isin(np.arange(1, k + 1), [int(c) for c in manual.get("selected", [])])
            self._manual_applied = manual
        write_mrc(self.out / "class2d" / "classes.mrcs", averages, self.classifier.pixel_size, stack=True)
        import pandas as pd

        table = pd.DataFrame({
            "rlnReferenceImage": [f"{i + 1:06d}@class2d/classes.mrcs" for i in range(k)],
            "rlnClassNumber": np.arange(1, k + 1),
            "rlnClassDistribution": dist,
            "rlnEstimatedResolution": res,
            "cryoliveParticleCount": snap.particle_counts.numpy().astype(np.float64),
            "cryoliveSelected": selected.astype(int),
            "cryoliveClassScore": stats.score.numpy().astype(np.float64),
            "cryoliveEffectiveSampleSize": stats.effective_sample_size.numpy().astype(np.float64),
        })
        write_star(self.out / "class2d" / "classes.star", {"model_classes": table})
        self._write_templates(averages, selected, self.classifier.pixel_size)
        self.n_classes_active = int(selected.sum())
        self.store.set_value("class2d_particles_seen", self.n_particles_seen)
        self.store.set_value("class2d_n_classes", self.n_classes_active)


    def apply_selection(self) -> bool:
        """If the manual class selection in the store (``class2d_manual_selection``: ``{"selected": [class
        numbers, 1-based], "by", "time"}``, saved by the dashboard) changed, rewrite classes.star's
        ``cryoliveSelected`` with it. Returns True if it rewrote the table."""
        manual = self.store.get_value(MANUAL_SELECTION_KEY)
        if not manual or manual == getattr(self, "_manual_applied", None):
            return False
        path = self.out / "class2d" / "classes.star"
        if not path.is_file():
            return False
        from ..io.star import read_star, write_star

        table = read_star(path)["model_classes"].copy()
        chosen = [int(c) for c in manual.get("selected", [])]
        table["cryoliveSelected"] = np.isin(table["rlnClassNumber"].to_numpy(), chosen).astype(int)
        write_star(path, {"model_classes": table})
        self._manual_applied = manual
        stack = self.out / "class2d" / "classes.mrcs"
        if stack.is_file():
            from ..io.mrc import read_mrc

            averages, px = read_mrc(stack)
            averages = averages if averages.ndim == 3 else averages[None]
            if len(averages) == len(table):
                self._write_templates(averages, table["cryoliveSelected"].to_numpy().astype(bool), px)
        self.n_classes_active = int(table["cryoliveSelected"].sum())
        self.store.set_value("class2d_n_classes", self.n_classes_active)
        log.info("2D: class selection from %s applied (%d classes)", manual.get("by"), self.n_classes_active)
        return True


    def _write_templates(self, averages: np.ndarray, selected: np.ndarray, pixel_size: float) -> None:
        """Write the selected class averages as picking templates (``OUT/class2d/templates.mrcs``, particles
        white, pixel size in the header) and record them under the store key ``class2d_templates``; with
        ``picking.templates_from_2d`` new exposures are then picked with them (:meth:`Session.submission_settings`)."""
        from ..io.mrc import write_mrc

        selected = np.asarray(selected, dtype=bool)
        if not selected.any():
            return
        rel = "class2d/templates.mrcs"
        write_mrc(self.out / rel, np.asarray(averages)[selected], float(pixel_size), stack=True)
        classes = (np.flatnonzero(selected) + 1).tolist()
        previous = self.store.get_value(TEMPLATES_KEY) or {}
        self.store.set_value(TEMPLATES_KEY, {"path": rel, "n": len(classes), "classes": classes,
                                             "version": int(previous.get("version", 0)) + 1})


MANUAL_SELECTION_KEY = "class2d_manual_selection"  # written by the dashboard (cryolive.server)
TEMPLATES_KEY = "class2d_templates"  # the picking templates from the selected classes (Class2DStage)
