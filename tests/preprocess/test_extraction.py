"""Particle extraction against ground truth: boxes at true positions reproduce the CTF-filtered projections."""

from __future__ import annotations

import math

import pytest
import torch

from cryolive import ctf as ctf_mod
from cryolive import fourier
from cryolive.geometry import random_rotations
from cryolive.preprocess.extraction import default_box_sizes, extract_particles, per_particle_defocus
from cryolive.simulate.physics import ice_mean_potential_volt
from cryolive.simulate.structure import load_atoms, project_atoms_2d

torch.set_num_threads(1)

PIXEL = 1.0
CTF = dict(defocus_u=15200.0, defocus_v=14800.0, defocus_angle_deg=25.0, voltage_kv=300.0, cs_mm=2.7,
           amplitude_contrast=0.07)


def _ctf_2d(shape, pixel=PIXEL):
    return ctf_mod.calculate_ctf_2d(CTF["defocus_u"], CTF["defocus_v"], CTF["defocus_angle_deg"], CTF["voltage_kv"],
                                    CTF["cs_mm"], CTF["amplitude_contrast"], pixel, shape)


@pytest.fixture(scope="module")
def scene():
    """A 512² noiseless micrograph (dark particles, 30 e/Å²) of three 3j5p particles at known sub-pixel positions,
    and each particle's own projection in a 240 px box (centre at index 120)."""
    atoms = load_atoms("3j5p")
    gen = torch.Generator().manual_seed(3)
    rots = random_rotations(3, gen)
    box = 240
    proj = project_atoms_2d(atoms, rots, box, PIXEL, solvent_potential_volt=ice_mean_potential_volt(), oversampling=1)
    true_yx = torch.tensor([[150.0, 140.0], [170.0, 370.0], [360.0, 260.0]])
    shape = (512, 512)
    potential = torch.zeros(shape)
    for p, c in zip(proj, true_yx.long()):
        y0, x0 = int(c[0]) - box // 2, int(c[1]) - box // 2
        ys, xs = slice(max(y0, 0), min(y0 + box, 512)), slice(max(x0, 0), min(x0 + box, 512))
        potential[ys, xs] += p[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    sigma = 6.5e-4
    contrast = torch.fft.irfft2(torch.fft.rfft2(sigma * potential) * _ctf_2d(shape), s=shape)
    micrograph = 30.0 * (1 - 2 * contrast)
    return micrograph, true_yx, proj


def _corr(a, b):
    a = a - a.mean()
    b = b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_default_box_sizes():
    for diameter, pixel in [(150.0, 1.0), (100.0, 1.0), (200.0, 1.5), (120.0, 0.83), (300.0, 1.1)]:
        box, out = default_box_sizes(diameter, pixel)
        assert box % 2 == 0 and out % 2 == 0
        assert fourier.good_fft_size(box) == box
        assert 1.5 * diameter <= box * pixel <= 1.8 * diameter  # 1.5 × diameter, rounded up to a fast size
        assert out <= box and out >= min(64, box)
        assert box * pixel / out <= 2.6  # about 2.5 Å/px or finer
    assert default_box_sizes(150.0, 1.0) == (240, 96)


def test_extracted_particles_match_ctf_filtered_projections(scene):
    micrograph, true_yx, proj = scene
    box, out = 240, 120
    ex = extract_particles(micrograph, true_yx, box, out)
    assert ex.kept.all() and ex.images.shape == (3, out, out)
    assert ex.pixel_size_factor == pytest.approx(2.0)
    # reference: each particle's projection through the CTF in its own box, Fourier-cropped (contrast: positive)
    ref = torch.fft.irfft2(torch.fft.rfft2(proj) * _ctf_2d((box, box)), s=(box, box))
    ref = fourier.fourier_crop_2d(ref, (out, out))
    for i in range(3):
        assert _corr(ex.images[i], ref[i]) > 0.9
    # a box half a diameter away does not match
    wrong = extract_particles(micrograph, true_yx + torch.tensor([0.0, 70.0]), box, out)
    for i in range(3):
        if wrong.kept[i]:
            assert _corr(wrong.images[int(wrong.kept[: i + 1].sum()) - 1], ref[i]) < 0.5
    # without inversion the particles come out dark: the correlation flips sign
    dark = extract_particles(micrograph, true_yx, box, out, invert_contrast=False)
    assert all(_corr(dark.images[i], ref[i]) < -0.9 for i in range(3))


def test_fourier_crop_keeps_low_frequencies(scene):
    micrograph, true_yx, _ = scene
    full = extract_particles(micrograph, true_yx, 240, None)
    small = extract_particles(micrograph, true_yx, 240, 96)
    # the cropped transform equals the full one at every kept frequency, up to the normalisation's scale
    fs = torch.fft.rfft2(small.images)  # (3, 96, 49)
    ff = torch.fft.rfft2(full.images)  # (3, 240, 121)
    rows = torch.cat([torch.arange(1, 30), torch.arange(96 - 29, 96)])
    rows_full = torch.where(rows < 48, rows, rows + 240 - 96)
    for i in range(3):
        a = fs[i][rows][:, :30]
        b = ff[i][rows_full][:, :30]
        ratio = (a * b.conj()).sum() / (b.abs() ** 2).sum()
        assert abs(ratio.imag) < 1e-4 * abs(ratio.real)
        assert float((a - ratio * b).norm() / a.norm()) < 1e-3


def test_background_normalisation_on_noisy_micrograph(scene):
    micrograph, true_yx, _ = scene
    noisy = torch.poisson(micrograph.clamp(min=0), generator=torch.Generator().manual_seed(1))
    ex = extract_particles(noisy, true_yx, 240, 96, background_radius_px=40)
    y, x = torch.meshgrid(torch.arange(96.0) - 48, torch.arange(96.0) - 48, indexing="ij")
    background = (y**2 + x**2) > 40**2
    vals = ex.images[:, background]
    assert vals.mean(dim=1).abs().max() < 1e-4
    assert (vals.std(dim=1) - 1).abs().max() < 1e-3
    # the (inverted) particles are brighter than their background: clearly so without noise
    clean = extract_particles(micrograph, true_yx, 240, 96, background_radius_px=40)
    assert (clean.images[:, ~background].mean(dim=1) > 0.15).all()


def test_box_centre_convention_and_edges():
    img = torch.zeros(100, 120)
    img[37, 81] = 1.0  # a bright dot
    ex = extract_particles(img, torch.tensor([[37.3, 80.6]]), 32, None, invert_contrast=False)
    assert ex.kept.tolist() == [True]
    peak = int(torch.argmax(ex.images[0]))
    assert divmod(peak, 32) == (16, 16)  # rounded coordinate at index b//2
    assert ex.centres_yx_px.tolist() == [[37, 81]]
    assert torch.allclose(ex.residual_yx_px, torch.tensor([[0.3, -0.4]]), atol=1e-5)
    # boxes reaching over an edge are kept while their centre is inside; picks outside are dropped
    coords = torch.tensor([[16.0, 16.0], [2.0, 60.0], [50.0, 119.0], [50.0, 120.0], [-1.0, 60.0], [99.0, 60.0]])
    ex = extract_particles(img, coords, 32, 16)
    assert ex.kept.tolist() == [True, True, True, False, False, True]
    assert ex.images.shape == (4, 16, 16)
    empty = extract_particles(img, torch.zeros(0, 2), 32, 16)
    assert empty.images.shape == (0, 16, 16) and empty.kept.shape == (0,)
    with pytest.raises(ValueError):
        extract_particles(img, coords, 33, None)


def test_edge_boxes_filled_with_matching_noise_and_particle_kept():
    g = torch.Generator().manual_seed(4)
    img = 5.0 + 2.0 * torch.randn(200, 200, generator=g)
    yy, xx = torch.meshgrid(torch.arange(200.0), torch.arange(200.0), indexing="ij")
    img = img - 8.0 * (((yy - 10) ** 2 + (xx - 100) ** 2) < 6**2)  # a dark particle 10 px from the top edge
    ex = extract_particles(img, torch.tensor([[10.0, 100.0], [100.0, 100.0]]), 64, None)
    assert ex.kept.tolist() == [True, True]
    edge = ex.images[0]
    # the filled rows (outside the micrograph) look like the background: same mean and spread
    filled, inside = edge[:22], edge[44:]
    assert abs(float(filled.mean()) - float(inside.mean())) < 0.15
    assert 0.85 < float(filled.std() / inside.std()) < 1.15
    # the particle (white after inversion) sits at the box centre
    assert float(edge[26:38, 26:38].mean()) > 2.0


def test_extraction_does_not_modify_input(scene):
    micrograph, true_yx, _ = scene
    before = micrograph.clone()
    extract_particles(micrograph, true_yx, 240, 96)
    assert torch.equal(micrograph, before)


def test_per_particle_defocus_hook():
    coords = torch.tensor([[10.0, 20.0], [500.0, 700.0]])
    du, dv, da = per_particle_defocus(coords, CTF)
    assert du.tolist() == [15200.0, 15200.0] and dv.tolist() == [14800.0, 14800.0] and da.tolist() == [25.0, 25.0]

    class Result:
        defocus_u, defocus_v, defocus_angle_deg = 20000.0, 19000.0, -10.0

    def plane(c):  # a tilted specimen: 100 Å more underfocus per 1000 px in x
        return 0.1 * c[:, 1]

    du, dv, da = per_particle_defocus(coords, Result(), landscape=plane)
    assert torch.allclose(du, torch.tensor([20002.0, 20070.0]))
    assert torch.allclose(dv, torch.tensor([19002.0, 19070.0]))
    assert da.tolist() == [-10.0, -10.0]
    assert math.isclose(float(du[1] - dv[1]), 1000.0)
