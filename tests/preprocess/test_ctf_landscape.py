"""Defocus landscape (stage tilt, per-particle defocus) and relative ice thickness against the simulator's truth.

Micrographs are the simulator's noiseless reference (1024² at 1 Å/px, 40 e/Å²) with Poisson noise; particle
heights in the ice are switched off where per-particle defocus is compared, since the landscape models the
tilted plane and not the height of each particle in the ice.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from cryolive.preprocess.ctf_fit import estimate_ctf
from cryolive.preprocess.ctf_landscape import (
    assess_specimen,
    estimate_ctf_patches,
    estimate_ice_thickness,
    fit_defocus_plane,
)
from cryolive.preprocess.extraction import per_particle_defocus
from cryolive.simulate.movies import MovieSimulator, SimulationSettings

DOSE = 40.0  # e/Å² in the sum


def _micrograph(seed: int, **kw):
    """(noisy non-dose-weighted sum (h, w), truth) of a simulated exposure."""
    base = dict(image_shape_px=(1024, 1024), n_frames=40, dose_per_frame=DOSE / 40, particles_per_micrograph=80,
                local_motion_angstrom=0.0, oversampling=1, particle_height_spread=False, seed=seed,
                defocus_range_angstrom=(8000.0, 30000.0))
    base.update(kw)
    s = SimulationSettings(**base)
    truth = MovieSimulator(s, seed).truth()
    img = torch.poisson(truth.reference.clamp(min=0), generator=torch.Generator().manual_seed(seed))
    return img, truth


def _angle_diff_deg(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


@pytest.mark.parametrize("seed", [0, 6, 7])  # 6 and 7: the highest defoci (2.7 µm), the hardest
def test_tilted_micrograph_gives_tilt_axis_and_particle_defocus(seed):
    img, truth = _micrograph(seed, stage_tilt_deg=30.0)
    glob = estimate_ctf(img, 1.0, 300.0, 2.7, 0.1)
    land = estimate_ctf_patches(img, 1.0, 300.0, 2.7, 0.1, global_result=glob)
    assert abs(land.stage_tilt_deg - 30.0) <= 3.0, (land.stage_tilt_deg, truth.defocus_u)
    assert _angle_diff_deg(land.tilt_axis_deg, truth.tilt_axis_deg) <= 10.0, (land.tilt_axis_deg, truth.tilt_axis_deg)
    coords = truth.particles["coords_yx_px"]
    du, dv, _ = per_particle_defocus(coords, glob, landscape=land)
    mean_fit = (du + dv) / 2
    mean_truth = (truth.particles["defocus_u"] + truth.particles["defocus_v"]) / 2
    assert float(mean_truth.max() - mean_truth.min()) > 400  # the plane spans > 400 Å over the particles
    rms = float((mean_fit - mean_truth).pow(2).mean().sqrt())
    print(f"tilt 30°: fitted {land.stage_tilt_deg:.2f}°, axis error "
          f"{_angle_diff_deg(land.tilt_axis_deg, truth.tilt_axis_deg):.2f}°, per-particle defocus RMS {rms:.1f} Å")
    assert rms <= 100.0, rms
    # without the landscape the error would be the plane itself
    assert float((float(mean_fit.mean()) - mean_truth).pow(2).mean().sqrt()) > 2 * rms


@pytest.mark.parametrize("seed, px, kv", [(6, 1.2, 200.0), (11, 0.9, 300.0)])
def test_tilted_with_particle_heights_other_pixel_and_voltage(seed, px, kv):
    """30° tilt with particles spread through the ice (their own heights, which no landscape models), at 200 kV /
    1.2 Å and 300 kV / 0.9 Å: tilt within 3°, axis within 10°, per-particle mean defocus within 100 Å RMS."""
    img, truth = _micrograph(seed, stage_tilt_deg=30.0, particle_height_spread=True, pixel_size_angstrom=px,
                             voltage_kv=kv)
    glob = estimate_ctf(img, px, kv, 2.7, 0.1)
    land = estimate_ctf_patches(img, px, kv, 2.7, 0.1, global_result=glob)
    assert abs(land.stage_tilt_deg - 30.0) <= 3.0, land.stage_tilt_deg
    assert _angle_diff_deg(land.tilt_axis_deg, truth.tilt_axis_deg) <= 10.0, (land.tilt_axis_deg, truth.tilt_axis_deg)
    du, dv, _ = per_particle_defocus(truth.particles["coords_yx_px"], glob, landscape=land)
    mean_truth = (truth.particles["defocus_u"] + truth.particles["defocus_v"]) / 2
    rms = float(((du + dv) / 2 - mean_truth).pow(2).mean().sqrt())
    print(f"tilt 30° with heights, {kv:.0f} kV, {px} Å/px: fitted {land.stage_tilt_deg:.2f}°, axis error "
          f"{_angle_diff_deg(land.tilt_axis_deg, truth.tilt_axis_deg):.2f}°, per-particle defocus RMS {rms:.1f} Å")
    assert rms <= 100.0, rms


@pytest.mark.parametrize("seed", [0, 3])
def test_untilted_micrograph_gives_no_tilt(seed):
    img, truth = _micrograph(seed, stage_tilt_deg=0.0)
    land = estimate_ctf_patches(img, 1.0, 300.0, 2.7, 0.1)
    assert land.stage_tilt_deg < 3.0, land.stage_tilt_deg
    offsets = land(truth.particles["coords_yx_px"])
    assert float(offsets.abs().max()) < 0.05 * 1024 * 1.0 * 1.5  # within tan(3°)·half-diagonal


def test_landscape_convention_matches_simulator_formula():
    """The callable is the plane of the module docstring: defocus rises along (−sin φ, cos φ) in (x, y)."""
    phi = math.radians(120.0)
    t = math.tan(math.radians(20.0))
    a, b = -t * math.sin(phi), t * math.cos(phi)  # Å/px at 1 Å/px
    ys, xs = np.meshgrid(np.arange(100, 1000, 200.0), np.arange(100, 1000, 200.0), indexing="ij")
    centres = np.stack([ys.ravel(), xs.ravel()], -1)
    d = 15000 + a * (centres[:, 1] - 512) + b * (centres[:, 0] - 512)
    d[[3, 11, 17]] += [3000.0, -2500.0, 4000.0]  # three wild patches
    coef, used = fit_defocus_plane(centres, d, (1024, 1024))
    assert not used[[3, 11, 17]].any() and used.sum() == 22
    np.testing.assert_allclose(coef, [15000, a, b], atol=1e-6)


def test_ice_thickness_ranks_micrographs():
    """200 → 1000 Å ice, random defocus and astigmatism: the relative thickness ranks them (Spearman ≥ 0.9)."""
    thickness = np.linspace(200.0, 1000.0, 9)
    est = []
    for i, t in enumerate(thickness):
        img, _ = _micrograph(100 + i, image_shape_px=(512, 512), particles_per_micrograph=30,
                             ice_thickness_range_angstrom=(t, t), defocus_range_angstrom=(5000.0, 35000.0),
                             particle_height_spread=True)
        e = estimate_ice_thickness(img, 1.0)
        assert e.flag == "ok"
        est.append(e.relative_thickness)
    rho = spearmanr(thickness, est).statistic
    print(f"ice thickness Spearman {rho:.3f}")
    assert rho >= 0.9, (rho, est)


def test_ice_thickness_needs_the_water_ring():
    img = torch.poisson(torch.full((256, 256), 40.0), generator=torch.Generator().manual_seed(0))
    e = estimate_ice_thickness(img, 1.8)
    assert math.isnan(e.relative_thickness) and e.flag == "not_measurable"
    # pure shot noise (no ice, no specimen): nothing above the noise floor (200 Å of ice gives ≈ 0.016)
    assert abs(estimate_ice_thickness(img, 1.0).relative_thickness) < 1e-3


def test_pipeline_records_tilt_ice_and_per_particle_defocus(tmp_path):
    """process_exposure on a simulated 30°-tilted movie: tilt in the metrics, per-particle defocus in the star."""
    from cryolive.config import Optics, PickingSettings, Settings
    from cryolive.io.star import read_star
    from cryolive.session.pipeline import StageFunctions, process_exposure
    from cryolive.simulate.dataset import write_movie

    s = SimulationSettings(image_shape_px=(1024, 1024), n_frames=4, dose_per_frame=10.0, particles_per_micrograph=60,
                           local_motion_angstrom=0.0, max_drift_angstrom=0.0, oversampling=1, gain_variation=0.0,
                           n_hot_pixels=0, particle_height_spread=False, stage_tilt_deg=30.0, movie_format="mrc",
                           defocus_range_angstrom=(10000.0, 20000.0), seed=3)
    sim = MovieSimulator(s, 0)
    path = write_movie(sim, tmp_path / sim.name)
    truth = sim.truth()
    coords = truth.particles["coords_yx_px"]

    def sum_frames(frames, pixel_size_angstrom, dose_per_frame, voltage_kv, settings):
        total = frames.sum(0)
        return SimpleNamespace(shifts_yx_px=torch.zeros(frames.shape[0], 2), micrograph=total,
                               micrograph_nodw=total.clone(), accum_motion_total=0.0, accum_motion_early=0.0,
                               accum_motion_late=0.0)

    def truth_picks(micrograph, pixel_size_angstrom, settings, ctf=None):
        return SimpleNamespace(coords_yx_px=coords, scores=torch.ones(len(coords)))

    settings = Settings(optics=Optics(pixel_size_angstrom=1.0), dose_per_frame=10.0, n_workers=0,
                        picking=PickingSettings(particle_diameter_angstrom=150.0))
    stages = StageFunctions(align_movie=sum_frames, pick_blobs=truth_picks)
    outcome = process_exposure(path, settings, tmp_path / "out", stages=stages)
    assert outcome.ok, outcome.error
    ctf = next(st for st in outcome.stages if st.stage == "ctf").metrics
    assert abs(ctf["stage_tilt_deg"] - 30.0) <= 3.0, ctf
    assert _angle_diff_deg(ctf["tilt_axis_deg"], truth.tilt_axis_deg) <= 10.0, (ctf, truth.tilt_axis_deg)
    assert math.isfinite(ctf["ice_thickness_angstrom"])
    rows = read_star(tmp_path / "out" / "particles" / f"{path.stem}.star")["particles"]
    fit = {(round(y), round(x)): (u + v) / 2 for y, x, u, v in
           zip(rows["rlnCoordinateY"], rows["rlnCoordinateX"], rows["rlnDefocusU"], rows["rlnDefocusV"])}
    mean_truth = ((truth.particles["defocus_u"] + truth.particles["defocus_v"]) / 2).tolist()
    err = [fit[(round(float(y)), round(float(x)))] - m for (y, x), m in zip(coords.tolist(), mean_truth)
           if (round(float(y)), round(float(x))) in fit]
    assert len(err) >= 0.9 * len(coords)
    assert float(np.sqrt(np.mean(np.square(err)))) <= 100.0
    # specimen flags and the dashboard's CTF data (OUT/ctf/<movie>.star, _diag.mrc, _diag.png)
    assert ctf["specimen_flag"] == "ok" and ctf["carbon_heterogeneity"] < 1.35, ctf
    out_ctf = next(st for st in outcome.stages if st.stage == "ctf").outputs
    assert set(out_ctf) == {"ctf_star", "ctf_diag_mrc", "ctf_diag_png"}
    blocks = read_star(tmp_path / "out" / out_ctf["ctf_star"])
    prof = blocks["ctf_profile"]
    assert np.all(np.diff(prof["rlnResolution"].to_numpy()) > 0) and len(prof) > 100
    band = (prof["rlnResolution"] > 1 / 20) & (prof["rlnResolution"] < 1 / 6)
    assert np.corrcoef(prof["cryoliveCtfSpectrum"][band], prof["cryoliveCtfFit"][band])[0, 1] > 0.5
    assert float(blocks["ctf"]["rlnDefocusU"]) == pytest.approx(ctf["defocus_u"], abs=0.01)
    import mrcfile

    diag = mrcfile.read(tmp_path / "out" / out_ctf["ctf_diag_mrc"])
    assert diag.shape == (512, 512) and np.abs(diag).max() <= 3.0
    assert (tmp_path / "out" / out_ctf["ctf_diag_png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_landscape_settings_are_in_the_ctf_settings_hash():
    """Changing the patch grid or search range re-runs the CTF stage (and everything after it), not motion."""
    from cryolive.config import CTFSettings, Settings
    from cryolive.session.pipeline import stage_hashes

    base = stage_hashes(Settings())
    for change in (dict(landscape_patches=(7, 5)), dict(landscape_search_range_angstrom=5000.0),
                   dict(carbon_heterogeneity_threshold=2.0), dict(thick_ice_ring_power=0.03)):
        h = stage_hashes(Settings(ctf=CTFSettings(**change)))
        assert h["motion"] == base["motion"]
        assert h["ctf"] != base["ctf"] and h["picking"] != base["picking"], change


def test_landscape_uses_the_settings_grid():
    img, _ = _micrograph(1, image_shape_px=(512, 512), particles_per_micrograph=20)
    from cryolive.config import CTFSettings

    land = estimate_ctf_patches(img, 1.0, 300.0, 2.7, 0.1, CTFSettings(landscape_patches=(2, 3), tile_size_px=256))
    assert land.patch_centres_yx_px.shape == (6, 2)


@pytest.mark.parametrize(
    "thickness, coverage, px, expected",
    [
        (250.0, 0.0, 1.0, "ok"),  # thin ice, no carbon
        (500.0, 0.0, 1.3, "ok"),
        (1200.0, 0.0, 0.85, "thick_ice"),
        (250.0, 0.15, 1.0, "carbon"),  # a carbon edge over 15 % of the image
        (400.0, 0.4, 0.85, "carbon"),
        (1000.0, 0.3, 1.3, "carbon+thick_ice"),
    ],
)
def test_specimen_flags_carbon_edge_and_thick_ice(thickness, coverage, px, expected):
    """cryolive.simulate exposures (40 e/Å², particles, junk) with a carbon film at a hole edge (the simulator's
    ``carbon_coverage``) and ice of 250–1200 Å: assess_specimen flags carbon and thick ice, and only those."""
    img, truth = _micrograph(200 + int(thickness) + int(100 * coverage), image_shape_px=(768, 768),
                             particles_per_micrograph=50, pixel_size_angstrom=px,
                             ice_thickness_range_angstrom=(thickness, thickness), carbon_coverage=coverage,
                             defocus_range_angstrom=(8000.0, 30000.0), particle_height_spread=True)
    a = assess_specimen(img, px)
    assert a.flag == expected, (a, truth.defocus_u)


def test_global_fit_over_a_wide_range_of_conditions():
    """estimate_ctf over defocus 0.5–3.5 µm, astigmatism 0–1000 Å, pixel 0.8–1.5 Å, 200 and 300 kV (1024², 40 e/Å²):
    mean-defocus RMS error ≤ 50 Å, median ≤ 20 Å, U and V within the same bars, angle within 5° where the
    astigmatism exceeds 200 Å."""
    rng = np.random.default_rng(0)
    err_mean, err_uv, err_angle = [], [], []
    for i in range(12):
        px = float(rng.uniform(0.8, 1.5))
        kv = (200.0, 300.0)[i % 2]
        s = SimulationSettings(image_shape_px=(1024, 1024), n_frames=40, dose_per_frame=1.0,
                               particles_per_micrograph=int(60 / px**2) + 5, pixel_size_angstrom=px, voltage_kv=kv,
                               local_motion_angstrom=0.0, oversampling=1, seed=1000 + i,
                               defocus_range_angstrom=(5000.0, 35000.0), max_astigmatism_angstrom=1000.0)
        truth = MovieSimulator(s, i).truth()
        img = torch.poisson(truth.reference.clamp(min=0), generator=torch.Generator().manual_seed(i))
        r = estimate_ctf(img, px, kv, 2.7, 0.1)
        err_mean.append((r.defocus_u + r.defocus_v) / 2 - (truth.defocus_u + truth.defocus_v) / 2)
        err_uv += [r.defocus_u - truth.defocus_u, r.defocus_v - truth.defocus_v]
        if truth.defocus_u - truth.defocus_v > 200:
            err_angle.append(abs((r.defocus_angle_deg - truth.defocus_angle_deg + 90) % 180 - 90))
    print(f"wide range: mean defocus RMS {np.sqrt(np.mean(np.square(err_mean))):.1f} Å median "
          f"{np.median(np.abs(err_mean)):.1f} Å; U/V RMS {np.sqrt(np.mean(np.square(err_uv))):.1f} Å median "
          f"{np.median(np.abs(err_uv)):.1f} Å; angle errors (astigmatism > 200 Å) {np.round(err_angle, 2)}")
    for e in (np.array(err_mean), np.array(err_uv)):
        assert np.sqrt(np.mean(e**2)) <= 50.0 and np.median(np.abs(e)) <= 20.0, e
    assert len(err_angle) >= 5 and max(err_angle) <= 5.0, err_angle
