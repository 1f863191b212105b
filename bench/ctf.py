"""CTF estimation benchmark: cryolive against teamtomo's torch-ctf-estimation and ASPIRE, same micrographs, one run.

Micrographs: ``cryolive.simulate.MovieSimulator`` exposures (atomic models in vitreous ice, junk, radiation damage,
inelastic loss) at 1 Å/px, 300 kV, Cs 2.7 mm, 10 % amplitude contrast, defocus 0.8–2.5 µm, astigmatism ≤ 500 Å,
40 frames × 1 e/Å² summed without motion (an ideal aligned, non-dose-weighted sum with Poisson noise per frame).
They are written as MRC to a temporary folder; cryolive runs in this process, each peer in its own virtual
environment and process (``bash bench/setup_ctf_peers.sh`` installs them under ``.bench-envs/``) and reads the
MRC files. All run on one CPU thread and get the same fit band (30–4 Å), defocus search range (0.2–5 µm) and tile
size (512). Peers' outputs are converted to RELION's convention in their runner scripts (``bench/_peer_*.py``);
the "convention check" lines show that the other sign of the angle would fit the truth worse.

Printed per estimator: seconds per micrograph (wall, one thread; the machine is shared, so compare ratios of the
same run, not absolute seconds), time ratio to cryolive's global fit, RMS error of the mean defocus and of U/V (Å),
median |error| of the mean defocus, and the astigmatism-angle error (RMS and max, °) where the true astigmatism
exceeds 100 Å.

Run from the repository root:

    bash bench/setup_ctf_peers.sh                 # once
    OMP_NUM_THREADS=1 python bench/ctf.py         # 16 micrographs of 1024²
    OMP_NUM_THREADS=1 python bench/ctf.py --n 4 --size 1024 --skip-peer aspire
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEERS = {"teamtomo": "bench/_peer_teamtomo.py", "aspire": "bench/_peer_aspire.py"}
BAND = (30.0, 4.0)
DEFOCUS_RANGE = (2000.0, 50000.0)
TILE = 512


def simulate(n: int, size: int, seed: int, out_dir: Path):
    """Write ``n`` micrographs as MRC; return [(name, path, truth dict, tensor)]."""
    import torch

    from cryolive.io.mrc import write_mrc
    from cryolive.simulate import MovieSimulator, SimulationSettings

    items = []
    for i in range(n):
        s = SimulationSettings(image_shape_px=(size, size), n_frames=40, dose_per_frame=1.0, pixel_size_angstrom=1.0,
                               voltage_kv=300.0, defocus_range_angstrom=(8000.0, 25000.0),
                               max_astigmatism_angstrom=500.0, max_drift_angstrom=0.0, local_motion_angstrom=0.0,
                               gain_variation=0.0, n_hot_pixels=0, oversampling=1,
                               particles_per_micrograph=int(100 * (size / 1024) ** 2), seed=seed * 1000 + i)
        sim = MovieSimulator(s, i)
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        mic = torch.zeros(size, size)
        for lam in sim.expected_frames():
            mic += torch.poisson(lam.clamp(min=0), generator=gen)
        t = sim.truth()
        name = f"mic_{i:03d}"
        path = out_dir / f"{name}.mrc"
        write_mrc(path, mic, 1.0)
        truth = dict(defocus_u=t.defocus_u, defocus_v=t.defocus_v, defocus_angle_deg=t.defocus_angle_deg)
        items.append((name, path, truth, mic))
    return items


def angle_diff(a: float, b: float) -> float:
    return (a - b + 90.0) % 180.0 - 90.0


def scores(results: dict, items) -> dict:
    import numpy as np

    e_mean, e_uv, e_ang, e_ang_flip, secs = [], [], [], [], []
    for name, _, t, _ in items:
        r = results.get(name)
        if r is None or not all(math.isfinite(r[k]) for k in ("defocus_u", "defocus_v", "defocus_angle_deg")):
            e_mean.append(float("nan"))
            continue
        e_mean.append((r["defocus_u"] + r["defocus_v"]) / 2 - (t["defocus_u"] + t["defocus_v"]) / 2)
        e_uv += [r["defocus_u"] - t["defocus_u"], r["defocus_v"] - t["defocus_v"]]
        if t["defocus_u"] - t["defocus_v"] > 100:
            e_ang.append(angle_diff(r["defocus_angle_deg"], t["defocus_angle_deg"]))
            e_ang_flip.append(angle_diff(-r["defocus_angle_deg"], t["defocus_angle_deg"]))
        secs.append(r["seconds"])
    e_mean, e_uv, e_ang, e_ang_flip = (np.array(x, dtype=float) for x in (e_mean, e_uv, e_ang, e_ang_flip))
    ok = np.isfinite(e_mean)

    def rms(x):
        return float(np.sqrt(np.mean(x**2))) if len(x) else float("nan")

    return dict(seconds=float(np.mean(secs)) if secs else float("nan"), n_ok=int(ok.sum()), n=len(items),
                rms_mean=rms(e_mean[ok]), median_mean=float(np.median(np.abs(e_mean[ok]))) if ok.any() else math.nan,
                rms_uv=rms(e_uv), rms_angle=rms(e_ang), max_angle=float(np.max(np.abs(e_ang))) if len(e_ang) else math.nan,
                median_angle=float(np.median(np.abs(e_ang))) if len(e_ang) else math.nan,
                median_angle_flipped=float(np.median(np.abs(e_ang_flip))) if len(e_ang_flip) else math.nan,
                within_10pct=int(np.sum(np.abs(e_mean[ok]) < 1000)))


def run_cryolive(items, landscape: bool) -> dict:
    import torch

    from cryolive.config import CTFSettings
    from cryolive.preprocess.ctf_fit import estimate_ctf
    from cryolive.preprocess.ctf_landscape import estimate_ctf_patches, estimate_ice_thickness

    settings = CTFSettings(min_resolution_angstrom=BAND[0], max_resolution_angstrom=BAND[1],
                           min_defocus_angstrom=DEFOCUS_RANGE[0], max_defocus_angstrom=DEFOCUS_RANGE[1],
                           tile_size_px=TILE)
    out = {}
    for name, _, _, mic in items:
        t0 = time.perf_counter()
        r = estimate_ctf(mic, 1.0, 300.0, 2.7, 0.1, settings)
        if landscape:
            estimate_ctf_patches(mic, 1.0, 300.0, 2.7, 0.1, settings, global_result=r)
            estimate_ice_thickness(mic, 1.0, TILE)
        out[name] = dict(defocus_u=r.defocus_u, defocus_v=r.defocus_v, defocus_angle_deg=r.defocus_angle_deg,
                         seconds=time.perf_counter() - t0)
    return out


def run_peer(name: str, manifest: Path, work: Path) -> tuple[dict, str]:
    py = REPO / ".bench-envs" / name / "bin" / "python"
    if not py.exists():
        raise FileNotFoundError(f"{py} missing: run `bash bench/setup_ctf_peers.sh {name}` first")
    out = work / f"{name}.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH="")
    proc = subprocess.run([str(py), str(REPO / PEERS[name]), str(manifest), str(out)], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.load(open(out))
    return data["results"], data["peer"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="number of micrographs")
    ap.add_argument("--size", type=int, default=1024, help="micrograph side, px")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-peer", action="append", default=[], choices=sorted(PEERS), help="repeatable")
    ap.add_argument("--json", type=Path, help="also write all results here")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        items = simulate(args.n, args.size, args.seed, work)
        print(f"simulated {args.n} micrographs of {args.size}² in {time.perf_counter() - t0:.0f} s", flush=True)
        manifest = work / "manifest.json"
        json.dump({"optics": dict(pixel_size_angstrom=1.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1),
                   "band_angstrom": BAND, "defocus_range_angstrom": DEFOCUS_RANGE, "tile_size_px": TILE,
                   "micrographs": [dict(name=n, path=str(p)) for n, p, _, _ in items]}, open(manifest, "w"))
        rows = {}
        rows["cryolive (global fit)"] = scores(run_cryolive(items, False), items)
        rows["cryolive (+5x5 landscape, ice)"] = scores(run_cryolive(items, True), items)
        raw = {}
        for peer in PEERS:
            if peer in args.skip_peer:
                continue
            try:
                res, label = run_peer(peer, manifest, work)
            except Exception as exc:  # report and go on with the others
                print(f"peer {peer}: {exc}", file=sys.stderr)
                continue
            rows[label] = scores(res, items)
            raw[label] = res
    base = rows["cryolive (global fit)"]["seconds"]
    print(f"\n{args.n} micrographs {args.size}², 1 Å/px, 300 kV, defocus 0.8–2.5 µm, astigmatism ≤ 500 Å, 40 e/Å²; "
          "one CPU thread each (shared machine: compare ratios)")
    hdr = (f"{'estimator':34s} {'s/mic':>7s} {'time/cryolive':>13s} {'ok':>5s} {'RMS mean df':>11s} "
           f"{'median':>7s} {'RMS U/V':>8s} {'RMS angle':>9s} {'max angle':>9s}")
    print(hdr)
    print("-" * len(hdr))
    for label, s in rows.items():
        print(f"{label:34s} {s['seconds']:7.2f} {s['seconds'] / base:13.2f} {s['within_10pct']:>2d}/{s['n']:<2d} "
              f"{s['rms_mean']:11.1f} {s['median_mean']:7.1f} {s['rms_uv']:8.1f} {s['rms_angle']:9.2f} "
              f"{s['max_angle']:9.2f}")
    print("\n'ok': mean defocus within 1000 Å of the truth; errors in Å, angles in ° (astigmatism > 100 Å only).")
    print("convention check (median |angle error| as converted vs with the opposite sign):")
    for label, s in rows.items():
        print(f"  {label:34s} {s['median_angle']:6.2f} vs {s['median_angle_flipped']:6.2f}")
    if args.json:
        json.dump({"rows": rows, "raw": raw, "truth": {n: t for n, _, t, _ in items}}, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
