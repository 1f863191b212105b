import math

import pytest
import torch

from cryolive import fourier


def test_shift_matches_roll_for_integer_shifts():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(2, 48, 64, generator=g)
    out = fourier.shift_image_2d(img, torch.tensor([[5.0, -3.0], [-7.0, 11.0]]))
    assert torch.allclose(out[0], torch.roll(img[0], (5, -3), (0, 1)), atol=1e-4)
    assert torch.allclose(out[1], torch.roll(img[1], (-7, 11), (0, 1)), atol=1e-4)


def test_subpixel_shift_moves_centre_of_mass():
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    blob = torch.exp(-((y - 30) ** 2 + (x - 20) ** 2) / (2 * 3.0**2))
    out = fourier.shift_image_2d(blob, torch.tensor([0.4, 2.3]))
    com_y = (out * y).sum() / out.sum()
    com_x = (out * x).sum() / out.sum()
    assert abs(com_y - 30.4) < 1e-3 and abs(com_x - 22.3) < 1e-3


def test_fourier_crop_keeps_mean_and_low_frequencies():
    y, x = torch.meshgrid(torch.arange(128.0), torch.arange(128.0), indexing="ij")
    smooth = 3 + torch.cos(2 * math.pi * 3 * x / 128) + 0.5 * torch.sin(2 * math.pi * 5 * y / 128)
    small = fourier.fourier_crop_2d(smooth, (64, 64))
    expected = smooth[::2, ::2]
    assert torch.allclose(small, expected, atol=1e-4)
    back = fourier.fourier_pad_2d(small, (128, 128))
    assert torch.allclose(back, smooth, atol=1e-4)


def test_fourier_crop_rejects_bad_sizes():
    with pytest.raises(ValueError):
        fourier.fourier_crop_2d(torch.zeros(32, 32), (33, 32))


def test_radial_average_of_radius_is_radius():
    shape = (64, 64)
    r = fourier.frequency_radius_2d(shape) * 64
    prof = fourier.radial_average_2d(r)
    n = torch.arange(prof.shape[0], dtype=torch.float32)
    assert torch.allclose(prof[1:], n[1:], atol=0.3)


def test_frc_of_signal_plus_noise_falls_with_noise():
    g = torch.Generator().manual_seed(1)
    sig = fourier.lowpass_2d(torch.randn(128, 128, generator=g), 8.0)
    frc_clean = fourier.fourier_ring_correlation(sig, sig)
    noisy = sig + 0.05 * torch.randn(128, 128, generator=g)
    frc_noisy = fourier.fourier_ring_correlation(sig, noisy)
    assert torch.allclose(frc_clean, torch.ones_like(frc_clean), atol=1e-5)
    assert frc_noisy[2:8].mean() > 0.9  # low frequencies carry the signal
    assert frc_noisy[40:].mean() < 0.2  # beyond the low-pass only noise


def test_good_fft_size():
    assert fourier.good_fft_size(97) == 100
    assert fourier.good_fft_size(128) == 128
    assert fourier.good_fft_size(131) == 144  # 2^4·3^2; 135 is odd
