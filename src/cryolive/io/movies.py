"""Open cryo-EM movies lazily (MRC/MRCS, TIFF incl. LZW, EER), check them, and read gain references.

Counts may be 4-bit (SerialEM: MRC mode 101 with two pixels per byte, the left one in the low nibble and each
row padded to a whole byte; TIFF with BitsPerSample 4), 8-bit, 16-bit or float; all are read as float32.

A movie is a stack of frames ``(t, h, w)``, row 0 first, as mrcfile and tifffile return them.
Every problem with a file is raised as :class:`MovieError` with a reason a person can act on; its
``transient`` flag says whether the file may still be being written (retry later) or is bad for good.

Examples::

    movie = open_movie("movies/mic_0001.tif")
    movie.shape                      # (t, h, w)
    first = movie.read_frames(0, 4)  # float32 (4, h, w)
    validate_movie("movies/mic_0001.tif", expected_frame_shape=(4096, 4096))
    gain = read_gain("gain.mrc", flip_y=False, rotate=0, movie_shape=movie.shape[1:])
    eer = open_movie("movies/FoilHole_1_fractions.eer", eer=EerOptions(dose_per_fraction=1.0, total_dose=40.0))
    eer.shape                        # (fractions, 4096, 4096); read_frames sums raw frames per fraction

EER movies (see :mod:`cryolive.io.eer`) are read as dose fractions: :class:`EerOptions` says how many raw
frames make a fraction, the sampling (1×, 2× or 4× with the sub-pixel bits) and an optional Fourier binning.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import eer as _eer

MRC_SUFFIXES = (".mrc", ".mrcs")
#: MRC mode of SerialEM's/IMOD's packed 4-bit counts (two pixels per byte, the left one in the low nibble)
PACKED_4BIT_MODE = 101
TIFF_SUFFIXES = (".tif", ".tiff")
EER_SUFFIXES = (".eer",)


class MovieError(Exception):
    """A movie (or gain reference) cannot be used; the message says why.

    ``transient=True`` means the file may still be growing (retry later); ``False`` means it is bad for good.
    """

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class MovieFormatNotSupported(MovieError, NotImplementedError):
    """The movie format is recognised but cannot be read (e.g. an EER variant with another bit layout)."""


@dataclass(frozen=True)
class EerOptions:
    """How to turn an EER file's raw frames into fractions.

    ``fraction_frames``: raw frames per fraction; if None, computed from ``dose_per_fraction`` and
    ``total_dose`` (e/Å², the whole exposure) when both are given, else about 40 fractions.
    ``upsampling``: 1 (physical pixels), 2 or 4 (super-resolution from the sub-pixel bits); ``bin_factor``:
    Fourier-crop the rendered fractions by this factor. ``threads``: decoding threads (None: CPUs, ≤ 8).
    """

    fraction_frames: int | None = None
    dose_per_fraction: float | None = None
    total_dose: float | None = None
    upsampling: int = 1
    bin_factor: int = 1
    threads: int | None = None

    def frames_per_fraction(self, n_raw_frames: int) -> int:
        if self.fraction_frames is not None:
            if self.fraction_frames < 1:
                raise MovieError(f"EER fraction size must be ≥ 1 raw frame, got {self.fraction_frames}")
            return int(self.fraction_frames)
        if self.dose_per_fraction is not None and self.total_dose is not None:
            return _eer.fraction_frames_for_dose(n_raw_frames, self.total_dose, self.dose_per_fraction)
        return _eer.default_fraction_frames(n_raw_frames)


def _fmt_shape(shape) -> str:
    return "×".join(str(int(s)) for s in shape)


def _movie_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(MRC_SUFFIXES):
        return "mrc"
    if name.endswith(TIFF_SUFFIXES):
        return "tiff"
    if name.endswith(EER_SUFFIXES):
        return "eer"
    raise MovieError(f"{path.name}: unknown movie format (expected .mrc, .mrcs, .tif, .tiff or .eer)")


# ----------------------------------------------------------------------------------------------- MRC
def _mrc_header(path: Path):
    """Header of an MRC file as (nx, ny, nz, dtype, extended header bytes, mode); raise MovieError if unreadable."""
    import warnings

    import mrcfile
    from mrcfile.utils import data_dtype_from_header

    size = path.stat().st_size
    if size < 1024:
        raise MovieError(f"{path.name}: truncated: file has {size} bytes, less than an MRC header (1024 bytes)",
                         transient=True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                h = m.header
                nx, ny, nz = int(h.nx), int(h.ny), int(h.nz)
                ext = int(h.nsymbt)
                mode = int(h.mode)
                try:
                    # mode 101 (IMOD/SerialEM): 4-bit counts packed two per byte, read by _read_packed_4bit_mrc
                    dtype = np.uint8 if mode == PACKED_4BIT_MODE else data_dtype_from_header(h)
                except ValueError as exc:
                    raise MovieError(f"{path.name}: unsupported MRC mode {mode}: {exc}") from exc
    except MovieError:
        raise
    except Exception as exc:  # mrcfile raises a variety of errors on garbage headers
        raise MovieError(f"{path.name}: unreadable MRC header: {exc}") from exc
    if nx <= 0 or ny <= 0 or nz <= 0:
        raise MovieError(f"{path.name}: corrupt MRC header: dimensions {nx}×{ny}×{nz}")
    return nx, ny, nz, np.dtype(dtype), ext, mode


def _validate_mrc(path: Path):
    nx, ny, nz, dtype, ext, mode = _mrc_header(path)
    data_bytes = nx * ny * nz * dtype.itemsize
    what = dtype.name
    if mode == PACKED_4BIT_MODE:  # two pixels per byte, each row padded to a whole byte
        data_bytes, what = nz * ny * ((nx + 1) // 2), "4-bit (mode 101)"
    expected = 1024 + ext + data_bytes
    size = path.stat().st_size
    if size < expected:
        raise MovieError(
            f"{path.name}: truncated: header says {nz} frames of {nx}×{ny} {what} = {data_bytes} bytes "
            f"(+1024 header +{ext} extended header = {expected} bytes), file has {size} bytes",
            transient=True,
        )
    if size > expected:
        raise MovieError(
            f"{path.name}: header says {nz} frames of {nx}×{ny} {what} = {expected} bytes in all, "
            f"but the file has {size} bytes (extra data after the frames)"
        )
    return (nz, ny, nx), dtype


def unpack_4bit(packed: np.ndarray, width: int, low_nibble_first: bool = True) -> np.ndarray:
    """Counts of 4-bit pixels packed two per byte → float32 ``(..., width)``.

    ``packed (..., ceil(width / 2))`` uint8 rows (each row starts on a byte; an odd width leaves the last
    nibble unused). ``low_nibble_first``: the left pixel of a pair is in the low 4 bits (MRC mode 101, as
    IMOD and SerialEM write it); False: in the high 4 bits (TIFF with BitsPerSample 4).
    """
    packed = np.asarray(packed, dtype=np.uint8)
    row_bytes = packed.shape[-1]
    if row_bytes != (width + 1) // 2:
        raise ValueError(f"{row_bytes} bytes per row cannot hold {width} 4-bit pixels "
                         f"(expected {(width + 1) // 2})")
    first, second = (packed & 0x0F, packed >> 4) if low_nibble_first else (packed >> 4, packed & 0x0F)
    out = np.empty((*packed.shape[:-1], width), dtype=np.float32)
    out[..., 0::2] = first[..., : (width + 1) // 2]
    out[..., 1::2] = second[..., : width // 2]
    return out


def _read_packed_4bit_mrc(path: Path, shape: tuple[int, int, int], start: int, stop: int) -> np.ndarray:
    """Frames ``start..stop-1`` of a mode-101 MRC as float32 ``(n, h, w)`` (rows padded to whole bytes)."""
    nz, ny, nx = shape
    ext = _mrc_header(path)[4]
    row_bytes = (nx + 1) // 2
    try:
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=1024 + ext, shape=(nz, ny, row_bytes))
    except ValueError as exc:  # the file is shorter than the header says
        raise MovieError(f"{path.name}: truncated 4-bit MRC: {exc}", transient=True) from exc
    try:
        return unpack_4bit(raw[start:stop], nx, low_nibble_first=True)
    finally:
        del raw


# ---------------------------------------------------------------------------------------------- TIFF
def _tiff_pages(path: Path):
    """Open a TIFF and list its pages' shapes; raise MovieError if the page chain is unreadable."""
    import tifffile

    try:
        tif = tifffile.TiffFile(path)
    except Exception as exc:
        raise MovieError(f"{path.name}: unreadable TIFF: {exc}", transient=True) from exc
    try:
        pages = list(tif.pages)
    except Exception as exc:
        tif.close()
        raise MovieError(f"{path.name}: truncated or corrupt TIFF page list: {exc}", transient=True) from exc
    if not pages:
        tif.close()
        raise MovieError(f"{path.name}: TIFF has no pages", transient=True)
    nxt = _next_ifd_offset(tif, pages[-1])
    if nxt is not None and nxt != 0:  # the page chain points past the end of the file: still being written
        tif.close()
        raise MovieError(f"{path.name}: truncated: TIFF page {len(pages)} links to a next page at byte {nxt} "
                         f"that cannot be read (the file has {path.stat().st_size} bytes)", transient=True)
    return tif, pages


def _next_ifd_offset(tif, page) -> int | None:
    """The offset of the page after ``page`` as its IFD stores it (0: last page), or None if unreadable."""
    import struct

    t = tif.tiff
    try:
        fh = tif.filehandle
        fh.seek(int(page.offset))
        n = struct.unpack(t.tagnoformat, fh.read(t.tagnosize))[0]
        fh.seek(int(page.offset) + t.tagnosize + n * t.tagsize)
        raw = fh.read(t.offsetsize)
        return struct.unpack(t.offsetformat, raw)[0] if len(raw) == t.offsetsize else None
    except Exception:
        return None


def _validate_tiff(path: Path, decode: bool = True):
    size = path.stat().st_size
    tif, pages = _tiff_pages(path)
    try:
        first = pages[0]
        shape0 = tuple(first.shape)
        if len(shape0) != 2:
            raise MovieError(f"{path.name}: TIFF page 1 has shape {shape0}; expected one 2D frame per page")
        for i, page in enumerate(pages):
            if tuple(page.shape) != shape0:
                raise MovieError(
                    f"{path.name}: TIFF page {i + 1} has frame size {_fmt_shape(page.shape)}, "
                    f"page 1 has {_fmt_shape(shape0)}"
                )
            ends = [int(o) + int(c) for o, c in zip(page.dataoffsets, page.databytecounts)]
            if ends and max(ends) > size:
                raise MovieError(
                    f"{path.name}: truncated: TIFF page {i + 1} data ends at byte {max(ends)}, file has {size} bytes",
                    transient=True,
                )
            if decode:
                try:
                    arr = page.asarray()
                except Exception as exc:
                    raise MovieError(f"{path.name}: corrupt TIFF page {i + 1}: {exc}") from exc
                if tuple(arr.shape) != shape0:
                    raise MovieError(f"{path.name}: corrupt TIFF page {i + 1}: decoded shape {arr.shape}")
        return (len(pages), *shape0), np.dtype(first.dtype)
    finally:
        tif.close()


# ---------------------------------------------------------------------------------------------- Movie
def _decode_threads(requested: int | None) -> int:
    """Decoding threads: ``requested``, or the CPUs this process may use (at most 8)."""
    if requested is not None:
        return max(1, int(requested))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


class Movie:
    """A movie opened lazily: frames are read from disk only when asked for.

    Attributes: ``path``, ``shape`` ``(t, h, w)``, ``dtype`` (as stored), ``format`` ("mrc", "tiff" or "eer").
    """

    #: threads that decode TIFF pages (None: the CPUs this process may use, at most 8)
    threads: int | None = None

    def __init__(self, path: Path, fmt: str, shape: tuple[int, int, int], dtype: np.dtype):
        self.path = path
        self.format = fmt
        self.shape = tuple(int(s) for s in shape)
        self.dtype = dtype

    @property
    def n_frames(self) -> int:
        return self.shape[0]

    def read_frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start..stop-1`` as a new float32 array ``(stop - start, h, w)``."""
        t = self.shape[0]
        stop = t if stop is None else min(int(stop), t)
        start = max(0, int(start))
        if stop <= start:
            return np.zeros((0, *self.shape[1:]), dtype=np.float32)
        if self.format == "mrc":
            import warnings

            import mrcfile

            if self._packed_4bit():
                return _read_packed_4bit_mrc(self.path, self.shape, start, stop)

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.mmap(self.path, mode="r", permissive=True) as m:
                    data = m.data
                    if data is None:
                        raise MovieError(f"{self.path.name}: MRC data could not be mapped (truncated?)")
                    if data.ndim == 2:
                        data = data[None]
                    return np.array(data[start:stop], dtype=np.float32)
        out = np.empty((stop - start, *self.shape[1:]), dtype=np.float32)
        n_workers = max(1, min(stop - start, _decode_threads(self.threads)))
        if n_workers == 1:
            self._read_tiff_pages(out, start, start, stop)
            return out
        # pages decoded on several threads (imagecodecs releases the GIL while decompressing); each thread has
        # its own file handle and a contiguous run of pages, written straight into the float32 output
        from concurrent.futures import ThreadPoolExecutor

        bounds = np.linspace(start, stop, n_workers + 1).round().astype(int)
        with ThreadPoolExecutor(n_workers) as pool:
            jobs = [pool.submit(self._read_tiff_pages, out, start, int(a), int(b))
                    for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
            for job in jobs:
                job.result()
        return out

    def _packed_4bit(self) -> bool:
        """Whether this MRC movie holds 4-bit counts (mode 101); read from the header once."""
        if getattr(self, "_mrc_mode", None) is None:
            self._mrc_mode = _mrc_header(self.path)[5]
        return self._mrc_mode == PACKED_4BIT_MODE

    def _read_tiff_pages(self, out: np.ndarray, offset: int, a: int, b: int) -> None:
        """Decode TIFF pages ``a..b-1`` into ``out[a - offset : b - offset]``."""
        import tifffile

        with tifffile.TiffFile(self.path) as tif:
            for i in range(a, b):
                try:
                    out[i - offset] = tif.pages[i].asarray(maxworkers=1)
                except Exception as exc:
                    raise MovieError(f"{self.path.name}: corrupt TIFF page {i + 1}: {exc}") from exc

    def read_all(self) -> np.ndarray:
        """All frames as float32 ``(t, h, w)``."""
        return self.read_frames(0, self.shape[0])

    def iter_chunks(self, chunk: int = 4, prefetch: int = 2):
        """Yield ``(start, frames float32 (n, h, w))`` for consecutive runs of ``chunk`` frames, decoding ahead
        on a background thread (at most ``prefetch`` chunks decoded but not yet taken), so that the caller's
        work on one chunk overlaps the decoding of the next ones in bounded memory."""
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        t = self.shape[0]
        starts = iter(range(0, t, max(1, int(chunk))))
        with ThreadPoolExecutor(1) as pool:
            pending: deque = deque()

            def submit() -> None:
                s = next(starts, None)
                if s is not None:
                    pending.append((s, pool.submit(self.read_frames, s, min(s + chunk, t))))

            for _ in range(max(1, int(prefetch))):
                submit()
            while pending:
                s, job = pending.popleft()
                arr = job.result()
                submit()
                yield s, arr

    def __repr__(self) -> str:
        return f"Movie({self.path.name!r}, format={self.format}, shape={self.shape}, dtype={self.dtype})"


class EerMovie(Movie):
    """An EER movie seen as fractions: ``shape`` is ``(fractions, h·u/b, w·u/b)``; frames are event counts.

    ``layout`` (:class:`cryolive.io.eer.EerLayout`), ``options`` (:class:`EerOptions`), ``fraction_frames``
    (raw frames per fraction; ``n_raw_frames % fraction_frames`` trailing raw frames are not used).
    """

    def __init__(self, layout: _eer.EerLayout, options: EerOptions):
        self.layout = layout
        self.options = options
        self.fraction_frames = options.frames_per_fraction(layout.n_raw_frames)
        h, w = layout.frame_shape
        u, b = int(options.upsampling), int(options.bin_factor)
        n = layout.n_raw_frames // self.fraction_frames
        dtype = np.dtype(np.uint16) if b == 1 else np.dtype(np.float32)
        super().__init__(layout.path, "eer", (n, h * u // b, w * u // b), dtype)

    @property
    def n_raw_frames(self) -> int:
        return self.layout.n_raw_frames

    def read_frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Fractions ``start..stop-1`` as float32 ``(n, h, w)``, decoded raw frame by raw frame."""
        stop = self.shape[0] if stop is None else stop
        try:
            return _eer.read_eer_fractions(self.layout, int(start), int(stop), self.fraction_frames,
                                           upsampling=self.options.upsampling, bin_factor=self.options.bin_factor,
                                           threads=self.options.threads)
        except _eer.EerError as exc:
            raise MovieError(str(exc), transient=exc.transient) from exc
        except ValueError as exc:
            raise MovieError(f"{self.path.name}: {exc}") from exc


def _open_eer(path: Path, options: EerOptions | None, decode: bool = False) -> EerMovie:
    try:
        layout = _eer.EerLayout.read(path)
        movie = EerMovie(layout, options or EerOptions())
        if movie.shape[0] == 0:
            raise MovieError(f"{path.name}: {layout.n_raw_frames} raw frames do not fill one fraction of "
                             f"{movie.fraction_frames}")
        if decode:
            _eer.validate_eer(layout, threads=movie.options.threads)
    except _eer.EerError as exc:
        raise MovieError(str(exc), transient=exc.transient) from exc
    except ImportError as exc:
        raise MovieFormatNotSupported(f"{path.name}: EER needs imagecodecs with its EER decoder: {exc}") from exc
    return movie


def open_movie(path: str | os.PathLike, eer: EerOptions | None = None) -> Movie:
    """Open a movie lazily from its header (no frame data read); ``eer``: how EER raw frames become fractions."""
    path = Path(path)
    if not path.is_file():
        raise MovieError(f"{path}: no such file", transient=True)
    kind = _movie_kind(path)
    if kind == "eer":
        return _open_eer(path, eer)
    if kind == "mrc":
        nx, ny, nz, dtype, _, _ = _mrc_header(path)
        return Movie(path, "mrc", (nz, ny, nx), dtype)
    tif, pages = _tiff_pages(path)
    try:
        shape = (len(pages), *tuple(pages[0].shape))
        dtype = np.dtype(pages[0].dtype)
    finally:
        tif.close()
    if len(shape) != 3:
        raise MovieError(f"{path.name}: TIFF pages are not 2D frames (page shape {shape[1:]})")
    return Movie(path, "tiff", shape, dtype)


def validate_movie(path: str | os.PathLike, expected_frame_shape: tuple[int, int] | None = None,
                   decode: bool = True, eer: EerOptions | None = None) -> Movie:
    """Check that a movie is complete and consistent, and return it opened.

    MRC: the header's dimensions × data type size + extended header + 1024 must equal the file size.
    TIFF: every page must have the same 2D shape, its data must lie inside the file and (``decode=True``)
    decode without error. EER: every raw frame has the same size and EER compression, its bytes lie inside
    the file and (``decode=True``) decode without error; ``eer`` says how raw frames become fractions.
    ``expected_frame_shape`` ``(h, w)``: the session's frame size (of the fractions for EER), if known.

    Raises :class:`MovieError` with the reason (``transient=True`` when the file looks incomplete).
    """
    path = Path(path)
    if not path.is_file():
        raise MovieError(f"{path}: no such file", transient=True)
    kind = _movie_kind(path)
    if kind == "eer":
        movie = _open_eer(path, eer, decode=decode)
        shape = movie.shape
    elif kind == "mrc":
        shape, dtype = _validate_mrc(path)
    else:
        shape, dtype = _validate_tiff(path, decode=decode)
    if expected_frame_shape is not None and tuple(shape[1:]) != tuple(expected_frame_shape):
        raise MovieError(
            f"{path.name}: frame size {_fmt_shape(shape[1:])} differs from the session's "
            f"{_fmt_shape(expected_frame_shape)}"
        )
    if kind == "eer":
        return movie
    return Movie(path, kind, shape, dtype)


# ---------------------------------------------------------------------------------------------- gain
def _sniff_image_format(path: Path) -> str | None:
    """"tiff" or "mrc" from a file's first bytes (TIFF/BigTIFF byte-order marks; an MRC header whose
    dimensions and mode are sane, with "MAP " at byte 208 or an .mrc/.mrcs name), else None."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+"):
        return "tiff"
    if len(head) == 1024:
        for order in ("<", ">"):
            nx, ny, nz, mode = np.frombuffer(head[:16], dtype=f"{order}i4")
            if 0 < nx <= 65536 and 0 < ny <= 65536 and 0 < nz <= 1_000_000 and mode in (0, 1, 2, 4, 6, 12, 101):
                if head[208:212] == b"MAP " or path.name.lower().endswith(MRC_SUFFIXES):
                    return "mrc"
    return None


def read_image_2d(path: Path, what: str, kind: str) -> np.ndarray:
    """The first 2D image of an MRC (``kind="mrc"``) or TIFF (``"tiff"``) file as stored (dtype kept), ``(h, w)``.

    ``what`` names the file in errors ("gain reference", "defect map"). Raises :class:`MovieError` when it is
    unreadable, truncated or not a single 2D image.
    """
    try:
        if kind == "mrc":
            import warnings

            import mrcfile

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with mrcfile.open(path, mode="r", permissive=True) as m:
                    if m.data is None:
                        raise MovieError(f"{what} {path.name}: MRC has no readable data (truncated?)")
                    img = np.array(m.data)
        else:
            import tifffile

            img = np.asarray(tifffile.imread(path, key=0))
    except MovieError:
        raise
    except Exception as exc:
        raise MovieError(f"{what} {path.name}: unreadable: {exc}") from exc
    if img.ndim == 3 and img.shape[0] == 1:
        img = img[0]
    if img.ndim != 2:
        raise MovieError(f"{what} {path.name}: expected one 2D image, got shape {img.shape}")
    return img


def read_gain(path: str | os.PathLike, flip_y: bool = False, rotate: int = 0,
              movie_shape: tuple[int, int] | None = None, zero_is_defect: bool | None = None) -> np.ndarray:
    """Read a multiplicative gain reference (``corrected = raw × gain``) from MRC or TIFF → float32 ``(h, w)``.

    The format is recognised from the content, whatever the suffix: TIFF by its byte-order mark, MRC by its
    header. Falcon's EER gain reference as EPU writes it (``*.gain``) is a TIFF holding the multiplicative gain
    in the EER frames' orientation, with 0 marking defective pixels; it is read as it is (RELION's
    ``EERRenderer::loadEERGain`` treats ``.gain`` files the same way: used as a multiplicative gain, no
    inversion, pixels at 0 are defects).

    ``rotate``: counter-clockwise rotation in degrees (multiple of 90), applied first; ``flip_y``: then flip
    the rows (RELION flips TIFF movies in Y on reading; make that explicit here). ``movie_shape`` ``(h, w)``:
    if given, the gain must have that shape. ``zero_is_defect``: accept zeros as defective pixels (they stay 0
    in the result; find them with ``gain == 0`` and correct them as defects); None: only for ``.gain`` files.
    Raises :class:`MovieError` if unreadable or of an unknown format, if any value is negative or not finite,
    zero (unless defects), or if the shape does not match.
    """
    path = Path(path)
    if not path.is_file():
        raise MovieError(f"gain reference {path}: no such file")
    name = path.name.lower()
    if zero_is_defect is None:
        zero_is_defect = name.endswith(".gain")
    try:
        kind = _sniff_image_format(path)
    except OSError as exc:
        raise MovieError(f"gain reference {path.name}: unreadable: {exc}") from exc
    if kind is None:
        raise MovieError(f"gain reference {path.name}: unknown format: neither TIFF (no II*/MM* byte-order "
                         "mark) nor MRC (no valid header); expected an MRC or TIFF image (EPU's .gain is a TIFF)")
    gain = read_image_2d(path, "gain reference", kind).astype(np.float32, copy=False)
    if rotate % 90 != 0:
        raise MovieError(f"gain rotation must be a multiple of 90 degrees, got {rotate}")
    k = (int(rotate) // 90) % 4
    if k:
        gain = np.rot90(gain, k)
    if flip_y:
        gain = gain[::-1]
    gain = np.ascontiguousarray(gain, dtype=np.float32)
    bad = ~np.isfinite(gain)
    if bad.any():
        raise MovieError(f"gain reference {path.name}: {int(bad.sum())} values are NaN or infinite")
    nonpos = (gain < 0) if zero_is_defect else (gain <= 0)
    if nonpos.any():
        what = "negative" if zero_is_defect else "zero or negative"
        raise MovieError(f"gain reference {path.name}: {int(nonpos.sum())} values are {what} "
                         "(a multiplicative gain must be positive everywhere"
                         + (", or 0 at defects)" if zero_is_defect else ")"))
    if zero_is_defect and not (gain > 0).any():
        raise MovieError(f"gain reference {path.name}: every value is 0")
    if movie_shape is not None and tuple(gain.shape) != tuple(movie_shape):
        raise MovieError(f"gain reference {path.name}: shape {_fmt_shape(gain.shape)} differs from the movie "
                         f"frames {_fmt_shape(movie_shape)}")
    return gain
