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


#: Number density of carbon atoms in an amorphous carbon support film (1.9 g/cm³), Å⁻³.
CARBON_NUMBER_DENSITY = 1.9 / 12.011 * 0.60221


def carbon_structure_factor(q_inv_angstrom: torch.Tensor) -> torch.Tensor:
    """A smooth model of the structure factor of amorphous carbon: 0.3 at q → 0 (film roughness keeps some
    low-frequency power), → 1 beyond ~1/4 Å⁻¹."""
    return 0.3 + 0.7 * (1 - torch.exp(-((q_inv_angstrom / 0.25) ** 2)))


def carbon_edge_potential(
    shape: tuple[int, int],
    pixel_size_angstrom: float,
    coverage: float,
    thickness_angstrom: float = 150.0,
    hole_diameter_angstrom: float = 12000.0,
    generator: torch.Generator | None = None,
    pad_px: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The edge of a hole in a holey carbon support film: projected potential ``(h + 2 pad_px, w + 2 pad_px)``
    (V·Å) on the image extended by ``pad_px`` on each side (so that the CTF can act without the step wrapping
    around the periodic boundary), and mask ``(h, w)`` bool of the image itself (True on carbon).

    The hole is a circle of ``hole_diameter_angstrom`` (Quantifoil R1.2/1.3: 12,000 Å) whose edge crosses the
    image in a random direction so that ``coverage`` of the area (0–1) lies on the carbon. The film is
    ``thickness_angstrom`` of amorphous carbon: mean inner potential ``ρ_C · 47.88 f_C(0)`` ≈ 11 V (its
    projection a step of ~1,700 V·Å at the edge, softened over ~10 Å) plus random-atom fluctuations of power
    ``ρ_C t |47.88 f_C(q)|² S_C(q)`` — the film's strong Thon rings and texture. The movie simulator applies
    the CTF to it on the extended grid and adds the cropped result to the ice's contrast; particles are placed
    in the hole only.
    """
    from ..fourier import frequency_radius_2d
    from .structure import POTENTIAL_PER_SCATTERING_FACTOR, electron_scattering_factor

    h, w = shape
    p = pixel_size_angstrom
    if coverage <= 0:
        return torch.zeros(h + 2 * pad_px, w + 2 * pad_px), torch.zeros(h, w, dtype=torch.bool)
    theta = 2 * math.pi * float(torch.rand(1, generator=generator))
    u = (math.sin(theta), math.cos(theta))  # (y, x): from the hole centre towards the carbon
    radius = 0.5 * hole_diameter_angstrom
    yy = (torch.arange(-pad_px, h + pad_px, dtype=torch.float64)[:, None] - (h - 1) / 2) * p
    xx = (torch.arange(-pad_px, w + pad_px, dtype=torch.float64)[None, :] - (w - 1) / 2) * p
    inner = (slice(pad_px, pad_px + h), slice(pad_px, pad_px + w))

    def signed_distance(offset):  # Å outside the hole edge; hole centre at -(radius - offset)·u from the image centre
        cy, cx = -(radius - offset) * u[0], -(radius - offset) * u[1]
        return torch.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) - radius

    lo, hi = -0.75 * p * max(h, w), 0.75 * p * max(h, w)  # offset of the edge from the image centre along u
    for _ in range(40):  # bisection on the covered fraction (decreasing in the offset)
        mid = 0.5 * (lo + hi)
        if float((signed_distance(mid)[inner] > 0).double().mean()) > coverage:
            lo = mid
        else:
            hi = mid
    dist = signed_distance(0.5 * (lo + hi)).to(torch.float32)
    mask = dist[inner] > 0
    profile = torch.sigmoid(dist / 5.0)  # film edge softened over ~10 Å
    big = (h + 2 * pad_px, w + 2 * pad_px)
    q = frequency_radius_2d(big, p)
    f0 = POTENTIAL_PER_SCATTERING_FACTOR * electron_scattering_factor("C", torch.zeros(1))
    mean_potential = float(CARBON_NUMBER_DENSITY * f0[0])  # V
    n_area = CARBON_NUMBER_DENSITY * thickness_angstrom
    amp = torch.sqrt(n_area * (POTENTIAL_PER_SCATTERING_FACTOR * electron_scattering_factor("C", q)) ** 2
                     * carbon_structure_factor(q)) / p
    amp[0, 0] = 0.0
    fluct = torch.fft.irfft2(torch.fft.rfft2(torch.randn(big, generator=generator)) * amp, s=big)
    return (mean_potential * thickness_angstrom + fluct) * profile, mask


__all__ = [
    "interaction_constant",
    "inelastic_mean_free_path_angstrom",
    "ice_mean_potential_volt",
    "ice_power_spectrum",
    "ice_potential_ft",
    "water_structure_factor",
    "contrast_scale",
    "mean_counts_per_pixel",
    "carbon_edge_potential",
    "carbon_structure_factor",
]
