"""Rotations in RELION's ZYZ Euler convention (rlnAngleRot, rlnAngleTilt, rlnAnglePsi, degrees).

``A = euler_angles_to_matrix(rot, tilt, psi)`` maps a point ``r`` of the 3D map (x, y, z order, Å or
voxels, origin at the map centre) to ``A @ r`` in the frame of the particle image; the projection image
is the integral over the new z: ``P(x, y) = ∫ V(Aᵀ (x, y, z)) dz``. ``A = R_z(psi) R_y(tilt) R_z(rot)``
with passive rotation matrices, as RELION's ``Euler_angles2matrix``.
"""

from __future__ import annotations

import math

import torch


def euler_angles_to_matrix(rot_deg, tilt_deg, psi_deg) -> torch.Tensor:
    """ZYZ Euler angles in degrees (tensors of any shape ``(...)``) → rotation matrices ``(..., 3, 3)``."""
    a, b, g = (torch.deg2rad(torch.as_tensor(v, dtype=torch.float32)) for v in (rot_deg, tilt_deg, psi_deg))
    a, b, g = torch.broadcast_tensors(a, b, g)
    ca, sa, cb, sb, cg, sg = a.cos(), a.sin(), b.cos(), b.sin(), g.cos(), g.sin()
    cc, cs, sc, ss = cb * ca, cb * sa, sb * ca, sb * sa
    m = torch.stack(
        [
            torch.stack([cg * cc - sg * sa, cg * cs + sg * ca, -cg * sb], -1),
            torch.stack([-sg * cc - cg * sa, -sg * cs + cg * ca, sg * sb], -1),
            torch.stack([sc, ss, cb], -1),
        ],
        -2,
    )
    return m


def matrix_to_euler_angles(m: torch.Tensor) -> torch.Tensor:
    """Rotation matrices ``(..., 3, 3)`` → ZYZ Euler angles ``(..., 3)`` (rot, tilt, psi) in degrees."""
    m = m.to(torch.float32)
    tilt = torch.atan2(torch.sqrt(m[..., 2, 0] ** 2 + m[..., 2, 1] ** 2), m[..., 2, 2])
    rot = torch.atan2(m[..., 2, 1], m[..., 2, 0])
    psi = torch.atan2(m[..., 1, 2], -m[..., 0, 2])
    # gimbal lock (tilt ≈ 0 or 180°): put everything into psi
    lock = torch.sin(tilt).abs() < 1e-6
    if lock.any():
        psi_lock = torch.atan2(-m[..., 1, 0], m[..., 0, 0])
        rot = torch.where(lock, torch.zeros_like(rot), rot)
        psi = torch.where(lock, psi_lock, psi)
    return torch.rad2deg(torch.stack([rot, tilt, psi], -1))


def random_rotations(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` rotation matrices ``(n, 3, 3)`` drawn uniformly from SO(3) (via random unit quaternions)."""
    q = torch.randn(n, 4, generator=generator)
    q = q / q.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    m = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
            2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
            2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
        ],
        -1,
    ).reshape(n, 3, 3)
    return m


def rotation_matrix_2d(angle_deg) -> torch.Tensor:
    """In-plane rotation matrices ``(..., 2, 2)`` acting on (x, y) column vectors, counter-clockwise."""
    a = torch.deg2rad(torch.as_tensor(angle_deg, dtype=torch.float32))
    c, s = a.cos(), a.sin()
    return torch.stack([torch.stack([c, -s], -1), torch.stack([s, c], -1)], -2)


def angular_distance_deg(m1: torch.Tensor, m2: torch.Tensor) -> torch.Tensor:
    """Angle (degrees) of the rotation taking ``m1`` to ``m2``, ``(...)``."""
    r = m1.transpose(-1, -2) @ m2
    tr = r.diagonal(dim1=-2, dim2=-1).sum(-1)
    return torch.rad2deg(torch.arccos(((tr - 1) / 2).clamp(-1, 1)))


__all__ = [
    "euler_angles_to_matrix",
    "matrix_to_euler_angles",
    "random_rotations",
    "rotation_matrix_2d",
    "angular_distance_deg",
]
