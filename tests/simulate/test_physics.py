"""Physical constants and the ice model against literature values."""

import math

import torch

from cryolive.simulate import physics


def test_interaction_constant_literature():
    # σ = 0.00065 rad/(V·Å) at 300 kV, 0.00073 at 200 kV (Kirkland; Reimer)
    assert abs(physics.interaction_constant(300) - 6.526e-4) < 5e-6
    assert abs(physics.interaction_constant(200) - 7.29e-4) < 1e-5


def test_ice_mean_inner_potential():
    # measured mean inner potential of vitreous ice ≈ 4.5 V (e.g. Wanner et al. 2006: 4.5 ± 0.2 V)
    assert 4.2 < physics.ice_mean_potential_volt() < 4.9


def test_ice_fluctuations_scale_with_thickness_and_peak_near_water_ring():
    g = torch.Generator().manual_seed(0)
    shape = (256, 256)
    var = []
    for t in (100.0, 400.0):
        field = torch.fft.irfft2(physics.ice_potential_ft(shape, 1.0, t, g, batch=(4,)), s=shape)
        var.append(float(field.var()))
        assert abs(float(field.mean())) < 1e-3 * math.sqrt(var[-1])
    assert 3.6 < var[1] / var[0] < 4.4  # independent molecules: variance ∝ number per column
    q = torch.linspace(0.05, 0.5, 400)
    s = physics.water_structure_factor(q)
    assert abs(float(q[s.argmax()]) - 1 / 3.7) < 0.01
    assert float(s[0]) < 0.2  # amorphous water is nearly incompressible: little low-q power


def test_inelastic_loss_reduces_contrast_not_counts():
    thin = physics.contrast_scale(300, 0.1, 100.0)
    thick = physics.contrast_scale(300, 0.1, 500.0)
    assert abs(thick / thin - math.exp(-400 / 3500)) < 1e-6
    assert physics.mean_counts_per_pixel(40, 1.2, 500, 300) == 40 * 1.2**2
    assert physics.mean_counts_per_pixel(40, 1.0, 350, 300, energy_filter=True) < 40 * 0.91
