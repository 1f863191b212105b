"""Defect lists and maps: SerialEM's list, MotionCor2's rectangles, MRC/TIFF maps, and clear errors."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
import tifffile

from cryolive.io.defects import read_defect_map
from cryolive.io.movies import MovieError


def test_serialem_list_marks_exactly_the_listed_pixels(tmp_path):
    p = tmp_path / "defects.txt"
    p.write_text("# a SerialEM defect list\nCameraSizeX 96\nCameraSizeY 64\nRotationAndFlip 0\nWasScaled 0\n"
                 "K2Type 0\nUsableArea 0 0 0 0\nPartialBadColumn 70 2 10 20\nPartialBadRow 40 1 5 9\n"
                 "BadPixels 5 7 60 61\nBadColumns 10 11\nBadRows 3\n")
    mask = read_defect_map(p, (64, 96))
    expect = np.zeros((64, 96), dtype=bool)
    expect[:, 10:12] = True
    expect[3, :] = True
    expect[10:21, 70:72] = True  # ends inclusive
    expect[40, 5:10] = True
    expect[7, 5] = expect[61, 60] = True
    np.testing.assert_array_equal(mask, expect)


def test_serialem_list_super_resolution_frames_and_usable_area(tmp_path):
    p = tmp_path / "defects.txt"
    p.write_text("CameraSizeX 32\nCameraSizeY 32\nBadColumns 4\nBadPixels 10 12\nUsableArea 0 0 0 29\n")
    mask = read_defect_map(p, (64, 64))  # frames at 2× the camera: every defect covers 2× the pixels
    expect = np.zeros((64, 64), dtype=bool)
    expect[:, 8:10] = True
    expect[24:26, 20:22] = True
    expect[:, 60:] = True  # right of the usable area (last usable column 29 → super-res 59)
    np.testing.assert_array_equal(mask, expect)
    # a frame smaller than the camera is centred on it
    small = read_defect_map(p, (16, 16))  # offset (-8, -8): camera column 4 is outside, pixel (10, 12) → (2, 4)
    assert small.sum() == 1 and small[4, 2]


def test_motioncor2_rectangles_are_clipped(tmp_path):
    p = tmp_path / "defects_mc2.txt"
    p.write_text("0 0 2 3\n30 10 1 100\n-2 -2 4 4\n5 5 0 4\n")
    mask = read_defect_map(p, (40, 32))
    expect = np.zeros((40, 32), dtype=bool)
    expect[0:3, 0:2] = True
    expect[10:40, 30] = True
    np.testing.assert_array_equal(mask, expect)


@pytest.mark.parametrize("fmt", ["mrc", "tif"])
def test_defect_map_images_nonzero_is_bad(tmp_path, fmt):
    rng = np.random.default_rng(0)
    img = (rng.random((24, 40)) < 0.05).astype(np.uint8) * rng.integers(1, 5, size=(24, 40)).astype(np.uint8)
    p = tmp_path / f"map.{fmt}"
    if fmt == "mrc":
        with mrcfile.new(p) as m:
            m.set_data(img)
    else:
        tifffile.imwrite(p, img)
    np.testing.assert_array_equal(read_defect_map(p, (24, 40)), img != 0)
    with pytest.raises(MovieError, match="differs from the movie frames 24×41"):
        read_defect_map(p, (24, 41))


def test_unreadable_defect_files_say_why(tmp_path):
    with pytest.raises(MovieError, match="no such file"):
        read_defect_map(tmp_path / "missing.txt", (8, 8))
    bad = tmp_path / "bad.txt"
    bad.write_text("BadColumns 3\nBadPixels 1 2 3\n")
    with pytest.raises(MovieError, match="line 2: BadPixels needs x y pairs"):
        read_defect_map(bad, (8, 8))
    junk = tmp_path / "junk.txt"
    junk.write_text("hello world\n")
    with pytest.raises(MovieError, match="line 1: expected 'x y width height'"):
        read_defect_map(junk, (8, 8))
    binary = tmp_path / "blob.dat"
    binary.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(MovieError, match="neither an MRC/TIFF defect map nor a text defect list"):
        read_defect_map(binary, (8, 8))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(MovieError, match="empty"):
        read_defect_map(empty, (8, 8))
