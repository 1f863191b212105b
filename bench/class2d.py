"""Benchmark of streaming 2D classification against ground truth, batch mode and ASPIRE.

Simulates particle images directly (``cryolive.simulate.particles``: projections of 6NY1 and 3J5P at random
3D poses with radiation damage, the CTF at each particle's own defocus, ice, Poisson counts at 40 e/Å²) plus
20 % junk aggregates, then measures, in one run:

1. **Stream vs batch** (``--n`` particles, box ``--box`` at ``--pixel-size``, ``--classes`` classes): the same
   particles as a stream of ``--batches`` batches (``StreamingClassifier2D.update``) and in one batch
   (``fit``, ``--batch-iterations`` EM passes). For each: seconds, particles per second, the fraction of real
   particles in classes whose majority is their own structure, the fraction of junk in classes whose majority is
   junk, classes used, and the quality of the class averages: for each real class, the FRC (masked) of its
   average with the exact CTF-free projection of the member view that matches it best (re-projected from the
   atoms at the member's true pose, brought into the class frame by its estimated pose); reported as the mean
   FRC up to 8 Å (weighted by class size) and the resolution where it falls below 0.5. The automatic class
   selection (``cryolive.classify2d.select_classes``) is scored too: real and junk particles kept.
2. **First classes** from the first ``--first-n`` particles at box ``--first-box`` (same field of view): seconds
   from handing them over to having classes, and the steady-state throughput of the stream afterwards.
3. **ASPIRE** (``--aspire-n`` of the box-``--first-box`` particles; ASPIRE's RIR nearest-neighbour classes and
   BFT averaging, in its own venv and process, see ``bench/setup_aspire.sh``) against cryolive's stream on the
   same particles: seconds, time ratio and purity (for ASPIRE, over the members of its ``--classes`` averaged
   classes, which overlap).

The machine may be shared: absolute seconds are noisy, ratios within one run are what to compare; a CPU
calibration (seconds for 2,000 rfft2 of 128²) is printed with the load average.

Examples::

    python bench/class2d.py                                    # the full figure (20,000 particles, box 128)
    python bench/class2d.py --n 2000 --box 64 --pixel-size 4 --classes 20 --first-n 1000 --aspire-n 300
    python bench/class2d.py --device cuda                       # on a GPU
    python bench/class2d.py --no-aspire --json out.json
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

import numpy as np
import torch

from cryolive import fourier
from cryolive.classify2d import StreamingClassifier2D, class_statistics, rotate_images_2d, select_classes
from cryolive.config import Class2DSettings, Optics
from cryolive.simulate import physics
from cryolive.simulate.particles import simulate_particle_stack
from cryolive.simulate.structure import load_atoms, project_atoms_2d

ROOT = Path(__file__).resolve().parent.parent
STRUCTURES = ["6ny1", "3j5p"]
OPTICS = Optics(pixel_size_angstrom=1.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


def simulate(n, box, pixel, seed):
    images, truth = simulate_particle_stack(STRUCTURES, n, box, pixel, junk_fraction=0.2, max_shift_px=3, seed=seed)
    return images, truth


def purity(class_index, labels):
    """(real particles in classes whose majority is their own structure, junk in junk-majority classes, classes
    used): labels −1 = junk. Majority over all particles of the class."""
    real_ok = junk_ok = 0
    used = 0
    for k in np.unique(class_index):
        if k < 0:
            continue
        lab = labels[class_index == k]
        used += 1
        vals, cnt = np.unique(lab, return_counts=True)
        maj = vals[np.argmax(cnt)]
        if maj >= 0:
            real_ok += int((lab == maj).sum())
        else:
            junk_ok += int((lab < 0).sum())
    return real_ok / max(1, int((labels >= 0).sum())), junk_ok / max(1, int((labels < 0).sum())), used


def group_purity(groups, labels):
    """Purity over overlapping groups (ASPIRE's neighbourhoods): pooled over all memberships."""
    real_ok = real_n = junk_ok = junk_n = 0
    for g in groups:
        lab = labels[np.asarray(g)]
        vals, cnt = np.unique(lab, return_counts=True)
        maj = vals[np.argmax(cnt)]
        real_n += int((lab >= 0).sum())
        junk_n += int((lab < 0).sum())
        real_ok += int((lab == maj).sum()) if maj >= 0 else 0
        junk_ok += int((lab < 0).sum()) if maj < 0 else 0
    return real_ok / max(1, real_n), junk_ok / max(1, junk_n)


def average_quality(snapshot, result, truth, box, pixel, max_members=16, seed=0):
    """Per real-majority class: FRC (masked) of the average with the best-matching member's exact projection in
    the class frame. Returns (weighted mean FRC up to 8 Å, weighted mean resolution at FRC 0.5 in Å, n classes)."""
    g = np.random.default_rng(seed)
    labels = truth["structure_index"].numpy()
    ci = result.class_index.cpu().numpy()
    psi = result.psi_deg.cpu()
    shift = result.shift_yx_px.cpu().float()
    models = [load_atoms(s) for s in STRUCTURES]
    v_ice = physics.ice_mean_potential_volt()
    mask = fourier.circular_mask_2d((box, box), 0.45 * box).float()
    shell8 = min(box // 2, int(box * pixel / 8.0))
    areas, ress, weights = [], [], []
    for k in np.unique(ci):
        members = np.flatnonzero(ci == k)
        lab = labels[members]
        vals, cnt = np.unique(lab, return_counts=True)
        maj = vals[np.argmax(cnt)]
        if maj < 0 or len(members) < 5:
            continue
        own = members[lab == maj]
        pick = g.choice(own, size=min(max_members, len(own)), replace=False)
        t = torch.as_tensor(pick)
        proj = project_atoms_2d(models[int(maj)], truth["rotations"][t], box, pixel, truth["shifts_yx_px"][t],
                                truth["bfactor_angstrom2"], v_ice, 1)
        frame = rotate_images_2d(fourier.shift_image_2d(proj, -shift[t]), -psi[t], oversampling=2)
        avg = snapshot.averages[int(k)]
        a = (avg - avg[mask > 0].mean()) * mask
        f = (frame - frame[:, mask > 0].mean(-1)[:, None, None]) * mask
        cc = (a[None] * f).sum((-2, -1)) / torch.sqrt((a**2).sum() * (f**2).sum((-2, -1))).clamp(min=1e-12)
        best = int(cc.argmax())
        frc = fourier.fourier_ring_correlation(a[None], f[best : best + 1])[0]
        areas.append(float(frc[1 : shell8 + 1].mean()))
        ress.append(fourier.resolution_at_threshold(frc, box, pixel, 0.5))
        weights.append(len(members))
    w = np.asarray(weights, dtype=float)
    if not len(w):
        return float("nan"), float("nan"), 0
    return float(np.average(areas, weights=w)), float(np.average(ress, weights=w)), len(w)


def ctf_of(truth, sl=slice(None)):
    return truth["defocus_u"][sl], truth["defocus_v"][sl], truth["defocus_angle_deg"][sl]


def run_stream(images, truth, K, box, pixel, n_batches, device, min_start=None):
    n = images.shape[0]
    bs = int(np.ceil(n / n_batches))
    settings = Class2DSettings(n_classes=K, batch_size=bs, min_particles_to_start=min_start or bs)
    clf = StreamingClassifier2D(K, box, pixel, OPTICS, settings, device=device, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    first = None
    for i in range(0, n, bs):
        sl = slice(i, min(n, i + bs))
        r = clf.update(images[sl], *ctf_of(truth, sl))
        if first is None and clf.initialised:
            first = time.perf_counter() - t0
    seconds = time.perf_counter() - t0
    clf.cpu_seconds = time.process_time() - c0
    result = clf.assign(images, *ctf_of(truth))
    return clf, result, seconds, first


def run_batch(images, truth, K, box, pixel, iterations, device):
    settings = Class2DSettings(n_classes=K, min_particles_to_start=images.shape[0])
    clf = StreamingClassifier2D(K, box, pixel, OPTICS, settings, device=device, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    result = clf.fit(images, *ctf_of(truth), n_iterations=iterations)
    clf.cpu_seconds = time.process_time() - c0
    return clf, result, time.perf_counter() - t0


def report(name, clf, result, seconds, truth, box, pixel, n):
    labels = truth["structure_index"].numpy()
    ci = result.class_index.cpu().numpy()
    real, junk, used = purity(ci, labels)
    snap = clf.snapshot()
    area, res, n_cls = average_quality(snap, result, truth, box, pixel)
    sel = select_classes(class_statistics(snap)).numpy()
    kept = sel[np.clip(ci, 0, None)] & (ci >= 0)
    out = {
        "seconds": seconds, "particles_per_second": n / seconds, "cpu_seconds": clf.cpu_seconds,
        "particles_per_cpu_second": n / clf.cpu_seconds, "real_in_own_majority_classes": real,
        "junk_in_junk_classes": junk, "classes_used": used, "frc_mean_to_8A": area, "resolution_frc05_angstrom": res,
        "real_classes_scored": n_cls, "selected_classes": int(sel.sum()),
        "selected_real_kept": float(kept[labels >= 0].mean()), "selected_junk_kept": float(kept[labels < 0].mean()),
        "alignment_resolution_angstrom": clf.alignment_resolution_angstrom,
    }
    print(f"{name:>7}: {seconds:7.1f} s  {n / seconds:6.1f} particles/s (CPU {clf.cpu_seconds:.1f} s, "
          f"{n / clf.cpu_seconds:.1f} particles per CPU-s)  real in own-majority classes {real:.3f}  "
          f"junk in junk classes {junk:.3f}  classes used {used}  FRC(avg, truth) mean to 8 Å {area:.3f}  "
          f"res@0.5 {res:.1f} Å  selection keeps real {out['selected_real_kept']:.3f} / junk "
          f"{out['selected_junk_kept']:.3f}", flush=True)
    return out


def calibrate():
    x = torch.randn(2000, 128, 128)
    t0 = time.perf_counter()
    torch.fft.rfft2(x)
    return time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--box", type=int, default=128)
    ap.add_argument("--pixel-size", type=float, default=2.0)
    ap.add_argument("--classes", type=int, default=50)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--batch-iterations", type=int, default=4)
    ap.add_argument("--first-n", type=int, default=5000)
    ap.add_argument("--first-box", type=int, default=64)
    ap.add_argument("--aspire-n", type=int, default=1000)
    ap.add_argument("--aspire-classes", type=int, default=None,
                    help="classes for the ASPIRE comparison, both ASPIRE's averaged classes and cryolive's K on the "
                         "subset (default --classes; ASPIRE's averaging time grows with it)")
    ap.add_argument("--no-aspire", action="store_true")
    ap.add_argument("--no-main", action="store_true", help="skip part 1 (stream vs batch)")
    ap.add_argument("--no-batch", action="store_true", help="part 1 without the batch run")
    ap.add_argument("--no-first", action="store_true", help="skip parts 2 and 3 (first classes, ASPIRE)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = {"args": vars(a), "load_average": os.getloadavg(), "calibration_rfft_seconds": calibrate()}
    print(f"load average {out['load_average']}, calibration {out['calibration_rfft_seconds']:.2f} s "
          f"(2,000 rfft2 of 128²), threads {a.threads}, device {a.device}", flush=True)

    if not a.no_main:
        t0 = time.perf_counter()
        images, truth = simulate(a.n, a.box, a.pixel_size, a.seed)
        print(f"simulated {a.n} particles, box {a.box}, {a.pixel_size} Å/px in {time.perf_counter() - t0:.0f} s",
              flush=True)
        clf, res, sec, _ = run_stream(images, truth, a.classes, a.box, a.pixel_size, a.batches, a.device)
        out["stream"] = report("stream", clf, res, sec, truth, a.box, a.pixel_size, a.n)
        if not a.no_batch:
            clf, res, sec = run_batch(images, truth, a.classes, a.box, a.pixel_size, a.batch_iterations, a.device)
            out["batch"] = report("batch", clf, res, sec, truth, a.box, a.pixel_size, a.n)
            ratio = out["stream"]["frc_mean_to_8A"] / out["batch"]["frc_mean_to_8A"]
            out["stream_over_batch_frc"] = ratio
            print(f"stream / batch: FRC with truth {ratio:.3f} (within 5 %: {abs(1 - ratio) <= 0.05 or ratio > 1}), "
                  f"time {out['stream']['seconds'] / out['batch']['seconds']:.2f}", flush=True)
        del images, truth

    if a.no_first:
        if a.json:
            Path(a.json).write_text(json.dumps(out, indent=1, default=float))
        return out
    # --- first classes at box first_box (same field of view)
    pixel2 = a.pixel_size * a.box / a.first_box
    n2 = max(a.first_n, a.aspire_n) + a.first_n
    images, truth = simulate(n2, a.first_box, pixel2, a.seed + 1)
    settings = Class2DSettings(n_classes=a.classes, min_particles_to_start=a.first_n, batch_size=1000)
    clf = StreamingClassifier2D(a.classes, a.first_box, pixel2, OPTICS, settings, device=a.device, seed=0)
    t0, c0 = time.perf_counter(), time.process_time()
    clf.update(images[: a.first_n], *ctf_of(truth, slice(0, a.first_n)))
    first = time.perf_counter() - t0
    first_cpu = time.process_time() - c0
    t0 = time.perf_counter()
    for i in range(a.first_n, 2 * a.first_n, 1000):
        sl = slice(i, min(2 * a.first_n, i + 1000))
        clf.update(images[sl], *ctf_of(truth, sl))
    steady = a.first_n / (time.perf_counter() - t0)
    r = clf.assign(images[: 2 * a.first_n], *ctf_of(truth, slice(0, 2 * a.first_n)))
    real, junk, used = purity(r.class_index.cpu().numpy(), truth["structure_index"][: 2 * a.first_n].numpy())
    out["first_classes"] = {"box": a.first_box, "pixel_size": pixel2, "n": a.first_n, "seconds": first,
                            "cpu_seconds": first_cpu,
                            "steady_particles_per_second": steady, "real_in_own_majority_classes": real,
                            "junk_in_junk_classes": junk}
    print(f"first classes from {a.first_n} particles at box {a.first_box} ({pixel2:.2f} Å/px): {first:.1f} s (CPU {first_cpu:.1f} s); "
          f"then {steady:.1f} particles/s; real in own-majority classes {real:.3f}, junk in junk classes {junk:.3f}",
          flush=True)

    # --- ASPIRE on a subset, cryolive on the same particles
    if not a.no_aspire:
        py = ROOT / ".bench-envs" / "aspire" / "bin" / "python"
        if not py.exists():
            subprocess.run(["bash", str(ROOT / "bench" / "setup_aspire.sh")], check=True)
        m = a.aspire_n
        kc = a.aspire_classes or a.classes
        sub = slice(0, m)
        labels = truth["structure_index"][:m].numpy()
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "particles.npz"
            np.savez(npz, images=images[sub].numpy(), defocus_u=truth["defocus_u"][sub].numpy(),
                     defocus_v=truth["defocus_v"][sub].numpy(), defocus_angle_deg=truth["defocus_angle_deg"][sub].numpy(),
                     pixel_size=pixel2, voltage_kv=OPTICS.voltage_kv, cs_mm=OPTICS.cs_mm,
                     amplitude_contrast=OPTICS.amplitude_contrast)
            res_json = Path(tmp) / "aspire.json"
            env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
            import resource

            t0, ch0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.run([str(py), str(ROOT / "bench" / "_aspire_class2d.py"), str(npz), str(res_json),
                                   "--n-classes", str(kc), "--n-nbor", "50"], env=env, cwd=tmp,  # ASPIRE logs into its cwd
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t0
            ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
            aspire_cpu = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)
            if proc.returncode:
                print("ASPIRE failed:\n" + proc.stderr[-3000:])
                asp = None
            else:
                asp = json.loads(res_json.read_text())
        clf, res, sec, _ = run_stream(images[sub], {k: (v[sub] if torch.is_tensor(v) else v) for k, v in truth.items()},
                                      kc, a.first_box, pixel2, max(1, m // 1000) if m >= 2000 else 2, a.device)
        ours_real, ours_junk, _ = purity(res.class_index.cpu().numpy(), labels)
        out["aspire_comparison"] = {"n": m, "classes": kc, "cryolive_seconds": sec, "cryolive_cpu_seconds": clf.cpu_seconds,
                                    "cryolive_real": ours_real, "cryolive_junk": ours_junk}
        if asp:
            a_real, a_junk = group_purity(asp["members"], labels)
            a_sec = asp["classify_seconds"] + asp["average_seconds"]
            out["aspire_comparison"].update({"aspire": asp | {"members": None}, "aspire_seconds": a_sec,
                                             "aspire_wall_seconds": wall, "aspire_cpu_seconds": aspire_cpu,
                                             "aspire_real": a_real, "aspire_junk": a_junk,
                                             "cpu_ratio_aspire_over_cryolive": aspire_cpu / clf.cpu_seconds,
                                             "time_ratio_aspire_over_cryolive": a_sec / sec})
            print(f"ASPIRE {asp['aspire_version']} on {m} particles (box {a.first_box}): classify {asp['classify_seconds']:.1f} s "
                  f"+ average {asp['n_classes']} classes {asp['average_seconds']:.1f} s; real in own-majority groups "
                  f"{a_real:.3f}, junk in junk groups {a_junk:.3f}", flush=True)
            print(f"cryolive on the same {m}: {sec:.1f} s ({kc} classes, stream); real {ours_real:.3f}, junk "
                  f"{ours_junk:.3f}; time ratio ASPIRE / cryolive {a_sec / sec:.1f} (wall), CPU "
                  f"{aspire_cpu:.1f} s / {clf.cpu_seconds:.1f} s = {aspire_cpu / clf.cpu_seconds:.1f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1, default=float))
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
