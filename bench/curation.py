"""Curation benchmark: a threshold change re-decides every exposure of a large session at once.

Builds a synthetic session store of N exposures (default 10,000) with realistic stage metrics (motion, CTF,
picking, extraction as the pipeline records them; a few percent NaN and a few exposures still queued), then
times, in the same run:

- **cryolive**: ``cryolive.session.curation.set_thresholds`` — the full path: save the thresholds, load every
  exposure's metrics from the store, decide (columnar), write every decision back, rewrite ``exposures.star``
  (particles.star is left out: the synthetic exposures have no particle files);
- **baseline**: the same work done one exposure at a time, the way the session wrote exposures.star before
  curation existed — two ``stage_result`` queries per exposure, a per-exposure Python decision
  (``preprocess.curation.decide_loop``, same semantics), the decisions written back in one transaction, the same
  STAR rewrite from a list of row dicts;
- the decision alone: ``decide`` vs ``decide_loop`` on the same table.

Both paths must give identical decisions (checked). Absolute seconds depend on the machine's load (the
development machine is shared); the ratio is the figure to compare. Run from the repository root:

    python bench/curation.py                    # 10,000 exposures, 3 repeats
    python bench/curation.py --n 2000 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def build_store(out: Path, n: int, seed: int = 0):
    """A session folder with a store of ``n`` exposures and their stage metrics (no image files)."""
    from cryolive.config import Settings
    from cryolive.session.pipeline import stage_hashes
    from cryolive.session.store import SessionStore

    rng = np.random.default_rng(seed)
    settings = Settings(dose_per_frame=1.0)
    hashes = stage_hashes(settings)
    store = SessionStore(out / "session.sqlite")
    store.set_value("settings", settings.model_dump(mode="json"))
    now = time.time()
    n_queued = max(1, n // 200)  # still queued: all their metrics are pending
    with store._tx() as db:
        db.executemany(
            "INSERT INTO exposures (path, name, status, n_particles, created, updated) VALUES (?, ?, ?, ?, ?, ?)",
            [(f"/data/movies/mic_{i:06d}.tif", f"mic_{i:06d}", "done" if i < n - n_queued else "pending",
              int(rng.poisson(120)) if i < n - n_queued else None, now, now) for i in range(n)])
        rows = []
        for i in range(n - n_queued):
            eid = i + 1
            total = float(rng.gamma(4.0, 5.0))
            du = float(rng.uniform(5000, 30000))
            res = float(rng.gamma(6.0, 1.0)) if rng.random() > 0.03 else float("nan")
            rows.append((eid, "motion", hashes["motion"], _json({
                "seconds": 1.0, "accum_motion_total": total, "accum_motion_early": 0.4 * total,
                "accum_motion_late": 0.6 * total, "n_frames": 40}),
                _json({"micrograph": f"micrographs/mic_{i:06d}.mrc"})))
            rows.append((eid, "ctf", hashes["ctf"], _json({
                "seconds": 1.0, "defocus_u": du + 300, "defocus_v": du - 300, "defocus_angle_deg": 30.0,
                "astigmatism": 600.0, "max_resolution_angstrom": res, "figure_of_merit": 0.2,
                "ice_thickness_angstrom": float(rng.gamma(5.0, 0.01)), "stage_tilt_deg": float(rng.normal(0, 2)),
                "tilt_axis_deg": 90.0}), "{}"))
            rows.append((eid, "picking", hashes["picking"], _json({
                "seconds": 1.0, "n_picks": 130, "mean_pick_score": float(rng.normal(4, 1)),
                "median_pick_score": float(rng.normal(3.5, 1))}), "{}"))
            rows.append((eid, "extraction", hashes["extraction"], _json({"seconds": 1.0, "n_particles": 120}),
                         _json({"particles_star": f"particles/mic_{i:06d}.star"})))
        db.executemany("INSERT INTO stage_results VALUES (?, ?, ?, ?, ?, ?)",
                       [(*r[:4], r[4], now) for r in rows])
    return store, settings


def _json(d):
    import json

    return json.dumps(d)


def baseline(out: Path, store, settings, thresholds):
    """One exposure at a time: per-exposure queries, per-exposure decision, the same outputs."""
    import pandas as pd

    from cryolive.io.star import write_star
    from cryolive.preprocess.curation import decide_loop
    from cryolive.session.curation import EXPOSURES_STAR_COLUMNS
    from cryolive.session.session import optics_table

    store.save_thresholds(thresholds.model_dump(), source="bench-baseline")
    rows, metric_rows, ids = [], [], []
    for exp in store.exposures():
        if exp.status == "failed":
            continue
        ids.append(exp.id)
        mm = (store.stage_result(exp.id, "motion") or {"metrics": {}})["metrics"]
        cm = (store.stage_result(exp.id, "ctf") or {"metrics": {}})["metrics"]
        pm = (store.stage_result(exp.id, "picking") or {"metrics": {}})["metrics"]
        du, dv = cm.get("defocus_u"), cm.get("defocus_v")
        metric_rows.append({
            "motion_total_angstrom": mm.get("accum_motion_total"),
            "motion_early_angstrom": mm.get("accum_motion_early"),
            "motion_late_angstrom": mm.get("accum_motion_late"),
            "ctf_resolution_angstrom": cm.get("max_resolution_angstrom"),
            "ctf_figure_of_merit": cm.get("figure_of_merit"),
            "defocus_angstrom": None if du is None or dv is None else 0.5 * (du + dv),
            "astigmatism_angstrom": cm.get("astigmatism"), "ice_thickness": cm.get("ice_thickness_angstrom"),
            "stage_tilt_deg": cm.get("stage_tilt_deg"),
            "particle_count": exp.n_particles if exp.status == "done" else None,
            "mean_pick_score": pm.get("mean_pick_score"), "median_pick_score": pm.get("median_pick_score"),
        })
        rows.append((exp, mm, cm, pm))
    decisions = decide_loop(metric_rows, thresholds)
    store.save_decisions(ids, [s for s, _ in decisions], [",".join(r) for _, r in decisions], None)
    star_rows = []
    nan = float("nan")
    for (exp, mm, cm, pm), (status, reasons) in zip(rows, decisions):
        if exp.status != "done":
            continue
        star_rows.append({
            "rlnMicrographMovieName": exp.path, "rlnMicrographName": f"micrographs/{exp.name}.mrc",
            "rlnOpticsGroup": 1, "rlnAccumMotionTotal": mm.get("accum_motion_total", nan),
            "rlnAccumMotionEarly": mm.get("accum_motion_early", nan),
            "rlnAccumMotionLate": mm.get("accum_motion_late", nan), "rlnDefocusU": cm.get("defocus_u", nan),
            "rlnDefocusV": cm.get("defocus_v", nan), "rlnDefocusAngle": cm.get("defocus_angle_deg", nan),
            "rlnCtfAstigmatism": cm.get("astigmatism", nan),
            "rlnCtfMaxResolution": cm.get("max_resolution_angstrom", nan),
            "rlnCtfFigureOfMerit": cm.get("figure_of_merit", nan),
            "cryoliveIceThicknessAngstrom": cm.get("ice_thickness_angstrom", nan),
            "cryoliveStageTiltDeg": cm.get("stage_tilt_deg", nan), "cryoliveTiltAxisDeg": cm.get("tilt_axis_deg", nan),
            "cryoliveParticleCount": int(exp.n_particles or 0),
            "cryoliveMeanPickScore": pm.get("mean_pick_score", nan),
            "cryoliveMedianPickScore": pm.get("median_pick_score", nan),
            "cryoliveAccepted": int(status == 1), "cryoliveDecision": ("rejected", "accepted", "pending")[status],
            "cryoliveRejectionReason": ",".join(reasons) or "none", "cryoliveManualOverride": "none",
        })
    df = pd.DataFrame(star_rows, columns=EXPOSURES_STAR_COLUMNS)
    write_star(out / "exposures.star", {"optics": optics_table(settings), "micrographs": df})
    return np.array([s for s, _ in decisions])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=10_000, help="number of exposures")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from cryolive.preprocess.curation import Thresholds, decide, decide_loop
    from cryolive.session.curation import exposure_table, set_thresholds

    tmp = tempfile.TemporaryDirectory(prefix="cryolive_bench_curation_")
    out = Path(tmp.name)
    t0 = time.perf_counter()
    store, settings = build_store(out, args.n)
    print(f"synthetic store: {args.n} exposures ({time.perf_counter() - t0:.1f} s to build)")
    # a session fills the curation metrics cache as exposures finish (each output rewrite); here all at once
    t0 = time.perf_counter()
    exposure_table(store)
    print(f"curation metrics cache filled for {args.n} exposures: {time.perf_counter() - t0:.2f} s (once; a live "
          f"session does it a few exposures at a time)")

    # a user dragging thresholds: each repeat is a different setting
    settings_seq = [
        Thresholds(max_ctf_resolution_angstrom=8.0, max_motion_total_angstrom=40.0),
        Thresholds(max_ctf_resolution_angstrom=6.0, max_motion_total_angstrom=30.0, min_defocus_angstrom=8000,
                   max_defocus_angstrom=28000, min_particle_count=100, max_ice_thickness=0.08),
        Thresholds(max_ctf_resolution_angstrom=5.0, min_mean_pick_score=3.5, max_stage_tilt_deg=3.0,
                   max_motion_early_angstrom=10.0),
    ]
    ours, base = [], []
    for r in range(args.repeats):
        t = settings_seq[r % len(settings_seq)]
        t0 = time.perf_counter()
        summary = set_thresholds(out, t, store=store, particles=False)
        ours.append(time.perf_counter() - t0)
        star_ours = (out / "exposures.star").read_text().split("\n", 1)[1]  # without the time-stamped comment
        t0 = time.perf_counter()
        status_base = baseline(out, store, settings, t)
        base.append(time.perf_counter() - t0)
        star_base = (out / "exposures.star").read_text().split("\n", 1)[1]
        assert np.array_equal(summary.decision.status, status_base), "decisions differ from the baseline"
        same_star = star_ours == star_base
        if not same_star:
            import difflib

            diff = list(difflib.unified_diff(star_base.splitlines(), star_ours.splitlines(), lineterm="", n=0))
            print("\n".join(diff[:8]))
        print(f"  thresholds {r + 1}: {summary.counts} — cryolive {ours[-1] * 1000:.0f} ms, "
              f"baseline {base[-1] * 1000:.0f} ms, identical exposures.star: {same_star}")

    table = exposure_table(store)
    t = settings_seq[1]
    n_dec = max(3, args.repeats)
    t_dec = []
    for _ in range(n_dec):
        t0 = time.perf_counter()
        d = decide(table.frame, t, pending=table.pending, overrides=table.overrides)
        t_dec.append(time.perf_counter() - t0)
    rows = [{k: (None if table.pending[k].iat[i] else table.frame[k].iat[i]) for k in table.pending.columns}
            for i in range(len(table.frame))]
    t0 = time.perf_counter()
    ref = decide_loop(rows, t)
    t_loop = time.perf_counter() - t0
    assert d.status.tolist() == [s for s, _ in ref]
    med_o, med_b = statistics.median(ours), statistics.median(base)
    print()
    print(f"full re-decision of {args.n} exposures (load from store, decide, write decisions, rewrite exposures.star):")
    print(f"  cryolive (columnar):        {med_o * 1000:7.0f} ms  (median of {len(ours)})"
          f"  {'< 1 s' if med_o < 1.0 else '>= 1 s'}")
    print(f"  baseline (per exposure):    {med_b * 1000:7.0f} ms")
    print(f"  ratio baseline / cryolive:  {med_b / med_o:7.1f}x")
    print(f"decision alone ({len(t.bounds())} bounds): decide {statistics.median(t_dec) * 1000:.1f} ms, "
          f"per-exposure loop {t_loop * 1000:.1f} ms, ratio {t_loop / statistics.median(t_dec):.1f}x")
    print("(absolute times depend on the machine's load; compare the ratios)")
    store.close()
    tmp.cleanup()


if __name__ == "__main__":
    main()
