"""Small, self-contained synthetic cryo-EM movies and micrographs with known ground truth.

Used by the motion and CTF tests until (and besides) ``cryolive.simulate``. The specimen is a weak
phase object: amorphous "ice" (Gaussian random field with a broad spectrum) plus particle-like clusters
of blurred point scatterers. A frame is ``dose · px² · (1 − 2 · CTF·E·D_t ⊛ φ)(r − s_t)`` with Poisson
counts, where E is a B-factor envelope and D_t the radiation-damage filter of the frame; frames are cut
from a larger canvas so that content enters and leaves at the edges as in a real movie.
"""

from __future__ import annotations

import math

import torch

from cryolive.ctf import calculate_ctf_2d, dose_filter_2d
from cryolive.fourier import frequency_radius_2d


def make_specimen(shape, pixel_size_angstrom, n_particles=40, particle_diameter_angstrom=120.0,
                  ice_contrast=0.06, particle_contrast=0.12, seed=0):
    """Phase image ``(h, w)`` (radians) of ice + particle clusters and the particle centres ``(n, 2)`` (y, x) px."""
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    k = frequency_radius_2d((h, w), pixel_size_angstrom)  # 1/Å
    # ice: broad spectrum, mild low-frequency boost, gentle fall-off beyond ~3 Å
    amp = (1.0 + 0.5 / (1.0 + (k / 0.02) ** 2)) * torch.exp(-20.0 * k**2)
    amp[0, 0] = 0
    ice = torch.fft.irfft2(torch.fft.rfft2(torch.randn(h, w, generator=g)) * amp, s=(h, w))
    ice = ice / ice.std() * ice_contrast
    # particles: clusters of small Gaussian blobs inside a disc
    rad_px = particle_diameter_angstrom / 2 / pixel_size_angstrom
    centres = torch.rand(n_particles, 2, generator=g) * torch.tensor([h - 4 * rad_px, w - 4 * rad_px]) + 2 * rad_px
    pts = []
    for c in centres:
        r = rad_px * torch.rand(60, 1, generator=g).sqrt()
        a = 2 * math.pi * torch.rand(60, 1, generator=g)
        pts.append(c + torch.cat([r * torch.sin(a), r * torch.cos(a)], 1))
    pts = torch.cat(pts)
    delta = torch.zeros(h, w)
    iy = pts[:, 0].round().long().clamp(0, h - 1)
    ix = pts[:, 1].round().long().clamp(0, w - 1)
    delta.index_put_((iy, ix), torch.ones(len(pts)), accumulate=True)
    blob = torch.exp(-2 * math.pi**2 * (3.0 / pixel_size_angstrom) ** 2 * (k * pixel_size_angstrom) ** 2)
    part = torch.fft.irfft2(torch.fft.rfft2(delta) * blob, s=(h, w))
    part = part / part.max() * particle_contrast * 3
    return ice + part, centres


def drift_trajectory(n_frames, total_px=12.0, angle_deg=35.0, tau_frames=6.0, jitter_px=0.15, seed=0):
    """Specimen displacement ``(t, 2)`` (y, x) px relative to frame 1: fast-then-slow drift plus small jitter."""
    g = torch.Generator().manual_seed(seed + 1000)
    t = torch.arange(n_frames, dtype=torch.float32)
    mag = total_px * (1 - torch.exp(-t / tau_frames)) / (1 - math.exp(-(n_frames - 1) / tau_frames))
    a = math.radians(angle_deg)
    s = torch.stack([mag * math.sin(a), mag * math.cos(a)], -1)
    s = s + jitter_px * torch.randn(n_frames, 2, generator=g).cumsum(0) / math.sqrt(2)
    return s - s[0]


def simulate_movie(shape=(512, 512), n_frames=24, pixel_size_angstrom=1.0, dose_per_frame=1.0,
                   defocus_u=15000.0, defocus_v=14700.0, defocus_angle_deg=30.0, voltage_kv=300.0,
                   cs_mm=2.7, amplitude_contrast=0.1, bfactor_angstrom2=60.0, shifts_yx_px=None,
                   n_particles=None, seed=0, margin=48, ice_contrast=0.06, particle_contrast=0.12):
    """Poisson movie ``(t, h, w)`` float32 counts and its truth.

    Returns ``(frames, truth)`` where ``truth`` holds ``shifts_yx_px (t, 2)``, ``micrograph (h, w)``
    (noiseless, motion-free, damage-free sum of expected counts in frame-1 coordinates), ``phase`` and the
    CTF parameters.
    """
    h, w = shape
    H, W = h + 2 * margin, w + 2 * margin
    if shifts_yx_px is None:
        shifts_yx_px = drift_trajectory(n_frames, seed=seed)
    if n_particles is None:
        n_particles = max(4, int(40 * h * w / 512**2 * (1.0 / pixel_size_angstrom) ** 2))
    phase, centres = make_specimen((H, W), pixel_size_angstrom, n_particles=n_particles, seed=seed,
                                   ice_contrast=ice_contrast, particle_contrast=particle_contrast)
    ctf = calculate_ctf_2d(defocus_u, defocus_v, defocus_angle_deg, voltage_kv, cs_mm, amplitude_contrast,
                           pixel_size_angstrom, (H, W), bfactor_angstrom2=bfactor_angstrom2)
    ft = torch.fft.rfft2(phase) * ctf
    counts_per_px = dose_per_frame * pixel_size_angstrom**2
    dose = dose_per_frame * (torch.arange(n_frames, dtype=torch.float32) + 0.5)
    g = torch.Generator().manual_seed(seed + 7)
    frames = torch.empty(n_frames, h, w)
    ky = torch.fft.fftfreq(H)[:, None]
    kx = torch.fft.rfftfreq(W)[None, :]
    for i in range(n_frames):
        q = dose_filter_2d(dose[i : i + 1], (H, W), pixel_size_angstrom, voltage_kv)[0]
        s = shifts_yx_px[i]
        shift = torch.polar(torch.ones(H, W // 2 + 1), -2 * math.pi * (ky * s[0] + kx * s[1]))
        img = 1.0 - 2.0 * torch.fft.irfft2(ft * q * shift, s=(H, W))
        expected = counts_per_px * img[margin : margin + h, margin : margin + w].clamp(min=0)
        frames[i] = torch.poisson(expected, generator=g)
    clean = n_frames * counts_per_px * (1.0 - 2.0 * torch.fft.irfft2(ft, s=(H, W)))
    truth = dict(
        shifts_yx_px=shifts_yx_px, micrograph=clean[margin : margin + h, margin : margin + w],
        phase=phase[margin : margin + h, margin : margin + w], centres_yx_px=centres - margin,
        defocus_u=defocus_u, defocus_v=defocus_v, defocus_angle_deg=defocus_angle_deg,
    )
    return frames, truth


def simulate_micrograph(shape=(1024, 1024), pixel_size_angstrom=1.0, total_dose=24.0, defocus_u=15000.0,
                        defocus_v=14700.0, defocus_angle_deg=30.0, voltage_kv=300.0, cs_mm=2.7,
                        amplitude_contrast=0.1, bfactor_angstrom2=60.0, phase_shift_deg=0.0, seed=0,
                        ice_contrast=0.06, particle_contrast=0.12):
    """One motion-free Poisson micrograph ``(h, w)`` (sum of counts at ``total_dose`` e/Å²)."""
    h, w = shape
    phase, _ = make_specimen((h, w), pixel_size_angstrom,
                             n_particles=max(4, int(40 * h * w / 512**2 / pixel_size_angstrom**2)), seed=seed,
                             ice_contrast=ice_contrast, particle_contrast=particle_contrast)
    ctf = calculate_ctf_2d(defocus_u, defocus_v, defocus_angle_deg, voltage_kv, cs_mm, amplitude_contrast,
                           pixel_size_angstrom, (h, w), phase_shift_deg=phase_shift_deg,
                           bfactor_angstrom2=bfactor_angstrom2)
    img = 1.0 - 2.0 * torch.fft.irfft2(torch.fft.rfft2(phase) * ctf, s=(h, w))
    g = torch.Generator().manual_seed(seed + 11)
    return torch.poisson((total_dose * pixel_size_angstrom**2 * img).clamp(min=0), generator=g)


# ------------------------------------------------------------------------------------------------------------
# Movies from cryolive.simulate with local motion, and the true displacement field


def simulated_movie_with_local_motion(size=768, n_frames=40, pixel_size_angstrom=1.0, dose_per_frame=1.0,
                                      max_drift_angstrom=20.0, local_motion_angstrom=3.0, seed=0, noise=True):
    """A :mod:`cryolive.simulate` movie (atomic models in ice, CTF, damage, global drift and smooth local
    deformation of the specimen). Returns ``(frames (t, h, w) float32, truth, simulator)``: gain-corrected
    Poisson counts (``noise=True``, hot pixels included) or the expected counts (``noise=False``, no detector)."""
    from cryolive.simulate import movies

    st = movies.SimulationSettings(n_movies=1, image_shape_px=(size, size), n_frames=n_frames,
                                   pixel_size_angstrom=pixel_size_angstrom, dose_per_frame=dose_per_frame,
                                   max_drift_angstrom=max_drift_angstrom, local_motion_angstrom=local_motion_angstrom,
                                   seed=seed)
    det = movies.make_detector(st.image_shape_px, st.gain_variation, st.n_hot_pixels, st.seed)
    sim = movies.MovieSimulator(st, 0, det)
    if noise:
        frames = torch.stack([f.float() for f in sim.frames()]) * det.gain
    else:
        frames = torch.stack([f.float() for f in sim.expected_frames()])
    return frames, sim.truth(), sim


def true_displacement(truth, coords_yx_px):
    """True specimen displacement ``(t, n, 2)`` (px, y x) at positions ``coords_yx_px (n, 2)`` of frame 1: the
    global drift plus the local deformation, which the simulator interpolates bicubically (torch's kernel,
    corner-to-corner control points) from ``truth.local_shifts_yx_px (t, g, g, 2)``."""
    import torch.nn.functional as F

    loc = truth.local_shifts_yx_px  # (t, gy, gx, 2)
    h, w = truth.reference.shape
    c = torch.as_tensor(coords_yx_px, dtype=torch.float32).reshape(-1, 2)
    grid = torch.stack([2 * c[:, 1] / (w - 1) - 1, 2 * c[:, 0] / (h - 1) - 1], -1)[None, None]  # (1, 1, n, 2)
    grid = grid.expand(loc.shape[0], 1, -1, 2)
    field = F.grid_sample(loc.permute(0, 3, 1, 2), grid, mode="bicubic", padding_mode="border",
                          align_corners=True)[:, :, 0]  # (t, 2, n)
    return truth.shifts_yx_px[:, None, :] + field.permute(0, 2, 1)


def rms_px(a, b) -> float:
    """RMS length of the difference of two ``(..., 2)`` shift tensors, px."""
    return float((a.cpu() - b.cpu()).norm(dim=-1).pow(2).mean().sqrt())


def true_mean_displacement(truth, step_px=8):
    """True mean displacement of the whole frame ``(t, 2)`` px: the simulator's drift plus the area mean of its
    local field (which is zero on average over the control points, not over the area)."""
    h, w = truth.reference.shape
    ys, xs = torch.meshgrid(torch.arange(0, h, step_px, dtype=torch.float32),
                            torch.arange(0, w, step_px, dtype=torch.float32), indexing="ij")
    return true_displacement(truth, torch.stack([ys.flatten(), xs.flatten()], -1)).mean(1)
