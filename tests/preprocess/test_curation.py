"""Exposure curation (pure): decisions against hand-computed expectations and against a one-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from cryolive.preprocess.curation import (
    ACCEPTED,
    METRICS,
    PENDING,
    REJECTED,
    Thresholds,
    decide,
    decide_loop,
)

NAN = float("nan")


def test_hand_computed_table():
    # five exposures: good; too much motion; CTF fit failed (NaN → reject); thick ice unmeasurable (NaN → ignored)
    # but too few particles; exactly on both bounds (passes)
    table = pd.DataFrame({
        "motion_total_angstrom": [12.0, 55.0, 20.0, 8.0, 40.0],
        "ctf_resolution_angstrom": [3.8, 4.5, NAN, 5.0, 6.0],
        "ice_thickness": [0.02, 0.03, 0.02, NAN, 0.05],
        "particle_count": [150, 90, 120, 12, 20],
    })
    t = Thresholds(max_motion_total_angstrom=40.0, max_ctf_resolution_angstrom=6.0, max_ice_thickness=0.05,
                   min_particle_count=20)
    d = decide(table, t)
    assert d.status.tolist() == [ACCEPTED, REJECTED, REJECTED, REJECTED, ACCEPTED]
    assert d.reasons == [[], ["motion_total_angstrom>40"], ["ctf_resolution_angstrom_not_measured"],
                         ["particle_count<20"], []]
    assert d.accepted.tolist() == [True, False, False, False, True]
    assert d.counts() == {"accepted": 2, "rejected": 3, "pending": 0}


def test_defocus_range_and_several_reasons_in_metric_order():
    table = {"defocus_angstrom": np.array([4000.0, 15000.0, 31000.0]),
             "astigmatism_angstrom": np.array([2000.0, 100.0, 50.0]),
             "mean_pick_score": np.array([0.1, 0.5, NAN])}
    t = Thresholds(min_defocus_angstrom=5000, max_defocus_angstrom=30000, max_astigmatism_angstrom=1000,
                   min_mean_pick_score=0.2)
    d = decide(table, t)
    assert d.status.tolist() == [REJECTED, ACCEPTED, REJECTED]
    # no picks → mean pick score NaN is ignored (particle count is the metric for that); defocus still rejects
    assert d.reasons == [["defocus_angstrom<5000", "astigmatism_angstrom>1000", "mean_pick_score<0.2"], [],
                         ["defocus_angstrom>30000"]]


def test_pending_never_rejects_but_a_failing_bound_does():
    table = pd.DataFrame({"ctf_resolution_angstrom": [4.0, NAN, NAN, 12.0],
                          "particle_count": [50.0, 50.0, 5.0, NAN]})
    pending = pd.DataFrame({"ctf_resolution_angstrom": [False, True, True, False],
                            "particle_count": [False, False, False, True]})
    t = Thresholds(max_ctf_resolution_angstrom=8.0, min_particle_count=10)
    d = decide(table, t, pending=pending)
    # 0 accepted; 1 waits for its CTF; 2 waits for its CTF but already has too few particles; 3 fails CTF
    assert d.status.tolist() == [ACCEPTED, PENDING, REJECTED, REJECTED]
    assert d.reasons[1] == ["ctf_resolution_angstrom_pending"]
    assert d.reasons[2] == ["ctf_resolution_angstrom_pending", "particle_count<10"]
    assert d.reasons[3] == ["ctf_resolution_angstrom>8", "particle_count_pending"]
    # a bound on a metric absent from the table: pending for everyone (not rejected)
    d2 = decide(table, t.updated(max_ice_thickness=0.1))
    assert d2.status[0] == PENDING and "ice_thickness_pending" in d2.reasons[0]


def test_manual_overrides_win():
    table = {"ctf_resolution_angstrom": np.array([4.0, 12.0, NAN, 5.0])}
    pending = {"ctf_resolution_angstrom": np.array([False, False, True, False])}
    d = decide(table, Thresholds(max_ctf_resolution_angstrom=8.0), pending=pending,
               overrides=np.array([-1, 1, 1, 0]))
    assert d.status.tolist() == [REJECTED, ACCEPTED, ACCEPTED, ACCEPTED]
    assert d.reasons == [["manual_reject"], [], [], []]


def test_no_thresholds_accepts_everything_and_empty_table():
    d = decide({"ctf_resolution_angstrom": np.array([NAN, 50.0])}, Thresholds())
    assert d.status.tolist() == [ACCEPTED, ACCEPTED]
    d0 = decide(pd.DataFrame({"ctf_resolution_angstrom": []}), Thresholds(max_ctf_resolution_angstrom=5))
    assert d0.status.shape == (0,) and d0.reasons == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_columnar_decision_equals_one_at_a_time_reference(seed):
    """Random tables (NaN, pending, overrides) and random bounds: decide == the per-exposure reference loop."""
    rng = np.random.default_rng(seed)
    n = 400
    names = list(METRICS)
    values = {k: rng.normal(10, 4, n) for k in names}
    for k in names:
        values[k][rng.random(n) < 0.08] = NAN
    pending = {k: rng.random(n) < 0.05 for k in names}
    overrides = rng.choice([-1, 0, 0, 0, 0, 1], size=n)
    chosen = rng.choice(names, size=6, replace=False)
    bounds = {}
    for k in chosen:
        lo, hi = sorted(rng.normal(10, 4, 2))
        if rng.random() < 0.7:
            bounds[f"min_{k}"] = round(float(lo), 2)
        if rng.random() < 0.7:
            bounds[f"max_{k}"] = round(float(hi), 2)
    t = Thresholds(**bounds)
    d = decide(pd.DataFrame(values), t, pending=pending, overrides=overrides)
    rows = [{k: (None if pending[k][i] else values[k][i]) for k in names} for i in range(n)]
    ref = decide_loop(rows, t, overrides.tolist())
    assert d.status.tolist() == [s for s, _ in ref]
    assert d.reasons == [r for _, r in ref]
    assert len(set(d.status.tolist())) >= 2  # the draw exercises more than one outcome


def test_thresholds_validation_and_parsing():
    with pytest.raises(ValidationError, match="above max_particle_count"):
        Thresholds(min_particle_count=50, max_particle_count=10)
    with pytest.raises(ValidationError):
        Thresholds(max_motion=3.0)  # unknown name
    with pytest.raises(ValidationError, match="finite"):
        Thresholds(max_ctf_resolution_angstrom=float("inf"))
    assert Thresholds.parse_assignments(["max_ctf_resolution_angstrom=6", "min-particle-count=none"]) == {
        "max_ctf_resolution_angstrom": 6.0, "min_particle_count": None}
    for bad, msg in [("max_ctf_resolution_angstrom", "key=value"), ("max_foo=1", "unknown threshold"),
                     ("max_ice_thickness=thick", "not a number")]:
        with pytest.raises(ValueError, match=msg):
            Thresholds.parse_assignments([bad])
    t = Thresholds(max_ctf_resolution_angstrom=6).updated(max_ctf_resolution_angstrom=None, min_particle_count=3)
    assert t.bounds() == [("particle_count", "min", 3.0)]
