"""The carbon film at a hole edge in simulated movies (``SimulationSettings.carbon_coverage``)."""

from __future__ import annotations

import pytest
import torch

from cryolive.simulate import MovieSimulator, SimulationSettings
from cryolive.simulate.physics import carbon_edge_potential

torch.set_num_threads(1)


def _settings(**kw):
    base = dict(structures=["6ny1"], image_shape_px=(384, 384), n_frames=20, pixel_size_angstrom=1.5,
                max_drift_angstrom=0.0, local_motion_angstrom=0.0, gain_variation=0.0, n_hot_pixels=0,
                oversampling=1, particles_per_micrograph=30, seed=3)
    base.update(kw)
    return SimulationSettings(**base)


@pytest.mark.parametrize("coverage", [0.1, 0.35, 0.6])
def test_carbon_edge_covers_the_requested_fraction(coverage):
    pot, mask = carbon_edge_potential((200, 300), 1.2, coverage, generator=torch.Generator().manual_seed(1), pad_px=50)
    assert pot.shape == (300, 400) and mask.shape == (200, 300)
    assert float(mask.float().mean()) == pytest.approx(coverage, abs=0.01)
    inner = pot[50:250, 50:350]
    # ~11 V mean inner potential × 150 Å on the film, ~0 in the hole (away from the softened edge)
    assert 1200 < float(inner[mask].median()) < 2200
    assert abs(float(inner[~mask].median())) < 50


def test_particles_only_in_the_hole_and_film_darker():
    s = _settings(carbon_coverage=0.3)
    sim = MovieSimulator(s, 0)
    truth = sim.truth()
    mask = truth.carbon_mask
    assert mask is not None and float(mask.float().mean()) == pytest.approx(0.3, abs=0.01)
    yx = truth.particles["coords_yx_px"].round().long()
    assert len(yx) > 5 and not bool(mask[yx[:, 0], yx[:, 1]].any())
    ref = truth.reference
    # amplitude contrast of ~1,700 V·Å of carbon: the film is clearly darker than the hole
    assert float(ref[mask].mean()) < 0.9 * float(ref[~mask].mean())
    without = MovieSimulator(_settings(), 0).truth()
    assert without.carbon_mask is None
    # the rest of the micrograph draws from the same random stream (defocus, ice, ...)
    assert without.defocus_u == truth.defocus_u and without.ice_thickness_angstrom == truth.ice_thickness_angstrom


def test_carbon_edge_in_frames_with_local_motion():
    s = _settings(carbon_coverage=0.2, local_motion_angstrom=2.0, n_frames=4, image_shape_px=(256, 256))
    sim = MovieSimulator(s, 1)
    frames = list(sim.expected_frames())
    mask = sim.truth().carbon_mask
    for f in frames:
        assert float(f[mask].mean()) < 0.9 * float(f[~mask].mean())
