"""EER: our writer's bit streams decode to the events written (by cryolive and by tifffile), fractions sum
the right raw frames, super-resolution puts events on the right sub-pixels, bad files are named."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from cryolive.io.eer import EerLayout, fraction_frames_for_dose
from cryolive.io.movies import EerOptions, MovieError, open_movie, validate_movie
from cryolive.simulate.eer import encode_eer_frame, write_eer


def _raw_frames(n=12, h=32, w=40, p=0.15, seed=0):
    rng = np.random.default_rng(seed)
    return [((rng.random((h, w)) < p).astype(np.uint8), rng.integers(0, 16, (h, w))) for _ in range(n)]


def _super_image(events, subpixel, upsampling):
    """Expected render: each event at its 4×4 sub-pixel, reduced to the ``upsampling`` grid."""
    h, w = events.shape
    yy, xx = np.nonzero(events)
    s = subpixel[yy, xx]
    d = 4 // upsampling
    out = np.zeros((h * upsampling, w * upsampling), np.float32)
    np.add.at(out, (upsampling * yy + (s >> 2) // d, upsampling * xx + (s & 3) // d), 1)
    return out


@pytest.mark.parametrize("compression", [65000, 65001, 65002])
def test_decode_of_encode_is_exact(tmp_path, compression):
    frames = _raw_frames()
    # long empty runs (> 255 pixels) need skip codes; a frame with no event and one with every pixel set
    frames[3][0][:] = 0
    frames[3][0][20, 7] = 1
    frames[4][0][:] = 0
    frames[5][0][:] = 1
    p = write_eer(tmp_path / "m.eer", frames, compression=compression, metadata={"numberOfFrames": 12})
    assert p == 12
    layout = EerLayout.read(tmp_path / "m.eer")
    assert layout.n_raw_frames == 12 and layout.frame_shape == (32, 40)
    movie = open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=1))
    got = movie.read_all()
    np.testing.assert_array_equal(got, np.stack([f[0] for f in frames]).astype(np.float32))
    # tifffile, an independent reader of the container and the compression tag, agrees
    with tifffile.TiffFile(tmp_path / "m.eer") as tif:
        assert tif.is_eer
        np.testing.assert_array_equal(tif.pages[2].asarray(), frames[2][0].astype(bool))
        with tifffile.TiffFile(tmp_path / "m.eer", superres=2) as tif4:
            np.testing.assert_array_equal(tif4.pages[1].asarray(), _super_image(*frames[1], 4) > 0)


def test_fractions_sum_the_right_raw_frames_and_drop_the_rest(tmp_path):
    frames = _raw_frames(n=11)
    write_eer(tmp_path / "m.eer", frames)
    movie = open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=3, threads=2))
    assert movie.shape == (3, 32, 40) and movie.fraction_frames == 3  # raw frames 9, 10 unused
    ev = np.stack([f[0] for f in frames]).astype(np.float32)
    np.testing.assert_array_equal(movie.read_frames(1, 3), np.stack([ev[3:6].sum(0), ev[6:9].sum(0)]))
    np.testing.assert_array_equal(movie.read_frames(0, 1)[0], ev[0:3].sum(0))
    # from doses: 11 raw frames carry 22 e/Å²; 4 e/Å² per fraction → 2 raw frames
    assert fraction_frames_for_dose(11, total_dose=22.0, dose_per_fraction=4.0) == 2
    by_dose = open_movie(tmp_path / "m.eer", eer=EerOptions(dose_per_fraction=4.0, total_dose=22.0))
    assert by_dose.shape[0] == 5
    np.testing.assert_array_equal(by_dose.read_frames(4, 5)[0], ev[8:10].sum(0))


def test_super_resolution_puts_events_on_their_sub_pixels(tmp_path):
    frames = _raw_frames(n=4, p=0.3, seed=3)
    write_eer(tmp_path / "m.eer", frames)
    one = open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=2)).read_all()
    for u in (2, 4):
        sup = open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=2, upsampling=u)).read_all()
        assert sup.shape == (2, 32 * u, 40 * u)
        expected = _super_image(*frames[0], u) + _super_image(*frames[1], u)
        np.testing.assert_array_equal(sup[0], expected)
        np.testing.assert_array_equal(sup.reshape(2, 32, u, 40, u).sum((2, 4)), one)  # u×u blocks = 1× image
    binned = open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=2, upsampling=2, bin_factor=2))
    b = binned.read_all()
    assert b.shape == one.shape
    np.testing.assert_allclose(b.sum((1, 2)), one.sum((1, 2)), rtol=1e-5)  # Fourier cropping keeps counts


def test_events_at_the_frame_edges_and_encoder_checks():
    ev = np.zeros((4, 300), np.uint8)
    ev[0, 0] = ev[-1, -1] = 1
    import imagecodecs

    for bits in (7, 8):
        data = encode_eer_frame(ev, None, rle_bits=bits)
        assert len(data) % 2 == 0
        np.testing.assert_array_equal(imagecodecs.eer_decode(data, ev.shape, bits, 2, 2), ev.astype(bool))
    with pytest.raises(ValueError, match="at most one event"):
        encode_eer_frame(np.full((2, 2), 2))


def test_truncated_and_corrupt_eer_raise_movie_error(tmp_path):
    frames = _raw_frames(n=6)
    write_eer(tmp_path / "m.eer", frames)
    raw = (tmp_path / "m.eer").read_bytes()
    assert validate_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=2)).shape == (3, 32, 40)
    (tmp_path / "t.eer").write_bytes(raw[: len(raw) * 2 // 3])
    with pytest.raises(MovieError, match="truncated") as err:
        validate_movie(tmp_path / "t.eer")
    assert err.value.transient
    # overwrite the first raw frame's bit stream with skip codes that run past the end of the frame
    layout = EerLayout.read(tmp_path / "m.eer")
    off, n = layout.strips[0]
    bad = bytearray(raw)
    bad[off:off + n] = b"\xff" * n
    (tmp_path / "c.eer").write_bytes(bytes(bad))
    open_movie(tmp_path / "c.eer")  # the header is fine
    with pytest.raises(MovieError, match="corrupt EER raw frame 1") as err:
        validate_movie(tmp_path / "c.eer")
    assert not err.value.transient
    with pytest.raises(MovieError, match="do not fill one fraction"):
        open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=7))
    (tmp_path / "g.eer").write_bytes(b"\0" * 100)
    with pytest.raises(MovieError, match="g.eer"):
        open_movie(tmp_path / "g.eer")
