"""Movies and dataset files against the simulator's own ground truth (tiny sizes)."""

import math

import mrcfile
import numpy as np
import pytest
import tifffile
import torch
from scipy.spatial import cKDTree

from cryolive.ctf import calculate_ctf_1d
from cryolive.fourier import radial_average_2d, shift_image_2d
from cryolive.io.star import read_star
from cryolive.simulate import SimulationSettings, load_atoms, simulate_dataset
from cryolive.simulate.movies import MovieSimulator

TINY = dict(
    image_shape_px=(256, 256),
    n_frames=8,
    pixel_size_angstrom=2.0,
    dose_per_frame=2.0,
    particles_per_micrograph=12,
    junk_per_micrograph=1,
    max_drift_angstrom=24.0,
    local_motion_angstrom=2.0,
    oversampling=1,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim")
    settings = SimulationSettings(n_movies=2, seed=5, **TINY)
    summary = simulate_dataset(out, settings)
    return out, settings, summary


def test_files_and_movie_format(dataset):
    out, settings, summary = dataset
    assert summary["n_movies"] == 2 and len(summary["movies"]) == 2
    for name in ("gain.mrc", "simulation.json", "truth/exposures.star", "truth/particles.star", "truth/maps/6ny1.mrc"):
        assert (out / name).is_file(), name
    for path in summary["movies"]:
        with tifffile.TiffFile(path) as tif:
            assert len(tif.pages) == settings.n_frames
            assert all(p.compression == tifffile.COMPRESSION.LZW for p in tif.pages)
            data = tif.asarray()
        assert data.shape == (settings.n_frames, 256, 256) and data.dtype == np.uint8
        stem = path.rsplit("/", 1)[1].rsplit(".", 1)[0]
        assert (out / "truth" / "micrographs" / f"{stem}.mrc").is_file()
        assert (out / "truth" / "motion" / f"{stem}.star").is_file()


def test_mrc_movie(tmp_path):
    settings = SimulationSettings(n_movies=1, seed=2, movie_format="mrc", **{**TINY, "n_frames": 3, "particles_per_micrograph": 2})
    summary = simulate_dataset(tmp_path, settings)
    with mrcfile.open(summary["movies"][0]) as m:
        assert m.data.shape == (3, 256, 256)
        assert m.data.dtype == np.int16
        assert abs(float(m.voxel_size.x) - 2.0) < 1e-6


def test_truth_star_columns(dataset):
    out, settings, _ = dataset
    mic = read_star(out / "truth" / "exposures.star")["micrographs"]
    for col in ("rlnMicrographMovieName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "cryoliveStageTiltDeg",
                "cryoliveTiltAxisDeg", "cryoliveIceThicknessAngstrom", "rlnMicrographOriginalPixelSize", "rlnVoltage",
                "rlnSphericalAberration", "rlnAmplitudeContrast", "cryoliveDosePerFrame"):
        assert col in mic.columns, col
    assert len(mic) == 2
    assert ((mic.rlnDefocusU >= 5000) & (mic.rlnDefocusU <= 35000)).all()
    assert (mic.rlnDefocusU >= mic.rlnDefocusV).all() and (mic.rlnDefocusU - mic.rlnDefocusV <= 500).all()
    parts = read_star(out / "truth" / "particles.star")["particles"]
    for col in ("rlnMicrographMovieName", "rlnCoordinateX", "rlnCoordinateY", "rlnAngleRot", "rlnAngleTilt",
                "rlnAnglePsi", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "cryoliveStructure",
                "cryoliveDiameterAngstrom"):
        assert col in parts.columns, col
    assert set(parts.cryoliveStructure) <= {"6ny1", "junk"} and (parts.cryoliveStructure == "6ny1").sum() >= 4
    motion = read_star(out / "truth" / "motion" / "movie_0001.star")
    g = motion["global_shift"]
    assert list(g.rlnMicrographFrameNumber) == list(range(1, 9))
    assert g.rlnMicrographShiftX.iloc[0] == 0 and g.rlnMicrographShiftY.iloc[0] == 0
    assert "local_shift" in motion


def test_particles_do_not_overlap_and_stay_inside():
    sim = MovieSimulator(SimulationSettings(seed=11, **{**TINY, "particles_per_micrograph": 30}), 0)
    truth = sim.truth()
    atoms = load_atoms("6ny1")
    p = sim.s.pixel_size_angstrom
    trees, pts_all = [], []
    for (cy, cx), rot, name in zip(truth.particles["coords_yx_px"], truth.particles["rotations"], truth.particles["structure"]):
        if name == "junk":
            continue
        xy = (atoms.coords @ rot.T)[:, :2].numpy() / p + np.array([float(cx), float(cy)])
        assert xy.min() >= 0 and xy.max() <= 255
        pts_all.append(xy)
        trees.append(cKDTree(xy))
    assert len(pts_all) >= 5  # several particles fitted
    for i in range(len(pts_all)):
        for j in range(i + 1, len(pts_all)):
            d, _ = trees[j].query(pts_all[i], k=1)
            assert d.min() > 2.0  # pixels between the closest atoms of two particles


def test_gain_corrected_mean_counts(dataset):
    out, settings, summary = dataset
    with mrcfile.open(out / "gain.mrc") as m:
        gain = m.data.astype(np.float64)
    hot = read_star(out / "truth" / "hot_pixels.star")["hot_pixels"]
    ok = np.ones_like(gain, dtype=bool)
    ok[hot.rlnCoordinateY.astype(int), hot.rlnCoordinateX.astype(int)] = False
    raw = tifffile.imread(summary["movies"][0]).astype(np.float64)
    corrected = (raw * gain)[:, ok].mean()
    expected = settings.dose_per_frame * settings.pixel_size_angstrom**2
    assert abs(corrected - expected) / expected < 0.01
    # and the raw mean differs (gain is not 1 everywhere): per-pixel correction flattens the detector
    assert gain.std() > 0.05
    per_frame = raw.mean(0)  # counts per frame
    hot_counts = per_frame[hot.rlnCoordinateY.astype(int), hot.rlnCoordinateX.astype(int)]
    assert hot_counts.min() > 15 and hot_counts.min() > np.percentile(per_frame[ok], 99.9)  # bright in every frame


def test_drift_convention(dataset):
    out, settings, summary = dataset
    gain = torch.from_numpy(mrcfile.read(out / "gain.mrc").astype(np.float32))
    frames = torch.from_numpy(tifffile.imread(summary["movies"][0]).astype(np.float32)) * gain
    hot = read_star(out / "truth" / "hot_pixels.star")["hot_pixels"]
    frames[:, hot.rlnCoordinateY.astype(int), hot.rlnCoordinateX.astype(int)] = frames.mean()
    g = read_star(out / "truth" / "motion" / "movie_0001.star")["global_shift"]
    s = torch.tensor(np.stack([g.rlnMicrographShiftY, g.rlnMicrographShiftX], -1), dtype=torch.float32)
    assert float(s.norm(dim=1).max()) > 3.0  # enough drift for the test to mean something
    ref = torch.from_numpy(mrcfile.read(out / "truth" / "micrographs" / "movie_0001.mrc").astype(np.float32))

    def corr(img):
        a = img[40:-40, 40:-40] - img[40:-40, 40:-40].mean()
        b = ref[40:-40, 40:-40] - ref[40:-40, 40:-40].mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    aligned = shift_image_2d(frames, -s).sum(0)
    wrong = shift_image_2d(frames, s).sum(0)
    raw = frames.sum(0)
    assert corr(aligned) > corr(raw) + 0.02
    assert corr(aligned) > corr(wrong) + 0.02
    # the scale of the truth micrograph is that of the aligned sum of gain-corrected counts
    assert abs(float(aligned.mean() / ref.mean()) - 1) < 0.01


def test_thon_rings_match_true_defocus():
    settings = SimulationSettings(
        seed=3, **{**TINY, "image_shape_px": (384, 384), "pixel_size_angstrom": 1.5, "max_astigmatism_angstrom": 0.0,
                   "defocus_range_angstrom": (12000.0, 20000.0), "local_motion_angstrom": 0.0, "max_drift_angstrom": 0.0,
                   "n_frames": 10, "dose_per_frame": 4.0}
    )
    sim = MovieSimulator(settings, 0)
    truth = sim.truth()
    total = torch.stack([f.float() * sim.detector.gain for f in sim.frames()]).sum(0)
    total[sim.detector.hot_pixels_yx[:, 0], sim.detector.hot_pixels_yx[:, 1]] = total.mean()
    ps = radial_average_2d(torch.fft.rfft2(total - total.mean()).abs() ** 2)  # (193,)
    n = ps.shape[0]
    k = torch.arange(n, dtype=torch.float32) / (384 * 1.5)
    band = (k > 1 / 40) & (k < 1 / 6)
    # remove the smooth background: subtract a running mean
    logp = torch.log(ps)
    smooth = torch.nn.functional.avg_pool1d(logp[None, None], 15, stride=1, padding=7, count_include_pad=False)[0, 0]
    detail = (logp - smooth)[band]

    def score(defocus):
        c2 = calculate_ctf_1d(defocus, 300.0, 2.7, 0.1, k) ** 2
        c2s = c2 - torch.nn.functional.avg_pool1d(c2[None, None], 15, stride=1, padding=7, count_include_pad=False)[0, 0]
        a, b = detail - detail.mean(), c2s[band] - c2s[band].mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    true = truth.defocus_u
    s_true = score(true)
    assert s_true > 0.3
    for factor in (0.85, 0.92, 1.08, 1.15):
        assert s_true > score(true * factor) + 0.1


def test_stage_tilt_defocus_plane():
    settings = SimulationSettings(seed=4, **{**TINY, "stage_tilt_deg": 30.0, "tilt_axis_deg": 0.0,
                                             "particle_height_spread": False, "max_astigmatism_angstrom": 0.0})
    truth = MovieSimulator(settings, 0).truth()
    y = truth.particles["coords_yx_px"][:, 0]
    expected = truth.defocus_u + math.tan(math.radians(30)) * 2.0 * (y - 128)  # axis along x: defocus grows with y
    assert torch.allclose(truth.particles["defocus_u"], expected, atol=1.0)
    assert truth.stage_tilt_deg == 30.0 and truth.tilt_axis_deg == 0.0


def test_reproducible_and_indexed():
    settings = SimulationSettings(seed=9, **{**TINY, "particles_per_micrograph": 3})
    a = MovieSimulator(settings, 1)
    b = MovieSimulator(settings, 1)
    c = MovieSimulator(settings, 2)
    assert a.params["defocus_u"] == b.params["defocus_u"] != c.params["defocus_u"]
    fa = next(iter(a.frames()))
    fb = next(iter(b.frames()))
    assert torch.equal(fa, fb)


def test_local_motion_truth_convention():
    settings = SimulationSettings(seed=8, **{**TINY, "max_drift_angstrom": 0.0, "local_motion_angstrom": 8.0,
                                             "dose_per_frame": 0.1, "n_frames": 4})
    sim = MovieSimulator(settings, 0)
    truth = sim.truth()
    last = list(sim.expected_frames())[-1]
    ref = truth.reference
    h, w = ref.shape
    d = truth.local_shifts_yx_px[-1].permute(2, 0, 1)[None]  # (1, 2, g, g)
    assert float(d.abs().max()) > 1.5
    d = torch.nn.functional.interpolate(d, size=(h, w), mode="bicubic", align_corners=True)[0]
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")

    def sample_at(img, sy, sx):
        grid = torch.stack([2 * sx / (w - 1) - 1, 2 * sy / (h - 1) - 1], -1)[None]
        return torch.nn.functional.grid_sample(img[None, None], grid, mode="bicubic", align_corners=True)[0, 0]

    def corr(a):
        a, b = a[30:-30, 30:-30], ref[30:-30, 30:-30]
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / (a.norm() * b.norm()))

    # frame_t(r) = frame_1(r - d(r))  ⇒  frame_1(r) ≈ frame_t(r + d(r))
    undone = sample_at(last, yy + d[0], xx + d[1])
    wrong = sample_at(last, yy - d[0], xx - d[1])
    assert corr(undone) > corr(last) + 0.05
    assert corr(undone) > corr(wrong) + 0.1


def test_micrograph_truth_matches_particle_images():
    """Boxes cut from the noiseless micrograph at the true coordinates equal CTF ⊛ projection at the true
    orientation and defocus (the movie and particle-stack simulators agree on every convention)."""
    from cryolive.geometry import euler_angles_to_matrix
    from cryolive.simulate import noiseless_particle_images

    settings = SimulationSettings(seed=21, **{**TINY, "ice_thickness_range_angstrom": (0.0, 0.0), "junk_per_micrograph": 0,
                                              "particles_per_micrograph": 4, "defocus_range_angstrom": (8000.0, 12000.0)})
    sim = MovieSimulator(settings, 0)
    truth = sim.truth()
    p = truth.particles
    box = 96
    c = sim.contrast_reference()
    n_checked = 0
    for i in range(len(p["structure"])):
        cy, cx = (float(v) for v in p["coords_yx_px"][i])
        iy, ix = round(cy), round(cx)
        if not (box // 2 <= iy < 256 - box // 2 and box // 2 <= ix < 256 - box // 2):
            continue
        cut = -c[iy - box // 2 : iy + box // 2, ix - box // 2 : ix + box // 2]  # inverted: particle white
        rot = p["rotations"][i : i + 1]
        ref = noiseless_particle_images("6ny1", rot, box, 2.0, p["defocus_u"][i : i + 1], p["defocus_v"][i : i + 1],
                                        p["defocus_angle_deg"][i : i + 1], bfactor_angstrom2=settings.bfactor_angstrom2)
        ref = shift_image_2d(ref, torch.tensor([[cy - iy, cx - ix]]))[0]
        quarter = euler_angles_to_matrix(0.0, 0.0, 90.0)
        turned = noiseless_particle_images("6ny1", quarter @ rot, box, 2.0, p["defocus_u"][i : i + 1],
                                           p["defocus_v"][i : i + 1], p["defocus_angle_deg"][i : i + 1])
        turned = shift_image_2d(turned, torch.tensor([[cy - iy, cx - ix]]))[0]
        defocused = noiseless_particle_images("6ny1", rot, box, 2.0, 1.3 * p["defocus_u"][i : i + 1],
                                              1.3 * p["defocus_v"][i : i + 1], p["defocus_angle_deg"][i : i + 1])
        defocused = shift_image_2d(defocused, torch.tensor([[cy - iy, cx - ix]]))[0]

        def corr(a, b):
            a, b = a - a.mean(), b - b.mean()
            return float((a * b).sum() / (a.norm() * b.norm()))

        assert corr(cut, ref) > 0.85
        assert corr(cut, ref) > corr(cut, turned) + 0.2
        assert corr(cut, ref) > corr(cut, defocused) + 0.2
        n_checked += 1
    assert n_checked >= 1
