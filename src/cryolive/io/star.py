"""STAR files (RELION 5 conventions) read and written with ``starfile``; writes are atomic."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import starfile

from .atomic import atomic_path


def write_star(path: str | os.PathLike, blocks: dict[str, pd.DataFrame | dict]) -> Path:
    """Write named data blocks (``{"optics": df, "particles": df}`` → ``data_optics``, ``data_particles``).

    A dict value is written as a single-row key/value block (like RELION's ``data_general``).
    """
    path = Path(path)
    with atomic_path(path) as tmp:
        starfile.write(blocks, tmp, overwrite=True)
    return path


def read_star(path: str | os.PathLike) -> dict[str, pd.DataFrame | dict]:
    """Read every data block of a STAR file → ``{block_name: DataFrame or dict}``."""
    data = starfile.read(path, always_dict=True)
    return dict(data)
