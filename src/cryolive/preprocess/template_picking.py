"""Template picking: CTF-aware normalised cross-correlation with 2D templates over in-plane rotations.

Templates are particle images with particles **white** (2D class averages, which are CTF-corrected, or
projections of a map): :func:`templates_from_classes` resamples class averages to a pixel size,
:func:`templates_from_map` projects a map at evenly spread views. :func:`pick_templates` then

1. prepares the micrograph as the blob picker does (:mod:`cryolive.preprocess.picking`): carbon film replaced by
   noise, plane subtracted, Fourier-cropped to ~diameter / 22 per pixel, phase-flipped with the CTF (so that the
   particles are white and their transform is ``|CTF| · P``), band-passed;
2. resamples each template to the working pixel size, rotates it in-plane every ``angle_step_deg`` (default
   10°), multiplies its transform by the micrograph's ``|CTF|`` and the same band-pass (the matched filter of a
   phase-flipped particle), cuts it to a disc of 1.5 × the particle diameter and makes it zero-mean, unit-norm;
3. computes the local normalised cross-correlation of the micrograph with every template × rotation at once by
   FFT (batched on the micrograph's device), keeps the best over them at every pixel (with the template and
   angle that gave it), and turns it into a z-score against the same computation on white noise;
4. candidates, junk (aggregates: local power and projected mass) and carbon rejection, automatic
   false-discovery-rate threshold and sub-pixel positions exactly as the blob picker does
   (:func:`cryolive.preprocess.picking.picks_from_score_maps`).

Everything is pure torch and follows the device of ``micrograph``; templates are moved there.

Example::

    templates = templates_from_classes(snapshot.averages[selected], 2.5, target_pixel_size_angstrom=5.0)
    picks = pick_templates(micrograph, 1.0, templates, 5.0, PickingSettings(particle_diameter_angstrom=150.0),
                           ctf=dict(defocus_u=15200.0, defocus_v=14800.0, defocus_angle_deg=30.0,
                                    voltage_kv=300.0, cs_mm=2.7, amplitude_contrast=0.1))
    picks.coords_yx_px, picks.scores, picks.template_index, picks.angle_deg
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import fourier
from ..config import PickingSettings
from . import picking
from .picking import Picks

TEMPLATE_NULL_REALISATIONS = 2
TEMPLATE_WINDOW_DIAMETERS = 0.75  # radius of the correlation window, × the particle diameter
TEMPLATE_CHUNK = 256  # templates × rotations correlated at once (bounds memory: chunk × working micrograph)


@dataclass
class TemplatePicks(Picks):
    """:class:`~cryolive.preprocess.picking.Picks` plus, per pick, the best template ``template_index (n,)`` and
    its in-plane rotation ``angle_deg (n,)`` (degrees; see :func:`_rotate_2d` for the sense)."""

    template_index: torch.Tensor | None = None
    angle_deg: torch.Tensor | None = None


def resample_images_2d(images: torch.Tensor, pixel_size_angstrom: float, target_pixel_size_angstrom: float) -> torch.Tensor:
    """Images ``(n, b, b)`` at ``pixel_size_angstrom`` → ``(n, b', b')`` at (about) ``target_pixel_size_angstrom``
    by Fourier cropping or padding (same field of view, ``b' = round(b · pixel / target)``, even)."""
    b = images.shape[-1]
    nb = max(2, int(round(b * pixel_size_angstrom / target_pixel_size_angstrom / 2)) * 2)
    if nb == b:
        return images.clone()
    if nb < b:
        return fourier.fourier_crop_2d(images, (nb, nb))
    return fourier.fourier_pad_2d(images, (nb, nb))


def templates_from_classes(
    class_averages: torch.Tensor, class_pixel_size_angstrom: float, target_pixel_size_angstrom: float | None = None
) -> torch.Tensor:
    """Templates from (selected) 2D class averages ``(k, b, b)`` (particles white, CTF-corrected, as
    :class:`cryolive.classify2d.StreamingClassifier2D` gives them): float32 ``(k, b', b')``, each with zero mean
    outside a soft disc of 0.9 × the box, resampled to ``target_pixel_size_angstrom`` when given (the
    picker resamples again to its working pixel size, so any pixel size works). Raises ``ValueError`` for
    anything but a non-empty stack of square images."""
    a = torch.as_tensor(class_averages, dtype=torch.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or a.shape[0] == 0 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"class averages must be a non-empty stack of square images (k, b, b), got {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError("class averages contain NaN or infinite values")
    b = a.shape[-1]
    mask = fourier.circular_mask_2d((b, b), 0.45 * b, device=a.device).to(torch.float32)
    outside = 1 - mask
    bg = (a * outside).sum((-2, -1), keepdim=True) / outside.sum().clamp(min=1)
    a = (a - bg) * mask
    if target_pixel_size_angstrom is not None:
        a = resample_images_2d(a, class_pixel_size_angstrom, target_pixel_size_angstrom)
    return a


def project_map_2d(volume: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Projections ``(n, d, d)`` of a map ``volume (d, d, d)`` (z, y, x) along z after rotating it by
    ``rotations (n, 3, 3)`` (``A`` maps map coordinates (x, y, z) to image coordinates, as in
    :mod:`cryolive.geometry`; trilinear interpolation, centre at voxel d // 2)."""
    d = volume.shape[-1]
    dev = volume.device
    c = torch.arange(d, dtype=torch.float32, device=dev) - d // 2
    zz, yy, xx = torch.meshgrid(c, c, c, indexing="ij")
    img_xyz = torch.stack([xx, yy, zz], -1).reshape(-1, 3)  # image coordinates of the output grid
    out = []
    for a in rotations.to(dev, torch.float32):
        src = img_xyz @ a  # A⁻¹ = Aᵀ: map coordinates of each output voxel (row vectors: r·A = Aᵀ r)
        grid = ((src + d // 2) / (d - 1) * 2 - 1).reshape(1, d, d, d, 3)  # grid_sample's (x, y, z) in [-1, 1]
        rot = F.grid_sample(volume[None, None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        out.append(rot[0, 0].sum(0))
    return torch.stack(out)


def templates_from_map(
    volume: torch.Tensor, pixel_size_angstrom: float, n_views: int = 24,
    target_pixel_size_angstrom: float | None = None,
) -> torch.Tensor:
    """Templates from a 3D map ``(d, d, d)`` (density positive): projections at ``n_views`` directions spread
    evenly over the sphere (a Fibonacci lattice; in-plane rotations are searched by the picker), as
    :func:`templates_from_classes` returns them."""
    vol = torch.as_tensor(volume, dtype=torch.float32)
    if vol.ndim != 3 or len(set(vol.shape)) != 1:
        raise ValueError(f"map must be a cube (d, d, d), got {tuple(vol.shape)}")
    i = torch.arange(n_views, dtype=torch.float64) + 0.5
    tilt = torch.rad2deg(torch.arccos(1 - 2 * i / n_views))
    rot = torch.remainder(i * 180.0 * (3 - math.sqrt(5)), 360.0)
    from ..geometry import euler_angles_to_matrix

    mats = euler_angles_to_matrix(rot.float(), tilt.float(), torch.zeros(n_views))
    proj = project_map_2d(vol, mats)
    return templates_from_classes(proj, pixel_size_angstrom, target_pixel_size_angstrom)


def _rotate_2d(images: torch.Tensor, angles_deg: torch.Tensor) -> torch.Tensor:
    """``images (k, b, b)`` rotated about the centre (b // 2) by each angle → ``(k, a, b, b)``: counter-clockwise
    as displayed with row 0 at the top (at 90° a point at +x, column b // 2 + r, moves to row b // 2 − r)."""
    k, b, _ = images.shape
    th = torch.deg2rad(angles_deg.to(images.device, torch.float32))
    cos, sin = torch.cos(th), torch.sin(th)
    # affine grid maps output (x, y) to input: rotate by -θ
    mat = torch.zeros(len(th), 2, 3, device=images.device)
    mat[:, 0, 0], mat[:, 0, 1], mat[:, 1, 0], mat[:, 1, 1] = cos, -sin, sin, cos
    off = (b // 2 - (b - 1) / 2) / ((b - 1) / 2)  # centre b // 2 in align_corners coordinates
    # grid points g (normalised); input = R⁻¹ (g - c) + c
    c = torch.tensor([off, off], device=images.device)
    mat[:, :, 2] = c - (mat[:, :, :2] @ c)
    grid = F.affine_grid(mat, (len(th), 1, b, b), align_corners=True)  # (a, b, b, 2)
    x = images[:, None].expand(k, len(th), b, b).reshape(k * len(th), 1, b, b)
    g = grid[None].expand(k, *grid.shape).reshape(k * len(th), b, b, 2)
    return F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=True).reshape(k, len(th), b, b)


def _template_bank(
    templates: torch.Tensor, template_pixel_size: float, ps_w: float, shape: tuple[int, int], filt: torch.Tensor,
    window: torch.Tensor, angles: torch.Tensor,
) -> torch.Tensor:
    """rfft2 ``(k·a, nh, nw//2+1)`` of the templates resampled to the working grid, rotated, filtered by ``filt``
    (|CTF| × band), cut to ``window`` (wrapped disc), zero-mean and unit-norm inside it."""
    nh, nw = shape
    t = resample_images_2d(templates, template_pixel_size, ps_w)
    b = t.shape[-1]
    if b > min(nh, nw):
        c = (b - min(nh, nw)) // 2 + 1
        t = t[:, c : b - c, c : b - c]
        b = t.shape[-1]
    rot = _rotate_2d(t, angles).reshape(-1, b, b)  # (k·a, b, b) centre at b // 2
    canvas = torch.zeros(rot.shape[0], nh, nw, device=rot.device)
    canvas[:, :b, :b] = rot
    canvas = torch.roll(canvas, (-(b // 2), -(b // 2)), (-2, -1))  # centre at pixel (0, 0), wrapped
    ft = torch.fft.rfft2(canvas) * filt
    x = torch.fft.irfft2(ft, s=(nh, nw)) * window
    n = window.sum()
    x = (x - x.sum((-2, -1), keepdim=True) / n) * window
    x = x / x.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None]
    return torch.fft.rfft2(x)


def template_score_map(
    micrograph: torch.Tensor, pixel_size_angstrom: float, templates: torch.Tensor, template_pixel_size_angstrom: float,
    diameter_angstrom: float, ctf: dict | None = None, angle_step_deg: float = 10.0,
    null_realisations: int = TEMPLATE_NULL_REALISATIONS,
) -> dict:
    """Score maps on the working grid (the dict of :func:`cryolive.preprocess.picking.score_map`, with
    ``template_index`` and ``angle_deg`` maps): the best z-scored local NCC over templates × rotations."""
    dev = micrograph.device
    carbon = picking.detect_carbon(micrograph, pixel_size_angstrom, diameter_angstrom,
                                   picking.CARBON_MARGIN_DIAMETERS * diameter_angstrom / pixel_size_angstrom)
    ft_neg, flip, ps_w, scale_yx, k, (nh, nw) = picking._preprocess(
        micrograph, pixel_size_angstrom, diameter_angstrom, ctf, carbon)
    band = picking._band(k, diameter_angstrom)
    abs_ctf = torch.ones_like(k)
    if ctf is not None:
        from .. import ctf as ctf_mod

        abs_ctf = ctf_mod.calculate_ctf_2d(
            ctf["defocus_u"], ctf["defocus_v"], ctf["defocus_angle_deg"], ctf["voltage_kv"], ctf["cs_mm"],
            ctf["amplitude_contrast"], ps_w, (nh, nw), device=dev).abs()
    ft = (ft_neg * flip * band)[None]
    if null_realisations > 0:
        gen = torch.Generator(device=dev).manual_seed(picking.NULL_SEED)
        noise = torch.randn((null_realisations, nh, nw), generator=gen, device=dev)
        ft = torch.cat([ft, torch.fft.rfft2(noise) * band])
    win = picking._disc_wrapped((nh, nw), TEMPLATE_WINDOW_DIAMETERS * diameter_angstrom / ps_w, dev)
    n_win = win.sum()
    img = torch.fft.irfft2(ft, s=(nh, nw))
    wft = torch.fft.rfft2(win).conj()
    s1 = torch.fft.irfft2(ft * wft, s=(nh, nw))
    s2 = torch.fft.irfft2(torch.fft.rfft2(img * img) * wft, s=(nh, nw))
    denom = (s2 - s1 * s1 / n_win).clamp(min=1e-12).sqrt()  # (1 + r, nh, nw): window norm of the zero-mean image

    tpl = torch.as_tensor(templates, dtype=torch.float32, device=dev)
    angles = torch.arange(0.0, 360.0, angle_step_deg, device=dev)
    n_a = len(angles)
    best = torch.full((ft.shape[0], nh, nw), -float("inf"), device=dev)
    best_i = torch.zeros((ft.shape[0], nh, nw), dtype=torch.long, device=dev)
    per_chunk = max(1, TEMPLATE_CHUNK // n_a)
    for c0 in range(0, tpl.shape[0], per_chunk):
        bank = _template_bank(tpl[c0 : c0 + per_chunk], template_pixel_size_angstrom, ps_w, (nh, nw), abs_ctf * band,
                              win, angles)  # (m, nh, nw//2+1)
        for j in range(ft.shape[0]):
            corr = torch.fft.irfft2(ft[j : j + 1] * bank.conj(), s=(nh, nw)) / denom[j]  # (m, nh, nw)
            v, i = corr.max(0)
            better = v > best[j]
            best[j] = torch.where(better, v, best[j])
            best_i[j] = torch.where(better, i + c0 * n_a, best_i[j])
    score = best[0]
    if null_realisations > 0:
        null = best[1:]
        mu, sd = null.mean(), null.std().clamp(min=1e-12)
        score = (score - mu) / sd
        null_score = (null - mu) / sd
    else:
        null_score = None
    local_power, mass = picking.junk_maps(ft_neg, flip, k, ps_w, (nh, nw), diameter_angstrom)
    # minimum distance between picks: MIN_DISTANCE_FACTOR × the smallest blob diameter (0.48 × diameter) — a
    # template's peak is sharp, and neighbours in a crowded hole touch
    one = 0
    carbon_w = None
    if carbon is not None:
        carbon_w = F.interpolate(carbon[None, None].float(), size=(nh, nw), mode="area")[0, 0] > 0.5
    idx = best_i[0]
    return dict(
        score=score, scale_index=torch.full_like(idx, one), local_power=local_power, mass=mass,
        amplitude=best[0] * denom[0] / denom[0].median().clamp(min=1e-12), pixel_size=ps_w, scale_yx=scale_yx,
        null_score=null_score, null_scale_index=None if null_score is None else torch.full_like(best_i[1:], one),
        carbon=carbon_w, template_index=idx // n_a, angle_deg=angles[idx % n_a],
    )


def pick_templates(
    micrograph: torch.Tensor,
    pixel_size_angstrom: float,
    templates: torch.Tensor,
    template_pixel_size_angstrom: float,
    settings: PickingSettings,
    ctf: dict | None = None,
    angle_step_deg: float = 10.0,
    edge_margin_px: float | None = None,
) -> TemplatePicks:
    """Pick particles matching ``templates (k, b, b)`` (particles white, at ``template_pixel_size_angstrom``) in
    ``micrograph (h, w)`` (particles dark), searching in-plane rotations every ``angle_step_deg``.

    ``ctf``, ``edge_margin_px`` and ``settings`` (``particle_diameter_angstrom``: correlation window and
    minimum distance between picks; ``threshold``: z-score, None for automatic; ``max_picks_per_micrograph``) as
    for :func:`cryolive.preprocess.picking.pick_blobs`. The micrograph is not modified. Returns
    :class:`TemplatePicks`, best score first."""
    tpl = torch.as_tensor(templates, dtype=torch.float32)
    if tpl.ndim == 2:
        tpl = tpl[None]
    if tpl.ndim != 3 or tpl.shape[0] == 0:
        raise ValueError(f"templates must be a non-empty stack (k, b, b), got {tuple(tpl.shape)}")
    if not 0 < angle_step_deg <= 180:
        raise ValueError(f"angle_step_deg must be in (0, 180], got {angle_step_deg}")
    maps = template_score_map(micrograph, pixel_size_angstrom, tpl.to(micrograph.device), template_pixel_size_angstrom,
                              float(settings.particle_diameter_angstrom), ctf, angle_step_deg)
    picks = picking.picks_from_score_maps(maps, pixel_size_angstrom, settings, edge_margin_px, return_index=True)
    base, flat_idx = picks
    return TemplatePicks(**{f: getattr(base, f) for f in base.__dataclass_fields__},
                         template_index=maps["template_index"].flatten()[flat_idx],
                         angle_deg=maps["angle_deg"].flatten()[flat_idx])
