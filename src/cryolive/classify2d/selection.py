"""Class statistics, automatic and manual selection of good 2D classes, and what selected classes feed.

The score of a class (each term in [0, 1], multiplied, so a class must be good on every count)::

    score = resolution_term · count_term · centring_term · contrast_term · structure_term

* ``resolution_term = clip((worst − res) / (worst − best))``: the half-set FRC resolution ``res`` (Å) between
  ``best`` = Nyquist (2 × pixel) and ``worst`` = ``worst_resolution_angstrom`` (default 40 Å; 999 Å classes,
  which have too few particles, score 0).
* ``count_term = min(1, ESS / min_particles)``: the effective sample size against ``min_particles`` (default 20).
* ``centring_term = exp(−(d / (0.1 b))²)``: ``d`` the distance (px) of the average's centre of mass (positive
  density) from the box centre; ``b`` the box. Averages that sit at an edge or are split over two particles
  score low.
* ``contrast_term = clip((c − 1) / (contrast_full − 1))``: ``c`` the standard deviation of the average inside
  the particle disc (radius ``0.35 b``) over that in the ring outside it (noise and neighbours); ``contrast_full``
  (default 3) gets the full term. Empty classes score low.
* ``structure_term = clip(s / structure_full)``: ``s`` the fraction of the average's variance inside the disc that
  its rotational average does not explain; ``structure_full`` (default 0.2) gets the full term. Featureless round
  blobs (the averages of junk aggregates, ice contamination) have ``s`` near 0; even a C4 top view keeps ~0.2.

:func:`select_classes` keeps classes whose score is at least ``min_score`` (default 0.3) and whose resolution is
within ``resolution_factor`` (default 1.5) of the best populated classes' (their 75th percentile), so a class that
is merely "not empty" does not pass once better ones exist; :class:`ClassSelection` adds manual overrides on
top. :func:`selected_templates` gives the selected averages with their pixel size (templates for picking) and
:func:`selected_particles` the particles of selected classes (the set for 3D).

Example::

    from cryolive.classify2d import ClassSelection, class_statistics, selected_templates

    stats = class_statistics(clf.snapshot())
    selection = ClassSelection()
    selection.set(3, False)                   # the user rejects class 3 (0-based) whatever its score
    keep = selection.selected(stats)          # (K,) bool
    templates, pixel_size = selected_templates(clf.snapshot(), keep)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .streaming import Class2DSnapshot

__all__ = [
    "ClassStatistics",
    "ClassSelection",
    "class_statistics",
    "select_classes",
    "selected_templates",
    "selected_particles",
]


@dataclass
class ClassStatistics:
    """Per class ``(K,)`` tensors: ``particle_count`` (soft, after forgetting), ``distribution`` (fractions),
    ``resolution_angstrom`` (half-set FRC at 0.143; 999 when unsupported), ``effective_sample_size``,
    ``coherence`` (see :class:`Class2DSnapshot`), ``centring_px`` (centre-of-mass distance from the box centre),
    ``contrast`` (std inside the particle disc / std outside), ``structure`` (non-rotationally-symmetric fraction
    of the variance inside the disc), ``score`` in [0, 1] (module docstring)."""

    particle_count: torch.Tensor
    distribution: torch.Tensor
    resolution_angstrom: torch.Tensor
    effective_sample_size: torch.Tensor
    coherence: torch.Tensor
    centring_px: torch.Tensor
    contrast: torch.Tensor
    structure: torch.Tensor
    score: torch.Tensor


def class_statistics(
    snapshot: Class2DSnapshot,
    worst_resolution_angstrom: float = 40.0,
    min_particles: float = 20.0,
    contrast_full: float = 3.0,
    structure_full: float = 0.2,
) -> ClassStatistics:
    """Statistics and score of every class in ``snapshot`` (CPU tensors; formula in the module docstring)."""
    avg = snapshot.averages.float()  # (K, b, b)
    K, b, _ = avg.shape
    pixel = snapshot.pixel_size_angstrom or 1.0
    y = torch.arange(b, dtype=torch.float32) - b // 2
    r = torch.sqrt(y[:, None] ** 2 + y[None, :] ** 2)
    pos = avg.clamp(min=0)
    mass = pos.sum((-2, -1))
    com_y = (pos.sum(-1) * y).sum(-1) / mass.clamp(min=1e-12)
    com_x = (pos.sum(-2) * y).sum(-1) / mass.clamp(min=1e-12)
    centring = torch.where(mass > 0, torch.sqrt(com_y**2 + com_x**2), torch.full_like(mass, float(b)))
    inside = r <= 0.35 * b
    ring = (r > 0.35 * b) & (r <= 0.45 * b)
    sd_in = avg[:, inside].std(-1)
    sd_out = avg[:, ring].std(-1)
    contrast = sd_in / sd_out.clamp(min=1e-6 * float(sd_in.abs().max().clamp(min=1e-12)))
    ri = r.round().long().flatten()
    n_ring = torch.bincount(ri).float().clamp(min=1)
    profile = torch.zeros(K, int(ri.max()) + 1).index_add_(1, ri, avg.reshape(K, -1)) / n_ring  # (K, n_r)
    radial = profile[:, ri].reshape(K, b, b)
    var_in = ((avg - avg[:, inside].mean(-1)[:, None, None])[:, inside] ** 2).sum(-1)
    structure = ((avg - radial)[:, inside] ** 2).sum(-1) / var_in.clamp(min=1e-12)
    structure = torch.where(var_in > 0, structure, torch.zeros_like(structure))
    res = snapshot.resolution_angstrom.float()
    best = 2 * pixel
    res_term = ((worst_resolution_angstrom - res) / (worst_resolution_angstrom - best)).clamp(0, 1)
    res_term = torch.where(res >= 999.0, torch.zeros_like(res_term), res_term)
    ess = snapshot.effective_sample_size if snapshot.effective_sample_size is not None else snapshot.particle_counts
    ess = ess.float()
    count_term = (ess / min_particles).clamp(0, 1)
    centring_term = torch.exp(-((centring / (0.1 * b)) ** 2))
    contrast_term = ((contrast - 1) / (contrast_full - 1)).clamp(0, 1)
    structure_term = (structure / structure_full).clamp(0, 1)
    coherence = snapshot.coherence if snapshot.coherence is not None else torch.zeros(K)
    return ClassStatistics(
        particle_count=snapshot.particle_counts.float(),
        distribution=snapshot.class_distribution.float(),
        resolution_angstrom=res,
        effective_sample_size=ess,
        coherence=coherence.float(),
        centring_px=centring,
        contrast=contrast,
        structure=structure,
        score=res_term * count_term * centring_term * contrast_term * structure_term,
    )


def select_classes(stats: ClassStatistics, min_score: float = 0.3, resolution_factor: float = 1.5) -> torch.Tensor:
    """Automatic selection ``(K,)`` bool: score ≥ ``min_score`` and resolution ≤ ``resolution_factor`` × the
    75th percentile of the resolutions of the classes that pass the score."""
    ok = stats.score >= min_score
    if not bool(ok.any()):
        return ok
    ref = float(torch.quantile(stats.resolution_angstrom[ok], 0.75))
    return ok & (stats.resolution_angstrom <= resolution_factor * ref)


@dataclass
class ClassSelection:
    """Automatic selection with manual overrides: ``overrides`` maps a class (0-based) to True (always keep) or
    False (always reject). ``min_score`` / ``resolution_factor`` are passed to :func:`select_classes`.
    :meth:`to_dict` / :meth:`from_dict` give a JSON-able form (for the session's store)."""

    overrides: dict[int, bool] = field(default_factory=dict)
    min_score: float = 0.3
    resolution_factor: float = 1.5

    def set(self, class_index: int, keep: bool | None) -> None:
        """Keep (True) or reject (False) class ``class_index`` whatever its score; None: back to automatic."""
        if keep is None:
            self.overrides.pop(int(class_index), None)
        else:
            self.overrides[int(class_index)] = bool(keep)

    def selected(self, stats: ClassStatistics) -> torch.Tensor:
        """``(K,)`` bool: the automatic selection with the overrides applied."""
        sel = select_classes(stats, self.min_score, self.resolution_factor).clone()
        for k, keep in self.overrides.items():
            if 0 <= k < sel.shape[0]:
                sel[k] = keep
        return sel

    def to_dict(self) -> dict:
        return {"overrides": {str(k): v for k, v in self.overrides.items()}, "min_score": self.min_score,
                "resolution_factor": self.resolution_factor}

    @classmethod
    def from_dict(cls, d: dict | None) -> "ClassSelection":
        if not d:
            return cls()
        return cls({int(k): bool(v) for k, v in d.get("overrides", {}).items()}, float(d.get("min_score", 0.3)),
                   float(d.get("resolution_factor", 1.5)))


def selected_templates(snapshot: Class2DSnapshot, selected: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Templates for picking: the selected class averages ``(n, b, b)`` float32 (particles white, CTF-corrected)
    and their pixel size in Å."""
    idx = torch.nonzero(torch.as_tensor(selected, dtype=torch.bool)).flatten()
    return snapshot.averages[idx].float().clone(), float(snapshot.pixel_size_angstrom)


def selected_particles(class_index: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """``(n,)`` bool: particles (0-based ``class_index``, −1 unassigned) that sit in a selected class."""
    ci = torch.as_tensor(class_index).long()
    sel = torch.as_tensor(selected, dtype=torch.bool)
    ok = (ci >= 0) & (ci < sel.shape[0])
    out = torch.zeros(ci.shape, dtype=torch.bool)
    out[ok] = sel[ci[ok]].cpu()
    return out

