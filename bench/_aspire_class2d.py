"""Peer runner for bench/class2d.py: ASPIRE's class averaging on the same particles, in ASPIRE's own venv.

Run only by bench/class2d.py, as a separate process with `.bench-envs/aspire/bin/python` (ASPIRE is GPL-3;
cryolive never imports it). Input: an .npz with ``images (n, b, b)`` float32 (particles white),
``defocus_u``, ``defocus_v`` (Å), ``defocus_angle_deg``, and scalars ``pixel_size``, ``voltage_kv``, ``cs_mm``,
``amplitude_contrast``. Output (JSON): seconds for phase flipping + rotationally invariant classification
(RIRClass2D, nearest neighbours) and for averaging ``n_classes`` selected classes, and for each of those classes
the indices of its images (the class's reference image first).

    .bench-envs/aspire/bin/python bench/_aspire_class2d.py IN.npz OUT.json --n-classes 50 --n-nbor 50
"""

import argparse
import json
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("npz")
    ap.add_argument("out_json")
    ap.add_argument("--n-classes", type=int, default=50)
    ap.add_argument("--n-nbor", type=int, default=50)
    a = ap.parse_args()

    import aspire
    from aspire.classification import RandomClassSelector
    from aspire.denoising import DefaultClassAvgSource
    from aspire.operators import CTFFilter
    from aspire.source import ArrayImageSource

    d = np.load(a.npz)
    images = d["images"].astype(np.float32)
    n = images.shape[0]
    px = float(d["pixel_size"])
    t0 = time.perf_counter()
    src = ArrayImageSource(images, pixel_size=px)
    alpha = float(np.arcsin(float(d["amplitude_contrast"])))  # amplitude contrast as a phase (radians)
    src.unique_filters = [
        CTFFilter(voltage=float(d["voltage_kv"]), defocus_u=float(du), defocus_v=float(dv),
                  defocus_ang=float(np.deg2rad(ang)), Cs=float(d["cs_mm"]), alpha=alpha)
        for du, dv, ang in zip(d["defocus_u"], d["defocus_v"], d["defocus_angle_deg"])
    ]
    src.filter_indices = np.arange(n)
    src = src.phase_flip()
    # a random selection of classes: the default (global variance) selector averages every class first
    avgs = DefaultClassAvgSource(src, n_nbor=a.n_nbor, class_selector=RandomClassSelector(seed=0))
    avgs._classify()
    t1 = time.perf_counter()
    averages = avgs.images[: a.n_classes].asnumpy()
    t2 = time.perf_counter()
    sel = np.asarray(avgs.selection_indices)[: a.n_classes]
    members = np.asarray(avgs.class_indices)[sel]
    json.dump(
        {
            "aspire_version": aspire.__version__,
            "n_images": n,
            "classify_seconds": t1 - t0,
            "average_seconds": t2 - t1,
            "n_classes": int(averages.shape[0]),
            "members": members.astype(int).tolist(),
        },
        open(a.out_json, "w"),
    )


if __name__ == "__main__":
    main()
