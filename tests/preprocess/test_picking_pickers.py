"""Blob, template and learned pickers against ground truth on the physics simulator, with junk and a carbon edge.

Micrographs: ``cryolive.simulate.MovieSimulator`` (atomic models 6ny1 / 3j5p in random orientations, heights
through vitreous ice, inelastic loss, radiation damage, Poisson counts), motion-free sums at 24–40 e/Å², with 3
junk aggregates and the carbon film at a hole edge covering 20–35 % of each micrograph; defocus, dose, pixel size
(1.0–1.4 Å/px) vary per micrograph. A pick is correct within 0.3 × diameter (greedy one-to-one); truth within half
a diameter of the edge is not required for recall. Scores are pooled over the micrographs of a test.
"""

from __future__ import annotations

import functools

import pytest
import torch

from cryolive.config import PickingSettings
from cryolive.preprocess.learned_picking import LearnedPicker, nnpu_loss
from cryolive.preprocess.picking import detect_carbon, match_picks, pick_blobs
from cryolive.preprocess.template_picking import (
    pick_templates,
    resample_images_2d,
    templates_from_classes,
    templates_from_map,
)

torch.set_num_threads(1)


@functools.lru_cache(maxsize=None)
def _micrograph(structure: str, seed: int, n_frames: int, pixel_size: float, defocus: float, carbon: float,
                size: int = 640):
    from cryolive.simulate import MovieSimulator, SimulationSettings

    s = SimulationSettings(structures=[structure], image_shape_px=(size, size), n_frames=n_frames,
                           pixel_size_angstrom=pixel_size, defocus_range_angstrom=(defocus, defocus),
                           max_drift_angstrom=0.0, local_motion_angstrom=0.0, gain_variation=0.0, n_hot_pixels=0,
                           seed=seed, oversampling=1, carbon_coverage=carbon, junk_per_micrograph=3)
    sim = MovieSimulator(s, 0)
    gen = torch.Generator().manual_seed(seed)
    micrograph = sum(torch.poisson(lam.clamp(min=0), generator=gen) for lam in sim.expected_frames())
    truth = sim.truth()
    is_particle = torch.tensor([name != "junk" for name in truth.particles["structure"]])
    ctf = dict(defocus_u=truth.defocus_u, defocus_v=truth.defocus_v, defocus_angle_deg=truth.defocus_angle_deg,
               voltage_kv=s.voltage_kv, cs_mm=s.cs_mm, amplitude_contrast=s.amplitude_contrast)
    return dict(micrograph=micrograph, true_yx=truth.particles["coords_yx_px"][is_particle],
                diameter=float(truth.particles["diameter_angstrom"][is_particle].mean()), pixel_size=pixel_size,
                ctf=ctf, carbon=truth.carbon_mask, junk_yx=truth.particles["coords_yx_px"][~is_particle])


# (structure, seed, dose e/Å², pixel Å, defocus Å, carbon fraction)
BLOB_CASES = [("6ny1", 11, 24, 1.0, 12000.0, 0.3), ("3j5p", 12, 40, 1.4, 25000.0, 0.2),
              ("6ny1", 13, 32, 1.2, 30000.0, 0.35)]


def _counts(picks_yx, m):
    t = m["true_yx"]
    h, w = m["micrograph"].shape
    margin = 0.5 * m["diameter"] / m["pixel_size"]
    inner = ((t >= margin) & (t < torch.tensor([float(h), float(w)]) - margin)).all(dim=1)
    r = 0.3 * m["diameter"] / m["pixel_size"]
    return picks_yx.shape[0], match_picks(picks_yx, t, r)[0], match_picks(picks_yx, t[inner], r)[0], int(inner.sum())


def _pooled(rows):
    n_pred, tp_all, tp_inner, n_true = (sum(r[k] for r in rows) for k in range(4))
    p, r = tp_all / max(n_pred, 1), tp_inner / max(n_true, 1)
    return p, r, 2 * p * r / max(p + r, 1e-12)


def _on_carbon(yx, m):
    c = yx.round().long().clamp(0, m["micrograph"].shape[0] - 1)
    return int(m["carbon"][c[:, 0], c[:, 1]].sum())


def test_carbon_film_is_found_and_only_when_there():
    for case in BLOB_CASES:
        m = _micrograph(*case)
        found = detect_carbon(m["micrograph"], m["pixel_size"], m["diameter"])
        assert found is not None
        assert float((found == m["carbon"]).float().mean()) > 0.97, case
    clean = _micrograph("3j5p", 14, 24, 1.0, 15000.0, 0.0)
    assert detect_carbon(clean["micrograph"], 1.0, clean["diameter"]) is None
    assert detect_carbon(3.0 * clean["micrograph"] + 100.0, 1.0, clean["diameter"]) is None


def test_blob_picker_f1_with_junk_and_carbon_edge():
    rows, on_carbon = [], 0
    for case in BLOB_CASES:
        m = _micrograph(*case)
        picks = pick_blobs(m["micrograph"], m["pixel_size"], PickingSettings(particle_diameter_angstrom=m["diameter"]),
                           ctf=m["ctf"])
        assert picks.carbon_fraction > 0.1
        rows.append(_counts(picks.coords_yx_px, m))
        on_carbon += _on_carbon(picks.coords_yx_px, m)
        # per-pick statistics for live threshold tuning are there, one per pick
        assert picks.scores.shape == picks.local_power.shape == picks.mass.shape == picks.amplitude.shape
    precision, recall, f1 = _pooled(rows)
    assert f1 >= 0.8, (precision, recall, f1)
    assert on_carbon == 0


@functools.lru_cache(maxsize=None)
def _map_templates(structure: str):
    from cryolive.simulate import atoms_to_volume, load_atoms

    return templates_from_map(atoms_to_volume(load_atoms(structure), 48, 5.0), 5.0, n_views=16)


TEMPLATE_CASES = [("3j5p", 21, 30, 1.0, 9000.0, 0.25), ("6ny1", 22, 24, 1.3, 20000.0, 0.3),
                  ("3j5p", 23, 40, 1.2, 32000.0, 0.2)]


def test_template_picker_f1_from_map_projections():
    rows = []
    for case in TEMPLATE_CASES:
        m = _micrograph(*case)
        picks = pick_templates(m["micrograph"], m["pixel_size"], _map_templates(case[0]), 5.0,
                               PickingSettings(particle_diameter_angstrom=m["diameter"]), ctf=m["ctf"])
        rows.append(_counts(picks.coords_yx_px, m))
        assert _on_carbon(picks.coords_yx_px, m) == 0
        assert picks.template_index.shape == picks.scores.shape == picks.angle_deg.shape
        assert bool((picks.angle_deg >= 0).all() and (picks.angle_deg < 360).all())
    precision, recall, f1 = _pooled(rows)
    assert f1 >= 0.9, (precision, recall, f1)


def test_template_picker_from_class_averages_and_rotated_templates():
    """Class-average-like templates (noiseless projections at 2.8 Å/px, 96² boxes, low-passed) and the same
    templates rotated in-plane by 37° pick the same particles: the rotation search covers the plane."""
    from cryolive.simulate import load_atoms, project_atoms_2d
    from cryolive.geometry import random_rotations

    atoms = load_atoms("6ny1")
    proj = project_atoms_2d(atoms, random_rotations(12, generator=torch.Generator().manual_seed(5)), 96, 2.8)
    classes = templates_from_classes(proj, 2.8)
    assert classes.shape == (12, 96, 96)
    m = _micrograph("6ny1", 31, 30, 1.1, 16000.0, 0.25)
    s = PickingSettings(particle_diameter_angstrom=m["diameter"])
    a = pick_templates(m["micrograph"], 1.1, classes, 2.8, s, ctf=m["ctf"])
    from cryolive.preprocess.template_picking import _rotate_2d

    rotated = _rotate_2d(classes, torch.tensor([37.0]))[:, 0]
    b = pick_templates(m["micrograph"], 1.1, rotated, 2.8, s, ctf=m["ctf"])
    fa, fb = _pooled([_counts(a.coords_yx_px, m)])[2], _pooled([_counts(b.coords_yx_px, m)])[2]
    assert fa >= 0.85 and fb >= 0.85, (fa, fb)
    assert abs(len(a) - len(b)) <= 0.1 * len(a) + 1


def test_template_inputs_are_checked_and_resampled():
    with pytest.raises(ValueError):
        templates_from_classes(torch.zeros(0, 32, 32), 2.0)
    with pytest.raises(ValueError):
        templates_from_classes(torch.zeros(3, 32, 40), 2.0)
    with pytest.raises(ValueError):
        templates_from_classes(torch.full((2, 32, 32), float("nan")), 2.0)
    t = templates_from_classes(torch.randn(4, 64, 64), 2.0, target_pixel_size_angstrom=4.0)
    assert t.shape == (4, 32, 32)
    # resampling keeps a centred Gaussian centred and its width in Å
    y, x = torch.meshgrid(torch.arange(64.0) - 32, torch.arange(64.0) - 32, indexing="ij")
    g = torch.exp(-(y**2 + x**2) / (2 * 6.0**2))[None]
    r = resample_images_2d(g, 1.0, 2.0)[0]
    assert r.shape == (32, 32) and tuple(torch.nonzero(r == r.max())[0].tolist()) == (16, 16)
    sigma_px = float(torch.sqrt((r * ((torch.arange(32.0) - 16)[None, :] ** 2)).sum() / r.sum()))
    assert sigma_px == pytest.approx(3.0, rel=0.05)


def test_nnpu_loss_is_non_negative_risk():
    pos = torch.zeros(100, dtype=torch.bool)
    pos[:5] = True
    good = torch.where(pos, 8.0, -8.0)
    loss, clipped = nnpu_loss(good, pos, prior=0.05)
    assert float(loss) < 0.01 and not clipped
    # labelled positives scored high and a prior far above their share: the unbiased estimate of the negative
    # risk goes below zero (overfitting); the non-negative correction returns its opposite to push it back up
    z = torch.where(pos, 8.0, 0.0)
    loss, clipped = nnpu_loss(z, pos, prior=0.5)
    assert clipped and float(loss) > 0
    z.requires_grad_(True)
    nnpu_loss(z, pos, prior=0.5)[0].backward()
    assert bool((z.grad[pos] > 0).all())  # descending the correction lowers the positives' scores


LEARN_TRAIN = [("6ny1", 41, 30, 1.2, 15000.0, 0.25), ("6ny1", 42, 24, 1.0, 25000.0, 0.3),
               ("6ny1", 43, 40, 1.3, 9000.0, 0.2)]
LEARN_TEST = [("6ny1", 44, 32, 1.1, 20000.0, 0.3), ("6ny1", 45, 24, 1.4, 32000.0, 0.25)]


@functools.lru_cache(maxsize=None)
def _trained_picker():
    train = [_micrograph(*c) for c in LEARN_TRAIN]
    gen = torch.Generator().manual_seed(0)
    # positives: 70 % of the particles (good 2D classes keep most of them, not all)
    positives = [m["true_yx"][torch.rand(len(m["true_yx"]), generator=gen) < 0.7] for m in train]
    picker = LearnedPicker(train[0]["diameter"], seed=1)
    report = picker.fit([m["micrograph"] for m in train], [m["pixel_size"] for m in train], positives,
                        ctfs=[m["ctf"] for m in train], steps=250)
    return picker, report


def test_learned_picker_f1_on_held_out_micrographs():
    picker, report = _trained_picker()
    assert report.n_micrographs == 3 and report.n_positives > 20
    rows = []
    for case in LEARN_TEST:
        m = _micrograph(*case)
        picks = picker.pick(m["micrograph"], m["pixel_size"], ctf=m["ctf"])
        rows.append(_counts(picks.coords_yx_px, m))
        assert _on_carbon(picks.coords_yx_px, m) == 0
        assert bool((picks.probability > 0).all() and (picks.probability < 1).all())
    precision, recall, f1 = _pooled(rows)
    assert f1 >= 0.9, (precision, recall, f1)


def test_learned_picker_state_round_trip(tmp_path):
    picker, _ = _trained_picker()
    m = _micrograph(*LEARN_TEST[0])
    before = m["micrograph"].clone()
    a = picker.pick(m["micrograph"], m["pixel_size"], ctf=m["ctf"])
    assert torch.equal(before, m["micrograph"])
    path = tmp_path / "picker.pt"
    picker.save(path)
    loaded = LearnedPicker.load(path)
    b = loaded.pick(m["micrograph"], m["pixel_size"], ctf=m["ctf"])
    assert loaded.threshold == picker.threshold
    for key, value in picker.net.state_dict().items():  # the weights round-trip exactly
        assert torch.equal(value, loaded.net.state_dict()[key]), key
    # the picks agree; convolution kernels may differ in the last bits between runs (oneDNN picks its algorithm by
    # memory layout), which can move a pick sitting exactly at the threshold, so compare them as sets
    _, precision, recall, _ = match_picks(a.coords_yx_px.double(), b.coords_yx_px.double(),
                                          torch.full((len(b.coords_yx_px),), 1.0))
    assert len(a.coords_yx_px) > 5 and precision >= 0.97 and recall >= 0.97
    common = min(len(a.scores), len(b.scores), 5)
    assert torch.allclose(a.scores[:common], b.scores[:common], rtol=1e-4, atol=1e-4)
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(ValueError):
        LearnedPicker.load(tmp_path / "junk.pt")


def test_learned_picker_rejects_bad_input():
    p = LearnedPicker(150.0)
    with pytest.raises(RuntimeError):
        p.pick(torch.zeros(256, 256), 1.0)
    with pytest.raises(ValueError):
        p.fit([torch.zeros(256, 256)], 1.0, [])
    with pytest.raises(ValueError):
        p.fit([torch.rand(256, 256)], 1.0, [torch.zeros(0, 2)])
    with pytest.raises(ValueError):
        LearnedPicker(0.0)


def test_session_uses_the_picker_the_settings_choose(tmp_path):
    """``cryolive process`` picks with ``PickingSettings.picker``: templates from an MRC stack, a saved learned
    model; a missing file is a clear error."""
    from cryolive.config import Settings
    from cryolive.io.mrc import write_mrc
    from cryolive.session.pipeline import StageFunctions, _pick

    m = _micrograph(*TEMPLATE_CASES[0])
    fns = StageFunctions().resolved()
    tpl_path = tmp_path / "templates.mrcs"
    write_mrc(tpl_path, _map_templates("3j5p").numpy(), 5.0, stack=True)
    s = Settings(picking=PickingSettings(particle_diameter_angstrom=m["diameter"], picker="template",
                                         templates_path=str(tpl_path)))
    picks = _pick(fns, m["micrograph"], m["pixel_size"], s.picking, m["ctf"])
    assert _pooled([_counts(picks.coords_yx_px, m)])[2] >= 0.9
    blob = _pick(fns, m["micrograph"], m["pixel_size"], PickingSettings(particle_diameter_angstrom=m["diameter"]),
                 m["ctf"])
    assert _pooled([_counts(blob.coords_yx_px, m)])[2] >= 0.8

    picker, _ = _trained_picker()
    model_path = tmp_path / "picker.pt"
    picker.save(model_path)
    mt = _micrograph(*LEARN_TEST[1])
    learned = _pick(fns, mt["micrograph"], mt["pixel_size"],
                    PickingSettings(particle_diameter_angstrom=mt["diameter"], picker="learned",
                                    learned_model_path=str(model_path)), mt["ctf"])
    direct = picker.pick(mt["micrograph"], mt["pixel_size"], ctf=mt["ctf"])
    assert torch.allclose(learned.coords_yx_px, direct.coords_yx_px)

    with pytest.raises(ValueError, match="missing.mrcs"):
        _pick(fns, m["micrograph"], m["pixel_size"],
              PickingSettings(picker="template", templates_path=str(tmp_path / "missing.mrcs")), m["ctf"])
    with pytest.raises(ValueError):
        PickingSettings(picker="learned")


def test_command_line_picker_options(tmp_path):
    import typer

    from cryolive.cli import _settings

    tpl = tmp_path / "classes.mrcs"
    tpl.write_bytes(b"")  # existence is checked here; the content when picking
    common = (1.0, 300.0, 2.7, 0.1, 1.0, None, False, 140.0, "C1", "cpu", 0, 10, 100, "*.mrc", False)
    s = _settings(*common, picker="template", templates=tpl)
    assert s.picking.picker == "template" and s.picking.templates_path == str(tpl.resolve())
    assert s.picking.particle_diameter_angstrom == 140.0
    assert _settings(*common).picking.picker == "blob"
    with pytest.raises(typer.BadParameter, match="templates_path"):
        _settings(*common, picker="template")
    with pytest.raises(typer.BadParameter, match="no such file"):
        _settings(*common, picker="learned", picker_model=tmp_path / "missing.pt")
