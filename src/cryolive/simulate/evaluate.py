"""Score a cryolive session folder against a simulated dataset's ground truth.

Used by the tests and the benchmarks: every figure is computed from the files a session writes
(``OUT/motion/*.star``, ``OUT/exposures.star``, ``OUT/particles.star``, ``OUT/class2d/``) and the truth
written by :func:`cryolive.simulate.simulate_dataset` (``SIM/truth/``), so it measures what a user gets.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..fourier import fourier_ring_correlation, resolution_at_threshold
from ..geometry import euler_angles_to_matrix
from ..io.mrc import read_mrc
from ..io.star import read_star
from ..preprocess.picking import match_picks
from .structure import load_atoms, project_atoms_2d


def _stem(name: str) -> str:
    return Path(str(name)).name.rsplit(".", 1)[0]


def trajectory_errors(out_dir: str | os.PathLike, sim_dir: str | os.PathLike) -> dict[str, float]:
    """RMS error (px) of every movie's global trajectory (``OUT/motion/<movie>.star`` vs the truth)."""
    errors = {}
    for truth_path in sorted(Path(sim_dir, "truth", "motion").glob("*.star")):
        out_path = Path(out_dir, "motion", truth_path.name)
        if not out_path.exists():
            continue
        t = read_star(truth_path)["global_shift"]
        o = read_star(out_path)["global_shift"]
        m = t.merge(o, on="rlnMicrographFrameNumber", suffixes=("_t", "_o"))
        dx = m["rlnMicrographShiftX_o"] - m["rlnMicrographShiftX_t"]
        dy = m["rlnMicrographShiftY_o"] - m["rlnMicrographShiftY_t"]
        errors[truth_path.stem] = float(np.sqrt(np.mean(dx**2 + dy**2)))
    return errors


def defocus_errors(out_dir: str | os.PathLike, sim_dir: str | os.PathLike) -> pd.DataFrame:
    """Per micrograph: fitted minus true defocus U and V (Å) and astigmatism angle error (degrees, mod 180)."""
    truth = read_star(Path(sim_dir, "truth", "exposures.star"))["micrographs"]
    out = read_star(Path(out_dir, "exposures.star"))["micrographs"]
    truth = truth.assign(stem=truth["rlnMicrographMovieName"].map(_stem))
    out = out.assign(stem=out["rlnMicrographMovieName"].map(_stem))
    m = out.merge(truth, on="stem", suffixes=("", "_truth"))
    dang = (m["rlnDefocusAngle"] - m["rlnDefocusAngle_truth"] + 90) % 180 - 90
    return pd.DataFrame({
        "stem": m["stem"],
        "error_u": m["rlnDefocusU"] - m["rlnDefocusU_truth"],
        "error_v": m["rlnDefocusV"] - m["rlnDefocusV_truth"],
        "astigmatism_truth": m["rlnDefocusU_truth"] - m["rlnDefocusV_truth"],
        "angle_error_deg": dang.abs(),
    })


@dataclass
class PickingScore:
    true_positives: int
    n_picked: int
    n_true: int
    precision: float
    recall: float
    f1: float


def picking_scores(out_dir: str | os.PathLike, sim_dir: str | os.PathLike, match_fraction: float = 0.3) -> PickingScore:
    """Precision and recall of ``OUT/particles.star`` against the true particles (junk excluded).

    A pick matches a true particle within ``match_fraction`` × its diameter (greedy, one to one, closest
    pairs first). Only micrographs present in the output count.
    """
    truth = read_star(Path(sim_dir, "truth", "particles.star"))["particles"]
    truth = truth[truth["cryoliveStructure"] != "junk"]
    picks = read_star(Path(out_dir, "particles.star"))["particles"]
    truth = truth.assign(stem=truth["rlnMicrographMovieName"].map(_stem))
    picks = picks.assign(stem=picks["rlnMicrographName"].map(_stem))
    tp = n_true = 0
    for stem, p in picks.groupby("stem"):
        t = truth[truth["stem"] == stem]
        n_true += len(t)
        tp += match_picks(torch.as_tensor(p[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(float)),
                          torch.as_tensor(t[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(float)),
                          torch.as_tensor(match_fraction * t["cryoliveDiameterAngstrom"].to_numpy(float)
                                          / _pixel_size(sim_dir)))[0]
    n_picked = len(picks)
    precision = tp / max(n_picked, 1)
    recall = tp / max(n_true, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return PickingScore(tp, n_picked, n_true, precision, recall, f1)


def _pixel_size(sim_dir) -> float:
    ex = read_star(Path(sim_dir, "truth", "exposures.star"))["micrographs"]
    return float(ex["rlnMicrographOriginalPixelSize"].iloc[0])


@dataclass
class ClassScore:
    class_number: int
    n_particles: int
    correlation: float  # best normalised correlation with a true projection of a member particle
    resolution_angstrom: float  # FRC 0.5 between the class average and that projection
    frc: np.ndarray


def class_average_scores(
    out_dir: str | os.PathLike,
    sim_dir: str | os.PathLike,
    max_members: int = 40,
    psi_step_deg: float = 5.0,
    min_particles: int = 5,
) -> list[ClassScore]:
    """Compare every class average with the CTF-free true projections of its member particles.

    For a class, up to ``max_members`` member picks are matched to true particles (within 0.3 × diameter);
    each one's true projection is computed at the class box and pixel size, aligned to the class average
    over in-plane rotations (``psi_step_deg``) and shifts, and the best normalised correlation is kept,
    with the FRC between the class average and that aligned projection.
    """
    from ..classify2d.streaming import rotate_images_2d

    classes, pixel_size = read_mrc(Path(out_dir, "class2d", "classes.mrcs"))
    classes = torch.as_tensor(classes)
    if classes.ndim == 2:
        classes = classes[None]
    box = classes.shape[-1]
    parts = read_star(Path(out_dir, "particles.star"))["particles"]
    truth = read_star(Path(sim_dir, "truth", "particles.star"))["particles"]
    px_mic = _pixel_size(sim_dir)
    truth = truth.assign(stem=truth["rlnMicrographMovieName"].map(_stem))
    parts = parts.assign(stem=parts["rlnMicrographName"].map(_stem))
    models: dict[str, object] = {}
    scores = []
    psis = torch.arange(0.0, 360.0, psi_step_deg)
    for k in range(classes.shape[0]):
        members = parts[parts["rlnClassNumber"] == k + 1]
        if len(members) < min_particles:
            continue
        rows = []
        for _, p in members.iterrows():
            t = truth[truth["stem"] == p["stem"]]
            if not len(t):
                continue
            d = np.hypot(t["rlnCoordinateX"] - p["rlnCoordinateX"], t["rlnCoordinateY"] - p["rlnCoordinateY"])
            j = int(np.argmin(d.to_numpy()))
            row = t.iloc[j]
            if d.iloc[j] <= 0.3 * row["cryoliveDiameterAngstrom"] / px_mic and row["cryoliveStructure"] != "junk":
                rows.append(row)
            if len(rows) >= max_members:
                break
        if not rows:
            continue
        avg = classes[k]
        best = (-2.0, None)
        for name in sorted({r["cryoliveStructure"] for r in rows}):
            sel = [r for r in rows if r["cryoliveStructure"] == name]
            if name not in models:
                models[name] = load_atoms(name)
            rot = euler_angles_to_matrix(*(torch.tensor([float(r[c]) for r in sel]) for c in
                                           ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")))
            proj = project_atoms_2d(models[name], rot, box, pixel_size)  # (m, box, box)
            for i in range(proj.shape[0]):
                rotated = rotate_images_2d(proj[i].expand(len(psis), box, box), psis, oversampling=2)
                cc, aligned = _best_shift_correlation(avg, rotated)
                j = int(torch.argmax(cc))
                if float(cc[j]) > best[0]:
                    best = (float(cc[j]), aligned[j])
        frc = fourier_ring_correlation(avg, best[1])
        scores.append(ClassScore(k + 1, len(members), best[0],
                                 resolution_at_threshold(frc, box, pixel_size, 0.5), frc.numpy()))
    return scores


def _best_shift_correlation(ref: torch.Tensor, images: torch.Tensor, max_shift_px: int = 6):
    """Normalised correlation of ``ref (b,b)`` with each of ``images (n,b,b)`` at its best integer shift."""
    b = ref.shape[-1]
    r = ref - ref.mean()
    im = images - images.mean(dim=(-2, -1), keepdim=True)
    cc = torch.fft.irfft2(torch.fft.rfft2(r)[None] * torch.fft.rfft2(im).conj(), s=(b, b))
    sy = torch.fft.fftfreq(b, d=1.0 / b)
    win = (sy[:, None].abs() <= max_shift_px) & (sy[None, :].abs() <= max_shift_px)
    cc = torch.where(win, cc, torch.full_like(cc, -math.inf))
    idx = cc.flatten(1).argmax(1)
    dy, dx = sy[idx // b].long(), sy[idx % b].long()
    aligned = torch.stack([torch.roll(im[i], (int(dy[i]), int(dx[i])), (0, 1)) for i in range(len(im))])
    norm = r.norm() * aligned.flatten(1).norm(dim=1)
    return (aligned * r).flatten(1).sum(1) / norm.clamp(min=1e-12), aligned
