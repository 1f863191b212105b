"""Blob picking against ground truth on physically scaled simulated micrographs.

Micrographs (``_synthetic_micrographs.make_micrograph``): dose-weighted sums of 24–40 e/Å² at 1–1.5 Å/px (Poisson
counts, ~1 count/px/frame), real atomic models (3j5p, 6ny1) or irregular complexes of 100–200 Å in random
orientations, weak-phase image formation with the CTF at 0.8–2.5 µm defocus, amorphous-ice phase noise, a slow
ice-thickness gradient and two dense junk aggregates. A pick is correct within 0.3 × the particle diameter
(greedy one-to-one matching); truth closer to the edge than the picker's margin is not required (recall), but
picks that match it are not counted false (precision).
"""

from __future__ import annotations

import pytest
import torch
from _synthetic_micrographs import make_micrograph

from cryolive.config import PickingSettings
from cryolive.preprocess import picking
from cryolive.preprocess.picking import match_picks, pick_blobs

torch.set_num_threads(1)


def _evaluate(m, picks):
    d, ps = m.diameter_angstrom, m.pixel_size_angstrom
    margin = 0.5 * d / ps  # the picker leaves out only particles cut by the edge
    h, w = m.noisy.shape
    t = m.true_yx_px
    inner = (t[:, 0] >= margin) & (t[:, 1] >= margin) & (t[:, 0] < h - margin) & (t[:, 1] < w - margin)
    _, precision, _, _ = match_picks(picks.coords_yx_px, t, 0.3 * d / ps)
    _, _, recall, _ = match_picks(picks.coords_yx_px, t[inner], 0.3 * d / ps)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return precision, recall, f1


def _settings(m, **kw):
    return PickingSettings(particle_diameter_angstrom=m.diameter_angstrom, **kw)


def test_match_picks_greedy_one_to_one():
    true = torch.tensor([[0.0, 0.0], [0.0, 10.0], [50.0, 50.0]])
    pred = torch.tensor([[0.0, 4.0], [0.0, 5.5], [0.5, 0.5], [30.0, 30.0]])
    # (0.5, 0.5)→(0, 0) is closest, then (0, 5.5)→(0, 10) at 4.5; (0, 4) has nothing left within 6 px
    tp, precision, recall, f1 = match_picks(pred, true, 6.0)
    assert tp == 2
    assert precision == pytest.approx(0.5) and recall == pytest.approx(2 / 3)
    assert f1 == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert match_picks(pred, true, 0.1)[0] == 0
    assert match_picks(torch.zeros(0, 2), true, 5.0) == (0, 1.0, 0.0, 0.0)


CASES = [
    # real models: 3j5p (~143 Å) and 6ny1 (~160 Å, ~140 kDa, elongated: the hardest)
    dict(seed=101, structure="3j5p", defocus_angstrom=8000.0, dose=24.0, pixel_size_angstrom=1.0),
    dict(seed=102, structure="3j5p", defocus_angstrom=25000.0, dose=40.0, pixel_size_angstrom=1.3),
    dict(seed=103, structure="6ny1", defocus_angstrom=25000.0, dose=30.0, pixel_size_angstrom=1.3),
    # irregular complexes of other sizes
    dict(seed=107, diameter_angstrom=100.0, defocus_angstrom=25000.0, dose=30.0, pixel_size_angstrom=1.1),
    # known gap: small particles at the lowest dose beside a 5-diameter aggregate — shoulder peaks on its rim
    # and between particles bring precision to ~0.65 (recall 0.9)
    pytest.param(
        dict(seed=104, diameter_angstrom=100.0, defocus_angstrom=15000.0, dose=24.0, pixel_size_angstrom=1.0),
        marks=pytest.mark.xfail(reason="precision ~0.65 for 100 Å particles at 24 e/Å² beside a large aggregate"),
    ),
    dict(seed=105, diameter_angstrom=150.0, defocus_angstrom=12000.0, dose=30.0, pixel_size_angstrom=1.2),
    dict(seed=106, diameter_angstrom=200.0, defocus_angstrom=20000.0, dose=30.0, pixel_size_angstrom=1.5),
]


def _case(c):
    return c if isinstance(c, dict) else c.values[0]


@pytest.fixture(scope="module")
def results():
    out = []
    for case in map(_case, CASES):
        m = make_micrograph(**case)
        picks = pick_blobs(m.noisy, m.pixel_size_angstrom, _settings(m), ctf=m.ctf)
        out.append((case, m, picks, _evaluate(m, picks)))
    return out


@pytest.mark.parametrize("i", [pytest.param(i, marks=getattr(c, "marks", ())) for i, c in enumerate(CASES)])
def test_recall_and_precision_at_realistic_dose(results, i):
    case, m, picks, (precision, recall, f1) = results[i]
    assert precision >= 0.7 and recall >= 0.7, (case, precision, recall, len(picks))


def test_mean_f1_over_conditions(results):
    f1 = [r[3][2] for r in results]
    assert sum(f1) / len(f1) >= 0.8, f1


def test_picks_are_accurate(results):
    for case, m, picks, _ in results:
        d_px = m.diameter_angstrom / m.pixel_size_angstrom
        dist = torch.cdist(picks.coords_yx_px, m.true_yx_px).min(dim=1).values
        matched = dist < 0.3 * d_px
        assert float(dist[matched].median()) < 0.15 * d_px, case  # centred: median error < 15% of the diameter


def test_junk_aggregates_are_rejected(results):
    # candidates on the aggregates (within their radius) are mostly rejected, particles mostly not
    n_junk_before = n_junk_after = n_particle_rejected = n_particle = 0
    for case, m, picks, _ in results:
        ps = m.pixel_size_angstrom
        settings = _settings(m, threshold=picks.threshold)
        everything = pick_blobs(m.noisy, ps, settings, ctf=m.ctf)  # same threshold, junk rule applied
        factor, mass_z = picking.JUNK_POWER_FACTOR, picking.JUNK_MASS_Z
        try:
            picking.JUNK_POWER_FACTOR = picking.JUNK_MASS_Z = float("inf")
            unfiltered = pick_blobs(m.noisy, ps, settings, ctf=m.ctf)
        finally:
            picking.JUNK_POWER_FACTOR, picking.JUNK_MASS_Z = factor, mass_z
        on_junk = lambda c: (torch.cdist(c, m.junk_yx_px) < m.junk_radius_px[None, :]).any(dim=1)  # noqa: E731
        radius = 0.3 * m.diameter_angstrom / ps
        on_particle = lambda c: torch.cdist(c, m.true_yx_px).min(dim=1).values < radius  # noqa: E731
        n_junk_before += int(on_junk(unfiltered.coords_yx_px).sum())
        n_junk_after += int(on_junk(everything.coords_yx_px).sum())
        part = on_particle(unfiltered.coords_yx_px) & ~on_junk(unfiltered.coords_yx_px)
        n_particle += int(part.sum())
        rejected = (unfiltered.local_power > everything.power_limit) | (unfiltered.mass > mass_z)
        n_particle_rejected += int((part & rejected).sum())
    assert n_junk_before >= 10
    assert n_junk_after <= 0.35 * n_junk_before, (n_junk_after, n_junk_before)
    assert n_particle_rejected <= 0.05 * n_particle, (n_particle_rejected, n_particle)


def test_picks_within_margin_sorted_and_above_threshold(results):
    for case, m, picks, _ in results:
        margin = 0.5 * m.diameter_angstrom / m.pixel_size_angstrom  # the particle lies inside
        h, w = m.noisy.shape
        c = picks.coords_yx_px
        assert c.dtype == torch.float32 and c.shape == (len(picks), 2)
        assert bool((c[:, 0] >= margin - 1).all() and (c[:, 0] <= h - margin + 1).all())
        assert bool((c[:, 1] >= margin - 1).all() and (c[:, 1] <= w - margin + 1).all())
        assert bool((picks.scores[:-1] >= picks.scores[1:]).all())
        assert bool((picks.scores >= picks.threshold).all())
        assert bool((picks.local_power <= picks.power_limit).all())
        assert bool((picks.mass <= picking.JUNK_MASS_Z).all())
        assert picks.local_power.shape == picks.scores.shape == picks.amplitude.shape


def test_empty_micrograph_gives_few_picks():
    for seed, structure, defocus in [(201, "3j5p", 15000.0), (202, None, 8000.0)]:
        kw = dict(structure=structure) if structure else dict(diameter_angstrom=100.0)
        m = make_micrograph(seed=seed, defocus_angstrom=defocus, dose=24.0, n_particles=0, n_junk=0, **kw)
        picks = pick_blobs(m.noisy, 1.0, _settings(m), ctf=m.ctf)
        assert len(picks) <= 0.1 * picks.n_candidates + 2, (len(picks), picks.n_candidates)


def test_invariant_to_gain_and_offset():
    m = make_micrograph(seed=301, structure="3j5p", defocus_angstrom=15000.0, dose=30.0)
    before = m.noisy.clone()
    a = pick_blobs(m.noisy, 1.0, _settings(m), ctf=m.ctf)
    assert torch.equal(m.noisy, before)  # the input is not modified
    b = pick_blobs(3.7 * m.noisy - 55.0, 1.0, _settings(m), ctf=m.ctf)
    assert len(a) == len(b) and len(a) > 5
    assert torch.allclose(a.coords_yx_px, b.coords_yx_px, atol=1e-2)
    assert torch.allclose(a.scores, b.scores, atol=1e-4)


def test_without_ctf_and_with_fixed_threshold_and_cap():
    m = make_micrograph(seed=302, diameter_angstrom=150.0, defocus_angstrom=15000.0, dose=30.0)
    # without the CTF (first CTF lobe covers the picking band at this defocus) the picker still works
    picks = pick_blobs(m.noisy, 1.0, _settings(m), ctf=None)
    precision, recall, _ = _evaluate(m, picks)
    assert precision >= 0.7 and recall >= 0.7
    fixed = pick_blobs(m.noisy, 1.0, _settings(m, threshold=4.0), ctf=m.ctf)
    assert fixed.threshold == 4.0 and bool((fixed.scores >= 4.0).all())
    assert 0 < len(fixed) < len(pick_blobs(m.noisy, 1.0, _settings(m, threshold=3.0), ctf=m.ctf))
    capped = pick_blobs(m.noisy, 1.0, _settings(m, max_picks_per_micrograph=5), ctf=m.ctf)
    assert len(capped) == 5
    full = pick_blobs(m.noisy, 1.0, _settings(m), ctf=m.ctf)
    assert torch.allclose(capped.coords_yx_px, full.coords_yx_px[:5], atol=1e-3)  # the best five, same places


def _simulator_micrograph(structure: str, seed: int, n_frames: int, pixel_size: float):
    """A motion-free sum of Poisson frames from cryolive's physics simulator (atomic model, ice with its
    structure factor, inelastic loss, radiation damage, junk fragments), with its truth."""
    from cryolive.simulate import MovieSimulator, SimulationSettings

    s = SimulationSettings(structures=[structure], n_frames=n_frames, pixel_size_angstrom=pixel_size,
                           max_drift_angstrom=0.0, local_motion_angstrom=0.0, gain_variation=0.0, n_hot_pixels=0,
                           seed=seed, oversampling=1)
    sim = MovieSimulator(s, 0)
    gen = torch.Generator().manual_seed(seed)
    total = sum(torch.poisson(lam.clamp(min=0), generator=gen) for lam in sim.expected_frames())
    truth = sim.truth()
    is_particle = torch.tensor([name != "junk" for name in truth.particles["structure"]])
    coords = truth.particles["coords_yx_px"][is_particle]
    diameter = float(truth.particles["diameter_angstrom"][is_particle].mean())
    ctf = dict(defocus_u=truth.defocus_u, defocus_v=truth.defocus_v, defocus_angle_deg=truth.defocus_angle_deg,
               voltage_kv=s.voltage_kv, cs_mm=s.cs_mm, amplitude_contrast=s.amplitude_contrast)
    return total, coords, diameter, ctf, truth


@pytest.mark.parametrize("structure, seed, n_frames, pixel_size", [("6ny1", 8, 32, 1.2), ("3j5p", 9, 40, 1.0)])
def test_on_physics_simulator_micrographs(structure, seed, n_frames, pixel_size):
    micrograph, true_yx, diameter, ctf, truth = _simulator_micrograph(structure, seed, n_frames, pixel_size)
    picks = pick_blobs(micrograph, pixel_size, PickingSettings(particle_diameter_angstrom=diameter), ctf=ctf)
    margin = 0.5 * diameter / pixel_size
    h, w = micrograph.shape
    inner = ((true_yx >= margin) & (true_yx < torch.tensor([h, w]) - margin)).all(dim=1)
    _, precision, _, _ = match_picks(picks.coords_yx_px, true_yx, 0.3 * diameter / pixel_size)
    _, _, recall, _ = match_picks(picks.coords_yx_px, true_yx[inner], 0.3 * diameter / pixel_size)
    assert precision >= 0.7 and recall >= 0.7, (structure, truth.defocus_u, precision, recall)
