"""Write EER (electron-event representation) files, for tests and simulated Falcon data.

An EER file is a TIFF with one page per raw detector frame. Each page holds one strip: a little-endian bit
stream (bits read from the least significant bit of each byte) of codes. A code is a run length of
``rle_bits`` bits (7 for compression 65001, 8 for 65000): the number of pixels without an event before the
next event. The all-ones value (127 or 255) means "skip that many pixels, no event" and is followed
directly by the next run length. Any other run length is followed by 4 sub-pixel bits (2 horizontal in the
low bits, 2 vertical above) and marks one event; the pixel position then advances past that pixel. The
sub-pixel bits are stored XOR 2, i.e. stored ``s`` means sub-pixel ``s ^ 2`` on the 4× grid. The stream ends
with a code whose run reaches the last pixel; its byte count is padded to an even number.

At most one event per pixel per raw frame (a counting detector at ~250-1000 raw frames per second).

Examples::

    rng = np.random.default_rng(0)
    frames = [(rng.random((64, 64)) < 0.02, rng.integers(0, 16, (64, 64))) for _ in range(10)]
    write_eer("movie.eer", frames)          # compression 65001 (7-bit runs + 4 sub-pixel bits)
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable

import numpy as np

EER_RLE_BITS = {65000: 8, 65001: 7, 65002: 7}


def encode_eer_frame(events: np.ndarray, subpixel: np.ndarray | None = None, rle_bits: int = 7) -> bytes:
    """Encode one raw frame ``events (h, w)`` (0 or 1 per pixel) into an EER bit stream.

    ``subpixel (h, w)``: the event's position on the 4×4 sub-pixel grid, ``4 * sub_y + sub_x`` (0..15); None
    puts every event at sub-pixel (y, x) = (2, 2), just past the pixel centre. Returns the strip bytes (even length).
    """
    events = np.asarray(events)
    if events.ndim != 2:
        raise ValueError(f"events must be 2D, got shape {events.shape}")
    if events.size and (events.min() < 0 or events.max() > 1):
        raise ValueError("an EER raw frame holds at most one event per pixel (values 0 or 1)")
    npix = events.size
    pos = np.flatnonzero(events.ravel()).astype(np.int64)  # sorted event pixels
    if subpixel is None:
        stored = np.zeros(len(pos), dtype=np.int64)
    else:
        sub = np.asarray(subpixel).ravel()[pos].astype(np.int64)
        if sub.size and (sub.min() < 0 or sub.max() > 15):
            raise ValueError("sub-pixel codes must lie in 0..15")
        sy, sx = sub >> 2, sub & 3
        stored = ((sy ^ 2) << 2) | (sx ^ 2)
    skip = (1 << rle_bits) - 1
    # gaps before each event, and the final gap up to the end of the frame (closed by a code with sub 0)
    prev_end = np.concatenate([[0], pos + 1])
    gaps = np.concatenate([pos, [npix]]) - prev_end
    stored = np.concatenate([stored, [0]])
    n_skip = gaps // skip
    runs = gaps % skip
    counts = n_skip + 1
    n_codes = int(counts.sum())
    values = np.full(n_codes, skip, dtype=np.int64)
    widths = np.full(n_codes, rle_bits, dtype=np.int64)
    last = np.cumsum(counts) - 1
    values[last] = runs | (stored << rle_bits)
    widths[last] = rle_bits + 4
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    total = int(widths.sum())
    total += (-total) % 16  # even number of bytes
    k = np.arange(rle_bits + 4)
    bit = (values[:, None] >> k) & 1
    keep = k[None, :] < widths[:, None]
    bits = np.zeros(total, dtype=np.uint8)
    bits[(starts[:, None] + k)[keep]] = bit[keep]
    return np.packbits(bits, bitorder="little").tobytes()


def _ifd(entries: list[tuple[int, int, int, int]], next_offset: int) -> bytes:
    out = struct.pack("<Q", len(entries))
    for tag, typ, count, value in sorted(entries):
        out += struct.pack("<HHQQ", tag, typ, count, value)
    return out + struct.pack("<Q", next_offset)


def write_eer(path: str | os.PathLike, frames: Iterable[tuple[np.ndarray, np.ndarray | None]],
              compression: int = 65001, metadata: dict | None = None) -> int:
    """Write raw frames ``(events (h, w), subpixel (h, w) or None)`` as an EER TIFF; return the frame count.

    A little-endian BigTIFF, as the Falcon writes (one IFD and one strip per raw frame, 1 bit per sample, the
    EER compression tag). ``metadata`` (name → value) is written on the first page as Falcon's XML (tag 65001,
    ``<metadata><item name="...">value</item>...</metadata>``), which marks the file as EER for tifffile.
    Compression 65002 writes the tags 65007-65009 (7 run-length bits, 2 + 2 sub-pixel bits).
    """
    if compression not in EER_RLE_BITS:
        raise ValueError(f"EER compression must be one of {sorted(EER_RLE_BITS)}, got {compression}")
    rle_bits = EER_RLE_BITS[compression]
    SHORT, LONG = 3, 4
    n = 0
    with open(path, "wb") as f:
        f.write(b"II" + struct.pack("<HHHQ", 43, 8, 0, 0))
        link = 8  # where the offset of the next IFD goes
        for events, subpixel in frames:
            h, w = np.asarray(events).shape
            strip = encode_eer_frame(events, subpixel, rle_bits)
            data_at = f.tell()
            f.write(strip)
            if f.tell() % 2:
                f.write(b"\0")
            meta_entry = []
            if n == 0:
                items = "".join(f'<item name="{k}">{v}</item>' for k, v in (metadata or {}).items())
                xml = f"<metadata>{items}</metadata>".encode()
                meta_entry = [(65001, 7, len(xml), f.tell())]
                f.write(xml + b"\0" * (len(xml) % 2))
            ifd_at = f.tell()
            entries = [(256, LONG, 1, w), (257, LONG, 1, h), (258, SHORT, 1, 1), (259, SHORT, 1, compression),
                       (262, SHORT, 1, 1), (273, LONG, 1, data_at), (277, SHORT, 1, 1), (278, LONG, 1, h),
                       (279, LONG, 1, len(strip)), *meta_entry]
            if compression == 65002:
                entries += [(65007, SHORT, 1, rle_bits), (65008, SHORT, 1, 2), (65009, SHORT, 1, 2)]
            f.write(_ifd(entries, 0))
            end = f.tell()
            f.seek(link)
            f.write(struct.pack("<Q", ifd_at))
            f.seek(end)
            link = ifd_at + 8 + 20 * len(entries)
            n += 1
    return n


def poisson_eer_frames(expected_counts: np.ndarray, n_raw_frames: int, seed: int = 0):
    """Raw EER frames from an expected count image ``(h, w)`` spread evenly over ``n_raw_frames``.

    Yields ``(events (h, w) uint8, subpixel (h, w))``; each raw frame draws at most one event per pixel with
    probability ``expected / n_raw_frames`` (must be < 1), so the sum is ~Poisson for many raw frames.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(expected_counts, dtype=np.float64) / n_raw_frames
    if p.max(initial=0) >= 1:
        raise ValueError("more than one expected event per pixel per raw frame; use more raw frames")
    for _ in range(n_raw_frames):
        events = (rng.random(p.shape) < p).astype(np.uint8)
        yield events, rng.integers(0, 16, p.shape)
