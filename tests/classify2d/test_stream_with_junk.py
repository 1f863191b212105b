"""A stream of two real structures (6ny1, 3j5p) at random 3D poses plus 20 % junk aggregates, from the particle
simulator (radiation damage, CTF per particle, ice, Poisson counts at 40 e/Å²), box 64 at 3 Å/px, fed in four
batches: real particles land in classes of their own structure, classes do not collapse, the class statistics
and the automatic selection behave. The full-size figure (20,000 particles, box 128) is bench/class2d.py's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cryolive.classify2d import (
    ClassSelection,
    StreamingClassifier2D,
    class_statistics,
    select_classes,
    selected_particles,
    selected_templates,
)
from cryolive.config import Class2DSettings
from cryolive.simulate.particles import simulate_particle_stack

from ._simulate import OPTICS

N, BOX, PIXEL, K = 1600, 64, 3.0, 24


def _purity(class_index: np.ndarray, labels: np.ndarray):
    """(real particles in classes whose majority is their own structure, junk in junk-majority classes)."""
    real_ok = junk_ok = 0
    for k in np.unique(class_index):
        lab = labels[class_index == k]
        vals, cnt = np.unique(lab, return_counts=True)
        maj = vals[np.argmax(cnt)]
        if maj >= 0:
            real_ok += int((lab == maj).sum())
        else:
            junk_ok += int((lab < 0).sum())
    return real_ok / int((labels >= 0).sum()), junk_ok / int((labels < 0).sum())


@pytest.fixture(scope="module")
def streamed():
    torch.set_num_threads(1)
    images, truth = simulate_particle_stack(["6ny1", "3j5p"], N, BOX, PIXEL, junk_fraction=0.2, max_shift_px=2, seed=3)
    ctf = (truth["defocus_u"], truth["defocus_v"], truth["defocus_angle_deg"])
    clf = StreamingClassifier2D(K, BOX, PIXEL, OPTICS, Class2DSettings(n_classes=K, min_particles_to_start=N // 4))
    for i in range(0, N, N // 4):
        clf.update(images[i : i + N // 4], *(c[i : i + N // 4] for c in ctf))
    result = clf.assign(images, *ctf)
    return clf, result, truth


def test_real_particles_sit_in_classes_of_their_own_structure(streamed):
    clf, result, truth = streamed
    ci = result.class_index.numpy()
    labels = truth["structure_index"].numpy()
    real, junk = _purity(ci, labels)
    counts = np.bincount(ci, minlength=K)
    print(f"real in own-majority classes {real:.3f}, junk in junk classes {junk:.3f}, class sizes {sorted(counts)[::-1]}")
    # measured 0.949 and 0.656 (seed 3); the 95 % line is for the full-size stream (bench/class2d.py) —
    # at 1,600 particles in 24 classes it is at the edge, so this asserts a point below it
    assert real >= 0.94
    assert junk >= 0.5  # most junk sits in junk classes (it is 20 % of the stream)
    # no collapse: most classes hold particles and no class takes a large share
    assert (counts >= 10).sum() >= 0.75 * K
    assert counts.max() <= 0.15 * N


def test_class_statistics_and_selection(streamed):
    clf, result, truth = streamed
    snap = clf.snapshot()
    stats = class_statistics(snap)
    populated = snap.particle_counts > 5
    assert ((stats.score >= 0) & (stats.score <= 1)).all()
    # the effective sample size is positive where there are particles, and averages are centred (recentring)
    assert (stats.effective_sample_size[populated] > 1).all()
    assert float(stats.centring_px[populated].median()) < 1.0
    # coherence: in [−1, 1] (0 for a class just re-seeded), high for most populated classes
    assert ((stats.coherence >= -1) & (stats.coherence <= 1)).all()
    assert float(stats.coherence[populated].median()) > 0.5
    auto = select_classes(stats)
    assert 0 < int(auto.sum()) < K
    # selected classes hold real particles mostly, and most real particles are kept
    keep = selected_particles(result.class_index, auto).numpy()
    labels = truth["structure_index"].numpy()
    assert (labels[keep] >= 0).mean() >= 0.8
    assert keep[labels >= 0].mean() >= 0.6
    # manual overrides win, and round-trip through a JSON-able dict
    sel = ClassSelection()
    first_on = int(torch.nonzero(auto)[0])
    first_off = int(torch.nonzero(~auto)[0])
    sel.set(first_on, False)
    sel.set(first_off, True)
    manual = ClassSelection.from_dict(sel.to_dict()).selected(stats)
    assert not manual[first_on] and manual[first_off]
    assert int(manual.sum()) == int(auto.sum())
    templates, pixel = selected_templates(snap, manual)
    assert templates.shape == (int(manual.sum()), BOX, BOX) and pixel == PIXEL
    assert torch.equal(templates[0], snap.averages[torch.nonzero(manual)[0, 0]])
