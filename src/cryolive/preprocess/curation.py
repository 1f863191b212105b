"""Exposure curation: thresholds on per-exposure metrics → accepted / rejected / pending, with the reasons.

Pure and columnar (numpy / pandas, no I/O): :func:`decide` takes a table of N exposures (one column per metric)
and a :class:`Thresholds`, and decides all N at once with a handful of array operations per threshold — no
Python loop over exposures — so a user dragging a threshold in the dashboard gets every exposure re-decided at
once. The session side (:mod:`cryolive.session.curation`) loads the table from the store, persists thresholds,
overrides and decisions, and rewrites ``exposures.star`` / ``particles.star``.

Metrics (:data:`METRICS`; names as the store's stage metrics, STAR column in exposures.star):

===========================  ==========  ===========================  ============================
name                         stage       exposures.star column        if measured as NaN
===========================  ==========  ===========================  ============================
motion_total_angstrom        motion      rlnAccumMotionTotal          reject
motion_early_angstrom        motion      rlnAccumMotionEarly          reject
motion_late_angstrom         motion      rlnAccumMotionLate           reject
max_local_motion_angstrom    motion      cryoliveMaxLocalMotionAngst. ignore (global alignment only)
ctf_resolution_angstrom      ctf         rlnCtfMaxResolution          reject (CTF fit failed)
ctf_figure_of_merit          ctf         rlnCtfFigureOfMerit          reject
defocus_angstrom             ctf         (rlnDefocusU+V)/2            reject
astigmatism_angstrom         ctf         rlnCtfAstigmatism            reject
ice_thickness                ctf         cryoliveIceThicknessAngstrom ignore (pixel > 1.7 Å)
stage_tilt_deg               ctf         cryoliveStageTiltDeg         ignore (micrograph too small)
carbon_heterogeneity         ctf         cryoliveCarbonHeterogeneity  ignore
particle_count               extraction  cryoliveParticleCount        ignore
mean_pick_score              picking     cryoliveMeanPickScore        ignore (no picks)
median_pick_score            picking     cryoliveMedianPickScore      ignore (no picks)
===========================  ==========  ===========================  ============================

Every metric has an optional ``min_<name>`` and ``max_<name>`` in :class:`Thresholds` (``None``: no bound).
A value equal to a bound passes. Missing values are explicit, two kinds:

- **pending** (the metric is not computed yet: its stage has not run, or ran before the metric existed) — the
  exposure is neither accepted nor rejected on that threshold; it is *pending* unless another threshold
  already rejects it. Pending exposures do not go downstream (not accepted), and are decided once computed.
- **not measured** (the stage ran and gave NaN) — per metric, see the table: ``reject`` (reason
  ``<name>_not_measured``) or ``ignore`` (the threshold does not apply to this exposure).

Manual overrides (per exposure: ``+1`` accept, ``-1`` reject, ``0`` none) win over the thresholds and over
pending. Status codes: :data:`REJECTED` = 0, :data:`ACCEPTED` = 1, :data:`PENDING` = 2.

Reasons are short tokens without spaces (they go into a STAR column as they are), joined by ``,``:
``ctf_resolution_angstrom>6`` (above the maximum 6), ``particle_count<20`` (below the minimum 20),
``defocus_angstrom_not_measured``, ``ice_thickness_pending`` and ``manual_reject``.

Example::

    t = Thresholds(max_ctf_resolution_angstrom=6.0, max_motion_total_angstrom=30.0)
    d = decide(pd.DataFrame({"ctf_resolution_angstrom": [4.1, 7.0], "motion_total_angstrom": [12.0, np.nan]}), t)
    d.status        # array([1, 0])  (the second is rejected: resolution 7 > 6, and motion not measured)
    d.reasons       # [[], ['motion_total_angstrom_not_measured', 'ctf_resolution_angstrom>6']]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

REJECTED, ACCEPTED, PENDING = 0, 1, 2
STATUS_NAMES = {REJECTED: "rejected", ACCEPTED: "accepted", PENDING: "pending"}
OVERRIDE_ACCEPT, OVERRIDE_REJECT, OVERRIDE_NONE = 1, -1, 0


@dataclass(frozen=True)
class Metric:
    """One per-exposure metric that thresholds may bound."""

    name: str
    stage: str  # the session stage whose result holds it
    star_column: str  # its column in OUT/exposures.star
    unit: str
    if_not_measured: Literal["reject", "ignore"]
    description: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("motion_total_angstrom", "motion", "rlnAccumMotionTotal", "Å", "reject",
           "accumulated motion over the whole movie (RELION's definition)"),
    Metric("motion_early_angstrom", "motion", "rlnAccumMotionEarly", "Å", "reject",
           "accumulated motion over the first 4 e/Å²"),
    Metric("motion_late_angstrom", "motion", "rlnAccumMotionLate", "Å", "reject",
           "accumulated motion after the first 4 e/Å²"),
    Metric("max_local_motion_angstrom", "motion", "cryoliveMaxLocalMotionAngstrom", "Å", "ignore",
           "largest deviation of the local (patch) motion from the global trajectory (NaN: global only)"),
    Metric("ctf_resolution_angstrom", "ctf", "rlnCtfMaxResolution", "Å", "reject",
           "resolution to which the CTF fit holds (smaller is better)"),
    Metric("ctf_figure_of_merit", "ctf", "rlnCtfFigureOfMerit", "", "reject", "CTF fit figure of merit"),
    Metric("defocus_angstrom", "ctf", "rlnDefocusU", "Å", "reject",
           "mean defocus (defocus U + V) / 2, positive underfocus"),
    Metric("astigmatism_angstrom", "ctf", "rlnCtfAstigmatism", "Å", "reject", "defocus U − V"),
    Metric("ice_thickness", "ctf", "cryoliveIceThicknessAngstrom", "relative", "ignore",
           "relative ice thickness (ranks exposures; NaN when the pixel is > 1.7 Å)"),
    Metric("stage_tilt_deg", "ctf", "cryoliveStageTiltDeg", "°", "ignore",
           "stage tilt from the defocus landscape (NaN on small micrographs)"),
    Metric("carbon_heterogeneity", "ctf", "cryoliveCarbonHeterogeneity", "", "ignore",
           "tile-power contrast at 12–40 Å (≈1.1–1.25 on ice; above CTFSettings.carbon_heterogeneity_threshold, "
           "1.35 by default, the CTF stage flags carbon)"),
    Metric("particle_count", "extraction", "cryoliveParticleCount", "", "ignore", "particles extracted"),
    Metric("mean_pick_score", "picking", "cryoliveMeanPickScore", "", "ignore", "mean score of the picks"),
    Metric("median_pick_score", "picking", "cryoliveMedianPickScore", "", "ignore", "median score of the picks"),
)}


class Thresholds(BaseModel):
    """Optional lower / upper bounds on every exposure metric (:data:`METRICS`); ``None``: no bound.

    Units as in the metric names (Å, degrees); a value equal to a bound passes. ``updated(**kv)`` returns a
    copy with some bounds changed (``None`` removes one); :meth:`parse_assignments` reads ``key=value``
    strings (``value`` ``none`` removes the bound).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_motion_total_angstrom: float | None = None
    max_motion_total_angstrom: float | None = None
    min_motion_early_angstrom: float | None = None
    max_motion_early_angstrom: float | None = None
    min_motion_late_angstrom: float | None = None
    max_motion_late_angstrom: float | None = None
    min_max_local_motion_angstrom: float | None = None
    max_max_local_motion_angstrom: float | None = None
    min_ctf_resolution_angstrom: float | None = None
    max_ctf_resolution_angstrom: float | None = None
    min_ctf_figure_of_merit: float | None = None
    max_ctf_figure_of_merit: float | None = None
    min_defocus_angstrom: float | None = None
    max_defocus_angstrom: float | None = None
    min_astigmatism_angstrom: float | None = None
    max_astigmatism_angstrom: float | None = None
    min_ice_thickness: float | None = None
    max_ice_thickness: float | None = None
    min_stage_tilt_deg: float | None = None
    max_stage_tilt_deg: float | None = None
    min_carbon_heterogeneity: float | None = None
    max_carbon_heterogeneity: float | None = None
    min_particle_count: float | None = None
    max_particle_count: float | None = None
    min_mean_pick_score: float | None = None
    max_mean_pick_score: float | None = None
    min_median_pick_score: float | None = None
    max_median_pick_score: float | None = None

    @model_validator(mode="after")
    def _check(self):
        for name in METRICS:
            lo, hi = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            for v in (lo, hi):
                if v is not None and not np.isfinite(v):
                    raise ValueError(f"threshold on {name} must be a finite number, got {v}")
            if lo is not None and hi is not None and lo > hi:
                raise ValueError(f"min_{name}={lo} is above max_{name}={hi}")
        return self

    def bounds(self) -> list[tuple[str, str, float]]:
        """The bounds that are set: ``[(metric name, "min" | "max", value), ...]`` in :data:`METRICS` order."""
        out = []
        for name in METRICS:
            for side in ("min", "max"):
                v = getattr(self, f"{side}_{name}")
                if v is not None:
                    out.append((name, side, float(v)))
        return out

    def updated(self, **changes) -> Thresholds:
        """A copy with some bounds changed (validated)."""
        return Thresholds(**{**self.model_dump(), **changes})

    @staticmethod
    def parse_assignments(assignments: list[str] | tuple[str, ...]) -> dict[str, float | None]:
        """``["max_ctf_resolution_angstrom=6", "min_particle_count=none"]`` → ``{...: 6.0, ...: None}``.

        Raises ValueError naming the bad item (unknown key, no ``=``, not a number)."""
        out: dict[str, float | None] = {}
        for item in assignments:
            key, sep, value = item.partition("=")
            key, value = key.strip().replace("-", "_"), value.strip()
            if not sep:
                raise ValueError(f"{item!r}: expected key=value, e.g. max_ctf_resolution_angstrom=6")
            if key not in Thresholds.model_fields:
                raise ValueError(f"{item!r}: unknown threshold {key!r}; known: {', '.join(Thresholds.model_fields)}")
            if value.lower() in ("none", "null", ""):
                out[key] = None
                continue
            try:
                out[key] = float(value)
            except ValueError as exc:
                raise ValueError(f"{item!r}: {value!r} is not a number") from exc
        return out


@dataclass
class Decision:
    """The decision on N exposures (arrays aligned with the rows of the metrics table).

    - ``status (n,) int8``: :data:`ACCEPTED` 1, :data:`REJECTED` 0, :data:`PENDING` 2;
    - ``accepted (n,) bool``: ``status == ACCEPTED`` (what goes downstream);
    - ``reason_text (n,) str``: the reasons joined by ``,`` ("" when none) — what the store and STAR files get;
    - ``failed (n, k) bool``: which of the ``k`` set bounds (``bounds``) each exposure fails (NaN: not measured
      and rejected on it count as failed); ``pending_on (n, k) bool``: which bounds wait for their metric.
    """

    status: np.ndarray
    reason_text: np.ndarray
    bounds: list[tuple[str, str, float]]
    failed: np.ndarray
    pending_on: np.ndarray

    @property
    def accepted(self) -> np.ndarray:
        return self.status == ACCEPTED

    @property
    def pending(self) -> np.ndarray:
        return self.status == PENDING

    @property
    def rejected(self) -> np.ndarray:
        return self.status == REJECTED

    @property
    def reasons(self) -> list[list[str]]:
        """Per exposure, its reasons as a list (built on demand: one Python list per exposure)."""
        return [r.split(",") if r else [] for r in self.reason_text.tolist()]

    def counts(self) -> dict[str, int]:
        return {STATUS_NAMES[s]: int((self.status == s).sum()) for s in (ACCEPTED, REJECTED, PENDING)}


def _column(metrics, name: str, n: int) -> np.ndarray | None:
    if isinstance(metrics, pd.DataFrame):
        if name not in metrics.columns:
            return None
        return metrics[name].to_numpy(dtype=np.float64, na_value=np.nan)
    if name not in metrics:
        return None
    return np.asarray(metrics[name], dtype=np.float64).reshape(n)


def _n_rows(metrics) -> int:
    if isinstance(metrics, pd.DataFrame):
        return len(metrics)
    lengths = {len(np.asarray(v).reshape(-1)) for v in metrics.values()}
    if len(lengths) > 1:
        raise ValueError(f"metric columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def decide(metrics: pd.DataFrame | Mapping[str, np.ndarray], thresholds: Thresholds,
           pending: pd.DataFrame | Mapping[str, np.ndarray] | None = None,
           overrides: np.ndarray | None = None) -> Decision:
    """Decide N exposures at once.

    ``metrics``: a DataFrame (or mapping of ``(n,)`` arrays) with one float column per metric name (see
    :data:`METRICS`); NaN = measured as NaN. A metric that a set bound needs but that is absent from the table is
    *pending* for every exposure. ``pending``: same layout, bool — True where the metric is not computed yet
    (its value is then ignored). ``overrides (n,)`` int: +1 accept, −1 reject, 0 none (manual decisions win).
    Returns :class:`Decision`.
    """
    n = _n_rows(metrics)
    bounds = thresholds.bounds()
    k = len(bounds)
    failed = np.zeros((n, k), dtype=bool)
    pending_on = np.zeros((n, k), dtype=bool)
    reason_text = np.full(n, "", dtype=object)
    tokens = []
    for j, (name, side, limit) in enumerate(bounds):
        values = _column(metrics, name, n)
        if values is None:
            pending_on[:, j] = True
            tokens.append(None)
            continue
        wait = _column(pending, name, n) if pending is not None else None
        wait = np.zeros(n, dtype=bool) if wait is None else wait.astype(bool)
        nan = np.isnan(values) & ~wait
        with np.errstate(invalid="ignore"):
            out = values > limit if side == "max" else values < limit  # NaN compares False
        fail = out & ~wait
        if METRICS[name].if_not_measured == "reject":
            fail |= nan
        failed[:, j] = fail
        pending_on[:, j] = wait
        tokens.append((f"{name}{'>' if side == 'max' else '<'}{limit:g},", f"{name}_not_measured,", nan))
    any_failed = failed.any(axis=1)
    any_pending = pending_on.any(axis=1)
    status = np.where(any_failed, REJECTED, np.where(any_pending, PENDING, ACCEPTED)).astype(np.int8)
    ov = np.zeros(n, dtype=np.int8) if overrides is None else np.asarray(overrides, dtype=np.int8).reshape(n)
    status[ov == OVERRIDE_ACCEPT] = ACCEPTED
    status[ov == OVERRIDE_REJECT] = REJECTED
    # reasons: one vectorised string concatenation per bound (object arrays: + is elementwise)
    if n:
        manual = np.where(ov == OVERRIDE_REJECT, "manual_reject,", "").astype(object)
        reason_text = manual
        for j, (name, side, limit) in enumerate(bounds):
            if tokens[j] is None:
                reason_text = reason_text + np.where(pending_on[:, j], f"{name}_pending,", "").astype(object)
                continue
            over, not_measured, nan = tokens[j]
            token = np.where(failed[:, j], np.where(nan, not_measured, over),
                             np.where(pending_on[:, j], f"{name}_pending,", ""))
            reason_text = reason_text + token.astype(object)
        # accepted exposures carry no reason (a manual accept overrides what the thresholds said)
        reason_text = np.where(status == ACCEPTED, "", reason_text).astype(object)
        reason_text = pd.Series(reason_text, dtype=object).str.rstrip(",").to_numpy(dtype=object)
    return Decision(status=status, reason_text=reason_text, bounds=bounds, failed=failed, pending_on=pending_on)


def decide_loop(rows: list[dict], thresholds: Thresholds,
                overrides: list[int] | None = None) -> list[tuple[int, list[str]]]:
    """Reference implementation, one exposure at a time (the benchmark's baseline and the tests' cross-check).

    ``rows``: one dict per exposure, metric name → value; a key absent or ``None`` is pending. Same semantics as
    :func:`decide`; returns ``[(status, reasons), ...]``.
    """
    out = []
    for i, row in enumerate(rows):
        reasons, failed, waiting = [], False, False
        ov = overrides[i] if overrides is not None else 0
        if ov == OVERRIDE_REJECT:
            reasons.append("manual_reject")
        for name, side, limit in thresholds.bounds():
            v = row.get(name)
            if v is None:
                waiting = True
                reasons.append(f"{name}_pending")
                continue
            v = float(v)
            if v != v:
                if METRICS[name].if_not_measured == "reject":
                    failed = True
                    reasons.append(f"{name}_not_measured")
                continue
            if (side == "max" and v > limit) or (side == "min" and v < limit):
                failed = True
                reasons.append(f"{name}{'>' if side == 'max' else '<'}{limit:g}")
        status = REJECTED if failed else PENDING if waiting else ACCEPTED
        if ov == OVERRIDE_ACCEPT:
            status = ACCEPTED
        elif ov == OVERRIDE_REJECT:
            status = REJECTED
        out.append((status, [] if status == ACCEPTED else reasons))
    return out
