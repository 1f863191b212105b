"""Re-extraction when picks change: new particles from the stored micrograph and CTF, in particles.star and the
curation metrics from then on; the old particles stay on disk; 2D is fed the new ones."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cryolive.config import Optics, PickingSettings, Settings
from cryolive.io.star import read_star
from cryolive.preprocess.ctf_landscape import CTFLandscape
from cryolive.session.reextract import landscape_from_tilt, reextract_exposure
from cryolive.session.session import Session
from cryolive.session.store import SessionStore


class _TruthCTF:
    def __init__(self, truth):
        self.t = truth

    def __call__(self, image, pixel_size_angstrom, voltage_kv, cs_mm, amplitude_contrast, settings):
        t = self.t
        return SimpleNamespace(defocus_u=t.defocus_u, defocus_v=t.defocus_v, defocus_angle_deg=t.defocus_angle_deg,
                               astigmatism=t.defocus_u - t.defocus_v, max_resolution_angstrom=4.0,
                               figure_of_merit=0.3)


def _sum_frames(frames, pixel_size_angstrom, dose_per_frame, voltage_kv, settings):
    total = frames.sum(0)
    return SimpleNamespace(shifts_yx_px=torch.zeros(frames.shape[0], 2), micrograph=total,
                           micrograph_nodw=total.clone(), accum_motion_total=1.0, accum_motion_early=0.5,
                           accum_motion_late=0.5)


def _grid_picks(micrograph, pixel_size_angstrom, settings, ctf=None):
    """A poor picker: a regular grid, blind to the particles."""
    ys, xs = torch.meshgrid(torch.arange(64, 512, 96.0), torch.arange(64, 512, 96.0), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], -1)
    return SimpleNamespace(coords_yx_px=coords, scores=torch.full((len(coords),), 0.2))


def test_reextraction_replaces_the_particles_of_one_exposure(tmp_path):
    from cryolive.session.pipeline import StageFunctions
    from cryolive.simulate.dataset import write_movie
    from cryolive.simulate.movies import MovieSimulator, SimulationSettings

    s = SimulationSettings(image_shape_px=(512, 512), n_frames=4, dose_per_frame=10.0, particles_per_micrograph=30,
                           junk_per_micrograph=0, local_motion_angstrom=0.0, max_drift_angstrom=0.0,
                           oversampling=1, gain_variation=0.0, n_hot_pixels=0, movie_format="mrc", seed=4)
    sim = MovieSimulator(s, 0)
    movie = write_movie(sim, tmp_path / sim.name)
    truth = sim.truth()
    settings = Settings(optics=Optics(pixel_size_angstrom=1.0), dose_per_frame=10.0, n_workers=0,
                        picking=PickingSettings(particle_diameter_angstrom=150.0))
    stages = StageFunctions(align_movie=_sum_frames, estimate_ctf=_TruthCTF(truth), pick_blobs=_grid_picks)
    out = tmp_path / "out"
    with Session(out, settings, stages=stages) as sess:
        sess.process([movie])
    old = read_star(out / "particles.star")["particles"]
    old_stack = out / old["rlnImageName"].iloc[0].split("@")[1]
    with SessionStore(out / "session.sqlite") as store:
        (exp,) = store.exposures()
        store.set_particle_classes(exp.id, [0, 1], [1, 2])  # as if 2D had classified the old particles
        store.mark_fed_2d([exp.id])

    coords = truth.particles["coords_yx_px"]
    scores = torch.linspace(0.5, 1.0, len(coords))
    r = reextract_exposure(out, exp.name, coords, scores, picker="truth")
    new = read_star(out / "particles.star")["particles"]
    # the new particles (the truth's are all inside the micrograph): true positions, defocus, scores
    assert r.n_picks == r.n_particles == len(new) == len(coords)
    got = np.stack([new["rlnCoordinateY"], new["rlnCoordinateX"]], -1)
    assert np.allclose(got, coords.numpy(), atol=1e-3)
    assert np.allclose(new["cryolivePickScore"], scores.numpy(), atol=1e-6)
    assert np.allclose(new["rlnDefocusU"], truth.defocus_u) and np.allclose(new["rlnDefocusV"], truth.defocus_v)
    # the old stack is still there, beside the new one
    assert old_stack.is_file() and (out / r.particles_mrcs).is_file() and old_stack != out / r.particles_mrcs
    # the images are the particles now: their centres are brighter (inverted contrast) than the grid boxes'
    import mrcfile

    def centre_mean(df):
        stack = out / df["rlnImageName"].iloc[0].split("@")[1]
        with mrcfile.open(stack) as m:
            data = np.asarray(m.data)
        c = data.shape[-1] // 2
        return float(data[:, c - 8 : c + 8, c - 8 : c + 8].mean())

    assert centre_mean(new) > centre_mean(old) + 0.1  # measured 0.20 vs 0.02 (unit-variance background)
    # curation sees the new picks; 2D will be fed the new particles, the old classes are gone
    mics = read_star(out / "exposures.star")["micrographs"]
    assert int(mics["cryoliveParticleCount"].iloc[0]) == r.n_particles
    assert mics["cryoliveMeanPickScore"].iloc[0] == pytest.approx(float(scores.mean()), rel=1e-6)
    with SessionStore(out / "session.sqlite") as store:
        (exp2,) = store.exposures()
        assert not exp2.fed_2d and store.particle_classes(exp.id) == {}
        assert store.stage_result(exp.id, "picking")["metrics"]["picker"] == "truth"
        assert store.count_stage_results(exp.id, "extraction") == 2  # the first extraction is kept
    with pytest.raises(KeyError):
        reextract_exposure(out, "no_such_movie", coords)


def test_landscape_from_tilt_equals_the_fitted_plane():
    """The plane rebuilt from the recorded tilt and axis gives the landscape's own offsets."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        a, b = rng.normal(0, 0.4, 2)  # Å per px
        px, shape = float(rng.uniform(0.7, 1.6)), (int(rng.integers(512, 4096)), int(rng.integers(512, 4096)))
        tilt = math.degrees(math.atan(math.hypot(a, b) / px))
        axis = math.degrees(math.atan2(-a, b)) % 360.0
        land = CTFLandscape(np.zeros((0, 2)), np.zeros(0), np.zeros(0), np.zeros(0, bool), 0.0, (a, b), tilt, axis,
                            0.0, shape, px)
        coords = torch.as_tensor(rng.uniform(0, 4096, (50, 2)), dtype=torch.float32)
        rebuilt = landscape_from_tilt(tilt, axis, px, shape)
        assert torch.allclose(rebuilt(coords), land(coords), atol=0.05)
    assert landscape_from_tilt(float("nan"), 10.0, 1.0, (512, 512)) is None
