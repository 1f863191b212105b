"""Physically scaled synthetic micrographs with ground truth, for picking and extraction tests.

A micrograph is the dose-weighted sum of counts of a weak-phase specimen:

    I(r) = dose_px · (1 − 2 · [CTF ⊛ φ](r)) · ice_attenuation(r)  + Poisson noise,

where ``φ = σ_e · ΔV · t(r)`` is the phase shift of the particles' projected protein thickness ``t`` (Å) at the
protein–ice potential contrast ``ΔV`` (V), plus amorphous-ice phase noise and a couple of dense junk aggregates.
Particles are clumps of 3D Gaussian sub-units (an irregular complex of the requested diameter), randomly placed
with a minimum centre distance (crowded like a good grid). ``project`` may be replaced by a real structure's
projector (``cryolive.simulate.structure``) when it is available.

All numbers are physical: 300 kV interaction constant, 1 count ≈ 1 e/Å² per Å² pixel at the given dose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cryolive import ctf as ctf_mod
from cryolive import fourier

PROTEIN_ICE_POTENTIAL_V = 2.0  # mean inner potential of protein above vitreous ice, V (conservative)
PACKING = 0.25  # fraction of the diameter sphere filled with protein (3j5p: 0.18, a compact complex: ~0.4)


def interaction_constant(voltage_kv: float) -> float:
    """σ_e in rad/(V·Å)."""
    lam = ctf_mod.electron_wavelength_angstrom(voltage_kv)
    v = voltage_kv * 1e3
    mc2 = 510998.95
    return 2 * math.pi / (lam * v) * (mc2 + v) / (2 * mc2 + v)


@dataclass
class SyntheticMicrograph:
    noisy: torch.Tensor  # (h, w) counts of the dose-weighted sum
    noiseless: torch.Tensor  # (h, w) expected counts, same scale
    true_yx_px: torch.Tensor  # (n, 2) particle centres (row, column), micrograph pixels
    junk_yx_px: torch.Tensor  # (m, 2) aggregate centres
    junk_radius_px: torch.Tensor  # (m,) aggregate radii
    thickness_angstrom: torch.Tensor  # (h, w) projected protein thickness of the particles only
    ctf: dict
    pixel_size_angstrom: float
    diameter_angstrom: float
    dose: float


def _render_gaussians(canvas: torch.Tensor, centres_yx: torch.Tensor, sigmas: torch.Tensor, weights: torch.Tensor):
    """Add 2D Gaussians (integral ``weights``, std ``sigmas`` px) at ``centres_yx`` (px) into ``canvas`` in place."""
    h, w = canvas.shape
    for (cy, cx), s, wt in zip(centres_yx.tolist(), sigmas.tolist(), weights.tolist()):
        r = int(math.ceil(4 * s)) + 1
        y0, y1 = max(0, int(cy) - r), min(h, int(cy) + r + 2)
        x0, x1 = max(0, int(cx) - r), min(w, int(cx) + r + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        yy = torch.arange(y0, y1, dtype=torch.float32)[:, None] - cy
        xx = torch.arange(x0, x1, dtype=torch.float32)[None, :] - cx
        canvas[y0:y1, x0:x1] += wt / (2 * math.pi * s * s) * torch.exp(-(yy**2 + xx**2) / (2 * s * s))


def _random_positions(n, shape, min_dist_px, margin_px, gen, existing=None):
    pts = [] if existing is None else [tuple(p) for p in existing.tolist()]
    out = []
    h, w = shape
    tries = 0
    while len(out) < n and tries < 200 * n:
        tries += 1
        p = (margin_px + torch.rand((), generator=gen).item() * (h - 2 * margin_px),
             margin_px + torch.rand((), generator=gen).item() * (w - 2 * margin_px))
        if all((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 >= min_dist_px**2 for q, _ in pts):
            pts.append((p, min_dist_px))
            out.append(p)
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 2)


def particle_thickness(
    shape, centres_yx_px, diameter_angstrom, pixel_size_angstrom, gen, n_subunits=12
) -> torch.Tensor:
    """Projected protein thickness (Å) of irregular complexes of ``diameter_angstrom`` at ``centres_yx_px``."""
    canvas = torch.zeros(shape)
    d_px = diameter_angstrom / pixel_size_angstrom
    volume = PACKING * math.pi / 6 * diameter_angstrom**3  # Å³ of protein per particle
    for c in centres_yx_px:
        # sub-units inside a sphere, projected along z: centres are the (y, x) of uniform points in the ball
        u = torch.randn(n_subunits, 3, generator=gen)
        u = u / u.norm(dim=1, keepdim=True) * torch.rand(n_subunits, 1, generator=gen) ** (1 / 3)
        sig = d_px * (0.13 + 0.05 * torch.rand(n_subunits, generator=gen))
        pos = c[None, :] + u[:, :2] * (0.5 * d_px - 1.5 * sig[:, None]).clamp(min=0)
        wts = torch.rand(n_subunits, generator=gen) + 0.5
        wts = wts / wts.sum() * volume / pixel_size_angstrom**2  # Å³ / (Å²/px) → Å·px² so canvas is Å
        _render_gaussians(canvas, pos, sig, wts)
    return canvas


def project_structure(atoms, shape, centres_yx_px, pixel_size_angstrom, gen) -> torch.Tensor:
    """Projected potential (V·Å, relative to ice) of ``atoms`` in random orientations at ``centres_yx_px``."""
    from cryolive.geometry import random_rotations
    from cryolive.simulate.physics import ice_mean_potential_volt
    from cryolive.simulate.structure import particle_diameter_angstrom, project_atoms_2d

    h, w = shape
    canvas = torch.zeros(shape)
    n = centres_yx_px.shape[0]
    if n == 0:
        return canvas
    box = int(math.ceil(1.2 * particle_diameter_angstrom(atoms) / pixel_size_angstrom / 2)) * 2
    base = torch.floor(centres_yx_px).long()
    frac = centres_yx_px - base
    proj = project_atoms_2d(
        atoms, random_rotations(n, gen), box, pixel_size_angstrom, shifts_yx_px=frac,
        solvent_potential_volt=ice_mean_potential_volt(), oversampling=1,
    )
    big = torch.zeros(h + 2 * box, w + 2 * box)
    for (y, x), img in zip(base.tolist(), proj):
        y0, x0 = y - box // 2 + box, x - box // 2 + box
        big[y0 : y0 + box, x0 : x0 + box] += img
    canvas += big[box : box + h, box : box + w]
    return canvas


def make_micrograph(
    seed: int = 0,
    shape: tuple[int, int] = (1024, 1024),
    pixel_size_angstrom: float = 1.0,
    diameter_angstrom: float = 150.0,
    defocus_angstrom: float = 15000.0,
    astigmatism_angstrom: float = 400.0,
    dose: float = 30.0,
    n_particles: int = 100,
    min_distance_factor: float = 0.9,
    n_junk: int = 2,
    ice_phase_std: float = 0.05,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.07,
    bfactor_angstrom2: float = 80.0,
    structure: str | None = None,
) -> SyntheticMicrograph:
    """A micrograph with ~``n_particles`` (fewer if they do not fit at ``min_distance_factor`` × diameter)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = shape
    ps = pixel_size_angstrom
    atoms = None
    if structure is not None:
        from cryolive.simulate.structure import load_atoms, particle_diameter_angstrom

        atoms = load_atoms(structure)
        diameter_angstrom = particle_diameter_angstrom(atoms)
    d_px = diameter_angstrom / ps
    # junk first (big), then particles around them
    junk_r_px = torch.empty(n_junk).uniform_(150, 260, generator=gen) / ps
    junk = _random_positions(n_junk, shape, 2.2 * float(junk_r_px.max()) if n_junk else 1, 0.0, gen)
    existing = [((float(j[0]), float(j[1])), float(r) + 0.6 * d_px) for j, r in zip(junk, junk_r_px)]
    pts = list(existing)
    truth = []
    tries = 0
    while len(truth) < n_particles and tries < 300 * n_particles:
        tries += 1
        p = (torch.rand((), generator=gen).item() * h, torch.rand((), generator=gen).item() * w)
        ok = True
        for q, rq in pts:
            if (p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 < rq**2:
                ok = False
                break
        if ok:
            pts.append((p, min_distance_factor * d_px))
            truth.append(p)
    true_yx = torch.tensor(truth, dtype=torch.float32).reshape(-1, 2)

    if atoms is None:
        thick = particle_thickness(shape, true_yx, diameter_angstrom, ps, gen)
        potential = PROTEIN_ICE_POTENTIAL_V * thick  # projected potential, V·Å
    else:
        potential = project_structure(atoms, shape, true_yx, ps, gen)
        thick = potential / PROTEIN_ICE_POTENTIAL_V
    # junk: dense clumps of many sub-units, thickness up to a few hundred Å
    junk_thick = torch.zeros(shape)
    for j, r in zip(junk, junk_r_px):
        n_sub = 60
        u = torch.randn(n_sub, 2, generator=gen)
        u = u / u.norm(dim=1, keepdim=True) * torch.rand(n_sub, 1, generator=gen).sqrt()
        sig = (r * (0.15 + 0.1 * torch.rand(n_sub, generator=gen)))
        vol = 0.8 * 4 / 3 * math.pi * (float(r) * ps) ** 3 / ps**2
        wts = torch.rand(n_sub, generator=gen) + 0.5
        _render_gaussians(junk_thick, j[None, :] + u * (r - 1.5 * sig[:, None]), sig, wts / wts.sum() * vol)

    sigma_e = interaction_constant(voltage_kv)
    phase = sigma_e * (potential + PROTEIN_ICE_POTENTIAL_V * junk_thick)
    # amorphous ice: phase noise, white above ~ 1/20 Å⁻¹ and suppressed at low frequency (liquid structure factor)
    k = fourier.frequency_radius_2d(shape, ps)
    ice_ft = torch.fft.rfft2(torch.randn(shape, generator=gen)) * (k**2 / (k**2 + (1 / 20) ** 2)).sqrt()
    phase = phase + ice_phase_std * torch.fft.irfft2(ice_ft, s=shape)

    defocus_u = defocus_angstrom + astigmatism_angstrom / 2
    defocus_v = defocus_angstrom - astigmatism_angstrom / 2
    angle = float(torch.rand((), generator=gen) * 180 - 90)
    c = ctf_mod.calculate_ctf_2d(
        defocus_u, defocus_v, angle, voltage_kv, cs_mm, amplitude_contrast, ps, shape,
        bfactor_angstrom2=bfactor_angstrom2,
    )
    # average radiation damage over the exposure (dose-weighted sum of damaged frames)
    doses = torch.linspace(0.5, dose - 0.5, max(int(dose), 1)) if dose >= 1 else torch.tensor([dose / 2])
    damage = ctf_mod.dose_filter_2d(doses, shape, ps, voltage_kv).mean(0)
    contrast = torch.fft.irfft2(torch.fft.rfft2(phase) * c * damage, s=shape)
    # slowly varying ice thickness: a few % inelastic attenuation gradient
    yy = torch.linspace(-1, 1, h)[:, None]
    xx = torch.linspace(-1, 1, w)[None, :]
    g = torch.randn(3, generator=gen)
    atten = 1 + 0.03 * (g[0] * yy + g[1] * xx + g[2] * xx * yy)
    dose_px = dose * ps * ps
    noiseless = (dose_px * (1 - 2 * contrast) * atten).clamp(min=0)
    noisy = torch.poisson(noiseless, generator=gen)
    ctf = dict(
        defocus_u=defocus_u, defocus_v=defocus_v, defocus_angle_deg=angle, voltage_kv=voltage_kv,
        cs_mm=cs_mm, amplitude_contrast=amplitude_contrast,
    )
    return SyntheticMicrograph(noisy, noiseless, true_yx, junk, junk_r_px, thick, ctf, ps, diameter_angstrom, dose)
