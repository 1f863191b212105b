import math

import torch

from cryolive import ctf, fourier


def test_wavelength():
    assert abs(ctf.electron_wavelength_angstrom(300) - 0.019687) < 1e-5
    assert abs(ctf.electron_wavelength_angstrom(200) - 0.025079) < 1e-5


def test_ctf_is_amplitude_contrast_at_dc_and_bounded():
    c = ctf.calculate_ctf_2d(15000, 14000, 30, 300, 2.7, 0.07, 1.0, (128, 128))
    assert abs(c[0, 0].item() - 0.07) < 1e-6
    assert c.abs().max() <= 1.0 + 1e-6


def test_first_zero_matches_analytic_position():
    # without Cs, sqrt(1-Q²) sin γ + Q cos γ = 0 at γ = π − atan(Q/sqrt(1-Q²)), γ = π λ Δf k²
    q, df, lam = 0.1, 20000.0, ctf.electron_wavelength_angstrom(300)
    k = torch.linspace(0.001, 0.1, 20000)
    c = ctf.calculate_ctf_1d(df, 300, 0.0, q, k)
    k0 = k[torch.nonzero(c[:-1] * c[1:] < 0)[0, 0]]
    expected = math.sqrt((math.pi - math.atan(q / math.sqrt(1 - q * q))) / (math.pi * lam * df))
    assert abs(k0.item() - expected) < 1e-4


def test_astigmatism_angle_direction():
    # along the U axis (angle 30° from X) the defocus is U; along the perpendicular it is V
    shape = (256, 256)
    u, v, ang = 25000.0, 15000.0, 30.0
    c2 = ctf.calculate_ctf_2d(u, v, ang, 300, 0.0, 0.1, 1.0, shape, rfft=False)
    ky, kx = fourier.frequency_grid_2d(shape, 1.0, rfft=False)
    for theta_deg, df in ((ang, u), (ang + 90, v)):
        t = math.radians(theta_deg)
        kr = torch.linspace(0.02, 0.2, 50)
        iy = torch.round(kr * math.sin(t) * 256).long() % 256
        ix = torch.round(kr * math.cos(t) * 256).long() % 256
        sampled = c2[iy, ix]
        kk = torch.sqrt(ky[iy, ix] ** 2 + kx[iy, ix] ** 2)
        expected = ctf.calculate_ctf_1d(df, 300, 0.0, 0.1, kk)
        assert torch.allclose(sampled, expected, atol=0.15), theta_deg


def test_batched_ctf_shapes():
    du = torch.tensor([10000.0, 20000.0, 30000.0])
    c = ctf.calculate_ctf_2d(du, du - 500, torch.zeros(3), 300, 2.7, 0.1, 1.2, (64, 80))
    assert c.shape == (3, 64, 41)


def test_dose_filter_decays_with_dose_and_frequency():
    f = ctf.dose_filter_2d(torch.tensor([1.0, 20.0]), (128, 128), 1.0)
    assert f.shape == (2, 128, 65)
    assert f[0, 0, 0] > 0.8 and f[1, 0, 40] < f[0, 0, 40] < f[0, 0, 5]
