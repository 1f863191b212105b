"""Picking benchmark on the physics simulator: blob, template and learned pickers against topaz-em, same micrographs.

Micrographs are motion-free sums of Poisson frames from ``cryolive.simulate.MovieSimulator``: particles of a real
structure (atomic model, random orientations, heights through the ice), vitreous ice, inelastic loss, radiation
damage, junk aggregates (3 per micrograph) and the carbon film at a hole edge (``--carbon``, fraction of the
area), at 24–40 e/Å², 0.5–3.5 µm defocus and 1.0–1.4 Å/px drawn per micrograph. Every picker gets the true CTF
and the structure's diameter. A pick is correct within 0.3 × diameter (greedy one-to-one); truth within half a
diameter of the edge is not required (recall) but may be matched (precision). Scores are pooled over the
micrographs.

- ``blob``: :func:`cryolive.preprocess.picking.pick_blobs`, automatic threshold;
- ``template``: :func:`cryolive.preprocess.template_picking.pick_templates` with 24 projections of the
  structure's map at 4 Å/px (:func:`templates_from_map`), 10° in-plane steps, automatic threshold;
- ``learned``: :class:`cryolive.preprocess.learned_picking.LearnedPicker` trained on ``--train`` *other*
  micrographs from the blob picker's picks that match the truth there (what the particles of good 2D classes
  would give; ``--positives blob``: all blob picks, false ones included), its own threshold; the training
  time is printed;
- ``topaz``: topaz-em's pretrained model (resnet16_u64) run by ``bench/_peer_topaz.py`` in its own venv and
  process (GPL-3; ``bash bench/setup_picking_peers.sh`` installs it), downsampled to ~diameter/20 per pixel,
  extraction radius 0.4 × diameter, at its default threshold (-6), at 0, and at the threshold that is best
  against the truth (an upper bound no user has).

Times are CPU seconds on one thread (``torch.set_num_threads(1)``; topaz: ``-j 1`` and ``-d -1``), preprocessing
included, model loading excluded; the machine may be loaded, so compare the ratios, not the seconds.

Run from the repository root:

    bash bench/setup_picking_peers.sh                 # once: topaz-em into .bench-envs/topaz
    OMP_NUM_THREADS=1 python bench/picking.py         # 8 test + 8 training micrographs 1024², 6ny1
    OMP_NUM_THREADS=1 python bench/picking.py --micrographs 4 --train 4 --structure 3j5p --no-topaz
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOPAZ_PYTHON = ROOT / ".bench-envs" / "topaz" / "bin" / "python"


def simulate(structure: str, index: int, seed: int, size: int, carbon: float):
    """One micrograph (motion-free sum of Poisson frames) with its truth, CTF, pixel size and diameter."""
    import torch

    from cryolive.simulate import MovieSimulator, SimulationSettings

    s = SimulationSettings(
        structures=[structure], image_shape_px=(size, size), n_frames=(24, 32, 40)[index % 3],
        pixel_size_angstrom=(1.0, 1.2, 1.0, 1.4)[index % 4], max_drift_angstrom=0.0, local_motion_angstrom=0.0,
        gain_variation=0.0, n_hot_pixels=0, seed=seed, oversampling=1, carbon_coverage=carbon,
    )
    sim = MovieSimulator(s, index)
    gen = torch.Generator().manual_seed(seed * 1000 + index)
    micrograph = sum(torch.poisson(lam.clamp(min=0), generator=gen) for lam in sim.expected_frames())
    truth = sim.truth()
    is_particle = torch.tensor([name != "junk" for name in truth.particles["structure"]])
    ctf = dict(defocus_u=truth.defocus_u, defocus_v=truth.defocus_v, defocus_angle_deg=truth.defocus_angle_deg,
               voltage_kv=s.voltage_kv, cs_mm=s.cs_mm, amplitude_contrast=s.amplitude_contrast)
    return dict(micrograph=micrograph, true_yx=truth.particles["coords_yx_px"][is_particle],
                diameter=float(truth.particles["diameter_angstrom"][is_particle].mean()),
                pixel_size=s.pixel_size_angstrom, ctf=ctf, name=f"mic{index:03d}", dose=s.n_frames,
                defocus=truth.defocus_u)


def counts(pred_yx, scores, mic, threshold=None):
    """(n_pred, tp against all truth, tp against the inner truth, n_inner) at a score threshold."""
    import torch

    from cryolive.preprocess.picking import match_picks

    if threshold is not None:
        pred_yx = pred_yx[scores >= threshold]
    t = mic["true_yx"]
    h, w = mic["micrograph"].shape
    margin = 0.5 * mic["diameter"] / mic["pixel_size"]
    inner = ((t >= margin) & (t < torch.tensor([float(h), float(w)]) - margin)).all(dim=1)
    r = 0.3 * mic["diameter"] / mic["pixel_size"]
    tp_all = match_picks(pred_yx, t, r)[0]
    tp_inner = match_picks(pred_yx, t[inner], r)[0]
    return int(pred_yx.shape[0]), tp_all, tp_inner, int(inner.sum())


def pooled(rows):
    n_pred = sum(r[0] for r in rows)
    tp_all = sum(r[1] for r in rows)
    tp_inner = sum(r[2] for r in rows)
    n_true = sum(r[3] for r in rows)
    p = tp_all / n_pred if n_pred else 1.0
    r = tp_inner / n_true if n_true else 1.0
    return p, r, (2 * p * r / (p + r) if p + r > 0 else 0.0)


def best_threshold(results, mics):
    """The threshold (over the picks' own scores) with the best pooled F1, and that (P, R, F1)."""
    import torch

    allscores = torch.cat([s for _, s in results])
    if allscores.numel() == 0:
        return float("nan"), (1.0, 0.0, 0.0)
    cands = torch.unique(torch.quantile(allscores.double(), torch.linspace(0, 1, 60, dtype=torch.float64)))
    best = (float("nan"), (0.0, 0.0, -1.0))
    for t in cands.tolist():
        prf = pooled([counts(c, s, m, t) for (c, s), m in zip(results, mics)])
        if prf[2] > best[1][2]:
            best = (t, prf)
    return best


def run_topaz(mics, tmp: Path, threshold: float = -6.0):
    """Picks (coords (n, 2), scores (n,)) per micrograph and CPU seconds, from topaz in its own process."""
    import mrcfile
    import numpy as np
    import torch

    by_scale: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(mics):
        scale = max(1, round(m["diameter"] / (20 * m["pixel_size"])))
        radius = max(1, round(0.4 * m["diameter"] / (m["pixel_size"] * scale)))
        by_scale.setdefault((scale, radius), []).append(i)
    out: list = [None] * len(mics)
    cpu = wall = 0.0
    for (scale, radius), idx in by_scale.items():
        paths = []
        for i in idx:
            p = tmp / f"{mics[i]['name']}.mrc"
            with mrcfile.new(p, overwrite=True) as f:
                f.set_data(mics[i]["micrograph"].numpy().astype(np.float32))
                f.voxel_size = mics[i]["pixel_size"]
            paths.append(str(p))
        js = tmp / f"topaz_{scale}_{radius}.json"
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        subprocess.run([str(TOPAZ_PYTHON), str(ROOT / "bench" / "_peer_topaz.py"), str(js), "--scale", str(scale),
                        "--radius", str(radius), "--threshold", str(threshold), *paths], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        res = json.loads(js.read_text())
        cpu += res["preprocess_s"][1] + res["extract_s"][1]
        wall += res["preprocess_s"][0] + res["extract_s"][0]
        for i in idx:
            rows = res["picks"].get(mics[i]["name"], [])
            t = torch.tensor(rows, dtype=torch.float32).reshape(-1, 3)
            out[i] = (t[:, :2], t[:, 2])
        version = res["topaz_version"]
    return out, cpu, wall, version


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micrographs", type=int, default=8, help="test micrographs")
    ap.add_argument("--train", type=int, default=8, help="training micrographs for the learned picker (<= 20)")
    ap.add_argument("--structure", default="6ny1")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--carbon", type=float, default=0.25, help="fraction of each micrograph on the carbon film")
    ap.add_argument("--train-steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-topaz", action="store_true")
    ap.add_argument("--positives", choices=("blob-correct", "blob"), default="blob-correct",
                    help="learned picker's positives: the blob picks that match the truth (as good 2D classes "
                         "would keep them), or all blob picks")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from cryolive.config import PickingSettings
    from cryolive.preprocess.learned_picking import LearnedPicker
    from cryolive.preprocess.picking import match_picks, pick_blobs
    from cryolive.preprocess.template_picking import pick_templates, templates_from_map
    from cryolive.simulate import atoms_to_volume, load_atoms

    t = time.perf_counter()
    test = [simulate(args.structure, i, args.seed * 100 + 1, args.size, args.carbon) for i in range(args.micrographs)]
    train = [simulate(args.structure, i, args.seed * 100 + 2, args.size, args.carbon) for i in range(args.train)]
    print(f"simulated {len(test)} test + {len(train)} training micrographs {args.size}² of {args.structure} "
          f"(carbon {args.carbon:.0%}, 3 junk aggregates each) in {time.perf_counter() - t:.0f} s", flush=True)
    diameter = test[0]["diameter"]
    settings = PickingSettings(particle_diameter_angstrom=diameter)

    def cpu_timed(fn):
        c = time.process_time()
        r = fn()
        return r, time.process_time() - c

    results: dict[str, list] = {}
    seconds: dict[str, float] = {}
    thresholds: dict[str, float] = {}

    # blob
    out, sec = [], 0.0
    for m in test:
        p, s = cpu_timed(lambda: pick_blobs(m["micrograph"], m["pixel_size"], settings, ctf=m["ctf"]))
        out.append((p.coords_yx_px, p.scores))
        sec += s
    results["blob"], seconds["blob"] = out, sec

    # template: projections of the structure's map
    vol = atoms_to_volume(load_atoms(args.structure), 64, 4.0)
    templates = templates_from_map(vol, 4.0, n_views=24)
    out, sec = [], 0.0
    for m in test:
        p, s = cpu_timed(lambda: pick_templates(m["micrograph"], m["pixel_size"], templates, 4.0, settings,
                                                ctf=m["ctf"]))
        out.append((p.coords_yx_px, p.scores))
        sec += s
    results["template"], seconds["template"] = out, sec

    # learned: trained on other micrographs from the blob picker's correct picks there
    positives = []
    for m in train:
        p = pick_blobs(m["micrograph"], m["pixel_size"], settings, ctf=m["ctf"])
        d = torch.cdist(p.coords_yx_px, m["true_yx"]) if len(p) and len(m["true_yx"]) else torch.zeros(len(p), 1)
        ok = d.min(dim=1).values < 0.3 * diameter / m["pixel_size"] if len(p) else torch.zeros(0, dtype=torch.bool)
        positives.append(p.coords_yx_px[ok] if args.positives == "blob-correct" else p.coords_yx_px)
    picker = LearnedPicker(diameter)
    report, train_cpu = cpu_timed(lambda: picker.fit([m["micrograph"] for m in train], [m["pixel_size"] for m in train],
                                                      positives, ctfs=[m["ctf"] for m in train],
                                                      steps=args.train_steps))
    n_true_train = sum(len(m["true_yx"]) for m in train)
    print(f"learned picker: trained on {len(train)} micrographs, {report.n_positives} positives ({args.positives}; "
          f"{report.n_positives / max(n_true_train, 1):.0%} of their particles), {report.steps} steps, "
          f"{train_cpu:.0f} s CPU, threshold {report.threshold:.2f}", flush=True)
    out, sec = [], 0.0
    for m in test:
        p, s = cpu_timed(lambda: picker.pick(m["micrograph"], m["pixel_size"], ctf=m["ctf"], threshold=None))
        out.append((p.coords_yx_px, p.scores))
        sec += s
    results["learned"], seconds["learned"] = out, sec
    thresholds["learned"] = report.threshold

    topaz_note = ""
    if not args.no_topaz:
        if not TOPAZ_PYTHON.exists():
            sys.exit("topaz-em is not installed: run `bash bench/setup_picking_peers.sh` (or pass --no-topaz)")
        with tempfile.TemporaryDirectory() as tmp:
            out, cpu, wall, version = run_topaz(test, Path(tmp))
        results["topaz"], seconds["topaz"] = out, cpu
        thresholds["topaz"] = -6.0
        topaz_note = f" (topaz-em {version}, pretrained resnet16_u64)"

    n = len(test)
    print()
    print(f"{n} test micrographs {args.size}², {args.structure}, diameter {diameter:.0f} Å, "
          f"{sum(len(m['true_yx']) for m in test)} particles{topaz_note}")
    ref = seconds.get("topaz")
    head = (f"{'picker':<10} {'mic/s':>7} {'s/mic':>6} {'vs topaz':>9}  {'P':>5} {'R':>5} {'F1':>5}   "
            f"{'best thr':>8} {'P':>5} {'R':>5} {'F1':>5}")
    print(head)
    print("-" * len(head))
    for name, res in results.items():
        thr = thresholds.get(name)
        p, r, f1 = pooled([counts(c, s, m, thr) for (c, s), m in zip(res, test)])
        bt, (bp, br, bf) = best_threshold(res, test)
        per = seconds[name] / n
        ratio = f"{ref / seconds[name]:8.1f}x" if ref else "        -"
        print(f"{name:<10} {n / seconds[name]:7.2f} {per:6.2f} {ratio:>9}  {p:5.2f} {r:5.2f} {f1:5.2f}   "
              f"{bt:8.2f} {bp:5.2f} {br:5.2f} {bf:5.2f}")
    if "topaz" in results:
        p, r, f1 = pooled([counts(c, s, m, 0.0) for (c, s), m in zip(results["topaz"], test)])
        print(f"topaz at threshold 0: P {p:.2f} R {r:.2f} F1 {f1:.2f}")
    per_mic = []
    for name, res in results.items():
        per_mic.append(f"{name} " + " ".join(f"{pooled([counts(c, s, m, thresholds.get(name))])[2]:.2f}"
                                             for (c, s), m in zip(res, test)))
    print("F1 per micrograph: " + "; ".join(per_mic))
    print("'vs topaz': speed relative to topaz (CPU seconds, 1 thread, same run); 'best thr': the threshold "
          "chosen against the truth (not available to a user)")
    _ = match_picks


if __name__ == "__main__":
    main()
