"""Optics groups from acquisition metadata: exposures taken at the same beam-shift position share a group.

With multi-shot acquisition (EPU AFIS, SerialEM multiple records) the beam is shifted to each hole around a stage
position, which tilts the beam by a slightly different amount at each position; RELION users give each position
its own optics group so that CTF refinement fits its beam tilt (aberrations) separately. The beam shifts recorded
for one position at different stage positions agree to within a small jitter, far smaller than the spacing
between positions, so they form tight clusters.

:class:`OpticsGrouper` assigns groups while exposures stream in, and **never changes a group once given**:

- Beam shifts (any unit, as long as one session uses one: EPU BeamShift, SerialEM ImageShift, FEI header
  Shift X/Y) are clustered by *leader clustering* with a fixed radius: an exposure joins the group whose centre
  (the running mean of its members) is nearest, if within the radius, else it founds a new group. Group numbers
  are given in order of first appearance (1, 2, ...).
- The radius is learned once from the first exposures, which wait (pending, no group yet) until then: the
  single-linkage merge heights of their beam shifts (minimum spanning tree edges, sorted) show a gap between the
  jitter within positions and the spacing between them. With ``n_groups`` = N the cut leaves N clusters and its
  gap must be ``min_gap / 2`` wide; with ``n_groups=None`` (auto) the widest gap that keeps at least two
  within-cluster edges must be ``min_gap`` wide. The radius is half the smallest between-cluster edge. If no
  gap shows after ``max_pending`` exposures (or at :meth:`OpticsGrouper.finish`, the end of a run), the radius
  is ``min_gap`` × the largest edge seen (auto: no structure, one group unless a far position appears later) or
  the cut at N clusters.
- Exposures without a beam shift go to a group per ``fallback`` label (e.g. the EPU grid square), given at once.

Examples::

    g = OpticsGrouper(n_groups=9)
    g.add("mic_001", (0.012, -0.004))      # -> None while the radius is being learned, later the group number
    g.assignments                          # {"mic_001": 3, ...}: only ever grows
    g.finish()                             # end of a run: assign whatever still waits
    state = g.state_dict(); OpticsGrouper.from_state(state)
"""

from __future__ import annotations

import math

import numpy as np


def minimum_spanning_edges(points: np.ndarray) -> np.ndarray:
    """Sorted edge lengths of the Euclidean minimum spanning tree of ``points (m, d)`` → ``(m - 1,)``.

    These are the merge heights of single-linkage clustering: cutting every edge longer than ``r`` leaves the
    clusters of points chained by steps ≤ ``r``. Prim's algorithm, O(m²) (m is small: the exposures pending).
    """
    pts = np.asarray(points, dtype=np.float64)
    m = len(pts)
    if m < 2:
        return np.zeros(0)
    dist = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1))  # (m, m)
    in_tree = np.zeros(m, dtype=bool)
    in_tree[0] = True
    best = dist[0].copy()
    edges = []
    for _ in range(m - 1):
        cand = np.where(in_tree, np.inf, best)
        j = int(np.argmin(cand))
        edges.append(cand[j])
        in_tree[j] = True
        best = np.minimum(best, dist[j])
    return np.sort(np.asarray(edges))


class OpticsGrouper:
    """Streaming optics-group assignment (see the module docstring). ``n_groups``: the number of beam-shift
    positions expected (None: found from the data); ``min_gap``: how much wider the spacing between positions
    must be than the jitter within one; ``max_pending``: exposures that may wait for the radius."""

    def __init__(self, n_groups: int | None = None, min_gap: float = 6.0, max_pending: int = 60,
                 min_pending: int = 12):
        if n_groups is not None and n_groups < 1:
            raise ValueError(f"n_groups must be ≥ 1 or None (auto), got {n_groups}")
        self.n_groups = n_groups
        self.min_gap = float(min_gap)
        self.max_pending = int(max_pending)
        self.min_pending = int(min_pending)
        self.radius: float | None = None
        self.assignments: dict[str, int] = {}
        self.descriptions: dict[int, str] = {}  # group → what it is (beam-shift centre or fallback label)
        self._centres: dict[int, list[float]] = {}  # group → [sum x, sum y, count]
        self._labels: dict[str, int] = {}  # fallback label → group
        self._pending: list[tuple[str, float, float]] = []
        self.warnings: list[str] = []

    # ----------------------------------------------------------------------------------------- queries
    @property
    def n_assigned_groups(self) -> int:
        return len(self.descriptions)

    @property
    def pending(self) -> list[str]:
        return [k for k, _, _ in self._pending]

    def group_of(self, key: str) -> int | None:
        return self.assignments.get(str(key))

    def centre(self, group: int) -> tuple[float, float] | None:
        c = self._centres.get(int(group))
        return None if c is None else (c[0] / c[2], c[1] / c[2])

    # ----------------------------------------------------------------------------------------- updates
    def add(self, key: str, beam_shift: tuple[float, float] | None, fallback: str | None = None) -> int | None:
        """Register one exposure; returns its group, or None while it waits for the radius to be learned.
        Adding a key already assigned returns its group and changes nothing."""
        key = str(key)
        if key in self.assignments:
            return self.assignments[key]
        if any(k == key for k, _, _ in self._pending):
            return None
        if beam_shift is None or not all(math.isfinite(float(v)) for v in beam_shift):
            label = fallback or "no beam shift"
            if label not in self._labels:
                self._labels[label] = self._new_group(label)
            self.assignments[key] = self._labels[label]
            return self.assignments[key]
        x, y = float(beam_shift[0]), float(beam_shift[1])
        if self.radius is not None:
            return self._assign(key, x, y)
        self._pending.append((key, x, y))
        self._learn(force=len(self._pending) >= self.max_pending)
        return self.assignments.get(key)

    def finish(self) -> None:
        """Assign every pending exposure now (end of a run), with the best radius the data allow."""
        if self._pending:
            self._learn(force=True)

    # ----------------------------------------------------------------------------------------- internals
    def _new_group(self, description: str) -> int:
        g = len(self.descriptions) + 1
        self.descriptions[g] = description
        return g

    def _assign(self, key: str, x: float, y: float) -> int:
        best, best_d = None, math.inf
        for g, (sx, sy, n) in self._centres.items():
            d = math.hypot(x - sx / n, y - sy / n)
            if d < best_d:
                best, best_d = g, d
        if best is None or self.radius is None or best_d > self.radius:
            best = self._new_group(f"beam shift ({x:.6g}, {y:.6g})")
            self._centres[best] = [0.0, 0.0, 0]
            n_beam = len(self._centres)
            if self.n_groups is not None and n_beam > self.n_groups:
                far = "no radius learned yet" if self.radius is None else f"farther than {self.radius:.3g}"
                msg = (f"beam shift ({x:.6g}, {y:.6g}) of {key} is {far} from the "
                       f"{n_beam - 1} groups found: new optics group {best} (more positions than the "
                       f"{self.n_groups} expected)")
                self.warnings.append(msg)
        c = self._centres[best]
        c[0] += x
        c[1] += y
        c[2] += 1
        self.assignments[key] = best
        return best

    def _learn(self, force: bool) -> None:
        pts = np.array([(x, y) for _, x, y in self._pending], dtype=np.float64)  # (m, 2)
        m = len(pts)
        h = minimum_spanning_edges(pts)  # (m - 1,) sorted
        scale = float(np.abs(pts).max()) if m else 0.0
        floor = max(scale, 1e-30) * 1e-9  # edges below this are "identical"
        hf = np.maximum(h, floor)
        ratios = hf[1:] / hf[:-1]  # ratio j: edge j+1 over edge j (j + 1 within-cluster edges kept below it)
        if m == 1:
            if force:  # a lone exposure at the end: its own group; the radius is still to be learned
                key, x, y = self._pending.pop()
                self._assign(key, x, y)
            return
        j = np.arange(len(ratios))
        cut = None  # index of the smallest between-cluster edge
        if self.n_groups is not None:  # N known: the widest gap that leaves at most N clusters
            n = self.n_groups
            ok = (m - 1 - j <= n) & (ratios >= self.min_gap / 2)
            if n == 1:
                self.radius = math.inf
            elif ok.any() and (m >= n + 2 or force):
                cut = int(np.argmax(np.where(ok, ratios, 0))) + 1
            elif force:  # cut at N clusters, or each exposure its own group when there are fewer
                cut = m - n if m > n else 0
        else:  # auto: the widest gap with at least two within-cluster edges below it
            ok = (j >= 1) & (ratios >= self.min_gap)
            weak = (j >= 1) & (ratios >= self.min_gap / 2)
            if ok.any() and (m >= self.min_pending or force):
                cut = int(np.argmax(np.where(ok, ratios, 0))) + 1
            elif force and weak.any():  # no clear gap by the end: the widest one that is at least half as wide
                cut = int(np.argmax(np.where(weak, ratios, 0))) + 1
            elif force:
                self.radius = float(hf[-1] * self.min_gap)  # no structure: one group (a far one founds another)
        if cut is not None:
            # between the jitter (largest edge kept) and the spacing (smallest edge cut), in log scale; an
            # exposure repeated exactly says nothing of the jitter, so the radius is at least cut / min_gap
            kept = hf[cut - 1] if cut >= 1 else hf[cut] / self.min_gap ** 2
            self.radius = float(math.sqrt(max(kept, hf[cut] / self.min_gap ** 2) * hf[cut]))
        if self.radius is None:
            return
        pending, self._pending = self._pending, []
        for key, x, y in pending:  # in arrival order: the first to come founds (and numbers) a group
            self._assign(key, x, y)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """A JSON-serialisable state (for the session store)."""
        return {
            "n_groups": self.n_groups, "min_gap": self.min_gap, "max_pending": self.max_pending,
            "min_pending": self.min_pending, "radius": self.radius, "assignments": dict(self.assignments),
            "descriptions": {str(g): d for g, d in self.descriptions.items()},
            "centres": {str(g): list(c) for g, c in self._centres.items()}, "labels": dict(self._labels),
            "pending": [list(p) for p in self._pending],
        }

    @classmethod
    def from_state(cls, state: dict) -> OpticsGrouper:
        g = cls(state.get("n_groups"), state.get("min_gap", 6.0), state.get("max_pending", 60),
                state.get("min_pending", 12))
        g.radius = state.get("radius")
        g.assignments = {str(k): int(v) for k, v in state.get("assignments", {}).items()}
        g.descriptions = {int(k): str(v) for k, v in state.get("descriptions", {}).items()}
        g._centres = {int(k): [float(v[0]), float(v[1]), int(v[2])] for k, v in state.get("centres", {}).items()}
        g._labels = {str(k): int(v) for k, v in state.get("labels", {}).items()}
        g._pending = [(str(k), float(x), float(y)) for k, x, y in state.get("pending", [])]
        return g
