import torch

from cryolive import geometry


def test_euler_round_trip():
    g = torch.Generator().manual_seed(0)
    m = geometry.random_rotations(500, generator=g)
    e = geometry.matrix_to_euler_angles(m)
    m2 = geometry.euler_angles_to_matrix(e[:, 0], e[:, 1], e[:, 2])
    assert geometry.angular_distance_deg(m, m2).max() < 0.5


def test_relion_convention_pure_rotations():
    # rot only: passive rotation about z; tilt only: about y
    m = geometry.euler_angles_to_matrix(90.0, 0.0, 0.0)
    assert torch.allclose(m @ torch.tensor([1.0, 0, 0]), torch.tensor([0.0, -1.0, 0]), atol=1e-6)
    m = geometry.euler_angles_to_matrix(0.0, 90.0, 0.0)
    assert torch.allclose(m @ torch.tensor([0.0, 0, 1.0]), torch.tensor([-1.0, 0, 0]), atol=1e-6)


def test_random_rotations_uniform():
    g = torch.Generator().manual_seed(3)
    m = geometry.random_rotations(20000, generator=g)
    z = m[:, :, 2]  # images of the z axis
    assert z.mean(0).abs().max() < 0.03
    assert abs((z[:, 2] ** 2).mean() - 1 / 3) < 0.02
