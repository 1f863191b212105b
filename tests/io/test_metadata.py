"""EPU XML and SerialEM mdoc into MovieMetadata (cryolive units), and the settings check."""

from __future__ import annotations

from pathlib import Path

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
