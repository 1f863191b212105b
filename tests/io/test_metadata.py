"""EPU XML and SerialEM mdoc into MovieMetadata (cryolive units), and the settings check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryolive.config import Optics, Settings
from cryolive.io.metadata import MetadataError, find_metadata, read_epu_xml, read_mdoc, reconcile

DATA = Path(__file__).parent / "data"
EPU = DATA / "GridSquare_2401567" / "Data" / "FoilHole_2458921_Data_2406011_34_20240315_101122.xml"


def test_epu_xml_in_cryolive_units():
    md = read_epu_xml(EPU)
    assert md.source == "epu"
    assert md.pixel_size_angstrom == pytest.approx(0.93)
    assert md.voltage_kv == pytest.approx(300)
    assert md.total_dose == pytest.approx(40.2)  # 4.02e21 e/m²
    assert md.exposure_time_s == pytest.approx(5.2466)
    assert md.defocus_target_angstrom == pytest.approx(16000)  # -1.6 µm applied = 1.6 µm underfocus
    assert md.defocus_angstrom == pytest.approx(16120)
    assert md.stage_tilt_deg == pytest.approx(30.0)
    assert md.stage_position_um == pytest.approx((123.45, -340.0))
    assert md.beam_shift == pytest.approx((0.0127, -0.0041))
    assert md.magnification == 130000
    assert (md.grid_square, md.foil_hole) == ("2401567", "2458921")
    assert md.timestamp.startswith("2024-03-15T10:11:22")


def test_epu_xml_missing_fields_are_none_and_garbage_is_an_error(tmp_path):
    md = read_epu_xml(EPU.with_name("FoilHole_2458922_Data_2406011_35_20240315_101140.xml"))
    assert md.voltage_kv == 300 and md.foil_hole == "2458922"
    assert md.pixel_size_angstrom is None and md.total_dose is None and md.stage_tilt_deg is None
    bad = tmp_path / "x.xml"
    bad.write_text("<MicroscopeImage><unclosed>")
    with pytest.raises(MetadataError, match="x.xml"):
        read_epu_xml(bad)


def test_mdoc_tilt_series_sections():
    sections = read_mdoc(DATA / "tilt_01.mdoc")
    assert len(sections) == 2
    a, b = sections
    assert a.movie_name == "tilt_01_001_0.0.tif" and b.movie_name == "tilt_01_002_3.0.tif"
    assert a.pixel_size_angstrom == pytest.approx(0.83) and b.voltage_kv == 300  # from the header
    assert b.stage_tilt_deg == pytest.approx(3.0021)
    assert a.total_dose == pytest.approx(3.02) and a.n_frames == 10
    assert a.dose_per_frame == pytest.approx(0.302)
    assert a.defocus_target_angstrom == pytest.approx(25000)
    assert a.defocus_angstrom == pytest.approx(24153)
    assert b.defocus_target_angstrom is None
    assert a.image_shift == pytest.approx((0.0125, -0.302))
    assert a.stage_position_um == pytest.approx((125.337, -340.112))


def test_find_metadata_next_to_movies(tmp_path):
    md = find_metadata(DATA / "movie_0042.tif")  # movie_0042.tif.mdoc
    assert md.source == "serialem" and md.movie_name == "movie_0042.tif"
    assert md.pixel_size_angstrom == pytest.approx(1.06) and md.n_frames == 40
    assert find_metadata(EPU.with_name(EPU.stem + "_fractions.tiff")).foil_hole == "2458921"
    assert find_metadata(tmp_path / "nothing.tif") is None


def test_reconcile_names_both_values_and_keeps_the_command_line():
    md = read_mdoc(DATA / "movie_0042.tif.mdoc")[0]  # 1.06 Å, 200 kV, 50.4 e/Å² over 40 frames
    agree = Settings(optics=Optics(pixel_size_angstrom=1.065, voltage_kv=200), dose_per_frame=1.26)
    assert reconcile(agree, md) == []  # 0.5 % off is within 1 %
    wrong = Settings(optics=Optics(pixel_size_angstrom=1.1, voltage_kv=300), dose_per_frame=1.26)
    found = {d.field: d for d in reconcile(wrong, md)}
    assert set(found) == {"pixel size", "voltage"}
    assert found["pixel size"].cli_value == 1.1 and found["pixel size"].metadata_value == pytest.approx(1.06)
    assert "1.1 Å" in found["pixel size"].message and "1.06 Å" in found["pixel size"].message
    assert "using the command line" in found["pixel size"].message
    # dose per frame from the movie's own frame count when given (e.g. EER fractions)
    dose = reconcile(agree, md, n_frames=20)
    assert [d.field for d in dose] == ["dose per frame"] and dose[0].metadata_value == pytest.approx(2.52)


# ----------------------------------------------------------------------------- FEI extended MRC header
def _fei_movie(path, n=6, fraction=True, shifts=(0.0123, -0.0456), version=b"FEI1", masks=True, order="<"):
    """An MRC movie of ``n`` uint8 frames with an FEI extended header block per frame, values known."""
    import mrcfile
    import numpy as np
    from mrcfile.dtypes import get_ext_header_dtype

    dtype = get_ext_header_dtype(version, order)
    ext = np.zeros(n, dtype=dtype)
    ext["Metadata size"] = dtype.itemsize
    ext["Metadata version"] = 2
    ext["HT"] = 300e3  # V
    ext["Dose"] = 6.7e19  # e/m² per fraction → 0.67 e/Å²
    ext["Integration time"] = 0.125  # s per fraction
    ext["Alpha tilt"] = -20.5  # degrees
    ext["X-Stage"], ext["Y-Stage"] = 1.5e-4, -2.25e-4  # m
    ext["Pixel size X"] = ext["Pixel size Y"] = 0.83e-10  # m
    ext["Defocus"] = -1.8e-6  # m, underfocus negative
    ext["Applied defocus"] = -1.75e-6
    ext["Magnification"] = 165000
    ext["Shift X"], ext["Shift Y"] = shifts
    ext["Is dose fraction"] = fraction
    ext["Fraction number"] = np.arange(n)
    if masks:
        ext["Bitmask 1"] = ext["Bitmask 2"] = ext["Bitmask 3"] = ext["Bitmask 4"] = 0xFFFFFFFF
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.random.default_rng(0).poisson(1.0, size=(n, 16, 16)).astype(np.uint8))
        m.set_extended_header(ext)
        m.header.exttyp = version
    return path


@pytest.mark.parametrize("version", [b"FEI1", b"FEI2"])
def test_fei_extended_header_in_cryolive_units(tmp_path, version):
    from cryolive.io.metadata import read_fei_extended_header, read_fei_metadata
    from cryolive.io.movies import open_movie

    path = _fei_movie(tmp_path / "FoilHole_7_Data_1_2_fractions.mrc", version=version)
    sections = read_fei_extended_header(path)
    assert len(sections) == 6 and sections[0].source == "fei"
    s = sections[3]
    assert s.pixel_size_angstrom == pytest.approx(0.83) and s.voltage_kv == pytest.approx(300)
    assert s.total_dose == pytest.approx(0.67) and s.exposure_time_s == pytest.approx(0.125)
    assert s.defocus_angstrom == pytest.approx(18000) and s.defocus_target_angstrom == pytest.approx(17500)
    assert s.stage_tilt_deg == pytest.approx(-20.5) and s.stage_position_um == pytest.approx((150.0, -225.0))
    assert s.beam_shift == pytest.approx((0.0123, -0.0456)) and s.magnification == 165000
    md = read_fei_metadata(path)  # six dose fractions → the exposure's dose and time are their sums
    assert md.n_frames == 6 and md.total_dose == pytest.approx(6 * 0.67)
    assert md.exposure_time_s == pytest.approx(0.75) and md.dose_per_frame == pytest.approx(0.67)
    assert find_metadata(path) == md.model_copy(update={"foil_hole": "7"})  # + EPU's name of the movie
    assert open_movie(path).read_all().shape == (6, 16, 16)  # the frames are read past the extended header


def test_fei_header_big_endian_bitmasks_and_single_image(tmp_path):
    from cryolive.io.metadata import read_fei_metadata

    md = read_fei_metadata(_fei_movie(tmp_path / "a.mrc", order=">"))  # byte order found from the size field
    assert md.pixel_size_angstrom == pytest.approx(0.83) and md.beam_shift == pytest.approx((0.0123, -0.0456))
    single = read_fei_metadata(_fei_movie(tmp_path / "b.mrc", n=3, fraction=False))
    assert single.total_dose == pytest.approx(0.67)  # not dose fractions: the first block describes the exposure
    unmasked = read_fei_metadata(_fei_movie(tmp_path / "c.mrc", masks=False))  # all bitmasks 0: values trusted
    assert unmasked.voltage_kv == pytest.approx(300)
    import mrcfile

    with mrcfile.open(tmp_path / "d.mrc", mode="w+") as m:  # a bitmask bit clear → that field is None
        m.set_data(np.zeros((1, 8, 8), np.uint8))
    path = _fei_movie(tmp_path / "e.mrc", n=1)
    with mrcfile.open(path, mode="r+") as m:
        ext = m.indexed_extended_header.copy()
        ext["Bitmask 1"] = 0xFFFFFFFF & ~(1 << 14)  # pixel size X (bit 14 of the first mask) not set
        m.set_extended_header(ext)
    cleared = read_fei_metadata(path)
    assert cleared.pixel_size_angstrom is None and cleared.voltage_kv == pytest.approx(300)
    assert read_fei_metadata(tmp_path / "d.mrc") is None  # no FEI header at all


def test_garbage_or_truncated_fei_header_warns_and_is_ignored(tmp_path):
    import mrcfile

    from cryolive.io.metadata import read_fei_metadata

    garbage = tmp_path / "garbage.mrc"
    with mrcfile.new(garbage) as m:
        m.set_data(np.zeros((2, 8, 8), np.uint8))
        m.set_extended_header(np.frombuffer(b"\x07" * 100, dtype="V1"))
        m.header.exttyp = b"FEI1"
    with pytest.raises(MetadataError, match="garbage.mrc.*FEI1.*cannot be read"):
        read_fei_metadata(garbage)
    with pytest.warns(RuntimeWarning, match="cannot be read"):
        assert find_metadata(garbage) is None
    # fewer blocks than sections: the blocks there are used, with a warning
    short = _fei_movie(tmp_path / "short.mrc", n=4)
    with mrcfile.open(short, mode="r+") as m:
        ext = m.indexed_extended_header.copy()[:2]
        data = m.data.copy()
        m.set_extended_header(ext)
        m.set_data(data)
    with pytest.warns(RuntimeWarning, match="2 blocks for 4 sections"):
        md = read_fei_metadata(short)
    assert md.n_frames == 4 and md.total_dose == pytest.approx(4 * 0.67)
    # an EPU XML beside an MRC movie wins; the FEI header fills its gaps
    hole = tmp_path / "FoilHole_2458922_Data_2406011_35_20240315_101140.xml"
    hole.write_bytes(EPU.with_name(hole.name).read_bytes())  # no pixel size, no dose in this XML
    movie = _fei_movie(tmp_path / (hole.stem + "_fractions.mrc"))
    both = find_metadata(movie)
    assert both.source == "epu+fei" and both.foil_hole == "2458922"
    assert both.pixel_size_angstrom == pytest.approx(0.83) and both.total_dose == pytest.approx(6 * 0.67)


def test_reconcile_reports_fei_header_disagreements(tmp_path):
    from cryolive.config import EerSettings

    md = find_metadata(_fei_movie(tmp_path / "m.mrc"))  # 0.83 Å, 300 kV, 0.67 e/Å² per frame (6 frames)
    agree = Settings(optics=Optics(pixel_size_angstrom=0.83, voltage_kv=300), dose_per_frame=0.67)
    assert reconcile(agree, md) == []
    wrong = Settings(optics=Optics(pixel_size_angstrom=0.83, voltage_kv=200), dose_per_frame=1.0)
    found = {d.field: d for d in reconcile(wrong, md)}
    assert set(found) == {"voltage", "dose per frame"}
    assert "fei metadata of m.mrc says 300 kV" in found["voltage"].message
    assert found["dose per frame"].metadata_value == pytest.approx(0.67)
    eer = agree.model_copy(update={"eer": EerSettings(total_dose=5.0)})  # total dose compared as a whole
    (d,) = reconcile(eer, md)
    assert d.field == "total dose" and d.metadata_value == pytest.approx(4.02) and d.cli_value == 5.0
