"""Particle stacks against their ground truth."""

import torch

from cryolive.fourier import circular_mask_2d
from cryolive.geometry import euler_angles_to_matrix
from cryolive.simulate import noiseless_particle_images, simulate_particle_stack


def test_stack_shapes_truth_and_normalisation():
    images, truth = simulate_particle_stack(["6ny1", "3j5p"], 120, 48, 4.0, seed=2, junk_fraction=0.25, max_shift_px=3)
    assert images.shape == (120, 48, 48) and images.dtype == torch.float32
    idx = truth["structure_index"]
    assert set(idx.tolist()) <= {-1, 0, 1}
    assert 10 < int((idx == -1).sum()) < 50
    assert [truth["structure_names"][i] for i in range(5)] == [
        "junk" if int(j) < 0 else truth["names"][int(j)] for j in idx[:5]
    ]
    assert truth["rotations"].shape == (120, 3, 3) and truth["euler_angles_deg"].shape == (120, 3)
    # Euler angles reproduce the rotations
    r = euler_angles_to_matrix(*truth["euler_angles_deg"].unbind(-1))
    assert (r - truth["rotations"]).abs().max() < 1e-4
    assert truth["shifts_yx_px"].abs().max() <= 3
    assert ((truth["defocus_u"] >= 8000) & (truth["defocus_u"] <= 25000)).all()
    assert (truth["defocus_u"] >= truth["defocus_v"]).all()
    bg = ~circular_mask_2d((48, 48), 0.375 * 48)
    assert images[:, bg].mean(1).abs().max() < 1e-4
    assert (images[:, bg].std(1) - 1).abs().max() < 1e-3


def test_particles_are_white_and_carry_the_true_signal():
    n = 96
    images, truth = simulate_particle_stack("6ny1", n, 48, 4.0, seed=4, dose_e_per_a2=60.0, defocus_range_angstrom=(15000, 20000))
    ref = noiseless_particle_images(
        "6ny1", truth["rotations"], 48, 4.0, truth["defocus_u"], truth["defocus_v"], truth["defocus_angle_deg"],
        envelope_bfactor_angstrom2=60.0,
    )
    wrong = noiseless_particle_images(
        "6ny1", truth["rotations"].roll(1, 0), 48, 4.0, truth["defocus_u"], truth["defocus_v"], truth["defocus_angle_deg"],
        envelope_bfactor_angstrom2=60.0,
    )

    def corr(a, b):
        a = a - a.mean((1, 2), keepdim=True)
        b = b - b.mean((1, 2), keepdim=True)
        return (a * b).sum((1, 2)) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))

    c_true = corr(images, ref)
    c_wrong = corr(images, wrong)
    assert float(c_true.mean()) > 0.1  # positive: particles white, CTF ⊛ projection
    assert float(c_true.mean()) > float(c_wrong.mean()) + 0.05
    assert float((c_true > c_wrong).float().mean()) > 0.8
    # realistic: noisy (SNR well below 1)
    assert float(c_true.mean()) < 0.6


def test_dose_sets_the_noise():
    kw = dict(seed=7, defocus_range_angstrom=(15000, 15000), max_astigmatism_angstrom=0.0, ice_thickness_angstrom=0.0)
    rot = None
    low, t1 = simulate_particle_stack("6ny1", 64, 48, 4.0, dose_e_per_a2=5.0, **kw)
    high, t2 = simulate_particle_stack("6ny1", 64, 48, 4.0, dose_e_per_a2=200.0, **kw)
    ref = noiseless_particle_images("6ny1", t1["rotations"], 48, 4.0, t1["defocus_u"], envelope_bfactor_angstrom2=60.0)
    assert torch.equal(t1["rotations"], t2["rotations"])

    def mean_corr(a):
        a = a - a.mean((1, 2), keepdim=True)
        b = ref - ref.mean((1, 2), keepdim=True)
        return float(((a * b).sum((1, 2)) / (a.flatten(1).norm(dim=1) * b.flatten(1).norm(dim=1))).mean())

    assert mean_corr(high) > mean_corr(low) + 0.15
