"""Picking and extraction benchmark on the physics simulator: precision, recall, F1 and seconds per micrograph.

Each micrograph is a motion-free sum of Poisson frames from ``cryolive.simulate.MovieSimulator`` (atomic models,
vitreous ice, inelastic loss, radiation damage, junk), at the dose, defocus (the simulator's 0.5–3.5 µm) and pixel
size drawn per micrograph; picking gets the true CTF and the structures' mean diameter. A pick is correct within
0.3 × diameter (greedy one-to-one); truth within the picker's edge margin is not required.

Run from the repository root (one thread, as in CI):

    OMP_NUM_THREADS=1 python bench/picking.py                       # 8 micrographs 1024², 6ny1 + 3j5p
    OMP_NUM_THREADS=1 python bench/picking.py --micrographs 4 --structures 6ny1
"""

from __future__ import annotations

import argparse
import time


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--micrographs", type=int, default=8)
    ap.add_argument("--structures", default="6ny1,3j5p")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from cryolive.config import PickingSettings
    from cryolive.preprocess.extraction import default_box_sizes, extract_particles
    from cryolive.preprocess.picking import match_picks, pick_blobs
    from cryolive.simulate import MovieSimulator, SimulationSettings

    rows = []
    for i in range(args.micrographs):
        s = SimulationSettings(
            structures=args.structures.split(","), image_shape_px=(args.size, args.size), n_frames=(24, 32, 40)[i % 3],
            pixel_size_angstrom=(1.0, 1.2, 1.0, 1.4)[i % 4], max_drift_angstrom=0.0, local_motion_angstrom=0.0,
            gain_variation=0.0, n_hot_pixels=0, seed=args.seed * 1000 + i, oversampling=1,
        )
        sim = MovieSimulator(s, i)
        gen = torch.Generator().manual_seed(args.seed * 1000 + i)
        micrograph = sum(torch.poisson(lam.clamp(min=0), generator=gen) for lam in sim.expected_frames())
        truth = sim.truth()
        is_particle = torch.tensor([name != "junk" for name in truth.particles["structure"]])
        true_yx = truth.particles["coords_yx_px"][is_particle]
        diameter = float(truth.particles["diameter_angstrom"][is_particle].mean())
        px = s.pixel_size_angstrom
        ctf = dict(defocus_u=truth.defocus_u, defocus_v=truth.defocus_v, defocus_angle_deg=truth.defocus_angle_deg,
                   voltage_kv=s.voltage_kv, cs_mm=s.cs_mm, amplitude_contrast=s.amplitude_contrast)
        t = time.process_time()
        picks = pick_blobs(micrograph, px, PickingSettings(particle_diameter_angstrom=diameter), ctf=ctf)
        t_pick = time.process_time() - t
        box, out = default_box_sizes(diameter, px)
        t = time.process_time()
        ex = extract_particles(micrograph, picks.coords_yx_px, box, out)
        t_extract = time.process_time() - t
        margin = box / 2
        inner = ((true_yx >= margin) & (true_yx < torch.tensor([float(args.size)] * 2) - margin)).all(dim=1)
        radius = 0.3 * diameter / px
        _, precision, _, _ = match_picks(picks.coords_yx_px, true_yx, radius)
        _, _, recall, _ = match_picks(picks.coords_yx_px, true_yx[inner], radius)
        f1 = 2 * precision * recall / max(precision + recall, 1e-12)
        rows.append((precision, recall, f1, t_pick, t_extract))
        print(f"{truth.name}: {px} Å/px, {s.n_frames} e/Å², defocus {truth.defocus_u / 1e4:.2f} µm, "
              f"ice {truth.ice_thickness_angstrom:.0f} Å: {int(inner.sum())} particles, {len(picks)} picks "
              f"(threshold {picks.threshold:.2f}, {picks.n_junk} junk) P {precision:.2f} R {recall:.2f} F1 {f1:.2f}; "
              f"pick {t_pick:.2f} s, extract {int(ex.kept.sum())} boxes {box}→{out} {t_extract:.2f} s CPU")
    n = len(rows)
    mean = [sum(r[k] for r in rows) / n for k in range(5)]
    print(f"mean over {n}: precision {mean[0]:.3f} recall {mean[1]:.3f} F1 {mean[2]:.3f}; "
          f"{mean[3]:.3f} s CPU picking and {mean[4]:.3f} s extraction per {args.size}² micrograph")


if __name__ == "__main__":
    main()
