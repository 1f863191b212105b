"""PNG encoding of small images for the dashboard (imagecodecs, a core dependency), and display helpers."""

from __future__ import annotations

import numpy as np


def encode_png(image: np.ndarray) -> bytes:
    """``(h, w)`` grey or ``(h, w, 3)`` RGB uint8 array → PNG bytes."""
    import imagecodecs

    a = np.ascontiguousarray(image, dtype=np.uint8)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"expected (h, w) or (h, w, 3), got {a.shape}")
    return imagecodecs.png_encode(a)


def to_uint8(image: np.ndarray, low_pct: float = 1.0, high_pct: float = 99.0) -> np.ndarray:
    """Scale to 0..255 between two percentiles (NaN → 0)."""
    a = np.asarray(image, dtype=np.float32)
    finite = a[np.isfinite(a)]
    if finite.size == 0:
        return np.zeros(a.shape, dtype=np.uint8)
    lo, hi = np.percentile(finite, [low_pct, high_pct])
    if not hi > lo:
        hi = lo + 1.0
    out = np.clip((np.nan_to_num(a, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return (out * 255.0 + 0.5).astype(np.uint8)


def bin_image(image: np.ndarray, max_size: int) -> tuple[np.ndarray, int]:
    """Block-average by the smallest integer factor that brings the larger side to ``max_size`` or less."""
    a = np.asarray(image, dtype=np.float32)
    h, w = a.shape
    f = max(1, int(np.ceil(max(h, w) / float(max_size))))
    if f == 1:
        return a, 1
    hh, ww = (h // f) * f, (w // f) * f
    return a[:hh, :ww].reshape(hh // f, f, ww // f, f).mean(axis=(1, 3)), f
