"""Image-formation physics shared by the particle-stack and movie simulators.

Model (weak phase object with amplitude contrast, linear in the projected potential ``v`` (V·Å)):

- phase ``φ = σ v`` with the relativistic interaction constant ``σ`` (rad per V·Å, 6.5e-4 at 300 kV);
- image intensity (fraction of the incident beam) of an underfocused specimen
  ``I = 1 − a · (2σ / √(1−Q²)) · F⁻¹[CTF · F v]`` — particles dark in raw images, with the CTF of
  :mod:`cryolive.ctf` (``√(1−Q²) sin γ + Q cos γ``);
- ``a = exp(−t / Λ_in)`` removes the inelastically scattered fraction from the contrast
  (ice thickness ``t``, inelastic mean free path ``Λ_in`` ≈ 3500 Å at 300 kV). Without an energy
  filter those electrons still reach the detector as a flat background, so the mean count is
  ``dose × pixel²``; with a filter the mean count is ``dose × pixel² × a``;
- vitreous ice: ``ρ t`` water molecules per Å² (ρ = 0.0314 Å⁻³) with the structure factor ``S(q)`` of
  amorphous water (low at low q, first peak near 3.7 Å); the projected-potential fluctuations are a
  Gaussian random field with power spectrum ``ρ t |47.88 f_w(q)|² S(q)`` ((V·Å)²·Å²), and the
  mean inner potential ``ρ · 47.88 f_w(0)`` ≈ 4.6 V is the solvent particles displace.
- radiation damage: :func:`cryolive.ctf.dose_filter_2d` on the specimen signal.
"""

from __future__ import annotations

import math

import torch

from ..ctf import electron_wavelength_angstrom
from .structure import POTENTIAL_PER_SCATTERING_FACTOR, electron_scattering_factor

#: Number density of water molecules in vitreous ice (0.94 g/cm³), Å⁻³.
WATER_NUMBER_DENSITY = 0.94 / 18.015 * 0.60221
ELECTRON_REST_ENERGY_KEV = 510.999


def interaction_constant(voltage_kv: float) -> float:
    """Relativistic interaction constant σ (rad / (V·Å)): ``σ = 2π/(λV) · (E₀ + eV)/(2E₀ + eV)``."""
    lam = electron_wavelength_angstrom(voltage_kv)
    e0 = ELECTRON_REST_ENERGY_KEV
    return 2 * math.pi / (lam * voltage_kv * 1e3) * (e0 + voltage_kv) / (2 * e0 + voltage_kv)


def inelastic_mean_free_path_angstrom(voltage_kv: float) -> float:
    """Inelastic mean free path of vitreous ice (Å): 3500 Å at 300 kV, scaled with β² for other voltages."""
    def beta2(kv):
        g = 1 + kv / ELECTRON_REST_ENERGY_KEV
        return 1 - 1 / g**2

    return 3500.0 * beta2(voltage_kv) / beta2(300.0)


def water_form_factor(q_inv_angstrom: torch.Tensor) -> torch.Tensor:
    """Fourier transform of the projected potential of one water molecule (V·Å³) at ``q`` (1/Å)."""
    f = electron_scattering_factor("O", q_inv_angstrom) + 2 * electron_scattering_factor("H", q_inv_angstrom)
    return POTENTIAL_PER_SCATTERING_FACTOR * f


def ice_mean_potential_volt() -> float:
    """Mean inner potential of vitreous ice (V) from the same scattering factors (≈ 4.6 V)."""
    return float(WATER_NUMBER_DENSITY * water_form_factor(torch.zeros(1))[0])


def water_structure_factor(q_inv_angstrom: torch.Tensor) -> torch.Tensor:
    """A smooth model of the structure factor of amorphous water: 0.06 at q → 0 (compressibility),
    first peak ≈ 2.2 at q = 1/3.7 Å⁻¹, → 1 at high q."""
    q = q_inv_angstrom
    base = 0.06 + 0.94 * (1 - torch.exp(-((q / 0.2) ** 2)))
    return base + 1.3 * torch.exp(-((q - 1 / 3.7) ** 2) / (2 * 0.025**2))


def ice_power_spectrum(q_inv_angstrom: torch.Tensor, thickness_angstrom: float) -> torch.Tensor:
    """Power spectrum ((V·Å)²·Å²) of the projected-potential fluctuations of ice of a given thickness."""
    n_area = WATER_NUMBER_DENSITY * thickness_angstrom
    return n_area * water_form_factor(q_inv_angstrom) ** 2 * water_structure_factor(q_inv_angstrom)


def ice_potential_ft(
    shape: tuple[int, int],
    pixel_size_angstrom: float,
    thickness_angstrom: float,
    generator: torch.Generator | None = None,
    batch: tuple[int, ...] = (),
) -> torch.Tensor:
    """rfft2 of a random realisation of the ice projected-potential fluctuations (zero mean), V·Å.

    Returns ``(*batch, h, w//2+1)`` complex64; ``irfft2(·, s=shape)`` gives the field in V·Å.
    """
    from ..fourier import frequency_radius_2d

    if thickness_angstrom <= 0:
        return torch.zeros(*batch, shape[0], shape[1] // 2 + 1, dtype=torch.complex64)
    white = torch.randn(*batch, *shape, generator=generator)
    q = frequency_radius_2d(shape, pixel_size_angstrom)
    amp = torch.sqrt(ice_power_spectrum(q, thickness_angstrom)) / pixel_size_angstrom
    amp[0, 0] = 0.0
    return torch.fft.rfft2(white) * amp


def contrast_scale(voltage_kv: float, amplitude_contrast: float, ice_thickness_angstrom: float, energy_filter: bool = False) -> float:
    """Factor ``a · 2σ/√(1−Q²)`` turning ``F⁻¹[CTF · F v]`` (V·Å) into the fractional intensity change.

    Without an energy filter the factor includes the inelastic loss ``a = exp(−t/Λ_in)``; with one the
    loss reduces the mean count instead and the contrast of the remaining (zero-loss) beam is full.
    """
    sigma = interaction_constant(voltage_kv)
    a = 1.0 if energy_filter else math.exp(-ice_thickness_angstrom / inelastic_mean_free_path_angstrom(voltage_kv))
    return a * 2 * sigma / math.sqrt(1 - amplitude_contrast**2)


def mean_counts_per_pixel(dose_e_per_a2: float, pixel_size_angstrom: float, ice_thickness_angstrom: float,
                          voltage_kv: float, energy_filter: bool = False) -> float:
    """Expected detector counts per pixel for a dose (e/Å²): ``dose × pixel²`` (× zero-loss fraction if filtered)."""
    n = dose_e_per_a2 * pixel_size_angstrom**2
    if energy_filter:
        n *= math.exp(-ice_thickness_angstrom / inelastic_mean_free_path_angstrom(voltage_kv))
    return n


__all__ = [
    "interaction_constant",
    "inelastic_mean_free_path_angstrom",
    "ice_mean_potential_volt",
    "ice_power_spectrum",
    "ice_potential_ft",
    "water_structure_factor",
    "contrast_scale",
    "mean_counts_per_pixel",
]
