"""Particle stacks as extraction produces them, with ground truth — fast, for streaming 2D/3D tests.

Each image is one particle (or a junk aggregate) in vitreous ice, imaged with the same physics as
the movie simulator (:mod:`cryolive.simulate.physics`): projected potential (solvent displaced) →
exposure-averaged radiation damage → CTF at the particle's own defocus (in a box padded 2× so that
delocalised signal leaves the box as it does in extraction) → inelastic loss → Poisson counts at the
given dose → contrast inverted (particles white) → normalised to zero mean / unit standard deviation
of the background (outside a circle of radius 0.375·box, as RELION does).

Example::

    from cryolive.simulate.particles import simulate_particle_stack
    images, truth = simulate_particle_stack(["6ny1", "3j5p"], 2000, 64, 2.5, seed=1, junk_fraction=0.1)
    images.shape                  # (2000, 64, 64) float32 torch tensor
    truth["structure_index"]      # (2000,) int64, −1 for junk
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..ctf import calculate_ctf_2d, critical_exposure
from ..fourier import circular_mask_2d, frequency_radius_2d
from ..geometry import matrix_to_euler_angles, random_rotations
from . import physics
from .structure import Atoms, load_atoms, particle_diameter_angstrom, project_atoms_2d, random_aggregate


def exposure_averaged_damage_2d(
    total_dose: float, shape: tuple[int, int], pixel_size_angstrom: float, voltage_kv: float, dose_per_frame: float = 1.0
) -> torch.Tensor:
    """Mean over frames of the Grant–Grigorieff attenuation ``exp(−N_t / 2Ne(k))`` → ``(h, w//2+1)``.

    The signal of an unweighted frame sum of ``total_dose`` e/Å² in frames of ``dose_per_frame``.
    """
    n_frames = max(1, int(round(total_dose / dose_per_frame)))
    k = frequency_radius_2d(shape, pixel_size_angstrom)
    ne = critical_exposure(k, voltage_kv)
    doses = (torch.arange(n_frames, dtype=torch.float32) + 0.5) * (total_dose / n_frames)
    return torch.exp(-doses[:, None, None] / (2 * ne)).mean(0)


def simulate_particle_stack(
    structures: list[str | Atoms] | str | Atoms,
    n: int,
    box_px: int,
    pixel_size_angstrom: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    defocus_range_angstrom: tuple[float, float] = (8000.0, 25000.0),
    max_astigmatism_angstrom: float = 500.0,
    dose_e_per_a2: float = 40.0,
    ice_thickness_angstrom: float = 300.0,
    junk_fraction: float = 0.0,
    max_shift_px: float = 0.0,
    bfactor_angstrom2: float = 20.0,
    envelope_bfactor_angstrom2: float = 60.0,
    structure_weights: list[float] | None = None,
    oversampling: int = 1,
    seed: int = 0,
    chunk_size: int = 256,
) -> tuple[torch.Tensor, dict]:
    """Simulate ``n`` extracted particle images ``(n, box_px, box_px)`` float32 with their truth.

    Args:
        structures: built-in names, file paths or :class:`Atoms`; each image shows one of them
            (``structure_weights`` relative frequencies, default equal).
        box_px: output box (even); pixel size in Å.
        defocus_range_angstrom: defocus U drawn uniformly per particle; V = U − U(0, max astigmatism),
            angle uniform in [0, 180).
        dose_e_per_a2: total exposure of the (unweighted) sum; sets the Poisson noise and the damage.
        ice_thickness_angstrom: ice around the particle (background noise, solvent contrast, inelastic loss);
            0 = vacuum.
        junk_fraction: fraction of images that are random aggregates of comparable size (label −1): amorphous
            clumps and clumps of fragments of the structures.
        max_shift_px: particle centre offsets uniform in ±max_shift_px (y and x; content moved by +shift).
        bfactor_angstrom2: B-factor applied to all atoms.
        envelope_bfactor_angstrom2: imaging envelope ``exp(−B k²/4)`` on the CTF (coherence, detector MTF,
            residual motion), applied to particle and ice alike.
        oversampling: projection oversampling (1 is fast and adequate under noise; 2 is more accurate).
        seed: reproducible results for equal arguments.

    Returns:
        ``images`` (n, box, box) float32, particles white; ``truth`` dict with tensors
        ``structure_index (n,)`` int64 (−1 junk), ``structure_names`` list[str] (n, "junk" for junk),
        ``names`` (the structure list's names), ``rotations (n, 3, 3)``, ``euler_angles_deg (n, 3)``
        (rot, tilt, psi), ``shifts_yx_px (n, 2)``, ``defocus_u``, ``defocus_v`` (Å), ``defocus_angle_deg`` (n,),
        ``diameter_angstrom (n,)``, and the scalar settings used.
    """
    if box_px % 2:
        raise ValueError("box_px must be even")
    if isinstance(structures, (str, Atoms)):
        structures = [structures]
    models = [load_atoms(s) for s in structures]
    names = [m.name for m in models]
    diameters = [particle_diameter_angstrom(m) for m in models]
    g = torch.Generator().manual_seed(int(seed))

    # --- per-image truth
    w = torch.tensor(structure_weights if structure_weights else [1.0] * len(models), dtype=torch.float64)
    label = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    if junk_fraction > 0:
        junk = torch.rand(n, generator=g) < junk_fraction
        label[junk] = -1
    rotations = random_rotations(n, generator=g)
    shifts = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift_px
    lo, hi = defocus_range_angstrom
    du = lo + (hi - lo) * torch.rand(n, generator=g)
    dv = du - max_astigmatism_angstrom * torch.rand(n, generator=g)
    dang = 180.0 * torch.rand(n, generator=g)

    # a pool of junk aggregates of comparable size, reused in random orientations
    n_junk = int((label < 0).sum())
    mean_diam = float(np.mean(diameters))
    junk_pool = [  # half amorphous clumps, half clumps of fragments of the structures
        random_aggregate(mean_diam * (0.7 + 0.6 * float(torch.rand(1, generator=g))), generator=g,
                         source=models[j % len(models)] if j % 2 else None)
        for j in range(min(n_junk, 16))
    ]
    junk_choice = torch.randint(0, max(1, len(junk_pool)), (n,), generator=g)
    diameter = torch.tensor(
        [diameters[int(l)] if l >= 0 else particle_diameter_angstrom(junk_pool[int(junk_choice[i])]) for i, l in enumerate(label)],
        dtype=torch.float32,
    ) if n else torch.zeros(0)

    # --- physics constants
    pad = 2 * box_px
    v_ice = physics.ice_mean_potential_volt() if ice_thickness_angstrom > 0 else 0.0
    scale = physics.contrast_scale(voltage_kv, amplitude_contrast, ice_thickness_angstrom)
    n0 = physics.mean_counts_per_pixel(dose_e_per_a2, pixel_size_angstrom, ice_thickness_angstrom, voltage_kv)
    damage = exposure_averaged_damage_2d(dose_e_per_a2, (pad, pad), pixel_size_angstrom, voltage_kv)
    bg = ~circular_mask_2d((box_px, box_px), 0.375 * box_px)
    lo_c = (pad - box_px) // 2

    images = torch.empty(n, box_px, box_px, dtype=torch.float32)
    for start in range(0, n, chunk_size):
        sl = slice(start, min(n, start + chunk_size))
        m = sl.stop - sl.start
        proj = torch.zeros(m, box_px, box_px)
        lab = label[sl]
        for k, model in enumerate(models):
            sel = torch.nonzero(lab == k).flatten()
            if len(sel):
                proj[sel] = project_atoms_2d(
                    model, rotations[sl][sel], box_px, pixel_size_angstrom, shifts[sl][sel],
                    bfactor_angstrom2, v_ice, oversampling,
                )
        for i in torch.nonzero(lab < 0).flatten().tolist():
            jm = junk_pool[int(junk_choice[sl.start + i])]
            proj[i] = project_atoms_2d(
                jm, rotations[sl.start + i], box_px, pixel_size_angstrom, shifts[sl.start + i][None],
                bfactor_angstrom2, v_ice, oversampling,
            )[0]
        padded = torch.zeros(m, pad, pad)
        padded[:, lo_c : lo_c + box_px, lo_c : lo_c + box_px] = proj
        ctf = calculate_ctf_2d(du[sl], dv[sl], dang[sl], voltage_kv, cs_mm, amplitude_contrast, pixel_size_angstrom,
                               (pad, pad), bfactor_angstrom2=envelope_bfactor_angstrom2)
        signal_ft = torch.fft.rfft2(padded) * damage
        ice_ft = physics.ice_potential_ft((pad, pad), pixel_size_angstrom, ice_thickness_angstrom, g, batch=(m,))
        contrast = -scale * torch.fft.irfft2((signal_ft + ice_ft) * ctf, s=(pad, pad))
        contrast = contrast[:, lo_c : lo_c + box_px, lo_c : lo_c + box_px]
        lam = (n0 * (1 + contrast)).clamp(min=0)
        counts = torch.poisson(lam, generator=g)
        img = -(counts - n0)  # invert: particles white
        vals = img[:, bg]
        img = (img - vals.mean(1)[:, None, None]) / vals.std(1).clamp(min=1e-6)[:, None, None]
        images[sl] = img

    truth = {
        "structure_index": label,
        "structure_names": [names[int(l)] if l >= 0 else "junk" for l in label],
        "names": names,
        "rotations": rotations,
        "euler_angles_deg": matrix_to_euler_angles(rotations) if n else torch.zeros(0, 3),
        "shifts_yx_px": shifts,
        "defocus_u": du,
        "defocus_v": dv,
        "defocus_angle_deg": dang,
        "diameter_angstrom": diameter,
        "pixel_size_angstrom": pixel_size_angstrom,
        "voltage_kv": voltage_kv,
        "cs_mm": cs_mm,
        "amplitude_contrast": amplitude_contrast,
        "dose_e_per_a2": dose_e_per_a2,
        "ice_thickness_angstrom": ice_thickness_angstrom,
        "bfactor_angstrom2": bfactor_angstrom2,
        "envelope_bfactor_angstrom2": envelope_bfactor_angstrom2,
    }
    return images, truth


def noiseless_particle_images(
    structure: str | Atoms,
    rotations: torch.Tensor,
    box_px: int,
    pixel_size_angstrom: float,
    defocus_u: torch.Tensor | None = None,
    defocus_v: torch.Tensor | None = None,
    defocus_angle_deg: torch.Tensor | None = None,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor_angstrom2: float = 20.0,
    envelope_bfactor_angstrom2: float = 60.0,
    solvent: bool = True,
) -> torch.Tensor:
    """Noise-free references: ``CTF ⊛ projection`` (V·Å, particles positive) ``(b, box, box)``; no CTF if defocus is None.

    Same projection (solvent displaced), B-factor and imaging envelope as :func:`simulate_particle_stack`
    (no damage, no inelastic loss, no noise), CTF applied in a 2× padded box.
    """
    atoms = load_atoms(structure)
    v_ice = physics.ice_mean_potential_volt() if solvent else 0.0
    proj = project_atoms_2d(atoms, rotations, box_px, pixel_size_angstrom, None, bfactor_angstrom2, v_ice, 2)
    if defocus_u is None:
        return proj
    pad = 2 * box_px
    lo = (pad - box_px) // 2
    padded = torch.zeros(proj.shape[0], pad, pad)
    padded[:, lo : lo + box_px, lo : lo + box_px] = proj
    dv = defocus_u if defocus_v is None else defocus_v
    da = torch.zeros_like(torch.as_tensor(defocus_u)) if defocus_angle_deg is None else defocus_angle_deg
    ctf = calculate_ctf_2d(defocus_u, dv, da, voltage_kv, cs_mm, amplitude_contrast, pixel_size_angstrom, (pad, pad),
                           bfactor_angstrom2=envelope_bfactor_angstrom2)
    out = torch.fft.irfft2(torch.fft.rfft2(padded) * ctf, s=(pad, pad))
    return out[:, lo : lo + box_px, lo : lo + box_px]


__all__ = ["simulate_particle_stack", "noiseless_particle_images", "exposure_averaged_damage_2d"]
