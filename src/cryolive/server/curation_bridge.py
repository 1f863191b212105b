"""The server's link to exposure curation (:mod:`cryolive.session.curation`, :mod:`cryolive.preprocess.curation`).

Thresholds and manual overrides live in the session store's curation tables; changing them through
:func:`save_thresholds` re-decides every exposure, records the decisions in the store and rewrites
``exposures.star`` (a running session notices the change through ``store.curation_version()`` and rewrites
``particles.star`` and feeds 2D accordingly). For display, :func:`decide_table` decides the dashboard's own
columnar table with the same pure function, the same overrides and the same "pending" rule, so what the page
colours is what the store records.
"""

from __future__ import annotations

import numpy as np

from ..preprocess import curation as _curation
from ..session import curation as _session_curation

Thresholds = _curation.Thresholds
METRICS = _curation.METRICS
ACCEPTED, REJECTED, PENDING = _curation.ACCEPTED, _curation.REJECTED, _curation.PENDING


def load_thresholds(store) -> Thresholds:
    """The current thresholds of the session (its settings' default if none were ever saved)."""
    return _session_curation.current_thresholds(store)[1]


def save_thresholds(out, store, changes: dict, user: str):
    """Change some bounds (None removes one); re-decide, record, rewrite exposures.star. → CurationSummary."""
    return _session_curation.set_thresholds(out, changes, source=f"dashboard:{user}", store=store,
                                            write_files=True, particles=False)


def decide_table(columns: dict[str, np.ndarray], pending: dict[str, np.ndarray], thresholds: Thresholds,
                 overrides: np.ndarray | None):
    """Decide every exposure of the columnar table (``columns[name] (n,)``) → ``curation.Decision``;
    ``pending[name] (n,) bool``: metric not computed yet; ``overrides (n,)``: +1 accept, -1 reject, 0 none."""
    table = {name: columns[name] for name in METRICS if name in columns}
    wait = {name: pending[name] for name in table if name in pending}
    return _curation.decide(table, thresholds, pending=wait or None, overrides=overrides)
