"""Gain references recognised by content (EPU's Falcon ``.gain`` is a TIFF), defects marked by 0 in a ``.gain``,
and movies whose frames come gain-corrected (TIFF, MRC and EER, through ``read_frames`` and ``iter_chunks``)."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import tifffile

from cryolive.io.movies import EerOptions, MovieError, open_movie, read_gain
from cryolive.io.prepared import GainCorrectedMovie


def _gain(shape=(32, 40), seed=0):
    return (0.8 + 0.4 * np.random.default_rng(seed).random(shape)).astype(np.float32)


def test_falcon_gain_file_is_read_as_a_tiff_with_zeros_as_defects(tmp_path):
    g = _gain()
    g[5, :] = 0.0  # a defective row, as EPU marks it
    p = tmp_path / "20240101_EER_GainReference.gain"
    tifffile.imwrite(p, g)
    got = read_gain(p, movie_shape=(32, 40))
    np.testing.assert_array_equal(got, g)  # as it is: multiplicative, no inversion, no flip
    assert got.dtype == np.float32 and int((got == 0).sum()) == 40
    # other names: zeros are refused unless asked for
    t = tmp_path / "gain.tif"
    tifffile.imwrite(t, g)
    with pytest.raises(MovieError, match="zero or negative"):
        read_gain(t)
    np.testing.assert_array_equal(read_gain(t, zero_is_defect=True), g)
    g[0, 0] = -1.0
    tifffile.imwrite(p, g)
    with pytest.raises(MovieError, match="1 values are negative"):
        read_gain(p)


def test_gain_format_comes_from_the_content_not_the_suffix(tmp_path):
    g = _gain()
    big_endian = tmp_path / "gain_be.dat"
    tifffile.imwrite(big_endian, g.astype(">f4"))
    np.testing.assert_array_equal(read_gain(big_endian), g)
    mrc_named_oddly = tmp_path / "gain_ref.bin"
    with mrcfile.new(mrc_named_oddly) as m:
        m.set_data(g)
    np.testing.assert_array_equal(read_gain(mrc_named_oddly), g)
    tiff_named_mrc = tmp_path / "gain.mrc"
    tifffile.imwrite(tiff_named_mrc, g)
    np.testing.assert_array_equal(read_gain(tiff_named_mrc), g)
    junk = tmp_path / "x.gain"
    junk.write_bytes(b"GAIN" + bytes(2000))
    with pytest.raises(MovieError, match="x.gain: unknown format: neither TIFF .* nor MRC"):
        read_gain(junk)


def test_gain_corrected_movie_multiplies_every_frame(tmp_path):
    g = _gain((24, 28), seed=1)
    counts = np.random.default_rng(2).poisson(3.0, size=(7, 24, 28)).astype(np.uint8)
    tif = tmp_path / "m.tif"
    tifffile.imwrite(tif, counts, compression="lzw", photometric="minisblack")
    mrc = tmp_path / "m.mrc"
    with mrcfile.new(mrc) as m:
        m.set_data(counts)
    for path in (tif, mrc):
        movie = GainCorrectedMovie(open_movie(path), g)
        assert movie.shape == (7, 24, 28) and movie.format == open_movie(path).format
        expected = counts.astype(np.float32) * g[None]
        np.testing.assert_array_equal(movie.read_all(), expected)
        np.testing.assert_array_equal(movie.read_frames(2, 5), expected[2:5])
        chunks = list(movie.iter_chunks(3, prefetch=2))
        assert [s for s, _ in chunks] == [0, 3, 6]
        np.testing.assert_array_equal(np.concatenate([a for _, a in chunks]), expected)
    np.testing.assert_array_equal(g, _gain((24, 28), seed=1))  # the gain is not modified
    with pytest.raises(MovieError, match="gain reference shape 28×24 differs"):
        GainCorrectedMovie(open_movie(tif), g.T)


def test_gain_corrected_eer_fractions(tmp_path):
    from cryolive.simulate.eer import write_eer

    rng = np.random.default_rng(4)
    raw = [(rng.random((32, 40)) < 0.1).astype(np.uint8) for _ in range(12)]
    path = tmp_path / "m.eer"
    write_eer(path, [(ev, None) for ev in raw])
    g = _gain((32, 40), seed=5)
    eer = open_movie(path, eer=EerOptions(fraction_frames=4))
    movie = GainCorrectedMovie(eer, g)
    assert movie.shape == (3, 32, 40) and movie.fraction_frames == 4 and movie.n_raw_frames == 12
    expected = np.stack([sum(raw[4 * i : 4 * i + 4]) for i in range(3)]).astype(np.float32) * g[None]
    np.testing.assert_array_equal(movie.read_all(), expected)
    np.testing.assert_array_equal(np.concatenate([a for _, a in movie.iter_chunks(2)]), expected)
