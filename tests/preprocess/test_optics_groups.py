"""Optics groups from beam shifts: multi-shot patterns over many stage positions, streamed in any order."""

from __future__ import annotations

import numpy as np
import pytest

from cryolive.preprocess.optics_groups import OpticsGrouper, minimum_spanning_edges


def multishot(n_stage=8, pattern=(3, 3), spacing=0.02, jitter=0.0004, seed=0, centre=(0.003, -0.001)):
    """Beam shifts of a ``pattern`` multi-shot grid at ``n_stage`` stage positions: (keys, shifts (n, 2), truth).

    ``truth[i]`` is the pattern position (0..8 for 3×3); each stage position adds Gaussian jitter per shot and a
    small offset common to its shots (as the beam-shift calibration drifts a little over a session)."""
    rng = np.random.default_rng(seed)
    rows, cols = pattern
    grid = np.array([(spacing * (c - (cols - 1) / 2), spacing * (r - (rows - 1) / 2))
                     for r in range(rows) for c in range(cols)]) + np.asarray(centre)
    keys, shifts, truth = [], [], []
    for s in range(n_stage):
        offset = rng.normal(0, jitter / 2, 2)
        for p, g in enumerate(grid):
            keys.append(f"FoilHole_{1000 * s + p}_Data_{s}")
            shifts.append(g + offset + rng.normal(0, jitter, 2))
            truth.append(p)
    return keys, np.asarray(shifts), np.asarray(truth)


def _same_partition(groups, truth):
    """Each true position maps to exactly one group and each group to one position."""
    pairs = set(zip(groups, truth))
    return len(pairs) == len(set(groups)) == len(set(truth))


@pytest.mark.parametrize("n_groups", [9, None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multishot_3x3_in_random_order_gives_9_stable_groups(n_groups, seed):
    spacing = [0.02, 1.5, 0.05][seed]  # EPU beam shift units, SerialEM µm, ...
    keys, shifts, truth = multishot(n_stage=7, spacing=spacing, jitter=spacing / 40, seed=seed)
    order = np.random.default_rng(100 + seed).permutation(len(keys))
    g = OpticsGrouper(n_groups=n_groups)
    seen: dict[str, int] = {}
    for step, i in enumerate(order):
        g.add(keys[i], tuple(shifts[i]))
        for k, grp in seen.items():  # what was assigned before is never changed
            assert g.group_of(k) == grp, f"step {step}: {k} moved from group {grp} to {g.group_of(k)}"
        seen = dict(g.assignments)
    assert len(g.pending) == 0 and len(g.assignments) == len(keys)  # the radius was learned while streaming
    groups = np.array([g.group_of(k) for k in keys])
    assert sorted(set(groups.tolist())) == list(range(1, 10))
    assert _same_partition(groups.tolist(), truth.tolist())
    assert spacing / 40 * 4 < g.radius < spacing  # between the jitter and the spacing
    for grp in range(1, 10):  # the centres are the pattern positions (up to the jitter)
        members = shifts[groups == grp]
        assert np.allclose(g.centre(grp), members.mean(0))


def test_waiting_exposures_get_groups_at_the_end_and_state_round_trips():
    keys, shifts, truth = multishot(n_stage=1, spacing=0.02, jitter=0.0005, seed=3)  # 9 shots, no repeat yet
    g = OpticsGrouper(n_groups=None)
    for k, s in zip(keys, shifts):
        assert g.add(k, tuple(s)) is None  # no repeat: jitter and spacing cannot be told apart yet
    restored = OpticsGrouper.from_state(g.state_dict())
    assert restored.pending == keys
    restored.finish()  # end of the run: no gap seen → one group for the lot... or the positions, if N is known
    assert set(restored.assignments.values()) == {1}
    known = OpticsGrouper(n_groups=9)
    for k, s in zip(keys, shifts):
        known.add(k, tuple(s))
    known.finish()
    assert sorted(known.assignments[k] for k in keys) == list(range(1, 10))
    # more stage positions later: each joins its position's group, none is renumbered
    more_keys, more, more_truth = multishot(n_stage=3, spacing=0.02, jitter=0.0005, seed=4)
    before = dict(known.assignments)
    for k, s in zip(more_keys, more):
        known.add("late_" + k, tuple(s))
    assert all(known.assignments[k] == v for k, v in before.items())
    by_truth = {t: known.assignments[k] for k, t in zip(keys, truth)}
    assert all(known.assignments["late_" + k] == by_truth[t] for k, t in zip(more_keys, more_truth))


def test_no_multishot_is_one_group_and_missing_beam_shift_falls_back_to_the_grid_square():
    rng = np.random.default_rng(5)
    g = OpticsGrouper(n_groups=None, max_pending=40)
    for i in range(40):  # one shot per hole: the beam shift is the same up to noise
        g.add(f"m{i}", tuple(0.001 * rng.normal(size=2)))
    assert set(g.assignments.values()) == {1} and len(g.assignments) == 40
    a = g.add("x1", None, fallback="grid square 77")
    b = g.add("x2", None, fallback="grid square 78")
    assert (a, b, g.add("x3", None, fallback="grid square 77")) == (2, 3, 2)
    assert g.descriptions[2] == "grid square 77"
    assert g.add("m0", (5.0, 5.0)) == 1  # an exposure added again keeps its group


def test_more_positions_than_asked_for_get_their_own_group_with_a_warning():
    keys, shifts, _ = multishot(n_stage=4, pattern=(2, 2), spacing=0.02, jitter=0.0003, seed=6)
    g = OpticsGrouper(n_groups=4)
    for k, s in zip(keys, shifts):
        g.add(k, tuple(s))
    assert g.n_assigned_groups == 4
    assert g.add("far", (0.5, 0.5)) == 5 and "more positions than the 4 expected" in g.warnings[-1]


def test_runs_ending_with_one_lone_exposure_each_still_group_and_warn():
    # each run (one movie each) ends with a single waiting exposure: no radius is ever learned, and the third
    # beam-shift position, beyond the 2 expected, must get its own group with a warning, not an exception
    g = OpticsGrouper(n_groups=2)
    for i in range(3):
        g.add(f"m{i}", (0.02 * i, 0.0))
        g.finish()
    assert g.radius is None and [g.group_of(f"m{i}") for i in range(3)] == [1, 2, 3]
    assert "more positions than the 2 expected" in g.warnings[-1]

def test_minimum_spanning_edges_are_single_linkage_heights():
    pts = np.array([[0, 0], [0, 1], [0, 3], [10, 3]], dtype=float)
    assert minimum_spanning_edges(pts).tolist() == [1.0, 2.0, 10.0]
