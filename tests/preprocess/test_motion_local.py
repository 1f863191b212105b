"""Patch (local) motion against the ground truth of cryolive.simulate: 40 frames, 40 e/Å², global drift up to
20 Å and local deformation up to 3 Å; and the same movie read from EER, LZW-TIFF and MRC."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _synthetic_movies import rms_px, simulated_movie_with_local_motion, true_displacement, true_mean_displacement
from cryolive.config import MotionSettings
from cryolive.fourier import fourier_ring_correlation
from cryolive.preprocess.motion import align_movie, correct_defects, detect_hot_pixels

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _grid_positions(h, w, n=6, margin=48):
    ys, xs = torch.meshgrid(torch.linspace(margin, h - 1 - margin, n), torch.linspace(margin, w - 1 - margin, n),
                            indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], -1)


@pytest.mark.parametrize(
    "size, pixel_size, dose_per_frame, drift_angstrom, seed",
    [
        (768, 1.0, 1.0, 20.0, 3),   # the bar: 40 frames, 40 e/Å², 1 Å/px, 20 Å drift, 3 Å local
        (640, 1.3, 1.0, 12.0, 5),   # coarser pixels (1.7 counts/px/frame), less drift
        (768, 0.8, 1.25, 20.0, 7),  # finer pixels (0.8 counts/px/frame), 50 e/Å²
    ],
)
def test_global_and_local_trajectories_and_sum_against_truth(size, pixel_size, dose_per_frame, drift_angstrom, seed):
    frames, truth, _ = simulated_movie_with_local_motion(size, 40, pixel_size, dose_per_frame, drift_angstrom,
                                                        3.0, seed=seed)
    frames = correct_defects(frames, detect_hot_pixels(frames.sum(0)))
    local = align_movie(frames, pixel_size, dose_per_frame, 300.0, MotionSettings())
    glob = align_movie(frames, pixel_size, dose_per_frame, 300.0, MotionSettings(patch_grid=(1, 1)))
    assert glob.local_motion is None and local.local_motion is not None
    assert local.local_motion.control_grid == (5, 5)

    # global trajectory = the mean motion of the frame. The simulator's drift differs from it by the area mean
    # of its local field (zero over its control points, not over the area: up to 0.34 px for these seeds)
    err_global = rms_px(local.shifts_yx_px, true_mean_displacement(truth))
    assert err_global < 0.25, err_global
    # the displacement field where the particles are and on a regular grid: global + local vs truth, within
    # 0.5 px, and 0.5 Å (the blur that matters) where pixels are smaller than 1 Å
    bar_px = max(0.5, 0.5 / pixel_size)
    h, w = frames.shape[-2:]
    particles = truth.particles["coords_yx_px"]
    assert len(particles) >= 10
    # (the regular grid spans the patch centres' region, a tenth of the frame in from each edge: beyond the
    # outermost patch centres the field is extrapolated and its error grows, e.g. 0.64 px at 48 px from the
    # edges for the 0.8 Å/px movie)
    for where in (particles, _grid_positions(h, w, margin=h // 10)):
        truth_field = true_displacement(truth, where)
        err_local = rms_px(local.shifts_at(where), truth_field)
        err_global_only = rms_px(glob.shifts_at(where), truth_field)
        assert err_local < bar_px, (err_local, err_global_only)
        assert err_local < 0.6 * err_global_only, (err_local, err_global_only)  # the local model explains it
    # the largest local deviation: the truth has up to 3 Å at the control points, less at the patch centres
    assert 0.5 < local.max_local_deviation_angstrom < 4.5, local.max_local_deviation_angstrom

    # the dose-weighted sum is closer to the noiseless, motion-free micrograph with local correction
    frc_local = fourier_ring_correlation(local.micrograph, truth.reference)
    frc_global = fourier_ring_correlation(glob.micrograph, truth.reference)
    n = len(frc_local)
    band = slice(int(0.15 * n), int(0.6 * n))  # 13–3.3 Å at 1 Å/px
    gain = float(frc_local[band].mean() - frc_global[band].mean())
    assert gain > 0.01, (gain, float(frc_global[band].mean()))
    # sums keep the mean of the counts
    assert abs(float(local.micrograph_nodw.mean()) / float(frames.sum(0).mean()) - 1) < 1e-3


@pytest.mark.parametrize("device", DEVICES)
def test_no_local_motion_gives_a_small_field(device):
    """Drift only: the local model stays near zero (it fits noise only) and the global answer is unchanged."""
    frames, truth, _ = simulated_movie_with_local_motion(512, 24, 1.0, 1.5, 15.0, 0.0, seed=11)
    frames = correct_defects(frames, detect_hot_pixels(frames.sum(0)))
    res = align_movie(frames.to(device), 1.0, 1.5, 300.0, MotionSettings())
    assert res.local_motion is not None and res.micrograph.device.type == device
    where = _grid_positions(512, 512)
    err = rms_px(res.shifts_at(where), true_displacement(truth, where))
    assert err < 0.35, err
    assert res.max_local_deviation_angstrom < 1.0


def test_local_model_is_robust_to_a_bad_patch():
    """A patch whose content does not follow the specimen (a static contaminant, e.g. on the carbon) must not
    drag the field around it: Huber-weighted fitting keeps the rest of the field close to the truth."""
    frames, truth, _ = simulated_movie_with_local_motion(640, 32, 1.0, 1.25, 16.0, 3.0, seed=13)
    frames = correct_defects(frames, detect_hot_pixels(frames.sum(0)))
    # a strong static feature (does not drift) in one patch
    yy, xx = torch.meshgrid(torch.arange(640.0), torch.arange(640.0), indexing="ij")
    blob = 0.35 * torch.exp(-((yy - 320) ** 2 + (xx - 96) ** 2) / (2 * 18.0**2))
    frames = frames * (1 - blob)
    res = align_movie(frames, 1.0, 1.25, 300.0, MotionSettings())
    where = _grid_positions(640, 640)
    far = (where - torch.tensor([320.0, 96.0])).norm(dim=-1) > 200
    err = rms_px(res.shifts_at(where[far]), true_displacement(truth, where[far]))
    assert err < 0.5, err


def _write_formats(tmp_path, expected: torch.Tensor, raw_per_fraction: int, seed: int):
    """The same Poisson realisation as EER (raw frames with sub-pixel bits), LZW-TIFF (uint8) and MRC (int16)."""
    import mrcfile
    import tifffile

    from cryolive.simulate.eer import poisson_eer_frames, write_eer

    raw = []
    for i, lam in enumerate(expected.numpy()):
        raw.extend(poisson_eer_frames(lam, raw_per_fraction, seed=seed * 1000 + i))
    write_eer(tmp_path / "m.eer", raw)
    fractions = np.stack([sum(ev.astype(np.int32) for ev, _ in raw[k * raw_per_fraction:(k + 1) * raw_per_fraction])
                          for k in range(expected.shape[0])])
    tifffile.imwrite(tmp_path / "m.tif", fractions.astype(np.uint8), compression="lzw")
    with mrcfile.new(tmp_path / "m.mrc") as m:
        m.set_data(fractions.astype(np.int16))
    return fractions


def test_eer_tiff_and_mrc_give_the_same_trajectories(tmp_path):
    """One simulated exposure (512², 20 fractions of 2 e/Å², 3 Å local motion) written as EER (5 raw frames per
    fraction), LZW-TIFF and MRC: the readers give the same counts, hence the same trajectories; the EER rendered at
    2× from its sub-pixel bits and Fourier-binned back gives the same trajectories within noise."""
    from cryolive.io.movies import EerOptions, open_movie

    px, dose = 1.0, 2.0
    expected, truth, _ = simulated_movie_with_local_motion(512, 20, px, dose, 14.0, 3.0, seed=17, noise=False)
    counts = _write_formats(tmp_path, expected, raw_per_fraction=5, seed=17)
    movies = {
        "mrc": open_movie(tmp_path / "m.mrc"),
        "tiff": open_movie(tmp_path / "m.tif"),
        "eer": open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=5)),
        "eer_2x_binned": open_movie(tmp_path / "m.eer", eer=EerOptions(fraction_frames=5, upsampling=2,
                                                                        bin_factor=2)),
    }
    where = _grid_positions(512, 512, n=5)
    true_field = true_displacement(truth, where)
    fields = {}
    for name, movie in movies.items():
        assert movie.shape == (20, 512, 512), (name, movie.shape)
        frames = torch.from_numpy(movie.read_all())
        if name != "eer_2x_binned":
            assert np.array_equal(frames.numpy(), counts.astype(np.float32)), name
        res = align_movie(frames, px, dose, 300.0, MotionSettings())
        fields[name] = res.shifts_at(where)
        assert rms_px(fields[name], true_field) < 0.5, (name, rms_px(fields[name], true_field))
    assert rms_px(fields["tiff"], fields["mrc"]) < 1e-3
    assert rms_px(fields["eer"], fields["mrc"]) < 1e-3
    # same events, another rendering: differences of the order of the estimation noise, far below the motion
    assert rms_px(fields["eer_2x_binned"], fields["eer"]) < 0.3
