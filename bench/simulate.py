"""Simulator benchmark: projections, particle stacks and movies; prints CPU seconds per item.

Run from the repository root (one thread, as in CI):

    OMP_NUM_THREADS=1 python bench/simulate.py                  # 8 movies 1024²×24, 2000 particles box 64
    OMP_NUM_THREADS=1 python bench/simulate.py --movies 2 --particles 500
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--movies", type=int, default=8)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--particles", type=int, default=2000)
    ap.add_argument("--box", type=int, default=64)
    ap.add_argument("--pixel-size", type=float, default=2.5, help="particle-stack pixel size, Å")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from cryolive.geometry import random_rotations
    from cryolive.simulate import SimulationSettings, load_atoms, project_atoms_2d, simulate_dataset, simulate_particle_stack

    atoms = load_atoms("6ny1")
    rot = random_rotations(500, torch.Generator().manual_seed(0))
    for box, px, os_ in ((64, 2.5, 1), (128, 1.0, 1), (128, 1.0, 2)):
        project_atoms_2d(atoms, rot[:8], box, px, oversampling=os_)
        t = time.process_time()
        project_atoms_2d(atoms, rot, box, px, oversampling=os_)
        print(f"project_atoms_2d 6ny1 ({atoms.n_atoms} atoms) box {box} @ {px} Å/px, oversampling {os_}: "
              f"{(time.process_time() - t) / 500 * 1e3:.2f} ms CPU per projection")
    t = time.process_time()
    simulate_particle_stack(["6ny1", "3j5p"], args.particles, args.box, args.pixel_size, junk_fraction=0.1, seed=1)
    dt = time.process_time() - t
    print(f"simulate_particle_stack {args.particles} × {args.box}² @ {args.pixel_size} Å/px: {dt:.1f} s CPU "
          f"({dt / args.particles * 1e3:.2f} ms per particle)")
    with tempfile.TemporaryDirectory() as tmp:
        t, w = time.process_time(), time.perf_counter()
        s = simulate_dataset(tmp, SimulationSettings(n_movies=args.movies, image_shape_px=(args.size, args.size),
                                                     n_frames=args.frames, seed=0))
        dt, dw = time.process_time() - t, time.perf_counter() - w
    print(f"simulate_dataset {args.movies} movies {args.size}²×{args.frames} ({s['n_particles']} particles): "
          f"{dt:.1f} s CPU, {dw:.1f} s wall ({dt / max(1, args.movies):.2f} s CPU per movie)")


if __name__ == "__main__":
    main()
