"""End to end at a tiny size: simulated movies → `cryolive process` (CLI, real algorithms) → files per CONTRACT.md,
then `cryolive live` on a folder fed by the simulator's replay, resumed on the same OUT."""

from __future__ import annotations

import threading

import mrcfile
import numpy as np
import pytest
from typer.testing import CliRunner

from cryolive.cli import app
from cryolive.io.star import read_star
from cryolive.session.store import SessionStore

OPTICS = ["--pixel-size", "1.0", "--voltage", "300", "--cs", "2.7", "--dose-per-frame", "1.0"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from cryolive.simulate import SimulationSettings, simulate_dataset

    out = tmp_path_factory.mktemp("sim")
    simulate_dataset(out, SimulationSettings(n_movies=3, image_shape_px=(768, 768), n_frames=6,
                                             particles_per_micrograph=60, movie_format="tiff", seed=1))
    return out


def test_process_cli_end_to_end(dataset, tmp_path):
    out = tmp_path / "out"
    movies = dataset / "movies"
    bad = movies.parent / "bad"
    bad.mkdir(exist_ok=True)
    raw = sorted(movies.glob("*.tif"))[0].read_bytes()
    (bad / "cut.tif").write_bytes(raw[: len(raw) // 3])
    args = ["process", str(movies / "*.tif"), str(bad / "cut.tif"), "--out", str(out), *OPTICS,
            "--gain", str(dataset / "gain.mrc"), "--particle-diameter", "150", "--workers", "0",
            "--classes", "2", "--min-particles-2d", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 exposures done, 1 failed" in result.output

    truth = read_star(dataset / "truth" / "exposures.star")["micrographs"]
    mics = read_star(out / "exposures.star")["micrographs"]
    assert len(mics) == 3
    merged = mics.assign(movie=mics["rlnMicrographMovieName"].map(lambda p: p.rsplit("/", 1)[-1])).merge(
        truth, left_on="movie", right_on="rlnMicrographMovieName", suffixes=("", "_truth"))
    mean_fit = (merged["rlnDefocusU"] + merged["rlnDefocusV"]) / 2
    mean_truth = (merged["rlnDefocusU_truth"] + merged["rlnDefocusV_truth"]) / 2
    # units and order of the columns agree with the truth (the CTF fit's own accuracy is tested elsewhere)
    assert (np.abs(mean_fit - mean_truth) < 0.1 * mean_truth).sum() >= 2
    for name in mics["rlnMicrographName"]:
        with mrcfile.open(out / name) as m:
            assert m.data.shape == (768, 768) and abs(float(m.voxel_size.x) - 1.0) < 1e-6

    parts = read_star(out / "particles.star")
    p, optics = parts["particles"], parts["optics"]
    accepted = mics[mics["cryoliveAccepted"] == 1]
    assert len(p) == int(accepted["cryoliveParticleCount"].sum()) > 0
    n_img = int(optics["rlnImageSize"].iloc[0])
    idx, stack = p["rlnImageName"].iloc[-1].split("@")
    with mrcfile.open(out / stack) as m:
        data = m.data if m.data.ndim == 3 else m.data[None]  # a stack of one image reads back as 2D
        assert data.shape[1:] == (n_img, n_img) and int(idx) == data.shape[0]
    assert p["rlnCoordinateX"].between(0, 768).all() and p["rlnCoordinateY"].between(0, 768).all()

    classes = read_star(out / "class2d" / "classes.star")
    table = classes[next(iter(classes))]
    assert len(table) == 2 and abs(table["rlnClassDistribution"].sum() - 1) < 1e-3
    assert set(p["rlnClassNumber"]) <= {1, 2}
    with mrcfile.open(out / "class2d" / "classes.mrcs") as m:
        assert m.data.shape == (2, n_img, n_img)
    store = SessionStore(out / "session.sqlite")
    (failed,) = store.exposures("failed")
    assert failed.name == "cut" and failed.error.startswith("cut.tif: ")
    assert "truncated" in failed.error or "corrupt TIFF" in failed.error
    timings = store.stage_results()
    assert {r["stage"] for r in timings} == {"motion", "ctf", "picking", "extraction", "metadata"}
    assert all(r["metrics"]["seconds"] > 0 for r in timings)
    store.close()

    # curation: a defocus window around the exposure with the most particles keeps only that one
    fit = np.sort(mean_fit.to_numpy())
    target = int(np.argmax(merged["cryoliveParticleCount"].to_numpy()))
    k = int(np.searchsorted(fit, mean_fit.to_numpy()[target]))
    sets = [f"min_defocus_angstrom={0.5 * (fit[k - 1] + fit[k]):.0f}"] if k > 0 else []
    sets += [f"max_defocus_angstrom={0.5 * (fit[k] + fit[k + 1]):.0f}"] if k < len(fit) - 1 else []
    args = [a for item in sets for a in ("--set", item)]
    result = CliRunner().invoke(app, ["curate", str(out), *args, "--set", "max_ctf_resolution_angstrom=none"])
    assert result.exit_code == 0, result.output
    assert "1 accepted, 2 rejected, 0 pending" in result.output
    mics2 = read_star(out / "exposures.star")["micrographs"]
    kept = mics2.loc[mics2["cryoliveAccepted"] == 1, "rlnMicrographName"].tolist()
    assert kept == [merged["rlnMicrographName"].iloc[target]]
    tokens = {item[4:].replace("=", ">" if item.startswith("max") else "<") for item in sets}
    assert set(mics2.loc[mics2["cryoliveAccepted"] == 0, "cryoliveRejectionReason"]) <= tokens
    p2 = read_star(out / "particles.star")["particles"]
    assert set(p2["rlnMicrographName"]) == set(kept)
    assert len(p2) == int(mics2.loc[mics2["cryoliveAccepted"] == 1, "cryoliveParticleCount"].sum())


def test_live_cli_with_replay_then_resume(dataset, tmp_path):
    from cryolive.simulate import replay

    watch, out = tmp_path / "watch", tmp_path / "out"
    feeder = threading.Thread(target=replay, args=(dataset, watch), kwargs={"interval_s": 0.2, "limit": 2})
    feeder.start()
    common = ["--out", str(out), *OPTICS, "--gain", str(dataset / "gain.mrc"), "--workers", "0",
              "--settle", "0.3", "--poll", "0.1", "--min-particles-2d", "100000"]
    result = CliRunner().invoke(app, ["live", str(watch), *common, "--max-exposures", "2"])
    feeder.join()
    assert result.exit_code == 0, result.output
    replay(dataset, watch, interval_s=0.0, limit=None)  # the third movie arrives while stopped; 1–2 again
    result = CliRunner().invoke(app, ["live", str(watch), *common, "--stop-after-idle", "1.5"])
    assert result.exit_code == 0, result.output
    store = SessionStore(out / "session.sqlite")
    exps = store.exposures()
    assert [e.status for e in exps] == ["done"] * 3
    assert all(e.attempts == 1 for e in exps)
    assert store.count_stage_results(stage="motion") == 3
    store.close()


def test_simulate_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "sim"
    args = ["simulate", str(out), "--n-movies", "1", "--size", "256", "--frames", "2", "--format", "mrc",
            "--structure", "3j5p", "--seed", "3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (movie,) = sorted((out / "movies").glob("*.mrc"))
    with mrcfile.open(movie) as m:
        assert m.data.shape == (2, 256, 256)
    assert (out / "gain.mrc").is_file() and (out / "truth" / "exposures.star").is_file()


def test_unavailable_device_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = CliRunner().invoke(app, ["process", str(tmp_path), "--out", str(tmp_path / "out"), *OPTICS,
                                      "--device", "cuda"])
    assert result.exit_code == 2
    assert "CUDA is not available" in result.output
    assert not (tmp_path / "out" / "session.sqlite").exists()  # nothing started


def test_selected_classes_feed_template_picking(dataset, tmp_path):
    """--templates-from-2d: once 2D classes are selected, later exposures are picked with templates made from the
    selected class averages (class2d/templates.mrcs), and those picks still find the true particles."""
    import torch

    from cryolive.preprocess.picking import match_picks
    from cryolive.session.session import MANUAL_SELECTION_KEY, TEMPLATES_KEY

    out = tmp_path / "out"
    movies = sorted((dataset / "movies").glob("*.tif"))
    common = ["--out", str(out), *OPTICS, "--gain", str(dataset / "gain.mrc"), "--particle-diameter", "150",
              "--workers", "0", "--classes", "2", "--min-particles-2d", "2", "--templates-from-2d"]
    result = CliRunner().invoke(app, ["process", str(movies[0]), *common])
    assert result.exit_code == 0, result.output
    store = SessionStore(out / "session.sqlite")
    if not store.get_value(TEMPLATES_KEY):  # the automatic selection kept no class: select both, as a user would
        store.set_value(MANUAL_SELECTION_KEY, {"selected": [1, 2], "by": "test"})
    store.close()
    result = CliRunner().invoke(app, ["process", *(str(m) for m in movies), *common])
    assert result.exit_code == 0, result.output

    store = SessionStore(out / "session.sqlite")
    info = store.get_value(TEMPLATES_KEY)
    assert info and info["n"] >= 1
    with mrcfile.open(out / info["path"]) as m:
        templates = m.data if m.data.ndim == 3 else m.data[None]
        assert templates.shape[0] == info["n"] and float(m.voxel_size.x) > 1.0
    classes = read_star(out / "class2d" / "classes.star")["model_classes"]
    assert sorted(info["classes"]) == sorted(classes.loc[classes["cryoliveSelected"] == 1, "rlnClassNumber"])
    picks = {r["exposure_id"]: r["settings_hash"] for r in store.stage_results() if r["stage"] == "picking"}
    first = store.exposures()[0].id
    later = [e.id for e in store.exposures() if e.id != first]
    assert all(picks[i] != picks[first] for i in later)  # picked with other settings: the template picker
    store.close()
    # the template picks in particles.star against the truth, and the blob picker on the same micrographs
    from cryolive.config import PickingSettings
    from cryolive.preprocess.picking import pick_blobs

    truth = read_star(dataset / "truth" / "particles.star")["particles"]
    truth = truth[truth["cryoliveStructure"] != "junk"]
    parts = read_star(out / "particles.star")["particles"]
    mics = read_star(out / "exposures.star")["micrographs"]
    f1_template, f1_blob = [], []
    for movie in movies[1:]:
        t = truth[truth["rlnMicrographMovieName"].str.contains(movie.stem)]
        true_yx = torch.as_tensor(t[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(float))
        radius = torch.as_tensor(0.3 * t["cryoliveDiameterAngstrom"].to_numpy(float) / 1.0)
        p = parts[parts["rlnMicrographName"].str.contains(movie.stem)]
        f1_template.append(match_picks(torch.as_tensor(p[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(float)),
                                       true_yx, radius)[3])
        row = mics[mics["rlnMicrographName"].str.contains(movie.stem)].iloc[0]
        micrograph = torch.as_tensor(mrcfile.read(out / row["rlnMicrographName"]).astype(np.float32))
        ctf = {"defocus_u": row["rlnDefocusU"], "defocus_v": row["rlnDefocusV"],
               "defocus_angle_deg": row["rlnDefocusAngle"], "voltage_kv": 300.0, "cs_mm": 2.7,
               "amplitude_contrast": 0.1}
        blob = pick_blobs(micrograph, 1.0, PickingSettings(particle_diameter_angstrom=150), ctf=ctf)
        f1_blob.append(match_picks(blob.coords_yx_px.double(), true_yx, radius)[3])
    print("F1 of template picks after 2D:", np.round(f1_template, 2), "blob picker on the same:", np.round(f1_blob, 2))
    # at 6 e/Å² the first classes' templates pick what the blob picker misses near 1 µm defocus
    assert min(f1_template) >= 0.4 and np.mean(f1_template) >= np.mean(f1_blob)
