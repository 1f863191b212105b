"""Extraction against the simulator's truth at realistic dose: extracted particles match the projection of their
true pose (through the CTF) far better than a random pose, and per-particle defocus on tilted micrographs
written to the particle STAR by the session pipeline is within 100 Å RMS of the truth.

Run with ``-s`` to see the measured correlations and RMS errors.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cryolive import ctf as ctf_mod
from cryolive import fourier
from cryolive.geometry import random_rotations
from cryolive.preprocess.extraction import default_box_sizes, extract_particles
from cryolive.simulate.movies import MovieSimulator, SimulationSettings
from cryolive.simulate.physics import ice_mean_potential_volt
from cryolive.simulate.structure import load_atoms, particle_diameter_angstrom, project_atoms_2d

torch.set_num_threads(1)


def _noisy_exposure(settings: SimulationSettings):
    """(Poisson-noisy sum of the whole dose (h, w), truth): the aligned sum of a perfect motion correction."""
    truth = MovieSimulator(settings, 0).truth()
    gen = torch.Generator().manual_seed(settings.seed + 101)
    return torch.poisson(truth.reference.clamp(min=0), generator=gen), truth


def _masked_corr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of ``a (n, b, b)`` and ``b (n, b, b)`` over the pixels of ``mask (b, b)`` → ``(n,)``."""
    a, b = a[:, mask], b[:, mask]
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=1e-12)


def _pose_correlations(s: SimulationSettings, img: torch.Tensor, truth, seed: int = 9):
    """Correlation of each extracted particle with its true projection and with a random-pose projection, both
    through the particle's true CTF (with the simulator's envelope) and Fourier-cropped like the particles, inside
    the particle's circle. The true pose comes from the truth's Euler angles (RELION ZYZ, as in particles.star)."""
    from cryolive.geometry import euler_angles_to_matrix

    px = s.pixel_size_angstrom
    atoms = load_atoms(s.structures[0])
    diameter = particle_diameter_angstrom(atoms)
    box, out = default_box_sizes(diameter, px)
    part = truth.particles
    ex = extract_particles(img, part["coords_yx_px"], box, out)
    kept = ex.kept
    n = int(kept.sum())
    eul = part["euler_deg"][kept]  # (n, 3) rot, tilt, psi

    def reference(rotations: torch.Tensor) -> torch.Tensor:
        proj = project_atoms_2d(atoms, rotations, box, px, solvent_potential_volt=ice_mean_potential_volt(),
                                oversampling=1)  # (n, box, box)
        ctf = ctf_mod.calculate_ctf_2d(part["defocus_u"][kept], part["defocus_v"][kept],
                                       part["defocus_angle_deg"][kept], s.voltage_kv, s.cs_mm,
                                       s.amplitude_contrast, px, (box, box),
                                       bfactor_angstrom2=s.envelope_bfactor_angstrom2)
        ref = torch.fft.irfft2(torch.fft.rfft2(proj) * ctf, s=(box, box))
        return fourier.fourier_crop_2d(ref, (out, out))

    mask = fourier.circular_mask_2d((out, out), 0.5 * diameter / (px * box / out))  # output pixels
    c_true = _masked_corr(ex.images, reference(euler_angles_to_matrix(eul[:, 0], eul[:, 1], eul[:, 2])), mask)
    c_rand = _masked_corr(ex.images, reference(random_rotations(n, torch.Generator().manual_seed(seed))), mask)
    return c_true, c_rand


@pytest.mark.parametrize("case", [
    dict(structures=["6ny1"], pixel_size_angstrom=1.0, defocus_range_angstrom=(9000.0, 16000.0), voltage_kv=300.0),
    dict(structures=["3j5p"], pixel_size_angstrom=1.3, defocus_range_angstrom=(18000.0, 26000.0), voltage_kv=200.0),
], ids=["6ny1-1.0A-300kV", "3j5p-1.3A-200kV"])
def test_extracted_particles_match_their_true_projection_not_a_random_pose(case):
    """40 e/Å², ice 200–500 Å with its structure, particles at their heights: per-particle correlations."""
    s = SimulationSettings(image_shape_px=(640, 640), n_frames=40, dose_per_frame=1.0, particles_per_micrograph=40,
                           junk_per_micrograph=0, local_motion_angstrom=0.0, max_drift_angstrom=0.0,
                           oversampling=1, gain_variation=0.0, n_hot_pixels=0, seed=5, **case)
    img, truth = _noisy_exposure(s)
    c_true, c_rand = _pose_correlations(s, img, truth)
    n = len(c_true)
    diff = (c_true - c_rand).numpy()
    t = diff.mean() / (diff.std(ddof=1) / np.sqrt(n))
    print(f"\n{case['structures'][0]} {s.pixel_size_angstrom} Å/px {s.voltage_kv:.0f} kV: {n} particles, "
          f"correlation with the true projection {float(c_true.mean()):.3f} ± {float(c_true.std()):.3f}, random "
          f"pose {float(c_rand.mean()):.3f} ± {float(c_rand.std()):.3f}; true > random for "
          f"{100 * float((diff > 0).mean()):.0f} %, paired t = {t:.1f}")
    assert n >= 10
    assert float(c_true.mean()) > 0.08  # the particle is there, white, centred, at its defocus
    assert t > 8  # the pose matters: the true projection fits clearly better than a random one
    assert float((diff > 0).mean()) >= 0.9


def test_extracted_particle_is_its_ctf_filtered_projection_without_noise():
    """Noiseless, no ice: the extracted particle equals its true projection through the CTF (the ceiling)."""
    s = SimulationSettings(image_shape_px=(512, 512), n_frames=40, dose_per_frame=1.0, particles_per_micrograph=20,
                           junk_per_micrograph=0, local_motion_angstrom=0.0, max_drift_angstrom=0.0, oversampling=1,
                           gain_variation=0.0, n_hot_pixels=0, ice_thickness_range_angstrom=(0.0, 0.0),
                           structures=["6ny1"], defocus_range_angstrom=(12000.0, 14000.0), seed=8)
    truth = MovieSimulator(s, 0).truth()
    c_true, c_rand = _pose_correlations(s, truth.reference, truth)
    print(f"\nnoiseless, no ice: true pose {float(c_true.mean()):.3f} (min {float(c_true.min()):.3f}), random "
          f"pose {float(c_rand.mean()):.3f}")
    assert len(c_true) >= 5
    assert float(c_true.min()) > 0.6 and float(c_true.mean()) > 0.75  # neighbours' tails enter the circle
    assert float(c_rand.mean()) < 0.4


@pytest.mark.parametrize("case", [
    # particles at their own heights in 300–420 Å of ice: the landscape cannot know a particle's height, which
    # alone gives ≈ 60–75 Å RMS here (uniform over ±(ice − diameter)/2); thicker ice would exceed 100 Å
    dict(pixel_size_angstrom=1.2, stage_tilt_deg=25.0, defocus_range_angstrom=(7000.0, 12000.0), voltage_kv=300.0,
         particle_height_spread=True, ice_thickness_range_angstrom=(300.0, 420.0), seed=11),
    dict(pixel_size_angstrom=0.9, stage_tilt_deg=40.0, defocus_range_angstrom=(15000.0, 22000.0), voltage_kv=200.0,
         particle_height_spread=False, seed=12),
], ids=["1.2A-25deg-heights", "0.9A-40deg-200kV"])
def test_per_particle_defocus_in_particle_star_on_tilted_micrographs(tmp_path, case):
    """The session's per-exposure chain on a tilted movie (true picks): particles.star defocus vs the truth."""
    from cryolive.config import Optics, PickingSettings, Settings
    from cryolive.io.star import read_star
    from cryolive.session.pipeline import StageFunctions, process_exposure
    from cryolive.simulate.dataset import write_movie

    s = SimulationSettings(image_shape_px=(1024, 1024), n_frames=4, dose_per_frame=10.0, particles_per_micrograph=60,
                           local_motion_angstrom=0.0, max_drift_angstrom=0.0, oversampling=1, gain_variation=0.0,
                           n_hot_pixels=0, movie_format="mrc", **case)
    sim = MovieSimulator(s, 0)
    path = write_movie(sim, tmp_path / sim.name)
    truth = sim.truth()
    coords = truth.particles["coords_yx_px"]
    settings = Settings(optics=Optics(pixel_size_angstrom=s.pixel_size_angstrom, voltage_kv=s.voltage_kv),
                        dose_per_frame=10.0, n_workers=0, picking=PickingSettings(particle_diameter_angstrom=150.0))
    stages = StageFunctions(align_movie=_sum_frames, pick_blobs=_TruthPicks(coords))
    outcome = process_exposure(path, settings, tmp_path / "out", stages=stages)
    assert outcome.ok, outcome.error
    rows = read_star(tmp_path / "out" / "particles" / f"{path.stem}.star")["particles"]
    fit = {(round(y), round(x)): (u + v) / 2 for y, x, u, v in
           zip(rows["rlnCoordinateY"], rows["rlnCoordinateX"], rows["rlnDefocusU"], rows["rlnDefocusV"])}
    mean_truth = ((truth.particles["defocus_u"] + truth.particles["defocus_v"]) / 2).tolist()
    err = np.array([fit[k] - m for k, m in zip(((round(float(y)), round(float(x))) for y, x in coords.tolist()),
                                               mean_truth) if k in fit])
    rms = float(np.sqrt(np.mean(err**2)))
    span = max(mean_truth) - min(mean_truth)
    print(f"\n{case}: {len(err)} particles, per-particle defocus RMS error {rms:.0f} Å "
          f"(bias {err.mean():.0f} Å; the tilt spans {span:.0f} Å over the particles)")
    assert len(err) >= 0.9 * len(coords)
    assert span > 500
    assert rms <= 100.0
    # one defocus per micrograph (no landscape) would be off by the tilt plane itself
    assert float(np.std(mean_truth)) > 100.0


def _sum_frames(frames, pixel_size_angstrom, dose_per_frame, voltage_kv, settings):
    total = frames.sum(0)
    return SimpleNamespace(shifts_yx_px=torch.zeros(frames.shape[0], 2), micrograph=total,
                           micrograph_nodw=total.clone(), accum_motion_total=0.0, accum_motion_early=0.0,
                           accum_motion_late=0.0)


class _TruthPicks:
    def __init__(self, coords):
        self.coords = coords

    def __call__(self, micrograph, pixel_size_angstrom, settings, ctf=None):
        return SimpleNamespace(coords_yx_px=self.coords, scores=torch.ones(len(self.coords)))
