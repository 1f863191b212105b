"""Read EER (Falcon 4/4i electron-event representation) movies as dose fractions.

An EER file is a BigTIFF with one page per raw detector frame (hundreds to thousands per exposure), each a
run-length bit stream of electron events (compression 65000: 8-bit runs, 65001: 7-bit runs, 65002: run and
sub-pixel bit widths in tags 65007-65009; every event carries 2 + 2 sub-pixel bits). A first uncompressed
page, when present, is the integrated image and is skipped. Decoding uses ``imagecodecs.eer_decode`` (the
decoder tifffile uses), which releases the GIL, so raw frames decode on several threads.

Raw frames are grouped into **fractions** of ``fraction_frames`` raw frames each (trailing raw frames that do
not fill a fraction are dropped, as RELION does); a fraction is the sum of its event images, rendered at
``upsampling`` 1 (physical pixels, 4096²), 2 (8192²) or 4 (16384²) using the sub-pixel bits, then optionally
reduced by Fourier cropping by ``bin_factor``. Memory stays bounded: pages are read and decoded a few at a
time, never the whole movie.

Examples::

    eer = EerLayout.read("movie.eer")
    eer.n_raw_frames, eer.frame_shape
    frames = read_eer_fractions(eer, 0, 4, fraction_frames=40, upsampling=2, bin_factor=2)  # (4, 4096, 4096)
    fraction_frames_for_dose(eer.n_raw_frames, total_dose=40.0, dose_per_fraction=1.0)
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

EER_COMPRESSIONS = (65000, 65001, 65002)


class EerError(ValueError):
    """Raised for an EER file that cannot be read; ``transient`` as for ``MovieError``."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class EerLayout:
    """Where the raw frames of an EER file lie: byte ``(offset, count)`` per raw frame, and how to decode them."""

    path: Path
    frame_shape: tuple[int, int]  # physical pixels (h, w)
    strips: tuple[tuple[int, int], ...]  # (offset, byte count) per raw frame
    rle_bits: int
    horz_bits: int
    vert_bits: int
    metadata: dict

    @property
    def n_raw_frames(self) -> int:
        return len(self.strips)

    @classmethod
    def read(cls, path: str | os.PathLike) -> EerLayout:
        """Parse the TIFF page chain (no event data read). Raises :class:`EerError` with the reason."""
        import tifffile

        path = Path(path)
        size = path.stat().st_size
        try:
            tif = tifffile.TiffFile(path)
        except Exception as exc:
            raise EerError(f"{path.name}: unreadable EER (TIFF) header: {exc}", transient=True) from exc
        try:
            try:
                pages = list(tif.pages)
            except Exception as exc:
                raise EerError(f"{path.name}: truncated or corrupt EER page list: {exc}", transient=True) from exc
            if pages and pages[0].compression == 1 and len(pages) > 1:
                pages = pages[1:]  # integrated image
            if not pages:
                raise EerError(f"{path.name}: EER file has no frames", transient=True)
            first = pages[0]
            comp = int(first.compression)
            if comp not in EER_COMPRESSIONS:
                raise EerError(f"{path.name}: page 1 has TIFF compression {comp}, not EER (65000, 65001 or 65002)")
            shape = (int(first.imagelength), int(first.imagewidth))
            rle, horz, vert = {65000: 8, 65001: 7}.get(comp, 7), 2, 2
            if comp == 65002:
                rle = int(first.tags.valueof(65007, 7))
                horz = int(first.tags.valueof(65008, 2))
                vert = int(first.tags.valueof(65009, 2))
            strips = []
            for i, page in enumerate(pages):
                if int(page.compression) != comp:
                    raise EerError(f"{path.name}: raw frame {i + 1} has compression {int(page.compression)}, "
                                   f"frame 1 has {comp}")
                pshape = (int(page.imagelength), int(page.imagewidth))
                if pshape != shape:
                    raise EerError(f"{path.name}: raw frame {i + 1} is {pshape[0]}×{pshape[1]}, "
                                   f"frame 1 is {shape[0]}×{shape[1]}")
                offsets, counts = page.dataoffsets, page.databytecounts
                if len(offsets) != 1:
                    raise EerError(f"{path.name}: raw frame {i + 1} has {len(offsets)} strips; EER has one")
                end = int(offsets[0]) + int(counts[0])
                if end > size:
                    raise EerError(f"{path.name}: truncated: raw frame {i + 1} ends at byte {end}, "
                                   f"file has {size} bytes", transient=True)
                strips.append((int(offsets[0]), int(counts[0])))
            metadata = {}
            try:
                metadata = dict(tif.eer_metadata or {})
            except Exception:
                metadata = {}
        finally:
            tif.close()
        return cls(path, shape, tuple(strips), rle, horz, vert, metadata)


def fraction_frames_for_dose(n_raw_frames: int, total_dose: float, dose_per_fraction: float) -> int:
    """Raw frames per fraction so that each fraction holds about ``dose_per_fraction`` e/Å² (at least 1)."""
    if total_dose <= 0 or dose_per_fraction <= 0:
        raise ValueError("total_dose and dose_per_fraction must be positive")
    return max(1, min(n_raw_frames, int(round(dose_per_fraction * n_raw_frames / total_dose))))


def default_fraction_frames(n_raw_frames: int, n_fractions: int = 40) -> int:
    """Raw frames per fraction when none is given: about ``n_fractions`` fractions."""
    return max(1, n_raw_frames // n_fractions)


def _decode_sum(layout: EerLayout, raw: range, upsampling: int, fd: int) -> np.ndarray:
    """Sum of the event images of raw frames ``raw`` at ``upsampling`` → uint16 ``(h·u, w·u)``."""
    import imagecodecs

    h, w = layout.frame_shape
    superres = {1: 0, 2: 1, 4: 2}[upsampling]
    shape = (h * upsampling, w * upsampling)
    acc = np.zeros(shape, dtype=np.uint16)
    acc8 = np.zeros(shape, dtype=np.uint8)  # uint8 adds move a quarter of the bytes; folded every 255 frames
    buf = np.empty(shape, dtype=bool)
    in_acc8 = 0
    for i in raw:
        offset, count = layout.strips[i]
        data = os.pread(fd, count, offset)
        if len(data) != count:
            raise EerError(f"{layout.path.name}: truncated: raw frame {i + 1} has {len(data)} of {count} bytes",
                           transient=True)
        buf.fill(False)  # eer_decode only sets the pixels with events
        try:
            imagecodecs.eer_decode(data, shape, layout.rle_bits, layout.horz_bits, layout.vert_bits,
                                   superres=superres, out=buf)
        except Exception as exc:
            raise EerError(f"{layout.path.name}: corrupt EER raw frame {i + 1}: {exc}") from exc
        np.add(acc8, buf.view(np.uint8), out=acc8)
        in_acc8 += 1
        if in_acc8 == 255:
            acc += acc8
            acc8.fill(0)
            in_acc8 = 0
    acc += acc8
    return acc


def _fourier_bin(image: np.ndarray, bin_factor: int) -> np.ndarray:
    """Reduce ``image (h, w)`` by ``bin_factor`` by Fourier cropping, keeping counts per output pixel (sums)."""
    h, w = image.shape
    nh, nw = h // bin_factor, w // bin_factor
    ft = np.fft.rfft2(image.astype(np.float32))
    cropped = np.concatenate([ft[: nh // 2, : nw // 2 + 1], ft[h - nh // 2:, : nw // 2 + 1]], axis=0)
    # irfft2 divides by nh·nw; the sum over a bin_factor² block is preserved by scaling 1/(h·w)·(nh·nw)·b²
    return (np.fft.irfft2(cropped, s=(nh, nw)) * (nh * nw) / (h * w) * bin_factor ** 2).astype(np.float32)


def read_eer_fractions(layout: EerLayout, start: int, stop: int, fraction_frames: int, upsampling: int = 1,
                       bin_factor: int = 1, threads: int | None = None) -> np.ndarray:
    """Fractions ``start..stop-1`` as float32 ``(n, h·u/b, w·u/b)`` of event counts.

    Fraction ``k`` sums raw frames ``k·fraction_frames .. (k+1)·fraction_frames - 1``. ``upsampling`` (1, 2
    or 4) renders events on the sub-pixel grid; ``bin_factor`` then Fourier-crops (counts per output pixel
    are preserved: a 2× render binned by 2 has the same mean as the 1× render). ``threads``: decoding
    threads (default: the CPUs this process may use, at most 8).
    """
    if upsampling not in (1, 2, 4):
        raise ValueError(f"EER upsampling must be 1, 2 or 4, got {upsampling}")
    if upsampling > 1 and (layout.horz_bits < 2 or layout.vert_bits < 2):
        raise ValueError("this EER file has fewer than 2 sub-pixel bits; use upsampling 1")
    h, w = layout.frame_shape
    if bin_factor < 1 or (h * upsampling) % (2 * bin_factor) or (w * upsampling) % (2 * bin_factor):
        raise ValueError(f"cannot bin {h * upsampling}×{w * upsampling} by {bin_factor} to an even size")
    if fraction_frames < 1:
        raise ValueError(f"fraction_frames must be ≥ 1, got {fraction_frames}")
    oh, ow = h * upsampling // bin_factor, w * upsampling // bin_factor
    n_frac = layout.n_raw_frames // fraction_frames
    stop = min(stop, n_frac)
    start = max(0, start)
    out = np.zeros((max(0, stop - start), oh, ow), dtype=np.float32)
    threads = _n_threads(threads)
    fd = os.open(layout.path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for j, k in enumerate(range(start, stop)):
                total = _sum_raw_frames(layout, k * fraction_frames, (k + 1) * fraction_frames, upsampling, pool,
                                        threads, fd)
                out[j] = total if bin_factor == 1 else _fourier_bin(total, bin_factor)
    finally:
        os.close(fd)
    return out


def _n_threads(threads: int | None) -> int:
    if threads is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = min(8, n)
    return max(1, int(threads))


def _sum_raw_frames(layout: EerLayout, first: int, stop: int, upsampling: int, pool, threads: int,
                    fd: int) -> np.ndarray:
    """Sum of raw frames ``first..stop-1``: one contiguous chunk per thread, each with its own accumulator."""
    h, w = layout.frame_shape
    bounds = np.linspace(first, stop, min(threads, stop - first) + 1).astype(int)
    parts = pool.map(lambda ab: _decode_sum(layout, range(ab[0], ab[1]), upsampling, fd),
                     list(zip(bounds[:-1], bounds[1:])))
    total = np.zeros((h * upsampling, w * upsampling), dtype=np.float32)
    for part in parts:
        total += part
    return total


def validate_eer(layout: EerLayout, decode: bool = True, threads: int | None = None) -> None:
    """Decode every raw frame once (``decode=True``) and raise :class:`EerError` on the first bad one."""
    if not decode:
        return
    threads = _n_threads(threads)
    chunk = 8 * threads  # bounded memory: one accumulator per thread
    fd = os.open(layout.path, os.O_RDONLY)
    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for first in range(0, layout.n_raw_frames, chunk):
                _sum_raw_frames(layout, first, min(first + chunk, layout.n_raw_frames), 1, pool, threads, fd)
    finally:
        os.close(fd)
