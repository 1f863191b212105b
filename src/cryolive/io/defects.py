"""Detector defect lists and maps: which pixels of every frame are bad and must be replaced.

:func:`read_defect_map` reads any of the forms the field uses and returns a boolean mask ``(h, w)`` of the
movie frames (row 0 first, as the frames are read), ``True`` = bad:

- a **defect map image**, MRC or TIFF, nonzero = bad (what RELION's and cryoSPARC's ``--defect_file`` take as
  an image, and what IMOD's ``clip defectmap`` writes);
- a **SerialEM defect list** (text, one keyword per line: ``CameraSizeX``/``CameraSizeY``, ``BadColumns``,
  ``BadRows`` (whole columns/rows, listed one by one), ``PartialBadColumn x width y_start y_end``,
  ``PartialBadRow y height x_start x_end`` (ends inclusive), ``BadPixels x y x y ...``, ``UsableArea top left
  bottom right`` (pixels outside are bad; 0 = no limit), ``WasScaled`` (the list was scaled to
  super-resolution: a listed bad pixel covers 2×2, or 4×4 when > 1); other keywords, and lines starting with
  ``#``, are ignored). A frame larger or smaller than the camera is centred on it, as IMOD does; a frame
  exactly 2× or 4× the camera size in both axes (super-resolution frames with a list in physical pixels) gets
  every defect scaled up by that factor;
- a **MotionCor2 defect file** (text, one rectangle ``x y width height`` per line, x = column and y = row of
  its first pixel), as RELION's ``--defect_file`` takes it.

Coordinates are columns (x) and rows (y) of the frames as cryolive reads them. A list made for frames stored
in another orientation must be turned first (e.g. into a map image with IMOD's ``clip defectmap``); the
gain's rotation/flip options do not apply to it (as in RELION).

Examples::

    mask = read_defect_map("defects.txt", frame_shape=(4096, 4096))   # SerialEM list or x y w h rectangles
    mask = read_defect_map("defect_map.tif", frame_shape=(4096, 4096))
    int(mask.sum())                                                    # bad pixels
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .movies import MovieError, _sniff_image_format, read_image_2d

#: keywords of a SerialEM defect list (CorDefParseDefects in IMOD/SerialEM reads these)
SERIALEM_KEYWORDS = ("CameraSizeX", "CameraSizeY", "RotationAndFlip", "WasScaled", "K2Type", "FalconType",
                     "NumToAvgSuperRes", "UsableArea", "PartialBadColumn", "PartialBadRow", "BadPixels",
                     "BadColumns", "BadRows")


def read_defect_map(path: str | os.PathLike, frame_shape: tuple[int, int]) -> np.ndarray:
    """Bad pixels of frames ``frame_shape (h, w)`` from a defect map image or a defect list → bool ``(h, w)``.

    See the module docstring for the formats. Raises :class:`MovieError` (permanent) with the reason if the file
    is missing, unreadable, of an unknown form, has a malformed line (its number is given), or is an image of
    another shape than the frames.
    """
    path = Path(path)
    h, w = (int(s) for s in frame_shape)
    if not path.is_file():
        raise MovieError(f"defect file {path}: no such file")
    try:
        kind = _sniff_image_format(path)  # "tiff", "mrc" or None (text)
    except OSError as exc:
        raise MovieError(f"defect file {path.name}: unreadable: {exc}") from exc
    if kind is not None:
        return _read_defect_image(path, kind, (h, w))
    try:
        text = path.read_text(encoding="utf-8", errors="strict")
    except (OSError, UnicodeDecodeError) as exc:
        raise MovieError(f"defect file {path.name}: neither an MRC/TIFF defect map nor a text defect list "
                         f"({exc})") from exc
    lines = [(i + 1, line.split("#", 1)[0].split()) for i, line in enumerate(text.splitlines())]
    lines = [(n, words) for n, words in lines if words]
    if not lines:
        raise MovieError(f"defect file {path.name}: empty (no defect listed)")
    if any(words[0] in SERIALEM_KEYWORDS for _, words in lines):
        return _serialem_mask(path.name, lines, (h, w))
    return _rectangles_mask(path.name, lines, (h, w))


def _read_defect_image(path: Path, kind: str, shape: tuple[int, int]) -> np.ndarray:
    img = read_image_2d(path, "defect map", kind)
    if tuple(img.shape) != tuple(shape):
        raise MovieError(f"defect map {path.name}: shape {img.shape[0]}×{img.shape[1]} differs from the movie "
                         f"frames {shape[0]}×{shape[1]}")
    return np.ascontiguousarray(img != 0)


def _ints(name: str, n: int, words: list[str], at_least: int = 1) -> list[int]:
    try:
        values = [int(float(v)) for v in words[1:]]
    except ValueError:
        raise MovieError(f"defect file {name}: line {n}: {words[0]} needs integers, got {' '.join(words[1:])!r}")
    if len(values) < at_least:
        raise MovieError(f"defect file {name}: line {n}: {words[0]} needs at least {at_least} values, "
                         f"got {len(values)}")
    return values


def _serialem_mask(name: str, lines, shape: tuple[int, int]) -> np.ndarray:
    """Rasterise a SerialEM defect list (module docstring) onto frames of ``shape``."""
    h, w = shape
    entries: dict[str, list] = {}
    cam = [None, None]
    was_scaled = 0
    for n, words in lines:
        key = words[0]
        if key == "CameraSizeX":
            cam[1] = _ints(name, n, words)[0]
        elif key == "CameraSizeY":
            cam[0] = _ints(name, n, words)[0]
        elif key == "WasScaled":
            was_scaled = _ints(name, n, words)[0]
        elif key in ("BadColumns", "BadRows"):
            entries.setdefault(key, []).extend(_ints(name, n, words))
        elif key == "BadPixels":
            v = _ints(name, n, words, at_least=2)
            if len(v) % 2:
                raise MovieError(f"defect file {name}: line {n}: BadPixels needs x y pairs, got {len(v)} values")
            entries.setdefault(key, []).extend(zip(v[0::2], v[1::2]))
        elif key in ("PartialBadColumn", "PartialBadRow", "UsableArea"):
            v = _ints(name, n, words, at_least=4)
            entries.setdefault(key, []).append(tuple(v[:4]))
        elif key not in SERIALEM_KEYWORDS:
            raise MovieError(f"defect file {name}: line {n}: unknown SerialEM defect keyword {key!r}")
    cam_h = cam[0] if cam[0] else h
    cam_w = cam[1] if cam[1] else w
    # super-resolution frames with a list in physical pixels: scale every defect up
    scale = 1
    for f in (2, 4):
        if (h, w) == (cam_h * f, cam_w * f):
            scale, cam_h, cam_w = f, cam_h * f, cam_w * f
    oy, ox = (h - cam_h) // 2, (w - cam_w) // 2  # the frame is centred on the camera
    pix = scale * ((4 if was_scaled > 1 else 2) if was_scaled > 0 else 1)  # side of one listed bad pixel
    mask = np.zeros((h, w), dtype=bool)

    def rows(a: int, b: int) -> slice:  # camera rows a..b-1 → frame slice (clipped)
        return slice(max(0, a + oy), max(0, min(h, b + oy)))

    def cols(a: int, b: int) -> slice:
        return slice(max(0, a + ox), max(0, min(w, b + ox)))

    for c in entries.get("BadColumns", []):
        mask[:, cols(c * scale, (c + 1) * scale)] = True
    for r in entries.get("BadRows", []):
        mask[rows(r * scale, (r + 1) * scale), :] = True
    for x, width, y0, y1 in entries.get("PartialBadColumn", []):
        mask[rows(y0 * scale, (y1 + 1) * scale), cols(x * scale, (x + width) * scale)] = True
    for y, height, x0, x1 in entries.get("PartialBadRow", []):
        mask[rows(y * scale, (y + height) * scale), cols(x0 * scale, (x1 + 1) * scale)] = True
    for x, y in entries.get("BadPixels", []):
        mask[rows(y * scale, y * scale + pix), cols(x * scale, x * scale + pix)] = True
    for top, left, bottom, right in entries.get("UsableArea", []):
        if left > 0:
            mask[:, cols(-w, left * scale)] = True
        if right > 0:
            mask[:, cols((right + 1) * scale, 2 * w)] = True
        if top > 0:
            mask[rows(-h, top * scale), :] = True
        if bottom > 0:
            mask[rows((bottom + 1) * scale, 2 * h), :] = True
    return mask


def _rectangles_mask(name: str, lines, shape: tuple[int, int]) -> np.ndarray:
    """MotionCor2's defect file: one ``x y width height`` rectangle per line (clipped to the frame)."""
    h, w = shape
    mask = np.zeros((h, w), dtype=bool)
    for n, words in lines:
        try:
            x, y, dx, dy = (int(float(v)) for v in words)
        except ValueError:
            raise MovieError(f"defect file {name}: line {n}: expected 'x y width height' (MotionCor2 defect file) "
                             f"or a SerialEM keyword, got {' '.join(words)!r}") from None
        if dx <= 0 or dy <= 0:
            continue
        mask[max(0, y):max(0, min(h, y + dy)), max(0, x):max(0, min(w, x + dx))] = True
    return mask
