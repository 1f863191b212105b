"""Acquisition metadata in a session: read it for each exposure done, report disagreements, assign optics groups.

For each exposure done, :class:`AcquisitionStage` (owned by the session process) reads what the microscope wrote
beside the movie (:func:`cryolive.io.metadata.find_metadata`: SerialEM ``.mdoc``, EPU XML, the FEI extended header
of MRC movies), compares it with the settings (:func:`cryolive.io.metadata.reconcile`: the command line wins,
and each disagreement is logged — the first of each kind as a warning — and counted in the store value
``metadata_report``), and records it as the stage ``metadata`` of the store (``metrics``: the metadata in
cryolive's units, ``disagreements``, ``error``).

With ``settings.optics_groups.n_groups`` ≠ 1 it also assigns each exposure an optics group from its beam shift
(EPU BeamShift, FEI header Shift X/Y, or SerialEM ImageShift; :class:`cryolive.preprocess.optics_groups.OpticsGrouper`),
saved in the store value ``optics_groups`` after every change. A group, once given, never changes. Exposures
whose group is still being learned (the first few) are left out of exposures.star and particles.star until
they have one (at the latest at the end of the run); :func:`optics_group_assignment` is what the STAR writers read.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

from ..config import Settings, settings_hash

log = logging.getLogger("cryolive.session")

OPTICS_GROUPS_KEY = "optics_groups"
REPORT_KEY = "metadata_report"
STAGE = "metadata"


def grouping_enabled(settings: Settings) -> bool:
    return settings.optics_groups.n_groups != 1


def read_exposure_metadata(path: str, settings: Settings, n_frames: int | None = None) -> dict:
    """The ``metadata`` stage's metrics for one movie: ``metadata`` (a dict in cryolive's units, or None),
    ``disagreements`` (messages of :func:`~cryolive.io.metadata.reconcile`), ``error`` (or None), ``seconds``."""
    import time

    from ..io.metadata import MetadataError, find_metadata, reconcile

    t0 = time.perf_counter()
    error = None
    md = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            md = find_metadata(path)
        except (MetadataError, OSError) as exc:
            error = str(exc)
        except Exception as exc:  # metadata never stops a session: reported, and the exposure has none
            error = f"{Path(path).name}: metadata unreadable: {type(exc).__name__}: {exc}"
    if caught and error is None:
        error = "; ".join(str(w.message) for w in caught)
    disagreements = [d.message for d in reconcile(settings, md, n_frames=n_frames)] if md is not None else []
    return {"metadata": md.model_dump(mode="json") if md is not None else None,
            "disagreements": disagreements, "error": error, "seconds": time.perf_counter() - t0}


def _beam_shift(md: dict | None):
    if not md:
        return None
    shift = md.get("beam_shift") or md.get("image_shift")
    return tuple(shift) if shift else None


def _fallback(md: dict | None) -> str:
    if md and md.get("grid_square"):
        return f"grid square {md['grid_square']}"
    return "no beam shift"


def optics_group_assignment(store, settings: Settings) -> dict[int, int] | None:
    """Exposure id → optics group as saved by the session, or None when grouping is off (one group for all)."""
    if not grouping_enabled(settings):
        return None
    state = store.get_value(OPTICS_GROUPS_KEY) or {}
    return {int(k): int(v) for k, v in state.get("assignments", {}).items()}


def optics_group_count(store, settings: Settings) -> int:
    """How many optics groups exist (1 when grouping is off or nothing is assigned yet)."""
    if not grouping_enabled(settings):
        return 1
    state = store.get_value(OPTICS_GROUPS_KEY) or {}
    return max(1, len(state.get("descriptions", {})))


class AcquisitionStage:
    """Session side of the metadata (see the module docstring). ``record`` after each exposure is done,
    ``finish`` at the end of a run."""

    def __init__(self, store, settings: Settings):
        from ..preprocess.optics_groups import OpticsGrouper

        self.store, self.settings = store, settings
        self.hash = settings_hash(settings.optics, settings.dose_per_frame, settings.eer)
        self.report = store.get_value(REPORT_KEY) or {"disagreements": {}, "errors": {"count": 0, "first": None}}
        self.grouper = None
        if grouping_enabled(settings):
            og = settings.optics_groups
            state = store.get_value(OPTICS_GROUPS_KEY)
            if state is not None:
                self.grouper = OpticsGrouper.from_state(state)
                if self.grouper.n_groups != og.n_groups:
                    log.warning("optics groups: this session grouped exposures with n_groups=%s; keeping its groups "
                                "(asked now: %s)", self.grouper.n_groups, og.n_groups)
            else:
                self.grouper = OpticsGrouper(og.n_groups, og.min_gap, og.max_pending)
        self._n_warned = len(self.grouper.warnings) if self.grouper else 0
        self._catch_up()

    def _catch_up(self) -> None:
        """Exposures done before (an earlier run, or grouping switched on later), in id order."""
        for exp in self.store.exposures("done"):
            res = self.store.stage_result(exp.id, STAGE)
            if res is None:
                self.record(exp.id, exp.path, save=False)
            elif self.grouper is not None and self.grouper.group_of(str(exp.id)) is None \
                    and str(exp.id) not in self.grouper.pending:
                self._group(exp.id, res["metrics"].get("metadata"))
        self._save()

    def record(self, exposure_id: int, path: str, n_frames: int | None = None, save: bool = True) -> dict:
        """Read, check and record one exposure's metadata; assign its optics group. Returns the metrics."""
        if n_frames is None:
            motion = self.store.stage_result(exposure_id, "motion")
            n_frames = (motion or {}).get("metrics", {}).get("n_frames")
        metrics = read_exposure_metadata(path, self.settings, n_frames)
        self.store.record_stage(exposure_id, STAGE, self.hash, metrics)
        name = Path(path).name
        for msg in metrics["disagreements"]:
            field = msg.split(":", 1)[0]
            entry = self.report["disagreements"].setdefault(field, {"count": 0, "first": None})
            entry["count"] += 1
            if entry["first"] is None:
                entry["first"] = f"{name}: {msg}"
                log.warning("%s: %s (reported once; counted in %s)", name, msg, REPORT_KEY)
            else:
                log.info("%s: %s", name, msg)
        if metrics["error"]:
            errors = self.report["errors"]
            errors["count"] += 1
            if errors["first"] is None:
                errors["first"] = metrics["error"]
                log.warning("metadata of %s not used: %s", name, metrics["error"])
        self._group(exposure_id, metrics["metadata"])
        if save:
            self._save()
        return metrics

    def _group(self, exposure_id: int, md: dict | None) -> None:
        if self.grouper is None:
            return
        self.grouper.add(str(exposure_id), _beam_shift(md), _fallback(md))

    def finish(self) -> None:
        """End of a run: every exposure still waiting gets its group."""
        if self.grouper is not None and self.grouper.pending:
            n = len(self.grouper.pending)
            self.grouper.finish()
            log.info("optics groups: %d waiting exposures assigned at the end of the run (radius %.4g)", n,
                     self.grouper.radius if self.grouper.radius is not None else float("nan"))
        self._save()

    def _save(self) -> None:
        self.store.set_value(REPORT_KEY, self.report)
        if self.grouper is None:
            return
        for msg in self.grouper.warnings[self._n_warned:]:
            log.warning("optics groups: %s", msg)
        self._n_warned = len(self.grouper.warnings)
        self.store.set_value(OPTICS_GROUPS_KEY, self.grouper.state_dict())


# exposures.star columns from the acquisition metadata (only written when some exposure has metadata)
METADATA_STAR_COLUMNS = {
    "cryoliveGridSquare": "grid_square", "cryoliveFoilHole": "foil_hole",
    "cryoliveBeamShiftX": ("shift", 0), "cryoliveBeamShiftY": ("shift", 1),
    "cryoliveTargetDefocusAngstrom": "defocus_target_angstrom", "cryoliveMetadataStageTiltDeg": "stage_tilt_deg",
    "cryoliveExposureTimeSeconds": "exposure_time_s", "cryoliveMetadataTotalDose": "total_dose",
}


_METADATA_CACHE: dict[tuple, dict] = {}  # (store path, inode) → {"rowid": last row read, "by_id": id → metadata}


def metadata_star_columns(store, exposure_ids) -> dict[str, list] | None:
    """exposures.star columns of the metadata of ``exposure_ids`` (in that order), or None when none has any.

    ``cryoliveGridSquare`` / ``cryoliveFoilHole`` (EPU ids, "None" when unknown), ``cryoliveBeamShiftX/Y`` (the beam
    shift grouped on: EPU BeamShift, FEI Shift X/Y or SerialEM ImageShift, their units; 8 significant digits),
    ``cryoliveTargetDefocusAngstrom`` (positive underfocus), ``cryoliveMetadataStageTiltDeg`` (the stage's alpha,
    not the tilt fitted from the CTF), ``cryoliveExposureTimeSeconds``, ``cryoliveMetadataTotalDose`` (e/Å²);
    NaN where unknown."""
    try:  # a store deleted and made again at the same path is another file
        key = (str(store.path), os.stat(store.path).st_ino)
    except OSError:
        key = (str(store.path), None)
    cache = _METADATA_CACHE.setdefault(key, {"rowid": 0, "by_id": {}})
    for rowid, eid, metrics in store.stage_metrics_after(STAGE, cache["rowid"]):  # only what is new since last time
        cache["rowid"] = rowid
        if metrics.get("metadata"):
            cache["by_id"][eid] = metrics["metadata"]
    by_id = cache["by_id"]
    if not by_id:
        return None
    nan = float("nan")
    cols: dict[str, list] = {c: [] for c in METADATA_STAR_COLUMNS}
    for eid in exposure_ids:
        md = by_id.get(int(eid), {})
        shift = _beam_shift(md)
        for col, key in METADATA_STAR_COLUMNS.items():
            if isinstance(key, tuple):  # text, 8 significant digits (shifts can be ~1e-3: %.6f is too few)
                cols[col].append(f"{float(shift[key[1]]):.8g}" if shift else "<NA>")
            elif key in ("grid_square", "foil_hole"):
                cols[col].append(str(md.get(key)) if md.get(key) else "None")
            else:
                v = md.get(key)
                cols[col].append(float(v) if v is not None else nan)
    return cols


def summary_lines(store, settings: Settings) -> list[str]:
    """What a run's summary says of the metadata: disagreements with the command line (per kind, with the first),
    unreadable metadata, and the optics groups."""
    report = store.get_value(REPORT_KEY) or {}
    lines = []
    for field, entry in sorted((report.get("disagreements") or {}).items()):
        lines.append(f"  metadata disagrees with the command line on {field} for {entry['count']} exposures "
                     f"(command line used), e.g. {entry['first']}")
    errors = report.get("errors") or {}
    if errors.get("count"):
        lines.append(f"  metadata unreadable for {errors['count']} exposures, e.g. {errors['first']}")
    if grouping_enabled(settings):
        state = store.get_value(OPTICS_GROUPS_KEY) or {}
        n = len(state.get("descriptions", {}))
        waiting = len(state.get("pending", []))
        lines.append(f"  {n} optics groups from the beam shifts"
                     + (f", {waiting} exposures waiting" if waiting else ""))
    return lines
