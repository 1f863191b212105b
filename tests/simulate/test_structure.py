"""Ground-truth tests of the atomic-model potential (projections, maps, rotation convention)."""

import math

import torch

from cryolive.geometry import euler_angles_to_matrix, random_rotations
from cryolive.simulate.structure import (
    POTENTIAL_PER_SCATTERING_FACTOR,
    Atoms,
    atoms_to_volume,
    electron_scattering_coefficients,
    load_atoms,
    particle_diameter_angstrom,
    project_atoms_2d,
    random_aggregate,
)


def _small_model() -> Atoms:
    g = torch.Generator().manual_seed(3)
    xyz = torch.randn(60, 3, generator=g) * torch.tensor([9.0, 5.0, 3.0]) + torch.tensor([4.0, 0.0, 0.0])
    elements = ["C", "N", "O", "S"] * 15
    return Atoms.from_arrays(xyz.numpy(), elements, name="toy")


def test_builtin_models_load_centred():
    for name, n_min in (("6ny1", 9000), ("3j5p", 15000)):
        atoms = load_atoms(name)
        assert atoms.n_atoms > n_min
        assert "C" in atoms.elements and "H" not in atoms.elements
        # centred on the centre of mass (carbon-dominated: the plain mean is within a few Å)
        assert atoms.coords.mean(0).abs().max() < 3.0
        assert 100 < particle_diameter_angstrom(atoms) < 200


def test_carbon_scattering_factor_is_international_tables():
    a, b = electron_scattering_coefficients("C")
    # f_e(0) of carbon ≈ 2.51 Å (ITC Table 4.3.2.2)
    assert abs(sum(a) - 2.51) < 0.02
    assert all(bi > 0 for bi in b)


def test_single_atom_projection_centred_and_integral():
    one = Atoms.from_arrays([[0.0, 0.0, 0.0]], ["C"])
    for pixel in (0.8, 1.5):
        img = project_atoms_2d(one, torch.eye(3), 48, pixel)[0]
        assert divmod(int(img.argmax()), 48) == (24, 24)
        # ∫ projected potential d²r = 47.88 · Σa (V·Å³)
        expected = POTENTIAL_PER_SCATTERING_FACTOR * sum(electron_scattering_coefficients("C")[0])
        assert abs(float(img.sum()) * pixel**2 - expected) / expected < 1e-3
        # symmetric about the centre
        assert torch.allclose(img[24 - 3, 24], img[24 + 3, 24], rtol=1e-3, atol=1e-3)


def test_subpixel_shift_moves_centroid():
    one = Atoms.from_arrays([[0.0, 0.0, 0.0]], ["O"])
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(48.0), indexing="ij")

    def centroid(shift):
        # B = 50 Å² keeps the image band-limited, so the sampled centroid is exact
        img = project_atoms_2d(one, torch.eye(3), 48, 1.0, shifts_yx_px=torch.tensor([shift]), bfactor_angstrom2=50.0)[0]
        return float((img * yy).sum() / img.sum()), float((img * xx).sum() / img.sum())

    c0, c1 = centroid([0.0, 0.0]), centroid([2.25, -3.5])
    assert abs(c0[0] - 24) < 0.01 and abs(c0[1] - 24) < 0.01
    assert abs(c1[0] - c0[0] - 2.25) < 0.02 and abs(c1[1] - c0[1] + 3.5) < 0.02


def test_volume_projection_equals_2d_projection():
    atoms = _small_model()
    for pixel in (1.0, 1.7):
        vol = atoms_to_volume(atoms, 40, pixel)
        proj = project_atoms_2d(atoms, torch.eye(3), 40, pixel)[0]
        err = (vol.sum(0) * pixel - proj).abs().max() / proj.abs().max()
        assert err < 1e-4
        # axis order (z, y, x): the model is elongated along x
        def spread(profile):
            w = profile.clamp(min=0)
            i = torch.arange(profile.shape[0], dtype=torch.float32)
            m = (w * i).sum() / w.sum()
            return float((w * (i - m) ** 2).sum() / w.sum())

        assert spread(vol.sum((0, 1))) > 4 * spread(vol.sum((1, 2)))


def test_rotation_convention_matches_rotating_coordinates():
    atoms = _small_model()
    rot = euler_angles_to_matrix(torch.tensor([30.0, -50.0]), torch.tensor([70.0, 120.0]), torch.tensor([-20.0, 200.0]))
    proj = project_atoms_2d(atoms, rot, 40, 1.2)
    for i in range(2):
        rotated = Atoms(atoms.coords @ rot[i].T, atoms.element_index, atoms.elements)
        direct = project_atoms_2d(rotated, torch.eye(3), 40, 1.2)[0]
        assert (proj[i] - direct).abs().max() < 1e-3 * direct.abs().max()
    # and differs from the transpose (the convention matters for a non-symmetric model)
    wrong = project_atoms_2d(atoms, rot[:1].transpose(1, 2), 40, 1.2)[0]
    assert (proj[0] - wrong).abs().max() > 0.1 * proj[0].abs().max()


def test_rotation_about_z_rotates_image_counterclockwise_in_xy():
    # a single atom at x = +6 Å; rot = 90° about z with A = R_z(psi): RELION passive → x' = x cos + y sin
    one = Atoms(torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([0]), ("C",))
    a = euler_angles_to_matrix(0.0, 0.0, 90.0)
    expected = a @ torch.tensor([6.0, 0.0, 0.0])
    img = project_atoms_2d(one, a, 32, 1.0)[0]
    row, col = divmod(int(img.argmax()), 32)
    assert (row, col) == (16 + round(float(expected[1])), 16 + round(float(expected[0])))


def test_random_orientations_uniform():
    g = torch.Generator().manual_seed(0)
    rot = random_rotations(4000, generator=g)
    z = rot[:, 2, :]  # the image z axis in map coordinates, i.e. the viewing direction
    assert z.mean(0).abs().max() < 0.05
    assert abs(float((z[:, 2] ** 2).mean()) - 1 / 3) < 0.03


def test_solvent_displacement_lowers_contrast():
    atoms = _small_model()
    vac = project_atoms_2d(atoms, torch.eye(3), 72, 1.0)[0]
    ice = project_atoms_2d(atoms, torch.eye(3), 72, 1.0, solvent_potential_volt=4.6)[0]
    removed = (vac.sum() - ice.sum()) * 1.0
    assert abs(float(removed) - 4.6 * 17.0 * atoms.n_atoms) / (4.6 * 17.0 * atoms.n_atoms) < 1e-3


def test_random_aggregate_size():
    g = torch.Generator().manual_seed(1)
    junk = random_aggregate(120.0, generator=g)
    assert junk.name == "junk"
    assert 60 < particle_diameter_angstrom(junk) <= 124.0
    assert junk.n_atoms > 1000


def test_fragment_aggregate_uses_source_atoms():
    g = torch.Generator().manual_seed(2)
    src = load_atoms("6ny1")
    junk = random_aggregate(130.0, generator=g, source=src)
    assert set(junk.elements) <= set(src.elements) and "P" in junk.elements  # nucleic-acid fragments kept
    assert particle_diameter_angstrom(junk) <= 134.0
    assert 200 < junk.n_atoms
