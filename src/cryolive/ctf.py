"""The contrast transfer function (CTF) model, shared by estimation, simulation, extraction, 2D and 3D.

Conventions follow RELION:
- defocus in Å, positive = underfocus; ``defocus_u ≥ defocus_v`` usually, ``defocus_angle_deg`` is the
  angle of the U axis from the image X axis (columns), counter-clockwise for increasing row index;
- ``CTF(k) = sqrt(1 - Q²) sin(γ) + Q cos(γ)`` with
  ``γ = π λ Δf(θ) k² − (π/2) Cs λ³ k⁴ + φ`` (φ = phase shift), so the CTF is positive at low frequency
  for underfocus. Particle images with positive density (inverted contrast, as RELION extracts them)
  equal ``CTF ⊛ projection``; raw micrographs show particles dark.
- Frequencies from :mod:`cryolive.fourier` (rfft layout, DC at [0, 0]).
"""

from __future__ import annotations

import math

import torch

from .fourier import frequency_grid_2d


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV (300 kV → 0.01969 Å)."""
    v = voltage_kv * 1e3
    return 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))


def _as_tensor(x, device, dtype=torch.float32) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype, device=device)


def defocus_at_angle(
    defocus_u: torch.Tensor, defocus_v: torch.Tensor, defocus_angle_deg: torch.Tensor, theta: torch.Tensor
) -> torch.Tensor:
    """Defocus (Å) along direction ``theta`` (radians from the X axis); broadcasting."""
    ang = torch.deg2rad(defocus_angle_deg)
    return 0.5 * (defocus_u + defocus_v) + 0.5 * (defocus_u - defocus_v) * torch.cos(2 * (theta - ang))


def calculate_ctf_2d(
    defocus_u: float | torch.Tensor,
    defocus_v: float | torch.Tensor,
    defocus_angle_deg: float | torch.Tensor,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    pixel_size_angstrom: float,
    shape: tuple[int, int],
    phase_shift_deg: float | torch.Tensor = 0.0,
    bfactor_angstrom2: float = 0.0,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The CTF on the FFT grid of ``shape``: ``(..., h, w//2+1)`` (rfft) or ``(..., h, w)``.

    Defocus arguments may be tensors of any batch shape ``(...)``; they broadcast to one CTF each.
    ``bfactor_angstrom2`` applies an envelope ``exp(-B k² / 4)``.
    """
    if device is None and isinstance(defocus_u, torch.Tensor):
        device = defocus_u.device
    du = _as_tensor(defocus_u, device)
    dv = _as_tensor(defocus_v, device)
    da = _as_tensor(defocus_angle_deg, device)
    ph = _as_tensor(phase_shift_deg, device)
    ky, kx = frequency_grid_2d(shape, pixel_size_angstrom, rfft, device)
    k2 = ky**2 + kx**2
    theta = torch.atan2(ky, kx)
    lam = electron_wavelength_angstrom(voltage_kv)
    cs = cs_mm * 1e7
    batch = torch.broadcast_shapes(du.shape, dv.shape, da.shape, ph.shape)
    du, dv, da, ph = (t.expand(batch)[..., None, None] for t in (du, dv, da, ph))
    dfz = defocus_at_angle(du, dv, da, theta)
    gamma = math.pi * lam * dfz * k2 - 0.5 * math.pi * cs * lam**3 * k2**2 + torch.deg2rad(ph)
    q = amplitude_contrast
    ctf = math.sqrt(1 - q * q) * torch.sin(gamma) + q * torch.cos(gamma)
    if bfactor_angstrom2:
        ctf = ctf * torch.exp(-bfactor_angstrom2 * k2 / 4)
    return ctf


def calculate_ctf_1d(
    defocus: float | torch.Tensor,
    voltage_kv: float,
    cs_mm: float,
    amplitude_contrast: float,
    k_inv_angstrom: torch.Tensor,
    phase_shift_deg: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Rotationally symmetric CTF at spatial frequencies ``k_inv_angstrom (n,)`` → ``(..., n)``."""
    d = _as_tensor(defocus, k_inv_angstrom.device)[..., None]
    ph = _as_tensor(phase_shift_deg, k_inv_angstrom.device)[..., None]
    lam = electron_wavelength_angstrom(voltage_kv)
    cs = cs_mm * 1e7
    k2 = k_inv_angstrom**2
    gamma = math.pi * lam * d * k2 - 0.5 * math.pi * cs * lam**3 * k2**2 + torch.deg2rad(ph)
    q = amplitude_contrast
    return math.sqrt(1 - q * q) * torch.sin(gamma) + q * torch.cos(gamma)


def critical_exposure(k_inv_angstrom: torch.Tensor, voltage_kv: float = 300.0) -> torch.Tensor:
    """Critical exposure (e/Å²) at spatial frequency k (1/Å), Grant & Grigorieff (2015) eLife 4:e06980.

    ``Ne(k) = 0.245 k^-1.665 + 2.81`` at 300 kV, scaled by 0.8 at 200 kV.
    """
    k = k_inv_angstrom.clamp(min=1e-6)
    ne = 0.245 * k.pow(-1.665) + 2.81
    if voltage_kv < 250:
        ne = ne * 0.8
    return ne


def dose_filter_2d(
    accumulated_dose: torch.Tensor, shape: tuple[int, int], pixel_size_angstrom: float, voltage_kv: float = 300.0
) -> torch.Tensor:
    """Radiation-damage amplitude attenuation ``exp(-N / (2 Ne(k)))`` for doses ``(t,)`` e/Å² → ``(t, h, w//2+1)``.

    ``accumulated_dose`` is the exposure at (the middle of) each frame.
    """
    ky, kx = frequency_grid_2d(shape, pixel_size_angstrom, True, accumulated_dose.device)
    ne = critical_exposure(torch.sqrt(ky**2 + kx**2), voltage_kv)
    return torch.exp(-accumulated_dose[:, None, None] / (2 * ne))
