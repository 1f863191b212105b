"""End-to-end benchmark: simulate a dataset (unless given), process it, print seconds per movie per stage.

The per-stage times come from the session store (each stage records its ``seconds`` in its metrics); the
2D time is measured around the classifier's feed. Run from the repository root:

    python bench/end_to_end.py                                  # 8 movies, 1024², 24 frames, 1 Å/px, temp dir
    python bench/end_to_end.py --movies data_sim --out bench_out --workers 2 --device cpu
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--movies", type=Path, help="simulated dataset folder (with movies/ and gain.mrc); default: "
                                                "simulate one into a temporary folder")
    ap.add_argument("--out", type=Path, help="session folder (default: a temporary folder)")
    ap.add_argument("--n-movies", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--pixel-size", type=float, default=1.0)
    ap.add_argument("--dose-per-frame", type=float, default=1.0)
    ap.add_argument("--particle-diameter", type=float, default=150.0)
    ap.add_argument("--workers", type=int, default=1, help="0: run in this process")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--collection-seconds", type=float, default=10.0,
                    help="the microscope's time per movie to compare against (EPU on a Krios with a fast "
                         "detector: roughly 5-15 s per exposure)")
    args = ap.parse_args(argv)

    from cryolive.config import Class2DSettings, Optics, PickingSettings, Settings
    from cryolive.session.session import Session

    tmp = tempfile.TemporaryDirectory(prefix="cryolive_bench_")
    data = args.movies
    t_sim = 0.0
    if data is None:
        from cryolive.simulate import SimulationSettings, simulate_dataset

        data = Path(tmp.name) / "sim"
        t0 = time.perf_counter()
        simulate_dataset(data, SimulationSettings(n_movies=args.n_movies, image_shape_px=(args.size, args.size),
                                                  n_frames=args.frames,
                                                  pixel_size_angstrom=args.pixel_size,
                                                  dose_per_frame=args.dose_per_frame, seed=0))
        t_sim = time.perf_counter() - t0
    out = args.out or Path(tmp.name) / "out"
    gain = data / "gain.mrc"
    settings = Settings(
        optics=Optics(pixel_size_angstrom=args.pixel_size), dose_per_frame=args.dose_per_frame,
        gain_path=str(gain) if gain.is_file() else None,
        picking=PickingSettings(particle_diameter_angstrom=args.particle_diameter),
        class2d=Class2DSettings(n_classes=10, min_particles_to_start=100, batch_size=200),
        device=args.device, n_workers=args.workers,
    )
    t0 = time.perf_counter()
    with Session(out, settings) as session:
        feed = session.class2d.feed
        t_2d = [0.0]

        def timed_feed(*args_, **kwargs):
            t = time.perf_counter()
            n = feed(*args_, **kwargs)
            t_2d[0] += time.perf_counter() - t
            return n

        session.class2d.feed = timed_feed
        status = session.process([data / "movies"])
        wall = time.perf_counter() - t0
        per_stage = {}
        for r in session.store.stage_results():
            per_stage.setdefault(r["stage"], []).append(float(r["metrics"].get("seconds", float("nan"))))
            if r["stage"] == "motion":  # reading the movie and the gain, before motion correction
                per_stage.setdefault("read", []).append(float(r["metrics"].get("read_seconds", float("nan"))))
        failed = [(e.name, e.error) for e in session.store.exposures("failed")]
    n = max(status.n_done, 1)
    print(f"dataset: {data}  ({status.n_done} done, {status.n_failed} failed, {status.n_particles} particles)")
    if t_sim:
        print(f"simulation: {t_sim:.1f} s")
    print(f"{'stage':<12}{'s/movie (mean)':>16}{'median':>10}{'max':>10}")
    for stage in ("read", "motion", "ctf", "picking", "extraction"):
        v = per_stage.get(stage, [])
        if v:
            print(f"{stage:<12}{statistics.fmean(v):>16.2f}{statistics.median(v):>10.2f}{max(v):>10.2f}")
    print(f"{'class2d':<12}{t_2d[0] / n:>16.2f}{'':>10}{'':>10}   ({status.n_particles_classified} particles)")
    print(f"wall clock: {wall:.1f} s for {status.n_done} movies = {wall / n:.2f} s/movie "
          f"with {args.workers} worker(s) on {args.device}")
    print(f"against the microscope at {args.collection_seconds:.0f} s/movie: processing takes "
          f"{wall / n / args.collection_seconds:.2f}× the collection time (< 1 keeps up)")
    for name, err in failed:
        print(f"failed: {name}: {err}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
