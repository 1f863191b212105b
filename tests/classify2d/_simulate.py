"""Particle stacks with ground truth for the 2D-classification tests (small, fast, realistic SNR)."""

from __future__ import annotations

import math

import torch

from cryolive import fourier
from cryolive.classify2d import rotate_images_2d
from cryolive.config import Optics
from cryolive.ctf import calculate_ctf_2d

OPTICS = Optics(pixel_size_angstrom=1.0, voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1)


def blob_templates(n_types: int, box: int, pixel_size: float, diameter_angstrom: float = 90.0, seed: int = 1):
    """``(n_types, box, box)`` CTF-free 'projections': sums of Gaussian blobs (asymmetric shapes), centred."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(box, dtype=torch.float32) - box // 2) * pixel_size
    yy, xx = torch.meshgrid(y, y, indexing="ij")
    out = []
    for _ in range(n_types):
        img = torch.zeros(box, box)
        n_blobs = 10
        r = diameter_angstrom / 2 * torch.sqrt(torch.rand(n_blobs, generator=g)) * 0.8
        a = torch.rand(n_blobs, generator=g) * 2 * math.pi
        sig = 5 + 5 * torch.rand(n_blobs, generator=g)
        amp = 0.5 + torch.rand(n_blobs, generator=g)
        for j in range(n_blobs):
            cx, cy = r[j] * torch.cos(a[j]), r[j] * torch.sin(a[j])
            img += amp[j] * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig[j] ** 2))
        # centre on the centre of mass
        m = img.sum()
        com = torch.stack([(img.sum(1) * y).sum() / m, (img.sum(0) * y).sum() / m]) / pixel_size
        out.append(fourier.shift_image_2d(img, -com))
    return torch.stack(out)


def make_stack(templates: torch.Tensor, n: int, pixel_size: float, snr: float = 0.1, max_shift_px: float = 3.0,
               seed: int = 0, optics: Optics = OPTICS):
    """Random type, in-plane rotation, shift and defocus; CTF; white noise so that the signal variance inside
    the particle disc over the noise variance is ``snr``. Returns a dict of tensors (images unit-noise)."""
    g = torch.Generator().manual_seed(seed)
    K, b, _ = templates.shape
    types = torch.randint(K, (n,), generator=g)
    psi = torch.rand(n, generator=g) * 360
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift_px
    du = 8000 + 17000 * torch.rand(n, generator=g)
    dv = du - 500 * torch.rand(n, generator=g)
    ang = torch.rand(n, generator=g) * 180
    clean = fourier.shift_image_2d(rotate_images_2d(templates[types], psi), shift)
    ctf = calculate_ctf_2d(du, dv, ang, optics.voltage_kv, optics.cs_mm, optics.amplitude_contrast, pixel_size, (b, b))
    sig = torch.fft.irfft2(torch.fft.rfft2(clean) * ctf, s=(b, b))
    disc = fourier.circular_mask_2d((b, b), 0.35 * b)
    sig_var = sig[:, disc].var(-1).mean()
    noise_std = torch.sqrt(sig_var / snr)
    noisy = (sig + noise_std * torch.randn(sig.shape, generator=g)) / noise_std
    return {"images": noisy.float(), "types": types, "psi": psi, "shift": shift, "du": du, "dv": dv, "ang": ang}


def best_aligned_correlation(avg: torch.Tensor, truth: torch.Tensor, pixel_size: float,
                             lowpass_angstrom: float | None = None) -> float:
    """Max over in-plane rotations (1°) and cyclic shifts of the Pearson correlation of two images (masked)."""
    b = avg.shape[-1]
    mask = fourier.circular_mask_2d((b, b), 0.45 * b).float()
    if lowpass_angstrom:
        avg = fourier.lowpass_2d(avg, lowpass_angstrom, pixel_size)
        truth = fourier.lowpass_2d(truth, lowpass_angstrom, pixel_size)
    angles = torch.arange(0, 360, 1.0)
    rot = rotate_images_2d(truth[None].expand(len(angles), -1, -1), angles) * mask
    a = avg * mask
    a = (a - a[mask > 0].mean()) * mask
    rot = (rot - rot[:, mask > 0].mean(-1)[:, None, None]) * mask
    cc = torch.fft.irfft2(torch.fft.rfft2(a)[None] * torch.fft.rfft2(rot).conj(), s=(b, b))
    denom = torch.sqrt((a**2).sum() * (rot**2).sum((-2, -1)))
    return float((cc.amax((-2, -1)) / denom).max())


def structure_stack(views, n: int, box: int, pixel_size: float, snr: float = 0.1, max_shift_px: float = 3.0,
                    bfactor_angstrom2: float = 50.0, seed: int = 0, optics: Optics = OPTICS):
    """Particles of real structures (``cryolive.simulate.structure``) seen in fixed ``views``.

    ``views``: list of ``(structure_name, rot_deg, tilt_deg)``; each particle gets one view at random, a
    random in-plane angle psi (RELION's rlnAnglePsi) and shift, its own defocus, the CTF and white noise
    (signal variance inside the particle disc / noise variance = ``snr``). Returns the stack as
    :func:`make_stack` plus ``templates (n_views, box, box)``: the CTF-free projections at psi = 0, centred.
    """
    from cryolive.geometry import euler_angles_to_matrix
    from cryolive.simulate.structure import load_atoms, project_atoms_2d

    g = torch.Generator().manual_seed(seed)
    types = torch.randint(len(views), (n,), generator=g)
    psi = torch.rand(n, generator=g) * 360
    shift = (torch.rand(n, 2, generator=g) * 2 - 1) * max_shift_px
    du = 8000 + 17000 * torch.rand(n, generator=g)
    dv = du - 500 * torch.rand(n, generator=g)
    ang = torch.rand(n, generator=g) * 180
    clean = torch.zeros(n, box, box)
    templates = []
    for t, (name, rot, tilt) in enumerate(views):
        atoms = load_atoms(name)
        sel = torch.nonzero(types == t).flatten()
        mats = euler_angles_to_matrix(torch.full((len(sel),), float(rot)), torch.full((len(sel),), float(tilt)), psi[sel])
        clean[sel] = project_atoms_2d(atoms, mats, box, pixel_size, shifts_yx_px=shift[sel],
                                      bfactor_angstrom2=bfactor_angstrom2, oversampling=1)
        templates.append(project_atoms_2d(atoms, euler_angles_to_matrix(rot, tilt, 0.0), box, pixel_size,
                                          bfactor_angstrom2=bfactor_angstrom2, oversampling=1)[0])
    ctf = calculate_ctf_2d(du, dv, ang, optics.voltage_kv, optics.cs_mm, optics.amplitude_contrast, pixel_size, (box, box))
    sig = torch.fft.irfft2(torch.fft.rfft2(clean) * ctf, s=(box, box))
    disc = fourier.circular_mask_2d((box, box), 0.35 * box)
    noise_std = torch.sqrt(sig[:, disc].var(-1).mean() / snr)
    noisy = (sig + noise_std * torch.randn(sig.shape, generator=g)) / noise_std
    return {"images": noisy.float(), "types": types, "psi": psi, "shift": shift, "du": du, "dv": dv, "ang": ang,
            "templates": torch.stack(templates)}


def purity(class_index: torch.Tensor, types: torch.Tensor) -> float:
    """Fraction of particles in a class whose majority type is their own."""
    good = 0
    for k in class_index.unique():
        m = class_index == k
        good += int(torch.bincount(types[m]).max())
    return good / len(types)


def frc_with_truth(avg: torch.Tensor, view, pixel_size: float, bfactor_angstrom2: float = 50.0) -> torch.Tensor:
    """FRC ``(b//2+1,)`` of a class average with the exact projection of its true ``view`` (name, rot, tilt).

    In-plane angle found on a 0.5° grid (interpolated), then the truth is re-projected from the atoms at that
    psi (no interpolation), placed by the best integer shift and refined on a 0.1 px sub-pixel grid."""
    from cryolive.geometry import euler_angles_to_matrix
    from cryolive.simulate.structure import load_atoms, project_atoms_2d

    b = avg.shape[-1]
    name, rot, tilt = view
    atoms = load_atoms(name)
    template = project_atoms_2d(atoms, euler_angles_to_matrix(rot, tilt, 0.0), b, pixel_size,
                                bfactor_angstrom2=bfactor_angstrom2, oversampling=1)[0]
    angles = torch.arange(0, 360, 0.5)
    rotated = rotate_images_2d(template[None].expand(len(angles), -1, -1), angles)
    cc = torch.fft.irfft2(torch.fft.rfft2(avg)[None] * torch.fft.rfft2(rotated).conj(), s=(b, b))
    i = int(cc.reshape(len(angles), -1).max(-1).values.argmax())
    pos = int(cc[i].argmax())
    shift = (torch.tensor([[pos // b, pos % b]], dtype=torch.float32) + b / 2) % b - b / 2
    # rotating the image by +angle is the projection at psi = -angle (passive rotation)
    exact = project_atoms_2d(atoms, euler_angles_to_matrix(rot, tilt, -float(angles[i])), b, pixel_size,
                             shifts_yx_px=shift, bfactor_angstrom2=bfactor_angstrom2, oversampling=1)[0]
    g = torch.arange(-0.5, 0.51, 0.1)
    sub = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    candidates = fourier.shift_image_2d(exact[None].expand(len(sub), -1, -1), sub)
    mask = fourier.circular_mask_2d((b, b), 0.45 * b).float()
    frc = fourier.fourier_ring_correlation((avg * mask)[None].expand(len(sub), -1, -1), candidates * mask)
    return frc[int(frc[:, b // 8 :].sum(-1).argmax())]
