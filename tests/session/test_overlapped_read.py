"""The session's read + motion stage decodes the movie while aligning it (``read_and_align_movie(overlap=True)``):
same trajectories, micrographs and hot pixels as decoding the whole movie first, gain and hot pixels included,
and the drift of the simulator's truth recovered."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from cryolive.config import MotionSettings, Optics, Settings
from cryolive.io.movies import open_movie
from cryolive.session.pipeline import StageFunctions, process_exposure, read_and_align_movie
from cryolive.simulate.dataset import write_movie
from cryolive.simulate.movies import MovieSimulator, SimulationSettings


def _simulated(tmp_path, **kw):
    s = SimulationSettings(image_shape_px=(512, 512), particles_per_micrograph=20, junk_per_micrograph=0,
                           local_motion_angstrom=0.0, oversampling=1, **kw)
    sim = MovieSimulator(s, 0)
    path = write_movie(sim, tmp_path / sim.name)
    return s, sim, path


def _rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm(dim=-1).pow(2).mean().sqrt())


@pytest.mark.parametrize("case", [
    dict(n_frames=20, dose_per_frame=2.0, pixel_size_angstrom=1.0, max_drift_angstrom=15.0, gain_variation=0.1,
         n_hot_pixels=12, movie_format="tiff", seed=5, patch_grid=(1, 1)),
    dict(n_frames=16, dose_per_frame=2.5, pixel_size_angstrom=1.3, max_drift_angstrom=12.0, gain_variation=0.15,
         n_hot_pixels=30, movie_format="mrc", seed=6, patch_grid=(3, 3)),
], ids=["tiff-global", "mrc-patches"])
def test_overlapped_decoding_gives_the_results_of_decoding_first(tmp_path, case):
    grid = case.pop("patch_grid")
    s, sim, path = _simulated(tmp_path, **case)
    truth = sim.truth()
    gain = sim.detector.gain.numpy().astype(np.float32)
    settings = Settings(optics=Optics(pixel_size_angstrom=s.pixel_size_angstrom, voltage_kv=s.voltage_kv),
                        dose_per_frame=s.dose_per_frame, motion=MotionSettings(patch_grid=grid))
    fns = StageFunctions().resolved()
    cpu = torch.device("cpu")
    new, mask_new, t_new = read_and_align_movie(open_movie(path), gain, settings, s.dose_per_frame, fns, cpu,
                                             overlap=True)
    old, mask_old, t_old = read_and_align_movie(open_movie(path), gain, settings, s.dose_per_frame, fns, cpu,
                                             overlap=False)
    assert t_new == 0.0 and t_old > 0.0  # decoding is part of the alignment's time when overlapped
    # the same hot pixels: every one the simulator put in, found on the gain-corrected sum
    assert torch.equal(mask_new, mask_old) and torch.equal(mask_new, new.defect_mask)
    hot_truth = {tuple(p) for p in sim.detector.hot_pixels_yx.tolist()}
    found = {tuple(p) for p in torch.nonzero(mask_new).tolist()}
    assert hot_truth <= found and len(found) <= len(hot_truth) + 2, (hot_truth, found)
    # the same trajectories (up to float rounding) and micrographs (float tolerance of their contrast)
    assert float((new.shifts_yx_px - old.shifts_yx_px).abs().max()) < 1e-3
    for a, b in ((new.micrograph, old.micrograph), (new.micrograph_nodw, old.micrograph_nodw)):
        assert float((a - b).abs().max()) < 1e-4 * float(b.std()) + 1e-5 * float(b.abs().mean())
    if grid != (1, 1):
        assert new.local_motion is not None
        ys, xs = torch.meshgrid(torch.linspace(0, 511, 9), torch.linspace(0, 511, 9), indexing="ij")
        points = torch.stack([ys.flatten(), xs.flatten()], -1)  # (81, 2) over the whole frame
        assert float((new.shifts_at(points) - old.shifts_at(points)).abs().max()) < 1e-3
    # and the drift of the truth (no local motion simulated), relative to frame 1
    true = truth.shifts_yx_px - truth.shifts_yx_px[0]
    assert _rms(new.shifts_yx_px, true) < 0.25
    # hot pixels corrected: none stands out of the micrograph any more
    mic = new.micrograph_nodw
    hy, hx = sim.detector.hot_pixels_yx.T
    assert float((mic[hy, hx] - mic.mean()).abs().max()) < 6 * float(mic.std())


def test_session_chain_overlaps_decoding_and_corrects_falcon_gain_defects(tmp_path):
    """process_exposure with an EPU-style ``.gain`` (a TIFF, 0 at defective pixels): decoding is overlapped,
    the dead column and the hot pixels are replaced, and the trajectory matches the truth and the old path."""
    s, sim, path = _simulated(tmp_path, n_frames=16, dose_per_frame=2.0, pixel_size_angstrom=1.1,
                              max_drift_angstrom=10.0, gain_variation=0.1, n_hot_pixels=6, movie_format="tiff",
                              seed=7)
    truth = sim.truth()
    gain = sim.detector.gain.numpy().astype(np.float32).copy()
    gain[:, 301] = 0.0  # a defective column, as a Falcon gain marks it
    gain_path = tmp_path / "falcon.gain"
    tifffile.imwrite(gain_path, gain)
    settings = Settings(optics=Optics(pixel_size_angstrom=s.pixel_size_angstrom, voltage_kv=s.voltage_kv),
                        dose_per_frame=s.dose_per_frame, n_workers=0, gain_path=str(gain_path),
                        motion=MotionSettings(patch_grid=(1, 1)))
    outcome = process_exposure(path, settings, tmp_path / "out")
    assert outcome.ok, outcome.error
    metrics = next(st for st in outcome.stages if st.stage == "motion").metrics
    assert metrics["decode_overlapped"] is True
    assert metrics["n_hot_pixels"] >= 512 + 6  # the column and the simulated hot pixels
    fns = StageFunctions().resolved()
    new, mask_new, _ = read_and_align_movie(open_movie(path), gain, settings, s.dose_per_frame, fns,
                                            torch.device("cpu"))
    old, mask_old, _ = read_and_align_movie(open_movie(path), gain, settings, s.dose_per_frame, fns,
                                            torch.device("cpu"), overlap=False)
    assert bool(mask_new[:, 301].all()) and torch.equal(mask_new, mask_old)
    assert int(mask_new.sum()) == metrics["n_hot_pixels"]
    assert float((new.shifts_yx_px - old.shifts_yx_px).abs().max()) < 1e-3
    b = old.micrograph
    assert float((new.micrograph - b).abs().max()) < 1e-4 * float(b.std()) + 1e-5 * float(b.abs().mean())
    # the column holds interpolated counts, not zeros: it does not stand out from its neighbours
    mic = new.micrograph_nodw
    col, nbr = mic[:, 301], (mic[:, 299] + mic[:, 303]) / 2
    assert abs(float(col.mean() - nbr.mean())) < 0.05 * float(nbr.mean())
    assert _rms(new.shifts_yx_px, truth.shifts_yx_px - truth.shifts_yx_px[0]) < 0.25
