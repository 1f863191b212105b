"""Shared Fourier numerics on torch tensors.

Conventions (used everywhere in cryolive):
- Images are real tensors shaped ``(..., h, w)``; row 0 first, as mrcfile/tifffile return them.
- Fourier transforms are ``torch.fft.rfft2`` with the default ("backward") normalisation, so the
  transforms are ``(..., h, w // 2 + 1)`` and the DC term sits at index ``[0, 0]``.
- Frequencies are in cycles per pixel unless a ``pixel_size_angstrom`` is given (then 1/Å).
- Shifts are tensors ``(..., 2)`` in **(y, x)** order, in pixels, matching the array axes.
  ``shift_image_2d(img, s)`` moves the content by ``+s``: ``out(r) = img(r - s)``.
- Every function follows the device and dtype of its inputs.
"""

from __future__ import annotations

import math

import torch


def frequency_grid_2d(
    shape: tuple[int, int],
    pixel_size_angstrom: float = 1.0,
    rfft: bool = True,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frequency coordinates ``(ky, kx)`` of an FFT of ``shape``, each ``(h, w//2+1)`` (rfft) or ``(h, w)``.

    Units: 1/Å when ``pixel_size_angstrom`` is given (cycles/pixel when it is 1).
    """
    h, w = shape
    ky = torch.fft.fftfreq(h, d=pixel_size_angstrom, device=device, dtype=dtype)
    kx = (torch.fft.rfftfreq if rfft else torch.fft.fftfreq)(w, d=pixel_size_angstrom, device=device, dtype=dtype)
    return torch.meshgrid(ky, kx, indexing="ij")


def frequency_radius_2d(
    shape: tuple[int, int],
    pixel_size_angstrom: float = 1.0,
    rfft: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """|k| of every FFT sample, ``(h, w//2+1)`` (rfft) — 1/Å, or cycles/pixel for pixel size 1."""
    ky, kx = frequency_grid_2d(shape, pixel_size_angstrom, rfft, device)
    return torch.sqrt(ky**2 + kx**2)


def shell_index_2d(shape: tuple[int, int], rfft: bool = True, device=None) -> torch.Tensor:
    """Integer Fourier shell of every FFT sample: round(|k| · min(h, w)), ``(h, w//2+1)``, int64.

    Shell ``n`` holds frequencies near ``n / min(h, w)`` cycles/pixel; Nyquist is shell ``min(h, w)//2``.
    """
    r = frequency_radius_2d(shape, 1.0, rfft, device) * min(shape)
    return torch.round(r).long()


def radial_average_2d(values: torch.Tensor, rfft: bool = True, n_shells: int | None = None) -> torch.Tensor:
    """Average ``values (..., h, w')`` (a Fourier-space quantity) over shells → ``(..., n_shells)``.

    ``n_shells`` defaults to ``min(h, w)//2 + 1`` (DC to Nyquist); samples beyond are dropped.
    For an rfft layout, ``w`` is recovered as ``2 (w' - 1)``.
    """
    h, wp = values.shape[-2:]
    w = 2 * (wp - 1) if rfft else wp
    idx = shell_index_2d((h, w), rfft, values.device)
    if n_shells is None:
        n_shells = min(h, w) // 2 + 1
    keep = idx < n_shells
    flat_idx = idx[keep]
    v = values[..., keep]  # (..., n)
    lead = v.shape[:-1]
    v2 = v.reshape(-1, v.shape[-1])
    out = torch.zeros(v2.shape[0], n_shells, dtype=v2.dtype, device=v2.device)
    out.index_add_(1, flat_idx, v2)
    counts = torch.bincount(flat_idx, minlength=n_shells).clamp(min=1).to(v2.dtype)
    return (out / counts).reshape(*lead, n_shells)


def phase_shift_2d(shift_yx: torch.Tensor, shape: tuple[int, int], rfft: bool = True) -> torch.Tensor:
    """Complex factors ``exp(-2πi k·s)`` that move content by ``+s`` when multiplied into an FFT.

    ``shift_yx``: ``(..., 2)`` pixels → returns ``(..., h, w//2+1)`` complex64.
    """
    ky, kx = frequency_grid_2d(shape, 1.0, rfft, shift_yx.device, torch.float32)
    s = shift_yx.to(torch.float32)
    phase = -2.0 * math.pi * (ky * s[..., 0, None, None] + kx * s[..., 1, None, None])
    return torch.polar(torch.ones_like(phase), phase)


def shift_image_2d(image: torch.Tensor, shift_yx: torch.Tensor) -> torch.Tensor:
    """Sub-pixel (Fourier) translation of ``image (..., h, w)`` by ``shift_yx (..., 2)`` pixels (periodic)."""
    shape = image.shape[-2:]
    ft = torch.fft.rfft2(image)
    return torch.fft.irfft2(ft * phase_shift_2d(shift_yx, shape), s=shape)


def fourier_crop_2d(image: torch.Tensor, new_shape: tuple[int, int]) -> torch.Tensor:
    """Downsample ``image (..., h, w)`` to ``new_shape`` by cropping its Fourier transform.

    Keeps mean intensity (values are per-pixel averages, not sums). ``new_shape`` must be even and ≤ shape.
    """
    h, w = image.shape[-2:]
    nh, nw = new_shape
    if (nh, nw) == (h, w):
        return image.clone()
    if nh > h or nw > w or nh % 2 or nw % 2:
        raise ValueError(f"fourier_crop_2d: cannot crop {(h, w)} to {new_shape} (must be even and smaller)")
    ft = torch.fft.rfft2(image)
    top = ft[..., : nh // 2, : nw // 2 + 1]
    bottom = ft[..., h - nh // 2 :, : nw // 2 + 1]
    cropped = torch.cat([top, bottom], dim=-2)
    return torch.fft.irfft2(cropped, s=(nh, nw)) * (nh * nw) / (h * w)


def fourier_pad_2d(image: torch.Tensor, new_shape: tuple[int, int]) -> torch.Tensor:
    """Upsample ``image (..., h, w)`` to a larger even ``new_shape`` by zero-padding its transform."""
    h, w = image.shape[-2:]
    nh, nw = new_shape
    ft = torch.fft.rfft2(image)
    out = torch.zeros(*ft.shape[:-2], nh, nw // 2 + 1, dtype=ft.dtype, device=ft.device)
    out[..., : h // 2, : w // 2 + 1] = ft[..., : h // 2, :]
    out[..., nh - h // 2 :, : w // 2 + 1] = ft[..., h - h // 2 :, :]
    return torch.fft.irfft2(out, s=(nh, nw)) * (nh * nw) / (h * w)


def lowpass_2d(
    image: torch.Tensor, cutoff_angstrom: float, pixel_size_angstrom: float = 1.0, falloff: float = 0.02
) -> torch.Tensor:
    """Low-pass ``image (..., h, w)`` at ``cutoff_angstrom`` with a raised-cosine edge ``falloff`` (cycles/px)."""
    shape = image.shape[-2:]
    k = frequency_radius_2d(shape, 1.0, True, image.device)
    kc = pixel_size_angstrom / cutoff_angstrom
    filt = soft_edge(k, kc, falloff)
    return torch.fft.irfft2(torch.fft.rfft2(image) * filt, s=shape)


def soft_edge(k: torch.Tensor, cutoff: float, falloff: float) -> torch.Tensor:
    """1 below ``cutoff - falloff/2``, 0 above ``cutoff + falloff/2``, raised cosine between."""
    if falloff <= 0:
        return (k <= cutoff).to(k.dtype)
    t = ((k - (cutoff - falloff / 2)) / falloff).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


def fourier_ring_correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """FRC of real images ``a, b (..., h, w)`` → ``(..., min(h,w)//2 + 1)`` from DC to Nyquist."""
    fa = torch.fft.rfft2(a)
    fb = torch.fft.rfft2(b)
    num = radial_average_2d((fa * fb.conj()).real)
    da = radial_average_2d(fa.abs() ** 2)
    db = radial_average_2d(fb.abs() ** 2)
    return num / torch.sqrt(da * db).clamp(min=1e-30)


def resolution_at_threshold(curve: torch.Tensor, box_size: int, pixel_size_angstrom: float, threshold: float) -> float:
    """Resolution (Å) where a shell curve (FRC/FSC, DC..Nyquist) first falls below ``threshold``."""
    c = curve.detach().cpu()
    for n in range(1, c.shape[-1]):
        if c[n] < threshold:
            n_last = max(n - 1, 1)
            return box_size * pixel_size_angstrom / n_last
    return 2.0 * pixel_size_angstrom


def normalize_image_2d(image: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Zero mean, unit standard deviation over ``mask`` (bool, ``(h, w)``) or the whole image, per image."""
    if mask is None:
        mean = image.mean(dim=(-2, -1), keepdim=True)
        std = image.std(dim=(-2, -1), keepdim=True)
    else:
        vals = image[..., mask]
        mean = vals.mean(dim=-1)[..., None, None]
        std = vals.std(dim=-1)[..., None, None]
    return (image - mean) / std.clamp(min=1e-12)


def circular_mask_2d(shape: tuple[int, int], radius_px: float, device=None) -> torch.Tensor:
    """Boolean disc of ``radius_px`` centred at ``(h//2, w//2)``, ``(h, w)``."""
    h, w = shape
    y = torch.arange(h, device=device, dtype=torch.float32) - h // 2
    x = torch.arange(w, device=device, dtype=torch.float32) - w // 2
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return (yy**2 + xx**2) <= radius_px**2


def good_fft_size(n: int) -> int:
    """The smallest even n' ≥ n whose prime factors are 2, 3 and 5 (fast FFT sizes)."""
    m = max(2, int(n))
    while True:
        if m % 2 == 0:
            k = m
            for p in (2, 3, 5):
                while k % p == 0:
                    k //= p
            if k == 1:
                return m
        m += 1
