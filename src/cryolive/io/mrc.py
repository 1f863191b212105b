"""MRC images, stacks and maps (via mrcfile), written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np

from .atomic import atomic_path


def write_mrc(path: str | os.PathLike, data, pixel_size_angstrom: float, stack: bool = False) -> Path:
    """Write a 2D image, a stack ``(n, h, w)`` (``stack=True``, an .mrcs) or a 3D map as float32 MRC, atomically."""
    arr = np.ascontiguousarray(_to_numpy(data), dtype=np.float32)
    path = Path(path)
    with atomic_path(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as m:
            m.set_data(arr)
            if stack and arr.ndim == 3:
                m.set_image_stack()
            m.voxel_size = pixel_size_angstrom
    return path


def read_mrc(path: str | os.PathLike) -> tuple[np.ndarray, float]:
    """Read an MRC file → (float32 array, pixel size in Å)."""
    with mrcfile.open(path, permissive=False) as m:
        return np.asarray(m.data, dtype=np.float32).copy(), float(m.voxel_size.x)


def _to_numpy(data) -> np.ndarray:
    if hasattr(data, "detach"):
        return data.detach().cpu().numpy()
    return np.asarray(data)
