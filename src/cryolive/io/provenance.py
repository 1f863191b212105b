"""Provenance written next to outputs: version, time, command line, settings."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
from pathlib import Path

from .atomic import atomic_path


def write_provenance(folder: str | os.PathLike, settings: dict | None = None, name: str = "provenance.json") -> Path:
    """Write ``folder/name`` with cryolive's version, UTC time, the command line and the settings."""
    from .. import __version__

    record = {
        "cryolive_version": __version__,
        "time_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "python": platform.python_version(),
        "host": platform.node(),
        "settings": settings or {},
    }
    path = Path(folder) / name
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(record, indent=2, default=str))
    return path
