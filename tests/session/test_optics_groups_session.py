"""Acquisition metadata in a session: EPU XML beside each movie, disagreements reported, beam-shift optics groups
written to exposures.star and particles.star, never renumbered across runs."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from cryolive.config import OpticsGroupSettings
from cryolive.io.metadata import read_epu_xml
from cryolive.io.star import read_star
from cryolive.session.acquisition import OPTICS_GROUPS_KEY, REPORT_KEY, summary_lines
from cryolive.session.session import Session

EPU_XML = """<?xml version="1.0" encoding="utf-8"?>
<MicroscopeImage xmlns="http://schemas.datacontract.org/2004/07/Fei.SharedObjects">
  <microscopeData>
    <gun><AccelerationVoltage>300000</AccelerationVoltage></gun>
    <optics>
      <BeamShift xmlns:a="http://schemas.datacontract.org/2004/07/System.Windows">
        <a:_x>{bx!r}</a:_x><a:_y>{by!r}</a:_y>
      </BeamShift>
    </optics>
  </microscopeData>
  <SpatialScale><pixelSize><x><numericValue>2.1E-10</numericValue></x></pixelSize></SpatialScale>
</MicroscopeImage>
"""


def write_epu_session(folder, movie_writer, n_stage=3, spacing=0.02, jitter=0.0005, seed=7):
    """EPU-like tree: 3×3 multi-shot at ``n_stage`` stage positions, one MRC movie and one XML per shot, named in
    a shuffled order (the session takes them in name order). Returns {movie stem: pattern position}."""
    rng = np.random.default_rng(seed)
    data = folder / "GridSquare_55" / "Data"
    data.mkdir(parents=True)
    grid = [(spacing * (c - 1), spacing * (r - 1)) for r in range(3) for c in range(3)]
    shots = [(s, p) for s in range(n_stage) for p in range(9)]
    truth = {}
    for n, i in enumerate(rng.permutation(len(shots))):
        s, p = shots[i]
        bx, by = np.asarray(grid[p]) + rng.normal(0, jitter, 2)
        stem = f"FoilHole_{100 + n}_Data_{s}_{p}_20240315_1011{n:02d}"
        (data / f"{stem}.xml").write_text(EPU_XML.format(bx=float(bx), by=float(by)))
        movie_writer(data / f"{stem}_fractions.mrc", seed=n)
        truth[f"{stem}_fractions"] = p
    return sorted(data.glob("*.mrc")), truth


def _groups(out):
    ex = read_star(out / "exposures.star")
    mics = ex["micrographs"]
    stems = [m.split("/")[-1][: -len(".mrc")] for m in mics["rlnMicrographName"]]
    return ex["optics"], dict(zip(stems, mics["rlnOpticsGroup"].astype(int)))


def test_beam_shift_groups_are_written_and_never_renumbered(tmp_path, movie_writer, fake_stages, small_settings,
                                                            caplog):
    movies, truth = write_epu_session(tmp_path / "epu", movie_writer)
    settings = small_settings.model_copy(update={"optics_groups": OpticsGroupSettings(n_groups=9)})
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="cryolive.session"):
        with Session(out, settings, stages=fake_stages) as s:  # first run: 12 of the 27 exposures
            s.process(movies[:12])
    optics, first = _groups(out)
    assert len(first) == 12
    n = len(set(first.values()))
    assert optics["rlnOpticsGroup"].tolist() == list(range(1, n + 1))  # contiguous, one row per group
    assert optics["rlnOpticsGroupName"].tolist() == [f"opticsGroup{g}" for g in range(1, n + 1)]
    assert (optics["rlnMicrographPixelSize"] == 2.0).all()  # the command line's optics in every row
    assert len({(g, truth[m]) for m, g in first.items()}) == n == len({truth[m] for m in first})
    # the XML says 2.1 Å, the command line 2.0 Å: reported, the command line used
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "pixel size" in r.getMessage()]
    assert len(warned) == 1 and "command line says 2 Å, epu metadata" in warned[0] and "says 2.1 Å" in warned[0]

    with Session(out, settings, stages=fake_stages) as s:  # second run, same OUT: the rest come
        s.process(movies)
        report = s.store.get_value(REPORT_KEY)
        state = s.store.get_value(OPTICS_GROUPS_KEY)
        lines = summary_lines(s.store, settings)  # what the CLI prints after the run
    optics, groups = _groups(out)
    assert len(groups) == 27 and all(groups[m] == g for m, g in first.items())  # nothing renumbered
    assert optics["rlnOpticsGroup"].tolist() == list(range(1, 10))
    assert len({(g, truth[m]) for m, g in groups.items()}) == 9  # each group is one multi-shot position
    assert report["disagreements"]["pixel size"]["count"] == 27 and not state["pending"]
    assert "disagrees with the command line on pixel size for 27 exposures (command line used)" in lines[0]
    assert lines[-1] == "  9 optics groups from the beam shifts"
    parts = read_star(out / "particles.star")
    assert parts["optics"]["rlnOpticsGroup"].tolist() == list(range(1, 10))
    p = parts["particles"]
    stems = p["rlnMicrographName"].str.split("/").str[-1].str[: -len(".mrc")]
    assert (p["rlnOpticsGroup"].astype(int).to_numpy() == stems.map(groups).to_numpy()).all()


def test_one_optics_group_by_default_even_with_beam_shifts(tmp_path, movie_writer, fake_stages, small_settings):
    movies, _ = write_epu_session(tmp_path / "epu", movie_writer, n_stage=1)
    with Session(tmp_path / "out", small_settings, stages=fake_stages) as s:
        s.process(movies[:4])
        md = s.store.stage_result(s.store.exposures("done")[0].id, "metadata")["metrics"]["metadata"]
    optics, groups = _groups(tmp_path / "out")
    assert optics["rlnOpticsGroup"].tolist() == [1] and set(groups.values()) == {1}
    assert md["source"] == "epu" and md["pixel_size_angstrom"] == 2.1 and len(md["beam_shift"]) == 2
    # the metadata's own columns in exposures.star: grid square, foil hole, beam shift (as in each XML)
    mics = read_star(tmp_path / "out" / "exposures.star")["micrographs"]
    assert (mics["cryoliveGridSquare"].astype(str) == "55").all()
    for _, row in mics.iterrows():
        stem = row["rlnMicrographName"].split("/")[-1][: -len(".mrc")]
        xml = read_epu_xml(tmp_path / "epu" / "GridSquare_55" / "Data" / (stem.replace("_fractions", "") + ".xml"))
        assert (row["cryoliveBeamShiftX"], row["cryoliveBeamShiftY"]) == pytest.approx(xml.beam_shift, rel=1e-4)
        assert stem.startswith(f"FoilHole_{row['cryoliveFoilHole']}_")
    assert mics["cryoliveTargetDefocusAngstrom"].isna().all()  # not in these XMLs


def test_no_metadata_no_metadata_columns(tmp_path, movie_writer, fake_stages, small_settings):
    movie_writer(tmp_path / "a.mrc")
    with Session(tmp_path / "out", small_settings, stages=fake_stages) as s:
        s.process([tmp_path / "a.mrc"])
    mics = read_star(tmp_path / "out" / "exposures.star")["micrographs"]
    assert len(mics) == 1 and not any(c.startswith(("cryoliveBeamShift", "cryoliveGridSquare")) for c in mics.columns)


def test_optics_groups_option(tmp_path):
    import typer
    from typer.testing import CliRunner

    from cryolive.cli import _optics_groups, app
    from cryolive.config import Settings

    assert _optics_groups(Settings(), "auto").optics_groups.n_groups is None
    assert _optics_groups(Settings(), "9").optics_groups.n_groups == 9
    for bad in ("0", "many"):
        with pytest.raises(typer.BadParameter, match="--optics-groups must be a number ≥ 1 or auto"):
            _optics_groups(Settings(), bad)
    res = CliRunner().invoke(app, ["process", str(tmp_path), "--out", str(tmp_path / "o"), "--pixel-size", "1",
                                   "--dose-per-frame", "1", "--optics-groups", "-3"])
    assert res.exit_code == 2 and "--optics-groups" in res.output


def test_streaming_exposures_wait_for_their_group_then_keep_it(tmp_path, movie_writer, fake_stages, small_settings):
    movies, truth = write_epu_session(tmp_path / "epu", movie_writer, n_stage=2, seed=11)
    settings = small_settings.model_copy(update={"optics_groups": OpticsGroupSettings(n_groups=None)})
    out = tmp_path / "out"
    history = []
    with Session(out, settings, stages=fake_stages, output_interval_s=0.0) as s:
        s.add_movies(movies)
        while s.store.counts()["pending"]:
            s.step(timeout=1.0)
            s.write_outputs()
            history.append((s.store.counts()["done"], _groups(out)[1]))
        s.finalize()
    for (_, before), (_, after) in zip(history, history[1:]):
        assert all(after[m] == g for m, g in before.items())  # a group once written never changes
    waiting = [done - len(groups) for done, groups in history]
    assert waiting[0] == 1 and waiting[-1] == 0  # the first exposures wait (left out), then all are listed
    _, final = _groups(out)
    assert len(final) == 18 and len({(g, truth[m]) for m, g in final.items()}) == 9


def test_unreadable_metadata_is_reported_and_the_exposure_still_done(tmp_path, movie_writer, fake_stages,
                                                                      small_settings, caplog):
    movies, _ = write_epu_session(tmp_path / "epu", movie_writer, n_stage=1)
    bad = movies[0].with_name(movies[0].name.replace("_fractions.mrc", ".xml"))
    bad.write_text("<MicroscopeImage><unclosed>")
    settings = small_settings.model_copy(update={"optics_groups": OpticsGroupSettings(n_groups=None)})
    with caplog.at_level(logging.WARNING, logger="cryolive.session"):
        with Session(tmp_path / "out", settings, stages=fake_stages) as s:
            status = s.process(movies[:3])
            report = s.store.get_value(REPORT_KEY)
    assert status.n_done == 3 and status.n_failed == 0
    assert report["errors"]["count"] == 1 and bad.name in report["errors"]["first"]
    assert any("metadata of" in r.getMessage() and "not a readable EPU XML" in r.getMessage() for r in caplog.records)
    optics, groups = _groups(tmp_path / "out")
    assert len(groups) == 3  # the one without metadata has a group too ("no beam shift")
