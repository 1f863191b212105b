"""StreamingClassifier2D against ground truth: particles of real structures (6ny1, 3j5p) in fixed views with
random in-plane rotations, shifts and defoci, the CTF and white noise at a realistic SNR (0.07 inside the
particle disc), box 64 at 2.5 Å/px."""

from __future__ import annotations

import io
import math

import pytest
import torch

from cryolive import fourier
from cryolive.classify2d import StreamingClassifier2D, rotate_images_2d
from cryolive.config import Class2DSettings

from ._simulate import OPTICS, best_aligned_correlation, frc_with_truth, purity, structure_stack

BOX, PIXEL, SNR, N = 64, 2.5, 0.07, 1000
VIEWS = [("6ny1", 0, 0), ("6ny1", 0, 90), ("3j5p", 0, 0), ("3j5p", 30, 90)]
SYMMETRY = [1, 1, 4, 1]  # in-plane symmetry of each view (3j5p is C4; seen down its axis at tilt 0)
SETTINGS = Class2DSettings(n_classes=6, min_particles_to_start=300, n_psi=24, max_shift_px=4)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def stack():
    torch.set_num_threads(1)
    return structure_stack(VIEWS, N, BOX, PIXEL, snr=SNR, seed=3)


def _ctf_args(d, sl=slice(None)):
    return d["du"][sl], d["dv"][sl], d["ang"][sl]


def _quality(snapshot, result, d):
    """Per true view: the best aligned correlation of any populated class average with the CTF-free truth."""
    cors = []
    populated = [k for k in range(snapshot.averages.shape[0]) if bool((result.class_index == k).any())]
    for t in range(len(VIEWS)):
        cors.append(max(best_aligned_correlation(snapshot.averages[k], d["templates"][t], PIXEL) for k in populated))
    return torch.tensor(cors)


@pytest.fixture(scope="module")
def batch_run(stack):
    clf = StreamingClassifier2D(6, BOX, PIXEL, OPTICS, SETTINGS, seed=0)
    result = clf.fit(stack["images"], *_ctf_args(stack), n_iterations=5)
    return clf, result


def test_rotate_images_2d_matches_rotation_matrix():
    img = torch.zeros(1, 32, 32)
    img[0, 16, 16 + 6] = 1.0  # x = +6, y = 0 from the centre
    out = rotate_images_2d(img, torch.tensor([90.0]))
    # rotation_matrix_2d(90) maps (x, y) = (6, 0) to (0, 6): row 16 + 6, column 16
    assert out[0].argmax() == (16 + 6) * 32 + 16
    assert out[0].sum() == pytest.approx(1.0, abs=1e-5)


def test_batch_fit_purity_and_averages_match_truth(stack, batch_run):
    clf, result = batch_run
    p = purity(result.class_index, stack["types"])
    quality = _quality(clf.snapshot(), result, stack)
    print(f"batch: purity {p:.3f}, correlation with truth per view {quality.tolist()}")
    assert p >= 0.95
    # every view is recovered by a class average close to its CTF-free projection (the views themselves
    # correlate with one another at 0.50-0.75 after alignment, so 0.9 singles out the right one)
    assert quality.min() >= 0.93
    assert float(result.max_probability.mean()) > 0.8


def test_half_set_resolution_is_honest(stack, batch_run):
    """The per-class resolution from the half-set FRC (0.143) agrees with the FRC of the average against the
    exact truth (0.5, the equivalent threshold for a full set against a noise-free reference)."""
    clf, result = batch_run
    snap = clf.snapshot()
    checked = 0
    for k in result.class_index.unique().tolist():
        in_k = result.class_index == k
        if in_k.sum() < 100:
            continue
        t = int(torch.bincount(stack["types"][in_k]).argmax())
        frc = frc_with_truth(snap.averages[k], VIEWS[t], PIXEL)
        true_res = fourier.resolution_at_threshold(frc, BOX, PIXEL, 0.5)
        est = float(snap.resolution_angstrom[k])
        print(f"class {k}: estimated {est:.1f} Å, against truth {true_res:.1f} Å")
        assert 0.75 * true_res <= est <= 1.4 * true_res
        checked += 1
    assert checked >= len(VIEWS)


def test_poses_are_consistent_with_truth(stack, batch_run):
    """Within a class, estimated psi + true psi is constant (a projection at psi shows the image rotated by -psi),
    modulo the view's in-plane symmetry (the 3j5p top view is C4); the estimated shift equals the true one
    (averages are centred on their centre of mass, as the simulated projections are)."""
    clf, result = batch_run
    good_psi, good_shift, total = 0, 0, 0
    for k in result.class_index.unique():
        in_k = result.class_index == k
        t = int(torch.bincount(stack["types"][in_k]).argmax())
        m = in_k & (stack["types"] == t)
        order = SYMMETRY[t]
        a = torch.deg2rad(result.psi_deg[m] + stack["psi"][m]) * order
        mean = torch.atan2(a.sin().mean(), a.cos().mean())
        dev = torch.rad2deg(torch.atan2(torch.sin(a - mean), torch.cos(a - mean))).abs() / order
        good_psi += int((dev <= 360 / SETTINGS.n_psi).sum())  # within one step of the psi grid
        err = (result.shift_yx_px[m] - stack["shift"][m]).norm(dim=-1)
        good_shift += int((err <= 2.0).sum())
        total += int(m.sum())
    print(f"psi within one step: {good_psi / total:.3f}, shifts within 2 px: {good_shift / total:.3f}")
    assert total >= 0.95 * N
    assert good_psi / total >= 0.9
    assert good_shift / total >= 0.85


def test_streaming_matches_batch(stack, batch_run):
    clf_batch, result_batch = batch_run
    clf = StreamingClassifier2D(6, BOX, PIXEL, OPTICS, SETTINGS, seed=0)
    results = []
    for i in range(0, N, 100):  # 10 batches; the first three are buffered until 300 particles have arrived
        sl = slice(i, i + 100)
        r = clf.update(stack["images"][sl], *_ctf_args(stack, sl))
        results.append(r)
    assert (results[0].class_index == -1).all() and (results[1].class_index == -1).all()
    assert (results[2].class_index >= 0).all()
    final = clf.assign(stack["images"], *_ctf_args(stack))
    p = purity(final.class_index, stack["types"])
    q_stream = _quality(clf.snapshot(), final, stack)
    q_batch = _quality(clf_batch.snapshot(), result_batch, stack)
    print(f"stream: purity {p:.3f}, correlation per view {q_stream.tolist()} (batch {q_batch.tolist()})")
    assert p >= 0.93
    assert float(q_stream.mean()) >= 0.97 * float(q_batch.mean())
    assert float(q_stream.min()) >= 0.95 * float(q_batch.min())
    snap = clf.snapshot()
    assert snap.n_particles_seen == N
    assert snap.class_distribution.sum() == pytest.approx(1.0, abs=1e-5)
    populated = snap.class_distribution > 0.05
    # the honest (half-set) resolution lies between Nyquist and the low-pass the classes started from
    assert ((snap.resolution_angstrom[populated] >= 2 * PIXEL) & (snap.resolution_angstrom[populated] <= 30)).all()
    assert (snap.resolution_angstrom[~populated & (snap.particle_counts < 2)] == 999.0).all()


def test_assign_recovers_known_pose_of_a_class_average(batch_run):
    clf, _ = batch_run
    snap = clf.snapshot()
    k = int(snap.class_distribution.argmax())
    psi, shift = 45.0, torch.tensor([[2.0, -3.0]])
    img = fourier.shift_image_2d(rotate_images_2d(snap.averages[k][None], torch.tensor([psi])), shift)
    du, dv, ang = torch.tensor([15000.0]), torch.tensor([14500.0]), torch.tensor([30.0])
    from cryolive.ctf import calculate_ctf_2d

    ctf = calculate_ctf_2d(du, dv, ang, OPTICS.voltage_kv, OPTICS.cs_mm, OPTICS.amplitude_contrast, PIXEL, (BOX, BOX))
    img = torch.fft.irfft2(torch.fft.rfft2(img) * ctf, s=(BOX, BOX))
    g = torch.Generator().manual_seed(0)
    img = img + 0.3 * img.std() * torch.randn(img.shape, generator=g)
    r = clf.assign(img, du, dv, ang)
    assert int(r.class_index) == k
    assert float(r.psi_deg) == pytest.approx(psi)
    assert r.shift_yx_px[0].tolist() == [2.0, -3.0]


def test_state_dict_round_trip_gives_identical_assignments(stack):
    clf = StreamingClassifier2D(4, BOX, PIXEL, OPTICS, SETTINGS, seed=1, n_init_iterations=2)
    clf.update(stack["images"][:300], *_ctf_args(stack, slice(0, 300)))
    clf.update(stack["images"][300:400], *_ctf_args(stack, slice(300, 400)))
    blob = io.BytesIO()
    torch.save(clf.state_dict(), blob)
    blob.seek(0)
    other = StreamingClassifier2D(4, BOX, PIXEL, OPTICS, SETTINGS, seed=99, n_init_iterations=2)
    other.load_state_dict(torch.load(blob))
    probe = slice(400, 600)
    a, b = clf.assign(stack["images"][probe], *_ctf_args(stack, probe)), other.assign(
        stack["images"][probe], *_ctf_args(stack, probe)
    )
    assert torch.equal(a.class_index, b.class_index)
    assert torch.equal(a.psi_deg, b.psi_deg) and torch.equal(a.shift_yx_px, b.shift_yx_px)
    # the resumed classifier continues exactly as the original would (same revisit draws, same statistics)
    sl = slice(600, 700)
    ra, rb = clf.update(stack["images"][sl], *_ctf_args(stack, sl)), other.update(stack["images"][sl], *_ctf_args(stack, sl))
    assert torch.equal(ra.class_index, rb.class_index)
    assert torch.allclose(clf.snapshot().averages, other.snapshot().averages)


@pytest.mark.parametrize("device", DEVICES)
def test_follows_device_and_keeps_inputs(stack, device):
    clf = StreamingClassifier2D(3, BOX, PIXEL, OPTICS, Class2DSettings(min_particles_to_start=100, n_psi=12),
                                device=device, n_init_iterations=1)
    images = stack["images"][:120].to(device)
    before = images.clone()
    r = clf.update(images, *(t[:120].to(device) for t in _ctf_args(stack)))
    assert r.class_index.device.type == torch.device(device).type
    assert torch.equal(images, before)
    snap = clf.snapshot()
    assert snap.averages.device.type == "cpu" and snap.averages.dtype == torch.float32
    assert snap.averages.shape == (3, BOX, BOX)
    assert math.isfinite(float(snap.averages.abs().sum()))


def test_separates_structures_in_physics_simulation():
    """Particles from the full image-formation simulator (all views, 300 Å ice, Poisson noise at 40 e/Å²,
    radiation damage): the classes separate the two structures."""
    from cryolive.simulate.particles import simulate_particle_stack

    images, truth = simulate_particle_stack(["6ny1", "3j5p"], 1000, BOX, PIXEL, max_shift_px=3, seed=11)
    clf = StreamingClassifier2D(10, BOX, PIXEL, OPTICS, Class2DSettings(min_particles_to_start=300), seed=0)
    for i in range(0, 600, 150):
        sl = slice(i, i + 150)
        clf.update(images[sl], truth["defocus_u"][sl], truth["defocus_v"][sl], truth["defocus_angle_deg"][sl])
    r = clf.assign(images, truth["defocus_u"], truth["defocus_v"], truth["defocus_angle_deg"])
    p = purity(r.class_index, truth["structure_index"])
    p_new = purity(r.class_index[600:], truth["structure_index"][600:])  # particles never seen in training
    print(f"physics simulation: structure purity {p:.3f} (unseen particles {p_new:.3f})")
    assert p >= 0.9 and p_new >= 0.88


@pytest.mark.slow
def test_first_classes_from_5000_particles_box64():
    """The live-session scale: 5,000 particles at box 64, 20 classes, batches of 1,000 (default settings).
    Prints the seconds to the first classes and the throughput; asserts structure purity and a time bar."""
    import time

    from cryolive.simulate.particles import simulate_particle_stack

    torch.set_num_threads(1)
    images, truth = simulate_particle_stack(["6ny1", "3j5p"], 5000, BOX, PIXEL, max_shift_px=3, seed=5)
    ctf = (truth["defocus_u"], truth["defocus_v"], truth["defocus_angle_deg"])
    clf = StreamingClassifier2D(20, BOX, PIXEL, OPTICS, Class2DSettings())
    t0 = time.perf_counter()
    first = None
    for i in range(0, 5000, 1000):
        r = clf.update(images[i : i + 1000], *(c[i : i + 1000] for c in ctf))
        if first is None and (r.class_index >= 0).all():
            first = time.perf_counter() - t0
    total = time.perf_counter() - t0
    r = clf.assign(images, *ctf)
    p = purity(r.class_index, truth["structure_index"])
    print(f"first classes after {first:.1f} s; 5000 particles in {total:.1f} s ({5000 / total:.0f} particles/s); "
          f"structure purity {p:.3f}; resolution {clf.snapshot().resolution_angstrom.tolist()}")
    assert p >= 0.9
    assert first < 60.0
