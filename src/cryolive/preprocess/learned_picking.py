"""Learned picking: a small fully convolutional network trained during the session by positive-unlabelled learning.

Live users start with the blob picker, then keep the particles of their good 2D classes. :class:`LearnedPicker`
learns *their* particle from those coordinates (positives) and everything else on the same micrographs
(unlabelled: more particles, ice, junk, carbon), in the spirit of Topaz (Bepler et al. 2019) — our own
implementation, with the non-negative PU risk of Kiryo et al. (2017) instead of Topaz's GE-binomial:

- every micrograph is prepared as the other pickers do (:mod:`cryolive.preprocess.picking`): the carbon film
  replaced by noise, the plane subtracted, Fourier-cropped to a working pixel size of diameter / 20 within
  4–8 Å, and turned into two channels — the CTF phase-flipped image band-passed to the particle's scales
  (particles white at every defocus) and the unflipped low-passed image (projected mass: junk is denser) —
  each normalised by its robust spread;
- the network (:class:`PickerNet`, ~25 k parameters) is fully convolutional with dilated 5×5 convolutions
  (receptive field ~1.6 × the particle diameter) and gives a logit per working pixel;
- labels: pixels within 0.1 × diameter of a positive coordinate are positive, all pixels are unlabelled (the
  marginal); the class prior ``π`` is the fraction of pixels expected to be positive
  (``expected_particles_per_micrograph``; default 1.25 × the mean number of positives: good classes keep most,
  not all, of the particles);
- nnPU risk with the logistic loss ``ℓ(z, y) = softplus(−y z)``: ``π R_P⁺ + max(0, R_U⁻ − π R_P⁻)``, stepping
  against the negative part when it goes below zero (Kiryo et al.), Adam, random 64² crops with the eight
  rotations/flips;
- picking: local maxima of the logit map, greedy non-maximum suppression at half a diameter, ``threshold`` on
  the logit (default 0: probability 0.5), nothing on the carbon film or within half a diameter of the edge.

Trains on ≤ 20 micrographs in about a minute on one CPU thread (the working images are ~150²); runs on the
device of the micrographs. ``state_dict()`` / ``load_state_dict()`` (or :meth:`LearnedPicker.save` /
:meth:`LearnedPicker.load`) keep the network with its settings.

Example::

    picker = LearnedPicker(particle_diameter_angstrom=150.0)
    picker.fit(micrographs, 1.0, positives_yx_px, ctfs=ctf_dicts)  # lists: (h, w) tensors, (n_i, 2) coords
    picks = picker.pick(micrograph, 1.0, ctf=ctf_dict)
    picker.save("picker.pt"); LearnedPicker.load("picker.pt")
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import picking

MODEL_VERSION = 1
WORKING_PIXELS_PER_DIAMETER = 20.0
MIN_WORKING_PIXEL_ANGSTROM = 4.0
MAX_WORKING_PIXEL_ANGSTROM = 8.0
POSITIVE_RADIUS_DIAMETERS = 0.1
NMS_DIAMETERS = 0.5


class PickerNet(nn.Module):
    """Fully convolutional scorer: ``(b, 2, h, w)`` working images → ``(b, 1, h, w)`` logits (same size)."""

    def __init__(self, channels: int = 16, in_channels: int = 2):
        super().__init__()
        c = channels
        self.layers = nn.ModuleList([
            nn.Conv2d(in_channels, c, 5, padding=2),
            nn.Conv2d(c, c, 5, padding=4, dilation=2),
            nn.Conv2d(c, c, 5, padding=6, dilation=3),
            nn.Conv2d(c, c, 3, padding=4, dilation=4),
        ])
        self.norms = nn.ModuleList([nn.GroupNorm(4, c) for _ in self.layers])
        self.head = nn.Conv2d(c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, norm in zip(self.layers, self.norms):
            x = F.relu(norm(conv(x)))
        return self.head(x)


@dataclass
class LearnedPicks(picking.Picks):
    """:class:`~cryolive.preprocess.picking.Picks` whose ``scores`` are the network's logits;
    ``probability (n,)`` = sigmoid(score)."""

    probability: torch.Tensor | None = None


@dataclass
class FitReport:
    """What :meth:`LearnedPicker.fit` did: steps, final loss, the prior, positives used, seconds, and the logit
    threshold it chose for :meth:`LearnedPicker.pick`."""

    steps: int
    loss: float
    prior: float
    n_positives: int
    n_micrographs: int
    seconds: float
    threshold: float


def _working_pixel_size(pixel_size_angstrom: float, diameter_angstrom: float) -> float:
    target = diameter_angstrom / WORKING_PIXELS_PER_DIAMETER
    return max(pixel_size_angstrom, min(MAX_WORKING_PIXEL_ANGSTROM, max(MIN_WORKING_PIXEL_ANGSTROM, target)))


def _robust_normalise(x: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    v = x[valid] if valid is not None and bool(valid.any()) else x.flatten()
    med = v.median()
    mad = (v - med).abs().median() * 1.4826
    return (x - med) / mad.clamp(min=1e-12)


def prepare_micrograph(
    micrograph: torch.Tensor, pixel_size_angstrom: float, diameter_angstrom: float, ctf: dict | None = None,
) -> dict:
    """The network's input for one micrograph: ``image (2, nh, nw)`` (phase-flipped band-passed and unflipped
    low-passed, robustly normalised), ``carbon (nh, nw)`` bool or None, ``scale_yx`` (micrograph px per working
    px) and ``pixel_size`` (working Å/px)."""
    ps_target = _working_pixel_size(pixel_size_angstrom, diameter_angstrom)
    carbon = picking.detect_carbon(micrograph, pixel_size_angstrom, diameter_angstrom,
                                   picking.CARBON_MARGIN_DIAMETERS * diameter_angstrom / pixel_size_angstrom)
    ft_neg, flip, ps_w, scale_yx, k, (nh, nw) = picking._preprocess(
        micrograph, pixel_size_angstrom, diameter_angstrom, ctf, carbon, working_pixel_size_angstrom=ps_target)
    band = picking._band(k, diameter_angstrom)
    flipped = torch.fft.irfft2(ft_neg * flip * band, s=(nh, nw))
    low = picking._highpass(k, 10 * diameter_angstrom) * torch.exp(-2 * (math.pi * k * diameter_angstrom / 6) ** 2)
    mass = torch.fft.irfft2(ft_neg * low, s=(nh, nw))
    carbon_w = None
    if carbon is not None:
        carbon_w = F.interpolate(carbon[None, None].float(), size=(nh, nw), mode="area")[0, 0] > 0.5
    valid = None if carbon_w is None else ~carbon_w
    image = torch.stack([_robust_normalise(flipped, valid), _robust_normalise(mass, valid)])
    return dict(image=image.to(torch.float32), carbon=carbon_w, scale_yx=scale_yx, pixel_size=ps_w)


def nnpu_loss(logits: torch.Tensor, positive: torch.Tensor, prior: float, beta: float = 0.0) -> tuple[torch.Tensor, bool]:
    """Non-negative PU risk (Kiryo et al. 2017) with the logistic loss, for ``logits (...)`` and a bool mask
    ``positive (...)`` of labelled positives, all elements being the unlabelled sample (the marginal).

    Returns ``(loss to minimise, clipped)``: when the estimated negative risk ``R_U⁻ − π R_P⁻`` falls below
    ``−beta``, the loss is ``−(R_U⁻ − π R_P⁻)`` (a step that pushes it back up) and ``clipped`` is True."""
    z = logits.flatten()
    p = positive.flatten()
    n_p = p.sum().clamp(min=1)
    r_p_pos = (F.softplus(-z) * p).sum() / n_p
    r_p_neg = (F.softplus(z) * p).sum() / n_p
    r_u_neg = F.softplus(z).mean()
    neg = r_u_neg - prior * r_p_neg
    if float(neg.detach()) < -beta:
        return -neg, True
    return prior * r_p_pos + neg, False


def _positive_mask(shape: tuple[int, int], coords_w: torch.Tensor, radius_px: float, device) -> torch.Tensor:
    h, w = shape
    mask = torch.zeros(h, w, dtype=torch.bool, device=device)
    if coords_w.numel() == 0:
        return mask
    r = int(math.ceil(radius_px))
    dy, dx = torch.meshgrid(torch.arange(-r, r + 1, device=device), torch.arange(-r, r + 1, device=device), indexing="ij")
    keep = (dy**2 + dx**2) <= radius_px**2 + 1e-6
    dy, dx = dy[keep], dx[keep]
    c = coords_w.round().long()
    yy = (c[:, 0:1] + dy[None]).flatten()
    xx = (c[:, 1:2] + dx[None]).flatten()
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    mask[yy[ok], xx[ok]] = True
    return mask


def _peaks(score: torch.Tensor, carbon: torch.Tensor | None, d_w: float, margin: tuple[int, int]) -> torch.Tensor:
    """Flat indices of the NMS peaks of a logit map ``(h, w)``, best first, off the carbon film."""
    shifted = score - score.min() + 1.0  # _local_maxima keeps positive peaks only
    idx = picking._local_maxima(shifted, max(1, int(0.15 * d_w)), margin)
    if carbon is not None:
        idx = idx[~carbon.flatten()[idx]]
    nw = score.shape[1]
    coords_w = torch.stack([idx // nw, idx % nw], -1).to(torch.float32)
    keep = picking.non_maximum_suppression(coords_w, score.flatten()[idx], NMS_DIAMETERS * d_w)
    return idx[keep]


class LearnedPicker:
    """A particle picker that learns from positive coordinates on a few micrographs (see the module docstring).

    ``particle_diameter_angstrom``: sets the working pixel size, the band-pass, the label radius and the
    minimum distance between picks. ``device``: where the network lives (micrographs are moved there).
    """

    def __init__(self, particle_diameter_angstrom: float, channels: int = 16, device: str | torch.device = "cpu",
                 seed: int = 0):
        if not particle_diameter_angstrom > 0:
            raise ValueError(f"particle_diameter_angstrom must be > 0, got {particle_diameter_angstrom}")
        self.diameter = float(particle_diameter_angstrom)
        self.channels = int(channels)
        self.device = torch.device(device)
        self.seed = int(seed)
        torch.manual_seed(self.seed)
        self.net = PickerNet(self.channels).to(self.device)
        self.prior: float | None = None
        self.threshold = 0.0
        self.fitted = False

    # ------------------------------------------------------------------ training
    def fit(
        self,
        micrographs: list[torch.Tensor],
        pixel_size_angstrom: float | list[float],
        positives_yx_px: list[torch.Tensor],
        ctfs: list[dict | None] | None = None,
        expected_particles_per_micrograph: float | None = None,
        steps: int = 400,
        batch_size: int = 8,
        crop_px: int = 64,
        learning_rate: float = 3e-3,
    ) -> FitReport:
        """Train on ``micrographs`` (list of ``(h, w)``, particles dark; pixel size one for all or one each) with
        ``positives_yx_px`` (list of
        ``(n_i, 2)`` (row, column) coordinates of known particles in each) and their CTFs (dicts as for
        :func:`cryolive.preprocess.picking.pick_blobs`, or None). Raises ``ValueError`` on mismatched lists or no
        positives at all. Returns a :class:`FitReport`."""
        import time

        t0 = time.perf_counter()
        if len(micrographs) == 0 or len(micrographs) != len(positives_yx_px):
            raise ValueError(f"need as many coordinate sets as micrographs (>0), got {len(micrographs)} and "
                             f"{len(positives_yx_px)}")
        ctfs = list(ctfs) if ctfs is not None else [None] * len(micrographs)
        pixel_sizes = ([float(pixel_size_angstrom)] * len(micrographs) if isinstance(pixel_size_angstrom, (int, float))
                       else [float(p) for p in pixel_size_angstrom])
        if len(pixel_sizes) != len(micrographs):
            raise ValueError("pixel_size_angstrom must be one number or one per micrograph")
        if len(ctfs) != len(micrographs):
            raise ValueError("ctfs must be None or one per micrograph")
        n_pos = sum(int(torch.as_tensor(c).reshape(-1, 2).shape[0]) for c in positives_yx_px)
        if n_pos == 0:
            raise ValueError("no positive coordinates to learn from")
        images, labels, carbons, ps_ws = [], [], [], []
        total_px = 0
        label_px = 0
        for m, c, ctf, px in zip(micrographs, positives_yx_px, ctfs, pixel_sizes):
            prep = prepare_micrograph(torch.as_tensor(m).to(self.device), px, self.diameter, ctf)
            sy, sx = prep["scale_yx"]
            cw = torch.as_tensor(c, dtype=torch.float32, device=self.device).reshape(-1, 2) / torch.tensor(
                [sy, sx], device=self.device)
            r_pos = max(1.0, POSITIVE_RADIUS_DIAMETERS * self.diameter / prep["pixel_size"])
            lab = _positive_mask(prep["image"].shape[-2:], cw, r_pos, self.device)
            images.append(prep["image"])
            carbons.append(prep["carbon"])
            ps_ws.append(prep["pixel_size"])
            labels.append(lab)
            total_px += lab.numel()
            r = int(math.ceil(r_pos))
            d2 = torch.arange(-r, r + 1)[:, None] ** 2 + torch.arange(-r, r + 1)[None, :] ** 2
            label_px = int((d2 <= r_pos**2 + 1e-6).sum())  # pixels labelled per particle
        n_exp = expected_particles_per_micrograph or 1.25 * n_pos / len(micrographs)
        self.prior = float(min(0.5, n_exp * len(micrographs) * label_px / total_px))

        gen = torch.Generator().manual_seed(self.seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=learning_rate, weight_decay=1e-5)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        self.net.train()
        loss_v = float("nan")
        for step in range(steps):
            xs, ys = [], []
            for _ in range(batch_size):
                j = int(torch.randint(len(images), (1,), generator=gen))
                img, lab = images[j], labels[j]
                h, w = lab.shape
                ch, cw_ = min(crop_px, h), min(crop_px, w)
                y0 = int(torch.randint(h - ch + 1, (1,), generator=gen))
                x0 = int(torch.randint(w - cw_ + 1, (1,), generator=gen))
                x = img[:, y0 : y0 + ch, x0 : x0 + cw_]
                y = lab[y0 : y0 + ch, x0 : x0 + cw_]
                k = int(torch.randint(4, (1,), generator=gen))
                x, y = torch.rot90(x, k, (-2, -1)), torch.rot90(y, k, (-2, -1))
                if int(torch.randint(2, (1,), generator=gen)):
                    x, y = x.flip(-1), y.flip(-1)
                xs.append(x)
                ys.append(y)
            if len({tuple(x.shape) for x in xs}) > 1:  # micrographs smaller than the crop: one at a time
                xs, ys = xs[:1], ys[:1]
            logits = self.net(torch.stack(xs))[:, 0]
            loss, _ = nnpu_loss(logits, torch.stack(ys), self.prior)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_v = float(loss.detach())
        self.net.eval()
        # threshold: peak logits are bimodal (particles / the rest); Otsu's split of the training micrographs'
        # peaks, never above the median logit of the peaks at labelled positives
        peaks, at_pos = [], []
        with torch.no_grad():
            for img, lab, prep_carbon in zip(images, labels, carbons):
                score = self.net(img[None])[0, 0]
                idx = _peaks(score, prep_carbon, self.diameter / ps_ws[0], (1, 1))
                peaks.append(score.flatten()[idx])
                at_pos.append(score.flatten()[idx[lab.flatten()[idx]]])
        peaks_t, pos_t = torch.cat(peaks), torch.cat(at_pos)
        t = float(picking._otsu_threshold(peaks_t)) if peaks_t.numel() > 2 else 0.0
        if pos_t.numel():
            t = min(t, float(pos_t.median()))
        self.threshold = t
        self.fitted = True
        return FitReport(steps, loss_v, self.prior, n_pos, len(micrographs), time.perf_counter() - t0, t)

    # ------------------------------------------------------------------ picking
    @torch.no_grad()
    def score_map(self, micrograph: torch.Tensor, pixel_size_angstrom: float, ctf: dict | None = None) -> dict:
        """Logit map ``score (nh, nw)`` on the working grid with ``carbon``, ``scale_yx``, ``pixel_size``."""
        prep = prepare_micrograph(torch.as_tensor(micrograph).to(self.device), pixel_size_angstrom, self.diameter, ctf)
        self.net.eval()
        prep["score"] = self.net(prep["image"][None])[0, 0]
        return prep

    @torch.no_grad()
    def pick(
        self, micrograph: torch.Tensor, pixel_size_angstrom: float, ctf: dict | None = None,
        threshold: float | str | None = "auto", max_picks: int = 2000, edge_margin_px: float | None = None,
    ) -> LearnedPicks:
        """Particles in ``micrograph (h, w)``: peaks of the logit map above ``threshold`` (a logit; "auto": the one
        :meth:`fit` chose; None: every peak), at least half a diameter apart, best first, none on the carbon film
        or closer than ``edge_margin_px`` (default half a diameter) to the edge. The micrograph is not
        modified."""
        if not self.fitted:
            raise RuntimeError("LearnedPicker.pick before fit() or load_state_dict()")
        maps = self.score_map(micrograph, pixel_size_angstrom, ctf)
        score = maps["score"]
        sy, sx = maps["scale_yx"]
        d_w = self.diameter / maps["pixel_size"]
        if edge_margin_px is None:
            edge_margin_px = 0.5 * self.diameter / pixel_size_angstrom
        margin = (int(math.ceil(edge_margin_px / sy)), int(math.ceil(edge_margin_px / sx)))
        if threshold == "auto":
            threshold = self.threshold
        idx = _peaks(score, maps["carbon"], d_w, margin)
        n_cand = int(len(idx))
        nw = score.shape[1]
        flat = score.flatten()
        if threshold is not None:
            idx = idx[flat[idx] >= threshold]
        idx = idx[:max_picks]
        yy, xx = idx // nw, idx % nw
        hh = score.shape[0]

        def _para(a, b, c):
            den = a - 2 * b + c
            return torch.where(den.abs() > 1e-12, 0.5 * (a - c) / den, torch.zeros_like(den)).clamp(-0.5, 0.5)

        dy = _para(flat[(yy - 1).clamp(0, hh - 1) * nw + xx], flat[idx], flat[(yy + 1).clamp(0, hh - 1) * nw + xx])
        dx = _para(flat[yy * nw + (xx - 1).clamp(0, nw - 1)], flat[idx], flat[yy * nw + (xx + 1).clamp(0, nw - 1)])
        coords = torch.stack([(yy + dy) * sy, (xx + dx) * sx], -1).to(torch.float32)
        s = flat[idx]
        n = len(idx)
        nan = torch.full((n,), float("nan"), device=score.device)
        return LearnedPicks(
            coords_yx_px=coords, scores=s, local_power=nan, mass=nan, amplitude=nan,
            diameter_angstrom=torch.full((n,), self.diameter, device=score.device),
            threshold=float("-inf") if threshold is None else float(threshold), noise_floor=float("nan"),
            power_limit=float("inf"), working_pixel_size_angstrom=maps["pixel_size"], n_candidates=n_cand,
            n_junk=0, carbon_fraction=0.0 if maps["carbon"] is None else float(maps["carbon"].float().mean()),
            probability=torch.sigmoid(s),
        )

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        return dict(version=MODEL_VERSION, diameter_angstrom=self.diameter, channels=self.channels,
                    prior=self.prior, threshold=self.threshold, fitted=self.fitted, seed=self.seed,
                    net={k: v.detach().cpu() for k, v in self.net.state_dict().items()})

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("version", -1)) != MODEL_VERSION:
            raise ValueError(f"learned picker state of version {state.get('version')}, expected {MODEL_VERSION}")
        self.diameter = float(state["diameter_angstrom"])
        self.channels = int(state["channels"])
        self.net = PickerNet(self.channels).to(self.device)
        self.net.load_state_dict(state["net"])
        self.net.eval()
        self.prior = state.get("prior")
        self.threshold = float(state.get("threshold", 0.0))
        self.fitted = bool(state.get("fitted", True))

    def save(self, path: str | os.PathLike) -> None:
        """Write the state to ``path`` (torch.save, atomically through a temporary file)."""
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        torch.save(self.state_dict(), tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> LearnedPicker:
        """A picker from a file written by :meth:`save`; ``ValueError`` if it is not one."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same error for the user
            raise ValueError(f"{path}: not a learned picker model ({type(exc).__name__}: {exc})") from exc
        if not isinstance(state, dict) or "net" not in state:
            raise ValueError(f"{path}: not a learned picker model")
        p = cls(float(state["diameter_angstrom"]), int(state["channels"]), device=device, seed=int(state.get("seed", 0)))
        p.load_state_dict(state)
        return p
