"""Streaming 2D classification: maximum-likelihood EM over in-plane rotations and shifts, with the CTF.

Model (per particle ``i``, Fourier coefficient ``f``, rfft layout of :mod:`cryolive.fourier`)::

    X_i(f) = CTF_i(f) · [R_psi A_k](f) · exp(-2πi f·s) + N_i(f),   E|N_i(f)|² = σ²(shell(f))

``A_k`` is the CTF-free class average, ``R_psi`` rotates its content counter-clockwise by ``psi`` (x = column,
y = row, :func:`cryolive.geometry.rotation_matrix_2d`), and ``s = (y, x)`` moves it by ``+s`` pixels, so a
particle is ``shift_image_2d(rotate(A_k, psi), s)`` filtered by its CTF. The E-step computes the posterior over
(class, psi, integer shift) for every particle, the cross-correlation for all shifts at once by FFT. The M-step
accumulates per-class sufficient statistics in two random half-sets, ``Σ w · R_-psi(shift_-s(CTF·X))`` (real
space) and ``Σ w · R_-psi(CTF²)`` (Fourier space), and the class average is their Wiener quotient
``Σ CTF·X / (Σ CTF² + σ²/τ²)`` with ``τ²`` the per-shell signal power of the class.

Streaming (online EM in the manner of Cappé & Moulines 2009): the statistics of a new batch replace a
fraction ``γ = (n_batch / n_processed) ** kappa`` of the running statistics, so early (poor) assignments fade
while the estimate still converges. A bounded reservoir of earlier particles is re-processed (``revisit``) so
they are assigned again against the improved classes. The resolution used for alignment starts at
``initial_resolution_angstrom`` and rises as the half-set FRC of the classes shows signal beyond it.

Example::

    from cryolive.config import Optics, Class2DSettings
    from cryolive.classify2d import StreamingClassifier2D

    clf = StreamingClassifier2D(20, 64, 2.0, Optics(pixel_size_angstrom=1.0))
    for batch in stream:                      # images (n, 64, 64), defoci (n,) in Å, angle (n,) in degrees
        result = clf.update(batch.images, batch.du, batch.dv, batch.angle)
    snap = clf.snapshot()                     # averages (K, 64, 64), counts, distribution, resolution (Å)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import fourier
from ..config import Class2DSettings, Optics
from ..ctf import calculate_ctf_2d

__all__ = ["StreamingClassifier2D", "BatchResult", "Class2DSnapshot", "rotate_images_2d"]


@dataclass
class BatchResult:
    """Assignment of a batch of ``n`` particles.

    ``class_index (n,)`` int64 (−1 while the classifier is still buffering before its first classes),
    ``max_probability (n,)`` posterior probability of that class (marginal over poses), ``psi_deg (n,)`` and
    ``shift_yx_px (n, 2)`` the best pose: the particle ≈ ``shift_image_2d(rotate_images_2d(average, psi_deg),
    shift_yx_px)`` (psi on the grid of ``settings.n_psi`` angles, integer shifts in pixels),
    ``log_likelihood (n,)`` of the best pose relative to an empty model (larger = fits better; in units of the
    per-shell noise, so comparable within one classifier only).

    Relation to RELION: a projection at rlnAnglePsi = ψ shows its psi = 0 image rotated by −ψ (the rotation is
    passive), so for particles of one view ``psi_deg + rlnAnglePsi`` is constant within a class (tested).
    """

    class_index: torch.Tensor
    max_probability: torch.Tensor
    psi_deg: torch.Tensor
    shift_yx_px: torch.Tensor
    log_likelihood: torch.Tensor


@dataclass
class Class2DSnapshot:
    """The current classes, on the CPU.

    ``averages (K, b, b)`` float32 CTF-corrected (Wiener) class averages, particles white;
    ``particle_counts (K,)`` effective number of particles behind each class (soft, after forgetting);
    ``class_distribution (K,)`` fractions summing to 1; ``resolution_angstrom (K,)`` where the FRC between the
    two half-sets of the class (odd/even particles, ``Σ CTF·X`` sums, unmasked) first falls below 0.143 (999 for
    a class with fewer than two particles in either half, as RELION writes for empty classes);
    ``alignment_resolution_angstrom`` the current alignment limit; ``n_particles_seen`` new particles so far;
    ``effective_sample_size (K,)`` ``(Σ w)² / Σ w²`` of the soft, forgetting-weighted particle weights (the number
    of equally weighted particles the average is worth); ``coherence (K,)`` the weighted mean over the class's
    particles of ρ, the correlation (in the alignment band, noise-weighted) between the CTF-modulated average at
    the particle's pose and the particle's signal (data power minus the expected noise power): near 1 when the
    average explains its particles, lower for classes of heterogeneous particles (junk), 0 for empty classes.
    ``pixel_size_angstrom`` of the averages.
    """

    averages: torch.Tensor
    particle_counts: torch.Tensor
    class_distribution: torch.Tensor
    resolution_angstrom: torch.Tensor
    alignment_resolution_angstrom: float
    n_particles_seen: int
    effective_sample_size: torch.Tensor | None = None
    coherence: torch.Tensor | None = None
    pixel_size_angstrom: float = 0.0


def rotate_images_2d(images: torch.Tensor, angle_deg: torch.Tensor, oversampling: int = 1) -> torch.Tensor:
    """Rotate the content of ``images (N, h, w)`` counter-clockwise by ``angle_deg (N,)`` about ``(h//2, w//2)``.

    Bilinear interpolation (``grid_sample``), zero outside. Acts on (x = column, y = row) like
    :func:`cryolive.geometry.rotation_matrix_2d`: a point at ``r`` moves to ``R(angle) r``.
    ``oversampling`` > 1 interpolates on a Fourier-padded grid and crops back: bilinear interpolation then
    barely attenuates the original band and its aliases fall outside it (needed for high-resolution sums).
    """
    if oversampling > 1:
        h, w = images.shape[-2:]
        big = fourier.fourier_pad_2d(images.float(), (h * oversampling, w * oversampling))
        return fourier.fourier_crop_2d(rotate_images_2d(big, angle_deg), (h, w))
    n, h, w = images.shape
    a = torch.deg2rad(angle_deg.to(device=images.device, dtype=torch.float32))
    c, s = torch.cos(a), torch.sin(a)
    # normalised coordinates (align_corners=False): pixel j sits at (2j + 1)/w - 1, the centre w//2 at 1/w
    cx, cy = 1.0 / w, 1.0 / h
    # source = R^T (out - centre) + centre with R = [[c, -s], [s, c]] on (x, y) in pixels; in normalised
    # coordinates (x scaled by 2/w, y by 2/h) R^T becomes [[c, s h/w], [-s w/h, c]]
    a11, a12, a21, a22 = c, s * (h / w), -s * (w / h), c
    theta = torch.stack(
        [
            torch.stack([a11, a12, cx - (a11 * cx + a12 * cy)], -1),
            torch.stack([a21, a22, cy - (a21 * cx + a22 * cy)], -1),
        ],
        -2,
    )  # (N, 2, 3)
    x = images[:, None].float()
    uniq, inverse = torch.unique(angle_deg.to(images.device), return_inverse=True)
    if len(uniq) * 8 > n:  # (nearly) all angles differ: one sampling grid per image
        grid = F.affine_grid(theta, [n, 1, h, w], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    # few distinct angles (a psi grid): one grid per angle, shared by its images
    out = torch.empty_like(images, dtype=torch.float32)
    first = torch.zeros(len(uniq), dtype=torch.long, device=images.device).scatter_(
        0, inverse, torch.arange(n, device=images.device)
    )
    for j in range(len(uniq)):
        idx = torch.nonzero(inverse == j).flatten()
        grid = F.affine_grid(theta[first[j]][None], [1, 1, h, w], align_corners=False)
        out[idx] = F.grid_sample(
            x[idx], grid.expand(len(idx), -1, -1, -1), mode="bilinear", padding_mode="zeros", align_corners=False
        )[:, 0]
    return out


def _soft_disc(b: int, radius: float, width: float, device) -> torch.Tensor:
    y = torch.arange(b, device=device, dtype=torch.float32) - b // 2
    r = torch.sqrt(y[:, None] ** 2 + y[None, :] ** 2)
    t = ((r - radius) / width).clamp(0, 1)
    return 0.5 * (1 + torch.cos(math.pi * t))


class StreamingClassifier2D:
    """Maximum-likelihood 2D classification that refines its classes as batches of particles arrive.

    Parameters
    ----------
    n_classes: number of classes ``K``.
    box_size_px: box ``b`` of the particle images (even).
    pixel_size_angstrom: pixel size of the particle images, Å.
    optics: voltage, Cs and amplitude contrast (its pixel size is not used; particles may be downsampled).
    settings: ``min_particles_to_start`` (buffered before the first classes), ``n_psi`` in-plane rotations,
        ``max_shift_px`` (integer shifts searched in ``[-m, m]²``), ``batch_size`` (a hint for callers).
    device: where the work runs ("cpu", "cuda", ...); inputs are moved there, outputs come back on it.
    seed: random seed (initialisation, half-sets, revisits).

    Keyword-only tuning: ``initial_resolution_angstrom`` (alignment limit to start with, Å),
    ``kappa`` (step-size exponent in (0.5, 1]; 1 = plain running sums), ``n_init_iterations`` (EM passes over the
    first particles), ``buffer_size`` (particles kept for revisits), ``revisit_fraction`` (after each update,
    this fraction of the batch size is re-processed from the buffer), ``mask_diameter_angstrom`` (soft circular
    mask of the averages; default 0.9 × box), ``chunk_size`` (particles per E-step chunk, bounds memory),
    ``initial_temperature`` (≥ 1: posteriors are flattened by this factor at the first EM pass over the start
    set and annealed to 1 over the first half of the initial passes; 1 = no annealing), ``reseed_fraction``
    (a class holding less than this fraction of its fair share ``1/K`` of the weight is re-seeded by splitting
    the most populated class), ``init_particles_per_class`` (the first classes are seeded and refined on at most
    this many particles per class of the start set, then one pass over all of it; None or 0 = all),
    ``stream_temperature`` / ``anneal_particles`` (posteriors of stream updates tempered by 1/T at the start, sharpening to 1 by ``anneal_particles`` new particles; default off: it merged classes in
    tests), ``use_class_prior`` (weight classes by their share in the E-step; default off: with young classes the
    prior of the largest classes drew particles from small ones and classes collapsed).

    Attributes: ``initialised`` (True once the first classes exist), ``alignment_resolution_angstrom``.
    Methods: :meth:`update` (stream), :meth:`fit` (batch, same E/M-steps), :meth:`revisit`, :meth:`assign`
    (E-step only), :meth:`snapshot`, :meth:`state_dict` / :meth:`load_state_dict`.
    """

    def __init__(
        self,
        n_classes: int,
        box_size_px: int,
        pixel_size_angstrom: float,
        optics: Optics,
        settings: Class2DSettings = Class2DSettings(),
        device: str | torch.device = "cpu",
        seed: int = 0,
        *,
        initial_resolution_angstrom: float | None = None,
        kappa: float = 0.75,
        n_init_iterations: int = 6,
        buffer_size: int = 4096,
        revisit_fraction: float = 0.5,
        mask_diameter_angstrom: float | None = None,
        chunk_size: int = 64,
        initial_temperature: float = 1.0,
        reseed_fraction: float = 0.25,
        stream_temperature: float = 1.0,
        anneal_particles: int | None = None,
        use_class_prior: bool = False,
        init_particles_per_class: int | None = 40,
    ):
        if box_size_px % 2:
            raise ValueError("box_size_px must be even")
        self.K = int(n_classes)
        self.b = int(box_size_px)
        self.pixel_size = float(pixel_size_angstrom)
        self.optics = optics
        self.settings = settings
        self.device = torch.device(device)
        self.kappa = float(kappa)
        self.n_init_iterations = int(n_init_iterations)
        self.buffer_size = int(buffer_size)
        self.revisit_fraction = float(revisit_fraction)
        self.chunk_size = int(chunk_size)
        self.initial_temperature = float(initial_temperature)
        self.reference_oversampling = 3
        self.alignment_margin = 0.2  # the alignment limit runs this fraction of the class resolution (in shells) ahead
        self.reseed_fraction = float(reseed_fraction)
        self.stream_temperature = float(stream_temperature)
        self.use_class_prior = bool(use_class_prior)
        self.init_particles_per_class = int(init_particles_per_class or 0)
        self.anneal_particles = int(anneal_particles if anneal_particles is not None else 5 * settings.min_particles_to_start)
        self.inverse_temperature = 1.0
        b, dev = self.b, self.device
        nyq = 2 * self.pixel_size
        self.initial_resolution = max(
            initial_resolution_angstrom if initial_resolution_angstrom else max(20.0, 8 * self.pixel_size), nyq
        )
        mask_d = mask_diameter_angstrom / self.pixel_size if mask_diameter_angstrom else 0.9 * b
        self.mask = _soft_disc(b, mask_d / 2 - 2, 4.0, dev)  # (b, b)
        self.shells = fourier.shell_index_2d((b, b), True, dev)  # (b, b//2+1)
        self.n_shells = b // 2 + 1
        mult = torch.full((b, b // 2 + 1), 2.0, device=dev)
        mult[:, 0] = 1.0
        mult[:, -1] = 1.0
        self.mult = mult  # rfft half-plane multiplicity
        m = int(settings.max_shift_px)
        self.shift_idx = torch.arange(-m, m + 1, device=dev) % b
        sy, sx = torch.meshgrid(torch.arange(-m, m + 1), torch.arange(-m, m + 1), indexing="ij")
        self.shift_values = torch.stack([sy.reshape(-1), sx.reshape(-1)], -1).float().to(dev)  # (S, 2)
        self.psi_values = torch.arange(settings.n_psi, device=dev, dtype=torch.float32) * (360.0 / settings.n_psi)
        self.gen = torch.Generator(device="cpu").manual_seed(seed)
        self._reset_state()

    # ------------------------------------------------------------------ state
    def _reset_state(self):
        K, b, dev = self.K, self.b, self.device
        self.initialised = False
        self.num = torch.zeros(2, K, b, b, device=dev)  # Σ w R(shift(CTF·X)), real space
        self.den = torch.zeros(2, K, b, b // 2 + 1, device=dev)  # Σ w R(CTF²)
        self.weight = torch.zeros(2, K, device=dev)  # Σ w
        self.weight_sq = torch.zeros(2, K, device=dev)  # Σ w² (effective sample size (Σ w)² / Σ w²)
        self.coherence_sum = torch.zeros(2, K, device=dev)  # Σ w ρ, ρ: correlation of model and particle signal
        self.sigma2 = torch.ones(self.n_shells, device=dev)  # noise power per shell
        self.total_weight = 0.0  # W: effective number of particles behind the statistics
        self.n_processed = 0  # particles processed incl. revisits (step-size schedule)
        self.n_seen = 0  # new particles
        self.n_updates = 0
        self.align_shell = self._shell_of(self.initial_resolution)
        self.pending: list[tuple[torch.Tensor, ...]] = []
        self.buf_images = torch.zeros(0, b, b, device=dev)
        self.buf_ctfpar = torch.zeros(0, 3, device=dev)
        self.buf_half = torch.zeros(0, dtype=torch.long, device=dev)
        self._refs_cache = None
        self._class_ft_cache = None

    def _shell_of(self, res_angstrom: float) -> int:
        return int(min(self.b // 2, max(2, math.floor(self.b * self.pixel_size / res_angstrom))))

    @property
    def alignment_resolution_angstrom(self) -> float:
        return self.b * self.pixel_size / self.align_shell

    def state_dict(self) -> dict:
        """Plain tensors (CPU), numbers and lists: ``torch.save``-able, for resuming a live session."""
        pending = (
            (torch.cat([p[0] for p in self.pending]).cpu(), torch.cat([p[1] for p in self.pending]).cpu())
            if self.pending
            else (torch.zeros(0, self.b, self.b), torch.zeros(0, 3))
        )
        return {
            "version": 1,
            "n_classes": self.K,
            "box_size_px": self.b,
            "pixel_size_angstrom": self.pixel_size,
            "initialised": self.initialised,
            "num": self.num.cpu(),
            "den": self.den.cpu(),
            "weight": self.weight.cpu(),
            "weight_sq": self.weight_sq.cpu(),
            "coherence_sum": self.coherence_sum.cpu(),
            "sigma2": self.sigma2.cpu(),
            "total_weight": self.total_weight,
            "n_processed": self.n_processed,
            "n_seen": self.n_seen,
            "n_updates": self.n_updates,
            "align_shell": self.align_shell,
            "pending_images": pending[0],
            "pending_ctf": pending[1],
            "buf_images": self.buf_images.cpu(),
            "buf_ctfpar": self.buf_ctfpar.cpu(),
            "buf_half": self.buf_half.cpu(),
            "rng_state": self.gen.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (onto this classifier's device)."""
        if (state["n_classes"], state["box_size_px"]) != (self.K, self.b):
            raise ValueError("state_dict was made for a different number of classes or box size")
        dev = self.device
        self.initialised = bool(state["initialised"])
        self.num = state["num"].to(dev).float()
        self.den = state["den"].to(dev).float()
        self.weight = state["weight"].to(dev).float()
        self.weight_sq = state.get("weight_sq", state["weight"]).to(dev).float()
        self.coherence_sum = state.get("coherence_sum", torch.zeros_like(state["weight"])).to(dev).float()
        self.sigma2 = state["sigma2"].to(dev).float()
        self.total_weight = float(state["total_weight"])
        self.n_processed = int(state["n_processed"])
        self.n_seen = int(state["n_seen"])
        self.n_updates = int(state["n_updates"])
        self.align_shell = int(state["align_shell"])
        pi, pc = state["pending_images"], state["pending_ctf"]
        self.pending = [(pi.to(dev), pc.to(dev))] if len(pi) else []
        self.buf_images = state["buf_images"].to(dev).float()
        self.buf_ctfpar = state["buf_ctfpar"].to(dev).float()
        self.buf_half = state["buf_half"].to(dev).long()
        self.gen.set_state(state["rng_state"])
        self._refs_cache = None
        self._class_ft_cache = None

    # ------------------------------------------------------------------ helpers
    def _ctf(self, ctfpar: torch.Tensor, rfft: bool = True) -> torch.Tensor:
        """CTF of particles with ``ctfpar (n, 3)`` = (defocus_u, defocus_v, angle_deg) → ``(n, b, b//2+1)``."""
        o = self.optics
        return calculate_ctf_2d(
            ctfpar[:, 0], ctfpar[:, 1], ctfpar[:, 2], o.voltage_kv, o.cs_mm, o.amplitude_contrast,
            self.pixel_size, (self.b, self.b), rfft=rfft, device=ctfpar.device,
        )

    def _as_inputs(self, images, defocus_u, defocus_v, defocus_angle_deg):
        dev = self.device
        x = torch.as_tensor(images, dtype=torch.float32).to(dev)
        if x.ndim != 3 or x.shape[-1] != self.b or x.shape[-2] != self.b:
            raise ValueError(f"images must be (n, {self.b}, {self.b}), got {tuple(x.shape)}")
        par = torch.stack(
            [torch.as_tensor(v, dtype=torch.float32).to(dev).reshape(-1) for v in (defocus_u, defocus_v, defocus_angle_deg)],
            -1,
        )
        if par.shape[0] != x.shape[0]:
            raise ValueError("one defocus per image")
        return x, par

    def _signal_power_reg(self, num_ft, den):
        """Wiener regulariser σ²/τ² per Fourier sample for statistics ``num_ft (..., b, b2)``, ``den``.

        The class's signal power per shell is estimated from ``E|Σ CTF·X|² ≈ τ² (Σ CTF²)² + σ² Σ CTF²`` summed
        over the shell, ``τ² = (Σ|num|² − σ² Σ den) / Σ den²``, which avoids dividing by small ``den`` near CTF
        zeros."""
        shells = self.shells.clamp(max=self.n_shells - 1)
        sig2 = self.sigma2[shells]
        p_num = fourier.radial_average_2d(num_ft.abs() ** 2)  # (..., n_shells)
        p_noise = fourier.radial_average_2d(sig2 * den)
        p_den2 = fourier.radial_average_2d(den**2).clamp(min=1e-12)
        tau2 = (p_num - p_noise) / p_den2
        floor = 1e-4 * (p_noise / p_den2).clamp(min=1e-12)
        tau2 = torch.maximum(tau2, floor)
        return sig2 / tau2[..., shells]

    def _averages(self, halves: bool = False) -> torch.Tensor:
        """Wiener class averages ``(K, b, b)`` (or ``(2, K, b, b)`` per half-set) from the statistics."""
        num = self.num if halves else self.num.sum(0)
        den = self.den if halves else self.den.sum(0)
        num_ft = torch.fft.rfft2(num)
        reg = self._signal_power_reg(num_ft, den)
        avg = torch.fft.irfft2(num_ft / (den + reg), s=(self.b, self.b))
        return avg * self.mask

    def _class_transforms(self) -> torch.Tensor:
        """Centred transforms of the masked class averages on an ``o``× oversampled grid ``(K, o·b, o·b)`` complex
        (``o = reference_oversampling``): index ``o·b/2 + o·f`` holds frequency ``f`` (cycles per box) of the
        average about its centre ``(b//2, b//2)``.
        Cached until the classes change."""
        if self._class_ft_cache is None:
            b = self.b
            avg = self._averages() * self.mask  # (K, b, b)
            o = self.reference_oversampling
            big = torch.zeros(self.K, o * b, o * b, device=avg.device)
            big[:, (o * b - b) // 2 : (o * b + b) // 2, (o * b - b) // 2 : (o * b + b) // 2] = avg
            self._class_ft_cache = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(big, dim=(-2, -1))), dim=(-2, -1))
        return self._class_ft_cache

    def _sample_references(self, k: torch.Tensor, psi_deg: torch.Tensor, fy: torch.Tensor, fx: torch.Tensor) -> torch.Tensor:
        """Transforms (rfft layout, origin at pixel 0) of class averages ``k (m,)`` rotated counter-clockwise by
        ``psi_deg (m,)``, at integer frequencies ``fy (R,)`` × ``fx (C,)`` → ``(m, R, C)`` complex.

        Rotating an image rotates its transform: ``G_rot(f) = G(Rᵀ f)``, sampled bilinearly from the 2×
        oversampled transform (RELION pads its references 2×; 3× here halves the interpolation error), so only the frequencies needed are made."""
        b, o = self.b, self.reference_oversampling
        G = self._class_transforms().reshape(self.K, -1)
        a = torch.deg2rad(psi_deg.float())
        c, s = torch.cos(a)[:, None, None], torch.sin(a)[:, None, None]
        fyg, fxg = fy.float()[:, None], fx.float()[None, :]
        qx = c * fxg + s * fyg  # Rᵀ f with R = [[c, -s], [s, c]] on (x, y)
        qy = -s * fxg + c * fyg
        jy, jx = o * b // 2 + o * qy, o * b // 2 + o * qx
        y0, x0 = torch.floor(jy), torch.floor(jx)
        wy, wx = jy - y0, jx - x0
        y0, x0 = y0.long(), x0.long()
        out = 0
        for dy, wgt_y in ((0, 1 - wy), (1, wy)):
            for dx, wgt_x in ((0, 1 - wx), (1, wx)):
                yy = (y0 + dy).clamp(0, o * b - 1)
                xx = (x0 + dx).clamp(0, o * b - 1)
                idx = (yy * (o * b) + xx).reshape(len(k), -1)
                out = out + G[k[:, None], idx].reshape(yy.shape) * (wgt_y * wgt_x)
        sign = 1.0 - 2.0 * ((fy.long()[:, None] + fx.long()[None, :]) % 2).float()  # exp(-2πi f·c/b), c = b/2
        inside = (fyg**2 + fxg**2) <= (b // 2) ** 2
        return out * (sign * inside)

    def _band_references(self):
        """Rotated references in the alignment band for the E-step: ``(rows, ncol, refs (K·P, R, C), power
        (K·P, R·C))``, cached until the classes or the alignment limit change."""
        if self._refs_cache is None or self._refs_cache[0] != self.align_shell:
            b = self.b
            rows, ncol, _, _ = self._band_dft(self.align_shell, self.device)
            fy = torch.fft.fftfreq(b, 1.0 / b, device=self.device)[rows]
            fx = torch.arange(ncol, device=self.device)
            P = self.psi_values.shape[0]
            k = torch.arange(self.K, device=self.device).repeat_interleave(P)
            refs = self._sample_references(k, self.psi_values.repeat(self.K), fy, fx)  # (K·P, R, C)
            self._refs_cache = (self.align_shell, refs)
        return self._refs_cache[1]

    def _band_dft(self, shell: int, device):
        """Rows/columns of the rfft band ``|f_y|, f_x ≤ shell`` and the DFT matrices to the shift window:
        ``ey (S1, R)`` = exp(2πi f_y s_y / b), ``ex (C, S1)`` = c(f_x) exp(2πi f_x s_x / b) with the Hermitian
        multiplicity ``c`` (1 at f_x = 0 and Nyquist, else 2)."""
        b = self.b
        fy = torch.fft.fftfreq(b, 1.0 / b, device=device)  # integer frequencies, fft order
        rows = torch.nonzero(fy.abs() <= shell).flatten()
        ncol = min(shell, b // 2) + 1
        m = int(self.settings.max_shift_px)
        sv = torch.arange(-m, m + 1, device=device, dtype=torch.float32)
        ey = torch.exp(2j * math.pi * sv[:, None] * fy[rows][None, :] / b).to(torch.complex64)
        fx = torch.arange(ncol, device=device, dtype=torch.float32)
        cx = torch.where((fx == 0) | (fx == b // 2), 1.0, 2.0)
        ex = (cx[:, None] * torch.exp(2j * math.pi * fx[:, None] * sv[None, :] / b)).to(torch.complex64)
        return rows, ncol, ey, ex

    def _class_prior(self):
        if not self.use_class_prior:
            return torch.zeros(self.K, device=self.device)
        w = self.weight.sum(0)
        p = (w + 1.0) / (w.sum() + self.K)
        return torch.log(p)

    # ------------------------------------------------------------------ E-step
    def _expectation(self, x: torch.Tensor, par: torch.Tensor, refs_ft: torch.Tensor | None = None,
                     log_prior: torch.Tensor | None = None, normalized_cc: bool = False):
        """Posterior over (class, psi, shift) for particles ``x (n, b, b)``.

        Returns dict: ``post_class (n, K)``, ``best_pose (n, K)`` (index into P·S for each class),
        ``best (n,)`` overall (class·P·S + pose) index, ``best_ll (n,)``, ``sigma2_batch (n_shells,)`` sum.
        ``normalized_cc``: score by normalised cross-correlation instead of likelihood (initial seeding).
        """
        b = self.b
        rows, ncol, ey, ex = self._band_dft(self.align_shell, x.device)
        if refs_ft is None:
            refs_band = self._band_references()  # (KP, R, C)
            if log_prior is None:
                log_prior = self._class_prior()
        else:
            refs_band = refs_ft[:, rows][..., :ncol]
        KP = refs_band.shape[0]
        K = KP // self.psi_values.shape[0]
        P = self.psi_values.shape[0]
        S = self.shift_values.shape[0]
        if log_prior is None:
            log_prior = torch.zeros(K, device=x.device)
        lim = (self.shells <= self.align_shell).float()
        wb = (lim / self.sigma2[self.shells.clamp(max=self.n_shells - 1)])[rows][:, :ncol]  # (R, C)
        mult = self.mult[rows][:, :ncol]
        ref_pow = (refs_band.abs() ** 2).reshape(KP, -1)  # (KP, R·C)
        # cross-correlation at the integer shifts s = (s_y, s_x) as one real matrix product:
        # cc[i, r, s] = Re Σ_f conj(R_r(f)) Z_i(f) E_s(f), E_s(f) = ey[s_y, f_y] ex[f_x, s_x] (shift phase and
        # Hermitian multiplicity), = Σ_f Re R·Re(Z E) + Im R·Im(Z E), over the band |f| ≤ limit only
        n_rows = rows.shape[0]
        E = (ey[:, None, :, None] * ex.T[None, :, None, :]).reshape(S, n_rows * ncol)  # (S, R·C)
        refs_flat = refs_band.reshape(KP, -1)
        refs_ri = torch.cat([refs_flat.real, refs_flat.imag], -1)  # (KP, 2·R·C)
        del refs_flat
        out_post, out_pose, out_best, out_ll, out_coh = [], [], [], [], []
        for c0 in range(0, x.shape[0], self.chunk_size):
            xc = x[c0 : c0 + self.chunk_size]
            n = xc.shape[0]
            ctf = self._ctf(par[c0 : c0 + self.chunk_size])[:, rows][..., :ncol]  # (n, R, C)
            X = torch.fft.rfft2(xc)[:, rows][..., :ncol]
            Z = X * ctf * wb  # (n, R, C)
            # cross-correlation Σ_f Z(f) conj(R(f)) exp(2πi f·s) at the integer shifts only, over the band
            # |f| ≤ limit (cheaper than full inverse FFTs at low resolution): one GEMM (n·S, 2·R·C) × (2·R·C, KP)
            ZE = Z.reshape(n, 1, -1) * E[None]  # (n, S, R·C)
            ZE = torch.cat([ZE.real, ZE.imag], -1).reshape(n * S, -1)
            cc = (ZE @ refs_ri.T).reshape(n, S, KP).transpose(1, 2)  # (n, KP, S)
            mm = ((ctf**2) * wb * mult).reshape(n, -1) @ ref_pow.T  # (n, KP)
            xx = ((X.abs() ** 2) * wb * mult).reshape(n, -1).sum(-1)  # (n,)
            if normalized_cc:
                score = cc / torch.sqrt(mm[..., None] * xx[:, None, None]).clamp(min=1e-12)
                ll = score.reshape(n, K, P * S)
            else:
                ll = (cc - 0.5 * mm[..., None]).reshape(n, K, P * S)  # relative to the empty model
            best_pose_ll, best_pose = ll.max(-1)  # (n, K)
            if normalized_cc:
                post = F.one_hot(best_pose_ll.argmax(-1), K).float()
            else:
                lse = torch.logsumexp(ll * self.inverse_temperature, -1) + log_prior  # (n, K)
                post = torch.softmax(lse, -1)
            kbest = (best_pose_ll + (0 if normalized_cc else log_prior)).argmax(-1)
            out_post.append(post)
            out_pose.append(best_pose)
            out_best.append(kbest)
            out_ll.append(best_pose_ll.gather(1, kbest[:, None])[:, 0])
            if not normalized_cc:
                # ρ = correlation of the best model with the particle's signal, whose power is estimated as the
                # data power minus the expected noise power (one per weighted Fourier sample): ≈ 1 when the
                # class average explains its particles, low for heterogeneous (junk) classes
                pb = best_pose.gather(1, kbest[:, None])[:, 0]
                kp = kbest * P + pb // S
                cc_b = cc[torch.arange(n, device=x.device), kp, pb % S]
                mm_b = mm[torch.arange(n, device=x.device), kp]
                n_noise = float(((wb > 0).float() * mult).sum())
                sig_pow = (xx - n_noise).clamp(min=1e-3 * n_noise)
                out_coh.append((cc_b / torch.sqrt(mm_b.clamp(min=1e-12) * sig_pow)).clamp(-1, 1))
            else:
                out_coh.append(torch.zeros(n, device=x.device))
        return {
            "post_class": torch.cat(out_post),
            "best_pose": torch.cat(out_pose),
            "best_class": torch.cat(out_best),
            "best_ll": torch.cat(out_ll),
            "coherence": torch.cat(out_coh),
        }

    def _result(self, e) -> BatchResult:
        k = e["best_class"]
        pose = e["best_pose"].gather(1, k[:, None])[:, 0]
        S = self.shift_values.shape[0]
        return BatchResult(
            class_index=k,
            max_probability=e["post_class"].gather(1, k[:, None])[:, 0],
            psi_deg=self.psi_values[pose // S],
            shift_yx_px=self.shift_values[pose % S],
            log_likelihood=e["best_ll"],
        )

    # ------------------------------------------------------------------ M-step
    def _batch_statistics(self, x, par, half, e, top: int = 3, min_weight: float = 1e-3, residuals: bool = True):
        """Sufficient statistics of a batch given its E-step: ``num (2,K,b,b)``, ``den``, ``weight (2,K)``,
        ``sigma2_sum (n_shells,)`` (residual power per shell summed over particles)."""
        b, K = self.b, self.K
        S = self.shift_values.shape[0]
        post, pose = e["post_class"], e["best_pose"]
        T = min(top, K)
        wt, kt = post.topk(T, dim=-1)  # (n, T)
        wt = wt / wt.sum(-1, keepdim=True)
        keep = wt > min_weight
        ii = torch.arange(x.shape[0], device=x.device)[:, None].expand(-1, T)[keep]
        kk, ww = kt[keep], wt[keep]
        pp = pose[ii, kk]
        psi = self.psi_values[pp // S]
        sh = self.shift_values[pp % S]
        P = self.psi_values.shape[0]
        num = torch.zeros(2, K, b, b, device=x.device)
        den = torch.zeros(2, K, b, b // 2 + 1, device=x.device)
        weight = torch.zeros(2, K, device=x.device)
        sig = torch.zeros(self.n_shells, device=x.device)
        refs = (self.initialised and residuals) or None
        # Rotation is linear, so Σ_i w_i R_-psi_i(y_i) = Σ_p R_-p(Σ_{i: psi_i = p} w_i y_i): accumulate the shifted,
        # CTF-weighted transforms and the CTF² per (half, class, psi) bin, then rotate each occupied bin once.
        bins = (half[ii] * K + kk) * P + pp // S
        ubins, inv = torch.unique(bins, return_inverse=True)
        U = ubins.shape[0]
        num_bins = torch.zeros(U, b, b // 2 + 1, dtype=torch.complex64, device=x.device)
        den_bins = torch.zeros(U, b, b, device=x.device)  # full plane, fftshifted (rotated about the centre)
        step = max(1, self.chunk_size * 8)
        for c0 in range(0, ii.shape[0], step):
            i_, w_, s_, u_ = (t[c0 : c0 + step] for t in (ii, ww, sh, inv))
            ctf_full = self._ctf(par[i_], rfft=False)  # (m, b, b)
            ctf = ctf_full[..., : b // 2 + 1]
            cx_ft = torch.fft.rfft2(x[i_]) * ctf * fourier.phase_shift_2d(-s_, (b, b))
            num_bins.index_add_(0, u_, cx_ft * w_[:, None, None])
            den_bins.index_add_(0, u_, ctf_full**2 * w_[:, None, None])
        bin_psi = self.psi_values[ubins % P]
        bin_flat = ubins // P  # half * K + class
        rstep = max(1, self.chunk_size * 4)
        for c0 in range(0, U, rstep):
            sl = slice(c0, c0 + rstep)
            ft = num_bins[sl]
            # rotate on a 2× grid (zero-padded transform) and crop back, see rotate_images_2d(oversampling=2)
            big = torch.zeros(ft.shape[0], 2 * b, b + 1, dtype=ft.dtype, device=ft.device)
            big[:, : b // 2, : b // 2 + 1] = ft[:, : b // 2]
            big[:, 2 * b - b // 2 :, : b // 2 + 1] = ft[:, b // 2 :]
            big = torch.fft.irfft2(big, s=(2 * b, 2 * b)) * 4.0
            cx = fourier.fourier_crop_2d(rotate_images_2d(big, -bin_psi[sl]), (b, b))
            c2 = torch.fft.fftshift(den_bins[sl], dim=(-2, -1))
            c2 = torch.fft.ifftshift(rotate_images_2d(c2, -bin_psi[sl]), dim=(-2, -1))[..., : b // 2 + 1]
            num.view(2 * K, b, b).index_add_(0, bin_flat[sl], cx)
            den.view(2 * K, b, b // 2 + 1).index_add_(0, bin_flat[sl], c2)
        weight.view(-1).index_add_(0, half[ii] * K + kk, ww)
        weight_sq = torch.zeros(2, K, device=x.device)
        weight_sq.view(-1).index_add_(0, half[ii] * K + kk, ww**2)
        coherence = torch.zeros(2, K, device=x.device)
        if "coherence" in e:
            coherence.view(-1).index_add_(0, half[ii] * K + kk, ww * e["coherence"][ii])
        if refs is not None:  # residual power at the best pose → noise estimate
            kb = e["best_class"]
            pb = pose.gather(1, kb[:, None])[:, 0]
            for c0 in range(0, x.shape[0], step):
                sl = slice(c0, c0 + step)
                ctf = self._ctf(par[sl])
                fy = torch.fft.fftfreq(b, 1.0 / b, device=x.device)
                fx = torch.arange(b // 2 + 1, device=x.device)
                model = self._sample_references(kb[sl], self.psi_values[pb[sl] // S], fy, fx) * ctf
                model = model * fourier.phase_shift_2d(self.shift_values[pb[sl] % S], (b, b))
                res = (torch.fft.rfft2(x[sl]) - model).abs() ** 2
                sig += fourier.radial_average_2d(res).sum(0)
        else:
            sig = fourier.radial_average_2d(torch.fft.rfft2(x).abs() ** 2).sum(0)
        return {"num": num, "den": den, "weight": weight, "sig": sig, "weight_sq": weight_sq, "coherence": coherence}

    def _maximization(self, stats, n: int, gamma: float):
        """Blend batch statistics of ``n`` particles into the running ones with step size ``gamma``."""
        num, den, weight, sig = stats["num"], stats["den"], stats["weight"], stats["sig"]
        w_old = self.total_weight
        w_new = n / gamma if gamma < 1 else float(n)
        w_new = min(w_new, w_old + n) if w_old > 0 else float(n)
        a_old = (1 - gamma) * (w_new / w_old) if w_old > 0 else 0.0
        a_new = gamma * w_new / n
        self.num = a_old * self.num + a_new * num
        self.den = a_old * self.den + a_new * den
        self.weight = a_old * self.weight + a_new * weight
        self.weight_sq = a_old**2 * self.weight_sq + a_new**2 * stats["weight_sq"]
        self.coherence_sum = a_old * self.coherence_sum + a_new * stats["coherence"]
        self.sigma2 = (1 - gamma) * self.sigma2 + gamma * (sig / n) if w_old > 0 else sig / n
        self.sigma2 = self.sigma2.clamp(min=1e-6 * float(self.sigma2.max()))
        self.total_weight = w_new
        self._refs_cache = None
        self._class_ft_cache = None
        self._recentre()
        self._refs_cache = None
        self._class_ft_cache = None
        self._update_alignment_limit()

    def _recentre(self):
        """Move each class average's centre of mass (positive density) to the box centre."""
        avg = self._averages().clamp(min=0)
        y = torch.arange(self.b, device=avg.device, dtype=torch.float32) - self.b // 2
        m = avg.sum((-2, -1)).clamp(min=1e-12)
        com = torch.stack([(avg.sum(-1) * y).sum(-1) / m, (avg.sum(-2) * y).sum(-1) / m], -1)  # (K, 2)
        com = torch.where((avg.sum((-2, -1)) > 0)[:, None], com, torch.zeros_like(com))
        self.num = fourier.shift_image_2d(self.num, -com[None].expand(2, -1, -1))

    def _half_frc(self) -> torch.Tensor:
        """FRC ``(K, n_shells)`` between the two half-sets' CTF-weighted sums ``Σ CTF·X`` of each class.

        Computed without mask or Wiener filter: a shared mask would leak strong low-frequency signal into the
        (filtered, tiny) high-frequency shells of both halves and fake a correlation there."""
        return fourier.fourier_ring_correlation(self.num[0], self.num[1])

    def _resolution_shells(self) -> torch.Tensor:
        """Per class, the last shell before the half-set FRC falls below 0.143 ``(K,)``."""
        frc = self._half_frc()
        below = frc[:, 1:] < 0.143
        first = torch.where(below.any(-1), below.float().argmax(-1), torch.full_like(below[:, 0], below.shape[1] - 1, dtype=torch.long))
        return first.clamp(min=1)  # index into shells 1.. → last good shell = first (shell first+1 fails)

    def _update_alignment_limit(self):
        w = self.weight.sum(0)
        pop = w > 0.5 * w.sum() / self.K / 4
        if not bool(pop.any()):
            return
        shells = self._resolution_shells()[pop].float()
        # align a few shells beyond the classes' resolution (RELION widens its limit the same way): at the limit
        # itself the half-set FRC is cut by the alignment, so the limit would never rise
        res = float(torch.quantile(shells, 0.5).item())
        target = int(round(res + max(2.0, self.alignment_margin * res)))
        self.align_shell = int(min(self.b // 2, max(self.align_shell, min(target, self.align_shell + 3))))

    def _reseed_empty(self, x, par, half, e):
        """Classes with less than ``reseed_fraction / K`` of the weight are re-seeded by splitting the most populated class: the batch's
        particles of that class that fit it worst (half of them, at their poses) become the new class, so it
        starts from a group of real images (a sub-view, or the junk hiding in a big class) instead of a single
        noisy particle that no other particle would follow."""
        w = self.weight.sum(0).clone()
        empty = torch.nonzero(w < self.reseed_fraction * w.sum() / self.K).flatten()
        if empty.numel() == 0:
            return
        kb, ll = e["best_class"], e["best_ll"]
        taken = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for k in empty.tolist():
            order_k = torch.argsort(w, descending=True)
            members = None
            for j in order_k.tolist():
                cand = torch.nonzero((kb == j) & ~taken).flatten()
                if cand.numel() >= 8:
                    members = cand[torch.argsort(ll[cand])[: cand.numel() // 2]]
                    break
            if members is None:  # tiny batch: the worst-fitting particles left
                free = torch.nonzero(~taken).flatten()
                if free.numel() == 0:
                    break
                members = free[torch.argsort(ll[free])[:4]]
            taken[members] = True
            j = kb[members]
            sub = {
                "post_class": F.one_hot(torch.full_like(j, k), self.K).float(),
                "best_pose": e["best_pose"][members].clone(),
                "best_class": torch.full_like(j, k),
            }
            sub["best_pose"][:, k] = e["best_pose"][members, j]
            st = self._batch_statistics(x[members], par[members], half[members], sub, residuals=False)
            self.num[:, k], self.den[:, k], self.weight[:, k] = st["num"][:, k], st["den"][:, k], st["weight"][:, k]
            self.weight_sq[:, k], self.coherence_sum[:, k] = st["weight_sq"][:, k], 0.0
            w[k] = st["weight"][:, k].sum()
        self._refs_cache = None
        self._class_ft_cache = None

    # ------------------------------------------------------------------ initialisation
    def _initialise(self, x, par, half):
        """k-means++ seeding by aligned, normalised cross-correlation of phase-flipped, low-passed particles,
        then ``n_init_iterations`` EM passes over these particles. With more than ``init_particles_per_class · K``
        particles, seeding and passes run on a random subset of that size and one EM pass over all of them
        follows (first classes sooner; the stream and its revisits refine them)."""
        n = x.shape[0]
        m = self.init_particles_per_class * self.K
        if 0 < m < n:
            sub = torch.randperm(n, generator=self.gen)[:m].to(x.device)
            self._initialise(x[sub], par[sub], half[sub])
            if self.n_init_iterations > 0:
                self._em_pass(x, par, half, gamma=1.0)
            return
        b = self.b
        ctf = self._ctf(par)
        flipped = torch.fft.irfft2(torch.fft.rfft2(x) * torch.sign(ctf), s=(b, b))
        flipped = fourier.lowpass_2d(flipped, self.initial_resolution, self.pixel_size) * self.mask
        self.sigma2 = fourier.radial_average_2d(torch.fft.rfft2(x).abs() ** 2).mean(0)
        P = self.psi_values.shape[0]
        first = int(torch.randint(n, (1,), generator=self.gen))
        seeds = [first]
        best_score = torch.full((n,), -1e9, device=x.device)
        for _ in range(self.K):
            s = flipped[seeds[-1]]
            rot = rotate_images_2d(s[None].expand(P, -1, -1), self.psi_values)
            e = self._expectation(x, par, torch.fft.rfft2(rot), torch.zeros(1, device=x.device), normalized_cc=True)
            best_score = torch.maximum(best_score, e["best_ll"])
            if len(seeds) == self.K:
                break
            d = (1 - best_score).clamp(min=0) ** 2
            d[seeds] = 0
            seeds.append(int(torch.multinomial(d.cpu() + 1e-12, 1, generator=self.gen)))
        rot = rotate_images_2d(flipped[seeds].repeat_interleave(P, 0), self.psi_values.repeat(self.K))
        e = self._expectation(x, par, torch.fft.rfft2(rot), torch.zeros(self.K, device=x.device), normalized_cc=True)
        stats = self._batch_statistics(x, par, half, e)
        self.total_weight = 0.0
        self._maximization(stats, n, 1.0)
        self.initialised = True
        for j in range(self.n_init_iterations):
            self._annealed_pass(x, par, half, j, self.n_init_iterations)

    def _annealed_pass(self, x, par, half, j: int, n_passes: int):
        """EM pass ``j`` of ``n_passes`` from fresh classes: the log-likelihoods are scaled by an inverse
        temperature rising geometrically from 1/``initial_temperature`` to 1 over the first half of the passes,
        so particles stay soft-assigned while the classes are still close to their seeds."""
        n_anneal = max(1, n_passes // 2)
        t = self.initial_temperature ** max(0.0, 1 - j / n_anneal)
        self.inverse_temperature = 1.0 / t
        try:
            return self._em_pass(x, par, half, gamma=1.0)
        finally:
            self.inverse_temperature = 1.0

    def _stream_inverse_temperature(self) -> float:
        """Annealing of the stream: posteriors are tempered by ``1/stream_temperature`` when the classes start and
        sharpen geometrically to 1 once ``anneal_particles`` new particles have been seen, so that while the
        classes are young a particle spreads over the classes it fits almost equally well (class similarity)
        instead of feeding the largest class, whose average is the least noisy."""
        t0 = self.stream_temperature
        start = float(self.settings.min_particles_to_start)
        if t0 <= 1 or self.n_seen >= self.anneal_particles:
            return 1.0
        f = max(0.0, (self.n_seen - start) / max(1.0, self.anneal_particles - start))
        return float(t0 ** (f - 1.0))

    def _em_pass(self, x, par, half, gamma: float):
        e = self._expectation(x, par)
        stats = self._batch_statistics(x, par, half, e)
        self._maximization(stats, x.shape[0], gamma)
        self._reseed_empty(x, par, half, e)
        return e

    # ------------------------------------------------------------------ buffer
    def _remember(self, x, par, half):
        """Reservoir sampling (Vitter's algorithm R) of new particles into the bounded revisit buffer."""
        n = x.shape[0]
        free = max(0, min(n, self.buffer_size - self.buf_images.shape[0]))
        if free:
            self.buf_images = torch.cat([self.buf_images, x[:free]])
            self.buf_ctfpar = torch.cat([self.buf_ctfpar, par[:free]])
            self.buf_half = torch.cat([self.buf_half, half[:free]])
        if free < n:
            seen = torch.arange(self.n_seen + free + 1, self.n_seen + n + 1, dtype=torch.float64)
            j = (torch.rand(n - free, generator=self.gen, dtype=torch.float64) * seen).long()
            slot_of = {}  # later particles overwrite earlier ones in the same slot, as in the sequential rule
            for i, jj in enumerate(j.tolist()):
                if jj < self.buffer_size:
                    slot_of[jj] = free + i
            if slot_of:
                slots = torch.tensor(list(slot_of.keys()), device=self.device)
                src = torch.tensor(list(slot_of.values()), device=self.device)
                self.buf_images[slots], self.buf_ctfpar[slots], self.buf_half[slots] = x[src], par[src], half[src]
        self.n_seen += n

    def _halves(self, n: int) -> torch.Tensor:
        return (torch.arange(self.n_seen, self.n_seen + n, device=self.device) % 2).long()

    def _gamma(self, n: int) -> float:
        self.n_processed += n
        return float(min(1.0, (n / self.n_processed) ** self.kappa))

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def update(self, images, defocus_u, defocus_v, defocus_angle_deg) -> BatchResult:
        """Add a batch of particles ``images (n, b, b)`` (particles white, normalised background) with their
        CTF (``defocus_u, defocus_v (n,)`` Å, ``defocus_angle_deg (n,)``) and refine the classes.

        Before ``settings.min_particles_to_start`` particles have arrived, they are buffered and the result has
        ``class_index == -1``; the batch that completes the start set initialises the classes and is assigned.
        """
        x, par = self._as_inputs(images, defocus_u, defocus_v, defocus_angle_deg)
        n = x.shape[0]
        half = self._halves(n)
        self._remember(x, par, half)
        if not self.initialised:
            self.pending.append((x, par))
            n_pend = sum(p[0].shape[0] for p in self.pending)
            if n_pend < self.settings.min_particles_to_start:
                z = torch.zeros(n, device=self.device)
                return BatchResult(
                    torch.full((n,), -1, dtype=torch.long, device=self.device), z, z.clone(),
                    torch.zeros(n, 2, device=self.device), z.clone(),
                )
            self._start_from_pending()
            return self._result(self._expectation(x, par))
        self.inverse_temperature = self._stream_inverse_temperature()
        try:
            e = self._em_pass(x, par, half, self._gamma(n))
        finally:
            self.inverse_temperature = 1.0
        self.n_updates += 1
        if self.revisit_fraction > 0:
            self.revisit(int(round(self.revisit_fraction * n)))
        return self._result(e)

    def _start_from_pending(self) -> None:
        px = torch.cat([p[0] for p in self.pending])
        pp = torch.cat([p[1] for p in self.pending])
        ph = (torch.arange(self.n_seen - px.shape[0], self.n_seen, device=self.device) % 2).long()
        self.pending = []
        self.n_processed = px.shape[0]
        self._initialise(px, pp, ph)
        self.n_updates += 1

    @torch.no_grad()
    def start(self) -> bool:
        """Make the first classes now from the buffered particles, even if fewer than
        ``settings.min_particles_to_start`` have come (e.g. at the end of a short run). Needs at least
        ``n_classes`` buffered particles; returns whether the classifier has classes afterwards."""
        n_pend = sum(p[0].shape[0] for p in self.pending)
        if not self.initialised and n_pend >= self.K:
            self._start_from_pending()
        return self.initialised

    @torch.no_grad()
    def revisit(self, n: int) -> BatchResult | None:
        """Re-process ``n`` random particles from the bounded buffer of earlier particles (E- and M-step), so
        their early assignments are corrected against the current classes. Returns their new assignment."""
        nb = self.buf_images.shape[0]
        if not self.initialised or nb == 0 or n <= 0:
            return None
        idx = torch.randperm(nb, generator=self.gen)[: min(n, nb)].to(self.device)
        x, par, half = self.buf_images[idx], self.buf_ctfpar[idx], self.buf_half[idx]
        e = self._em_pass(x, par, half, self._gamma(x.shape[0]))
        return self._result(e)

    @torch.no_grad()
    def fit(self, images, defocus_u, defocus_v, defocus_angle_deg, n_iterations: int = 10) -> BatchResult:
        """Batch mode: classify all particles at once with ``n_iterations`` full EM passes (same E- and M-steps
        as :meth:`update`), after the same initialisation if there are no classes yet. On a classifier that
        already has classes the passes start from them, and the statistics become those of these particles."""
        x, par = self._as_inputs(images, defocus_u, defocus_v, defocus_angle_deg)
        half = self._halves(x.shape[0])
        self._remember(x, par, half)
        fresh = not self.initialised
        if fresh:  # seeded on all particles (no subset: the passes below run over all of them anyway)
            n_init, per_class = self.n_init_iterations, self.init_particles_per_class
            self.n_init_iterations = self.init_particles_per_class = 0
            self._initialise(x, par, half)
            self.n_init_iterations, self.init_particles_per_class = n_init, per_class
        self.n_processed += x.shape[0]
        for j in range(n_iterations):
            if fresh:
                self._annealed_pass(x, par, half, j, n_iterations)
            else:
                self._em_pass(x, par, half, gamma=1.0)
            self.n_updates += 1
        return self._result(self._expectation(x, par))

    @torch.no_grad()
    def assign(self, images, defocus_u, defocus_v, defocus_angle_deg) -> BatchResult:
        """E-step only: the best class and pose of each particle against the current classes (no update)."""
        if not self.initialised:
            raise RuntimeError("no classes yet: fewer than settings.min_particles_to_start particles seen")
        x, par = self._as_inputs(images, defocus_u, defocus_v, defocus_angle_deg)
        return self._result(self._expectation(x, par))

    @torch.no_grad()
    def snapshot(self) -> Class2DSnapshot:
        """The current class averages and their statistics, as CPU tensors."""
        K, b = self.K, self.b
        if not self.initialised:
            return Class2DSnapshot(
                torch.zeros(K, b, b), torch.zeros(K), torch.full((K,), 1.0 / K), torch.full((K,), 999.0),
                self.alignment_resolution_angstrom, self.n_seen, torch.zeros(K), torch.zeros(K), self.pixel_size,
            )
        w = self.weight.sum(0)
        shells = self._resolution_shells().float()
        res = b * self.pixel_size / shells
        res = torch.where(self.weight.min(0).values > 2.0, res, torch.full_like(res, 999.0))
        return Class2DSnapshot(
            averages=self._averages().float().cpu(),
            particle_counts=w.cpu(),
            class_distribution=(w / w.sum().clamp(min=1e-12)).cpu(),
            resolution_angstrom=res.cpu(),
            alignment_resolution_angstrom=self.alignment_resolution_angstrom,
            n_particles_seen=self.n_seen,
            effective_sample_size=(w**2 / self.weight_sq.sum(0).clamp(min=1e-12)).cpu(),
            coherence=(self.coherence_sum.sum(0) / w.clamp(min=1e-12)).cpu(),
            pixel_size_angstrom=self.pixel_size,
        )
