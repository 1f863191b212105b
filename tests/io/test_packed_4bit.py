"""4-bit counts as SerialEM writes them: MRC mode 101 and TIFF with BitsPerSample 4, packed by hand here."""

from __future__ import annotations

import struct

import imagecodecs
import mrcfile
import numpy as np
import pytest

from cryolive.io.movies import MovieError, open_movie, unpack_4bit, validate_movie


def _counts(t, h, w, seed=0):
    """Low-dose counts that use the whole 4-bit range (0..15)."""
    rng = np.random.default_rng(seed)
    c = rng.poisson(1.5, size=(t, h, w))
    c.flat[rng.integers(0, c.size, 20)] = 15
    return np.clip(c, 0, 15).astype(np.uint8)


def _pack(frames, low_first):
    """Two pixels per byte, each row padded to a whole byte; the left pixel in the low (MRC) or high (TIFF) nibble."""
    t, h, w = frames.shape
    padded = np.zeros((t, h, 2 * ((w + 1) // 2)), dtype=np.uint8)
    padded[..., :w] = frames
    left, right = padded[..., 0::2], padded[..., 1::2]
    return (left | (right << 4)) if low_first else ((left << 4) | right)


def _write_mode101(path, frames):
    """An MRC header as mrcfile writes it for (t, h, w) bytes, mode changed to 101, then the packed data."""
    t, h, w = frames.shape
    tmp = path.with_suffix(".tmp.mrc")
    with mrcfile.new(tmp, overwrite=True) as m:
        m.set_data(np.zeros((t, h, w), dtype=np.uint8))
        m.voxel_size = 0.5
    header = bytearray(tmp.read_bytes()[:1024])
    tmp.unlink()
    struct.pack_into("<i", header, 12, 101)
    path.write_bytes(bytes(header) + _pack(frames, low_first=True).tobytes())
    return path


def _write_tiff4(path, frames, lzw):
    """A TIFF of 4-bit pages (BitsPerSample 4, one strip per page, LZW or uncompressed), written tag by tag."""
    t, h, w = frames.shape
    out = bytearray(b"II*\0" + struct.pack("<I", 0))
    next_ifd_at = 4
    for i in range(t):
        data = _pack(frames[i : i + 1], low_first=False)[0].tobytes()
        if lzw:
            data = imagecodecs.lzw_encode(data)
        offset = len(out)
        out += data + (b"\0" if len(data) % 2 else b"")
        tags = [(256, 3, w), (257, 3, h), (258, 3, 4), (259, 3, 5 if lzw else 1), (262, 3, 1), (273, 4, offset),
                (277, 3, 1), (278, 3, h), (279, 4, len(data))]
        struct.pack_into("<I", out, next_ifd_at, len(out))
        out += struct.pack("<H", len(tags))
        for tag, typ, val in tags:
            value = struct.pack("<HH", val, 0) if typ == 3 else struct.pack("<I", val)
            out += struct.pack("<HHI", tag, typ, 1) + value
        next_ifd_at = len(out)
        out += struct.pack("<I", 0)
    path.write_bytes(bytes(out))
    return path


def test_unpack_4bit_both_nibble_orders_and_odd_width():
    frames = _counts(2, 3, 7)
    np.testing.assert_array_equal(unpack_4bit(_pack(frames, True), 7), frames.astype(np.float32))
    np.testing.assert_array_equal(unpack_4bit(_pack(frames, False), 7, low_nibble_first=False), frames)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack_4bit(_pack(frames, True), 9)


@pytest.mark.parametrize("w", [48, 37])
def test_mode101_mrc_reads_exactly(tmp_path, w):
    frames = _counts(5, 20, w, seed=w)
    p = _write_mode101(tmp_path / "m.mrc", frames)
    movie = validate_movie(p, expected_frame_shape=(20, w))
    assert movie.shape == (5, 20, w)
    np.testing.assert_array_equal(movie.read_all(), frames.astype(np.float32))
    np.testing.assert_array_equal(open_movie(p).read_frames(2, 4), frames[2:4].astype(np.float32))
    it = list(open_movie(p).iter_chunks(2))
    np.testing.assert_array_equal(np.concatenate([a for _, a in it]), frames.astype(np.float32))


def test_truncated_or_padded_mode101_is_a_movie_error(tmp_path):
    frames = _counts(6, 16, 33)
    p = _write_mode101(tmp_path / "t.mrc", frames)
    full = p.stat().st_size
    assert full == 1024 + 6 * 16 * 17  # rows padded to whole bytes
    with open(p, "r+b") as f:
        f.truncate(full - 100)
    with pytest.raises(MovieError) as err:
        validate_movie(p)
    assert err.value.transient and "truncated" in str(err.value) and "4-bit (mode 101)" in str(err.value)
    with pytest.raises(MovieError, match="truncated"):
        open_movie(p).read_all()
    with open(p, "ab") as f:
        f.write(b"\0" * 300)
    with pytest.raises(MovieError, match="extra data after the frames"):
        validate_movie(p)


@pytest.mark.parametrize("lzw", [False, True])
@pytest.mark.parametrize("w", [40, 35])
def test_4bit_tiff_reads_exactly(tmp_path, lzw, w):
    frames = _counts(4, 18, w, seed=3)
    p = _write_tiff4(tmp_path / "m.tif", frames, lzw)
    movie = validate_movie(p)
    assert movie.shape == (4, 18, w)
    np.testing.assert_array_equal(movie.read_all(), frames.astype(np.float32))
    np.testing.assert_array_equal(open_movie(p).read_frames(1, 3), frames[1:3].astype(np.float32))


def test_truncated_4bit_tiff_is_a_movie_error(tmp_path):
    frames = _counts(5, 32, 64, seed=4)
    p = _write_tiff4(tmp_path / "t.tif", frames, lzw=True)
    data = p.read_bytes()
    # cut inside the last page's strip (its IFD is at the end, so cut the strip data of the last page instead)
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(MovieError) as err:
        validate_movie(p)
    assert err.value.transient
