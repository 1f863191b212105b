"""Run teamtomo's torch-motion-correction on one movie and write its trajectories and timings as JSON.

Executed by the peer's own interpreter (``.bench-envs/torch-motion-correction/bin/python``, made by
``bench/setup_motion_peers.sh``) in a separate process by ``bench/motion.py``; it imports nothing from cryolive.

    .bench-envs/torch-motion-correction/bin/python bench/_peer_tmc.py MOVIE.mrc OUT.json --pixel-size 1.0

Two estimates, as the package offers them:

* ``global``: ``estimate_global_motion`` — whole-frame cross-correlation of every frame with the middle frame
  (integer-pixel peaks), returned as a ``DeformationField`` of shape (2, t, 1, 1) in Å.
* ``optimiser``: ``estimate_local_motion`` seeded with the global field (``--seed zero``: from zero) — a Catmull-Rom spline deformation
  field (nt, nh, nw) fitted by Adam to patches; its whole-image trajectory is the field's mean over a grid
  of the image evaluated at every frame's time.

With ``--points N``, each estimate also gets ``points_yx_px``: the field's total motion ``(t, N², 2)`` at an
N×N grid spanning the frame corner to corner (``DeformationField.resample``), row-major.

Conversion to cryolive's convention (docs/CONVENTIONS.md: specimen displacement relative to frame 1, (y, x),
pixels): the package's fields hold (y, x) in Å, positive = displacement of the specimen (its
cross-correlation puts the peak of ``conj(ref) · frame`` at +s, and its optimiser aligns patches by shifting
them by minus the field); so ``s_t = (field_t − field_0) / pixel_size``. bench/motion.py checks this sign
against the truth on every run rather than trusting it.
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("movie", help="MRC (or .npy) movie, (t, h, w) counts")
    ap.add_argument("out", help="JSON file to write")
    ap.add_argument("--pixel-size", type=float, required=True, help="Å/px")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--patch", type=int, default=512, help="optimiser patch side, px")
    ap.add_argument("--grid", type=int, default=5, help="deformation-field control points per image axis")
    ap.add_argument("--time-points", type=int, default=0, help="field control points in time (0: min(t, 20))")
    ap.add_argument("--iterations", type=int, default=100, help="optimiser iterations (package default 100)")
    ap.add_argument("--skip-optimiser", action="store_true")
    ap.add_argument("--points", type=int, default=0,
                    help="also write each field's total motion at an N×N grid of points spanning the frame")
    ap.add_argument("--seed", choices=("global", "zero"), default="global",
                    help="optimiser's starting field: the global estimate (as the package's workflow) or zero")
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    import torch_motion_correction as tmc
    from torch_motion_correction import (
        OptimizationConfig,
        PatchSamplingConfig,
        estimate_global_motion,
        estimate_local_motion,
    )

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    px = args.pixel_size

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    out = {"package": "torch-motion-correction", "version": tmc.__version__, "torch": torch.__version__,
           "device": str(device), "pixel_size": px}
    t0, c0 = time.perf_counter(), time.process_time()
    if args.movie.endswith(".npy"):
        data = np.load(args.movie)
    else:
        import mrcfile

        data = mrcfile.read(args.movie)
    movie = torch.from_numpy(np.asarray(data, dtype=np.float32))  # (t, h, w) on the host, as the package allows
    t_read, c_read = time.perf_counter() - t0, time.process_time() - c0
    t, h, w = movie.shape

    def whole_image_px(field) -> list:
        """(t, 2) trajectory in px, frame 1 = 0, from a DeformationField in Å."""
        nt, nh, nw = field.resolution
        if (nh, nw) == (1, 1) and nt == t:
            s = field.data[:, :, 0, 0].T  # (t, 2) Å
        else:
            s = field.resample((t, 9, 9)).data.mean(dim=(-2, -1)).T  # mean over a 9×9 grid of the image
        s = s.detach().to("cpu", torch.float64) / px
        return (s - s[0:1]).tolist()

    def points_px(field):
        """(t, N², 2) px, each point relative to itself in frame 1, on an N×N grid spanning the frame corner
        to corner (the field's normalised coordinates 0..1), row-major (y, then x)."""
        n = args.points
        nt, nh, nw = field.resolution
        if (nh, nw) == (1, 1) and nt == t:
            s = field.data[:, :, 0, 0].T[:, None, :].expand(-1, n * n, -1)  # the same motion everywhere
        else:
            s = field.resample((t, n, n)).data.permute(1, 2, 3, 0).reshape(t, n * n, 2)  # (t, N², 2) Å
        s = s.detach().to("cpu", torch.float64) / px
        return (s - s[0:1]).tolist()

    t1, c1 = time.perf_counter(), time.process_time()
    with torch.no_grad():
        g_field = estimate_global_motion(image=movie, pixel_spacing=px, device=device)
    sync()
    t_global, c_global = time.perf_counter() - t1, time.process_time() - c1
    out["global"] = {"shifts_yx_px": whole_image_px(g_field), "seconds": t_global,
                     "seconds_with_read": t_read + t_global, "cpu_seconds_with_read": c_read + c_global}
    if args.points:
        out["global"]["points_yx_px"] = points_px(g_field)
    if not args.skip_optimiser:
        nt = args.time_points or min(t, 20)
        patch = min(args.patch, h // 2, w // 2)
        patch -= patch % 2
        t2, c2 = time.perf_counter(), time.process_time()
        field, _trace = estimate_local_motion(
            image=movie,
            pixel_spacing=px,
            deformation_field_resolution=(nt, args.grid, args.grid),
            patch_sampling=PatchSamplingConfig(patch_shape=(patch, patch)),
            initial_deformation_field=g_field if args.seed == "global" else None,
            optimization=OptimizationConfig(max_iterations=args.iterations),
            device=device,
        )
        sync()
        t_opt, c_opt = time.perf_counter() - t2, time.process_time() - c2
        seeded = args.seed == "global"
        out["optimiser"] = {"shifts_yx_px": whole_image_px(field), "seconds": t_opt,
                            "seconds_with_read": t_read + (t_global if seeded else 0.0) + t_opt,
                            "cpu_seconds_with_read": c_read + (c_global if seeded else 0.0) + c_opt,
                            "settings": {"patch_px": patch, "field_resolution": [nt, args.grid, args.grid],
                                         "iterations": args.iterations, "optimizer": "adam (package default lr)",
                                         "seed": args.seed}}
        if args.points:
            out["optimiser"]["points_yx_px"] = points_px(field)
    out["read_seconds"] = t_read
    out["shape"] = [t, h, w]
    with open(args.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
