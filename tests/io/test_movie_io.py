"""Opening, validating and reading movies and gain references."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import tifffile

from cryolive.io.movies import MovieError, MovieFormatNotSupported, open_movie, read_gain, validate_movie


def _frames(t=6, h=32, w=48, seed=0, dtype=np.uint8):
    rng = np.random.default_rng(seed)
    return rng.poisson(3.0, size=(t, h, w)).astype(dtype)


def _write_mrc(path, data):
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
    return path


def _write_tiff(path, data, compression="lzw"):
    tifffile.imwrite(path, data, compression=compression, photometric="minisblack")
    return path


def test_mrc_movie_reads_lazily_and_exactly(tmp_path):
    data = _frames(dtype=np.int16)
    p = _write_mrc(tmp_path / "a.mrc", data)
    movie = validate_movie(p)
    assert movie.shape == (6, 32, 48)
    assert movie.dtype == np.int16
    part = movie.read_frames(2, 4)
    assert part.dtype == np.float32 and part.shape == (2, 32, 48)
    np.testing.assert_array_equal(part, data[2:4].astype(np.float32))
    np.testing.assert_array_equal(open_movie(p).read_all(), data.astype(np.float32))


def test_lzw_tiff_every_page_is_a_frame(tmp_path):
    data = _frames(t=7)
    p = _write_tiff(tmp_path / "a.tif", data)
    movie = validate_movie(p)
    assert movie.shape == (7, 32, 48)
    np.testing.assert_array_equal(movie.read_all(), data.astype(np.float32))
    np.testing.assert_array_equal(movie.read_frames(5, 7), data[5:7].astype(np.float32))


def test_truncated_mrc_reason_gives_expected_and_actual_size(tmp_path):
    data = _frames(t=24, h=64, w=64)
    p = _write_mrc(tmp_path / "t.mrc", data)
    full = p.stat().st_size
    with open(p, "r+b") as f:
        f.truncate(full - 1000)
    with pytest.raises(MovieError) as err:
        validate_movie(p)
    msg = str(err.value)
    assert "truncated" in msg
    assert "24 frames of 64×64" in msg
    assert str(full) in msg and str(full - 1000) in msg
    assert err.value.transient


def test_truncated_lzw_tiff_is_rejected(tmp_path):
    data = _frames(t=8, h=64, w=64)
    p = _write_tiff(tmp_path / "t.tif", data)
    raw = p.read_bytes()
    (tmp_path / "cut.tif").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(MovieError) as err:
        validate_movie(tmp_path / "cut.tif")
    assert "cut.tif" in str(err.value)


def test_corrupt_tiff_page_is_named(tmp_path):
    data = _frames(t=8, h=64, w=64)
    p = _write_tiff(tmp_path / "c.tif", data)
    with tifffile.TiffFile(p) as tif:
        off = int(tif.pages[6].dataoffsets[0])
        n = int(tif.pages[6].databytecounts[0])
    raw = bytearray(p.read_bytes())
    raw[off : off + n] = bytes([0xFF]) * n  # garbage LZW codes in page 7
    p.write_bytes(bytes(raw))
    with pytest.raises(MovieError) as err:
        validate_movie(p)
    assert "corrupt TIFF page 7" in str(err.value)


def test_wrong_frame_size_reason(tmp_path):
    p = _write_mrc(tmp_path / "small.mrc", _frames(h=32, w=32))
    with pytest.raises(MovieError) as err:
        validate_movie(p, expected_frame_shape=(64, 64))
    assert "frame size 32×32 differs from the session's 64×64" in str(err.value)
    assert not err.value.transient


def test_garbage_eer_is_a_movie_error(tmp_path):
    p = tmp_path / "x.eer"
    p.write_bytes(b"\0" * 100)
    with pytest.raises(MovieError, match="x.eer: unreadable EER"):
        open_movie(p)
    assert issubclass(MovieFormatNotSupported, NotImplementedError)


@pytest.mark.filterwarnings("ignore:Data array contains NaN values")
def test_gain_flip_rotate_and_checks(tmp_path):
    g = np.arange(1, 1 + 4 * 6, dtype=np.float32).reshape(4, 6)
    p = _write_mrc(tmp_path / "gain.mrc", g)
    np.testing.assert_array_equal(read_gain(p), g)
    np.testing.assert_array_equal(read_gain(p, flip_y=True), g[::-1])
    np.testing.assert_array_equal(read_gain(p, rotate=90), np.rot90(g))
    t = _write_tiff(tmp_path / "gain.tif", g, compression=None)
    np.testing.assert_array_equal(read_gain(t, movie_shape=(4, 6)), g)
    with pytest.raises(MovieError, match="differs from the movie frames 6×4"):
        read_gain(p, movie_shape=(6, 4))
    bad = g.copy()
    bad[1, 2] = np.nan
    with pytest.raises(MovieError, match="NaN"):
        read_gain(_write_mrc(tmp_path / "nan.mrc", bad))
    bad = g.copy()
    bad[0, 0] = 0
    with pytest.raises(MovieError, match="zero or negative"):
        read_gain(_write_mrc(tmp_path / "zero.mrc", bad))
    (tmp_path / "junk.mrc").write_bytes(b"not an mrc")
    with pytest.raises(MovieError, match="gain reference junk.mrc"):
        read_gain(tmp_path / "junk.mrc")
