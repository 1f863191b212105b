"""The session's read + motion stage with the movie decoded while it is aligned, against decoding it first.

Times ``cryolive.session.pipeline.read_and_align_movie`` (what ``process_exposure`` runs for every movie:
decode, gain, hot pixels, alignment, dose-weighted sum) on one simulated LZW TIFF with a gain reference and hot
pixels, in the same run, alternating the two ways:

- ``read_all`` (``overlap=False``, the session before): ``Movie.read_all()`` decodes every page (on
  ``Movie.threads`` threads), the gain multiplies the stack, hot pixels are found on the sum and corrected, then
  ``align_movie`` runs on the stack;
- ``overlapped`` (``overlap=True``, the session now): ``align_movie`` gets the opened movie; a background thread
  decodes (on the same decoding threads) and gain-corrects a few frames at a time while the frames already read
  are Fourier transformed; hot pixels are corrected once the sum is known and the spectra updated for them.

Both give the same trajectories (the largest difference is printed). Wall and CPU seconds per movie, the fastest
of ``--repeats``; the machine is shared, so the ratio within one run is the figure to quote. Run from the
repository root::

    OMP_NUM_THREADS=1 python bench/session_read_motion.py --size 2048 --frames 40 --workdir /tmp/bench_srm
    OMP_NUM_THREADS=1 python bench/session_read_motion.py --patch-grid 1 1   # global alignment only
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _simulate(workdir: Path, size: int, frames: int, seed: int) -> tuple[Path, Path]:
    import numpy as np

    from cryolive.io.mrc import write_mrc
    from cryolive.simulate.dataset import write_movie
    from cryolive.simulate.movies import MovieSimulator, SimulationSettings

    movie = workdir / f"movie_{size}_{frames}_{seed}.tif"
    gain = workdir / f"gain_{size}_{seed}.mrc"
    if movie.is_file() and gain.is_file():
        return movie, gain
    s = SimulationSettings(image_shape_px=(size, size), n_frames=frames, dose_per_frame=1.0, pixel_size_angstrom=1.0,
                           oversampling=1, max_drift_angstrom=20.0, local_motion_angstrom=2.0, gain_variation=0.1,
                           n_hot_pixels=20, movie_format="tiff", seed=seed)
    sim = MovieSimulator(s, 0)
    write_mrc(gain, sim.detector.gain.numpy().astype(np.float32), 1.0)
    write_movie(sim, movie)
    return movie, gain


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--patch-grid", type=int, nargs=2, default=None, help="default: the session's (5 5)")
    ap.add_argument("--threads", type=int, default=None, help="decoding threads (default: Movie.threads' "
                                                              "default, the usable CPUs ≤ 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/cryolive_bench_srm"))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from cryolive.config import MotionSettings, Optics, Settings, resolve_device
    from cryolive.io.movies import _decode_threads, open_movie, read_gain
    from cryolive.session.pipeline import StageFunctions, read_and_align_movie

    args.workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    movie_path, gain_path = _simulate(args.workdir, args.size, args.frames, args.seed)
    print(f"movie {movie_path} ({movie_path.stat().st_size / 2**20:.0f} MiB LZW), ready in "
          f"{time.perf_counter() - t0:.0f} s")
    motion = MotionSettings() if args.patch_grid is None else MotionSettings(patch_grid=tuple(args.patch_grid))
    settings = Settings(optics=Optics(pixel_size_angstrom=1.0), dose_per_frame=1.0, motion=motion,
                        device=args.device)
    device = resolve_device(settings.device)
    gain = read_gain(gain_path)
    fns = StageFunctions().resolved()
    threads = _decode_threads(args.threads)
    print(f"decoding threads: {threads} (TIFF pages; overlapped: on one background thread that drives them); "
          f"torch threads: {torch.get_num_threads()}; patch grid {motion.patch_grid}; device {device}")

    best: dict[str, tuple[float, float]] = {}
    shifts = {}
    for rep in range(args.repeats):
        for name, overlap in (("read_all", False), ("overlapped", True)):
            movie = open_movie(movie_path)
            movie.threads = args.threads
            c0, w0 = time.process_time(), time.perf_counter()
            res, mask, _ = read_and_align_movie(movie, gain, settings, 1.0, fns, device, overlap=overlap)
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            shifts[name] = res.shifts_yx_px.cpu()
            print(f"  repeat {rep + 1} {name:>10}: wall {wall:6.2f} s, CPU {cpu:6.2f} s, {int(mask.sum())} defect "
                  f"pixels")
            w_b, c_b = best.get(name, (float("inf"), float("inf")))
            best[name] = (min(w_b, wall), min(c_b, cpu))
            del res
    diff = float((shifts["overlapped"] - shifts["read_all"]).abs().max())
    (w_old, c_old), (w_new, c_new) = best["read_all"], best["overlapped"]
    print(f"\n{args.size}²×{args.frames} LZW TIFF, read + motion per movie (fastest of {args.repeats}):")
    print("| way | wall s | CPU s | wall ratio |")
    print("|---|---|---|---|")
    print(f"| read_all, then align (before) | {w_old:.2f} | {c_old:.2f} | 1 |")
    print(f"| decoded while aligning (now) | {w_new:.2f} | {c_new:.2f} | {w_new / w_old:.2f} |")
    print(f"largest trajectory difference: {diff:.2e} px; load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({"size": args.size, "frames": args.frames, "patch_grid": motion.patch_grid,
                                         "threads": threads, "read_all": best["read_all"],
                                         "overlapped": best["overlapped"], "max_shift_diff_px": diff}, indent=1))


if __name__ == "__main__":
    main()
