"""Particle extraction: boxes cut from a micrograph at picked positions, Fourier-cropped and normalised.

Conventions:

- A box of size ``b`` for a pick at ``(y, x)`` (micrograph pixels, 0-based pixel centres) covers rows
  ``round(y) - b//2 … round(y) - b//2 + b - 1`` (same for columns), so the rounded coordinate lies at index
  ``b // 2`` of the box — the centre convention of ``fourier.circular_mask_2d`` and of RELION. The sub-pixel
  remainder ``(y - round(y), x - round(x))`` is *not* applied (it is at most half a pixel) and is returned as
  ``Extracted.residual_yx_px`` for refinement to use.
- Edges: a box that reaches over the micrograph's edge is kept as long as its centre lies inside the
  micrograph; the part outside is filled with Gaussian noise of the median and robust spread of the part
  inside (so the normalisation and Fourier cropping see no hard edge). Picks whose centre is outside the
  micrograph are dropped: ``kept[i]`` is False and there is no image for them. ``images`` holds the kept
  particles only, in input order (``images.shape[0] == kept.sum()``).
- Fourier cropping keeps the low frequencies exactly; the output pixel size is
  ``pixel_size × pixel_size_factor`` with ``pixel_size_factor = box_size_px / output_box_size_px``.
- Contrast is inverted by default so particles are white (positive density, CONVENTIONS.md), and each image is
  normalised to zero mean and unit standard deviation of its background (outside a circle of
  ``background_radius_px`` output pixels, centred at ``b//2``).

Example::

    box, out = default_box_sizes(150.0, 1.0)         # (224, 96)
    ex = extract_particles(micrograph, picks.coords_yx_px, box, out)
    ex.images.shape                                  # (n_kept, 96, 96)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import fourier

TARGET_OUTPUT_PIXEL_SIZE_ANGSTROM = 2.5
MIN_OUTPUT_BOX_PX = 64
BOX_FACTOR = 1.5  # box ≈ this × particle diameter


@dataclass
class Extracted:
    """Extracted particle images.

    - ``images (n_kept, b, b)`` float32, ``b = output_box_size_px``; particles white when inverted.
    - ``kept (n,) bool``: whether input pick ``i`` lies inside the micrograph (it has an image).
    - ``centres_yx_px (n_kept, 2)`` long: the integer box centres in micrograph pixels (index b//2 of the box).
    - ``residual_yx_px (n_kept, 2)``: input coordinate minus box centre (|·| ≤ 0.5), micrograph pixels.
    - ``pixel_size_factor``: output pixel size / micrograph pixel size.
    """

    images: torch.Tensor
    kept: torch.Tensor
    centres_yx_px: torch.Tensor
    residual_yx_px: torch.Tensor
    pixel_size_factor: float


def default_box_sizes(particle_diameter_angstrom: float, pixel_size_angstrom: float) -> tuple[int, int]:
    """``(box_px, output_box_px)`` for a particle diameter (Å) at a micrograph pixel size (Å/px).

    The box is ~1.5 × the diameter rounded up to an even fast FFT size; the output is Fourier-cropped to about
    2.5 Å/px, at least 64 px (or the box, if smaller) and even, never larger than the box (no upsampling).
    """
    box = fourier.good_fft_size(int(math.ceil(BOX_FACTOR * particle_diameter_angstrom / pixel_size_angstrom)))
    out = int(round(box * pixel_size_angstrom / TARGET_OUTPUT_PIXEL_SIZE_ANGSTROM / 2)) * 2
    out = max(out, MIN_OUTPUT_BOX_PX)
    out = min(out, box)
    return box, out


def extract_particles(
    micrograph: torch.Tensor,
    coords_yx_px: torch.Tensor,
    box_size_px: int,
    output_box_size_px: int | None = None,
    invert_contrast: bool = True,
    background_radius_px: float | None = None,
) -> Extracted:
    """Cut ``box_size_px`` boxes centred at ``round(coords_yx_px (n, 2))`` from ``micrograph (h, w)``.

    ``output_box_size_px`` (even, ≤ box; default: the box): Fourier-crop size. ``background_radius_px``
    (output pixels; default 0.375 × output box, RELION's default): pixels farther than this from the centre are
    the background used for normalisation. Returns :class:`Extracted` (see module docstring for conventions).
    """
    b = int(box_size_px)
    ob = b if output_box_size_px is None else int(output_box_size_px)
    if b % 2 or ob % 2 or ob > b:
        raise ValueError(f"box sizes must be even with output ≤ box, got box={b}, output={ob}")
    img = micrograph.to(torch.float32)
    dev = img.device
    h, w = img.shape[-2:]
    coords = coords_yx_px.to(device=dev, dtype=torch.float32).reshape(-1, 2)
    centres = torch.round(coords).long()
    lo = centres - b // 2
    kept = (centres[:, 0] >= 0) & (centres[:, 1] >= 0) & (centres[:, 0] < h) & (centres[:, 1] < w)
    lo_k = lo[kept]
    ar = torch.arange(b, device=dev)
    rows = lo_k[:, 0, None] + ar  # (k, b)
    cols = lo_k[:, 1, None] + ar
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (k, b, b)
    boxes = img[rows.clamp(0, h - 1)[:, :, None], cols.clamp(0, w - 1)[:, None, :]]  # (k, b, b)
    if boxes.shape[0] and not bool(inside.all()):
        boxes = _fill_outside(boxes, inside)
    if ob != b:
        boxes = fourier.fourier_crop_2d(boxes, (ob, ob)) if boxes.shape[0] else boxes.new_zeros((0, ob, ob))
    if invert_contrast:
        boxes = -boxes
    radius = 0.375 * ob if background_radius_px is None else float(background_radius_px)
    background = ~fourier.circular_mask_2d((ob, ob), radius, device=dev)
    if boxes.shape[0]:
        boxes = fourier.normalize_image_2d(boxes, background)
    return Extracted(
        images=boxes.contiguous(),
        kept=kept,
        centres_yx_px=centres[kept],
        residual_yx_px=(coords - centres.to(torch.float32))[kept],
        pixel_size_factor=b / ob,
    )


def _fill_outside(boxes: torch.Tensor, inside: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Replace the pixels of ``boxes (k, b, b)`` where ``inside`` is False by Gaussian noise with the median and
    robust spread (1.4826 × MAD, so a particle in the box does not inflate it) of each box's inside pixels.
    Reproducible (fixed seed); the input is not modified."""
    out = boxes.clone()
    g = torch.Generator(device=boxes.device).manual_seed(seed)
    partial = torch.nonzero(~inside.flatten(1).all(dim=1)).flatten().tolist()
    for i in partial:
        vals = boxes[i][inside[i]]
        if vals.numel() == 0:
            continue
        med = vals.median()
        spread = 1.4826 * (vals - med).abs().median()
        outside = ~inside[i]
        noise = torch.randn(int(outside.sum()), generator=g, device=boxes.device, dtype=boxes.dtype)
        out[i][outside] = med + spread * noise
    return out


def per_particle_defocus(
    coords_yx_px: torch.Tensor, ctf_result_like, landscape=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Defocus of each particle: ``(defocus_u (n,), defocus_v (n,), defocus_angle_deg (n,))``, Å and degrees.

    ``ctf_result_like``: an object with ``defocus_u``, ``defocus_v``, ``defocus_angle_deg`` attributes (a
    ``CTFResult``) or a dict with those keys — the micrograph's values. ``landscape``: optional hook for a
    defocus model over the micrograph (a later issue fits a plane from stage tilt / local CTF): a callable
    ``landscape(coords_yx_px (n, 2)) -> (n,)`` defocus offset in Å (positive = more underfocus) added to U and
    V. Without it every particle gets the micrograph's values.
    """
    get = (lambda k: ctf_result_like[k]) if isinstance(ctf_result_like, dict) else (
        lambda k: getattr(ctf_result_like, k)
    )
    coords = torch.as_tensor(coords_yx_px).reshape(-1, 2)
    n = coords.shape[0]
    dev = coords.device
    du = torch.full((n,), float(get("defocus_u")), device=dev)
    dv = torch.full((n,), float(get("defocus_v")), device=dev)
    da = torch.full((n,), float(get("defocus_angle_deg")), device=dev)
    if landscape is not None:
        offset = torch.as_tensor(landscape(coords), dtype=torch.float32, device=dev).reshape(n)
        du = du + offset
        dv = dv + offset
    return du, dv, da
