"""Which orientation of a gain reference fits the movies: the one that makes the corrected sum flattest.

A gain reference (``corrected = raw × gain``, gain ≈ 1/sensitivity per pixel) written by another program
can be rotated or flipped relative to the frames (RELION flips TIFF movies in Y; cameras and EPU differ in
their conventions). In the right orientation the gain cancels the detector's pixel-to-pixel sensitivity
pattern, so the corrected sum has the least pixel-level variance; in any other it adds a second pattern.

The 8 orientations are those of :func:`cryolive.io.movies.read_gain`: rotate counter-clockwise by
``rotation_deg`` (0, 90, 180, 270; ``np.rot90`` with k = rotation/90), then flip the rows if ``flip_y``.
Rotations by 90° and 270° are only tried for square images.

Examples::

    best = detect_gain_orientation(frames.sum(0), gain)         # (rotation_deg, flip_y, score)
    if (best.rotation_deg, best.flip_y) != (0, False): print("gain reference does not fit as given")
    table = gain_orientation_scores(frames.sum(0), gain)         # all orientations, best first
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class GainOrientation(NamedTuple):
    """``rotation_deg`` (counter-clockwise, applied first), ``flip_y`` (then flip rows), ``score``: pixel-level
    variance of the corrected sum relative to its mean² (lower is flatter)."""

    rotation_deg: int
    flip_y: bool
    score: float


def orient_gain_2d(gain: torch.Tensor, rotation_deg: int, flip_y: bool) -> torch.Tensor:
    """``gain (h, w)`` rotated counter-clockwise by ``rotation_deg`` then flipped in rows if ``flip_y``."""
    g = torch.rot90(gain, (int(rotation_deg) // 90) % 4, dims=(-2, -1))
    return torch.flip(g, dims=(-2,)) if flip_y else g


def _pixel_variance(image: torch.Tensor, trim: float = 0.001) -> float:
    """Variance of ``image`` minus its 5×5 local mean, over its mean², ignoring the top ``trim`` of outliers."""
    x = image[None, None]
    smooth = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), 5, stride=1)
    r2 = ((x - smooth)[0, 0, 2:-2, 2:-2] ** 2).flatten()  # leave out the border
    k = max(1, int(r2.numel() * (1 - trim)))
    cutoff = r2.kthvalue(k).values
    kept = r2[r2 <= cutoff]
    mean = image.mean().clamp(min=1e-12)
    return float(kept.mean() / mean ** 2)


def gain_orientation_scores(frames_sum: torch.Tensor, gain: torch.Tensor) -> list[GainOrientation]:
    """Score every orientation of ``gain`` against ``frames_sum (h, w)`` (raw counts summed over frames,
    ideally over several movies); best (lowest score) first."""
    frames_sum = torch.as_tensor(frames_sum, dtype=torch.float32)
    gain = torch.as_tensor(gain, dtype=torch.float32, device=frames_sum.device)
    if frames_sum.ndim != 2 or gain.ndim != 2:
        raise ValueError(f"expected 2D images, got {tuple(frames_sum.shape)} and {tuple(gain.shape)}")
    out = []
    for rotation in (0, 90, 180, 270):
        for flip_y in (False, True):
            g = orient_gain_2d(gain, rotation, flip_y)
            if g.shape != frames_sum.shape:
                continue
            out.append(GainOrientation(rotation, flip_y, _pixel_variance(frames_sum * g)))
    if not out:
        raise ValueError(f"gain {tuple(gain.shape)} fits the frames {tuple(frames_sum.shape)} in no orientation")
    return sorted(out, key=lambda o: o.score)


def detect_gain_orientation(frames_sum: torch.Tensor, gain: torch.Tensor) -> GainOrientation:
    """The orientation of ``gain`` that makes ``frames_sum × gain`` flattest: ``(rotation_deg, flip_y, score)``."""
    return gain_orientation_scores(frames_sum, gain)[0]


def orientation_options(rotation_deg: int, flip_y: bool) -> str:
    """An orientation in the terms of cryolive's options, and the same in RELION's/MotionCor2's terms.

    cryolive: ``--gain-rotate`` counter-clockwise degrees, then ``--gain-flip y`` (upside down). RELION's
    ``--gain_rot N`` turns the gain N × 90° clockwise as relion_display shows it (row 0 at the top), then
    ``--gain_flip 1`` flips it upside down (2: left to right), as MotionCor2's -RotGain/-FlipGain; so a
    counter-clockwise rotation by r is ``--gain_rot (360 − r) / 90 mod 4``.
    """
    r = int(rotation_deg) % 360
    relion_rot = ((360 - r) % 360) // 90
    return (f"--gain-rotate {r} --gain-flip {'y' if flip_y else 'none'} "
            f"(RELION/MotionCor2: --gain_rot {relion_rot} --gain_flip {1 if flip_y else 0})")


def check_gain_orientation(frames_sum: torch.Tensor, gain: torch.Tensor, margin: float = 0.05,
                           given: tuple[int, bool] = (0, False)) -> str | None:
    """A warning if another orientation fits ``gain`` better by more than ``margin`` (relative score) than the
    ``given`` one ``(rotation_deg, flip_y)`` (the session's options; ``gain`` as stored), naming the one that
    fits in the options' terms; None when the given orientation is the best or within the margin."""
    scores = gain_orientation_scores(frames_sum, gain)
    given = (int(given[0]) % 360, bool(given[1]))
    given_o = next((o for o in scores if (o.rotation_deg, o.flip_y) == given), None)
    best = scores[0]
    if given_o is not None and (best is given_o or best.score >= given_o.score * (1 - margin)):
        return None
    turn = " then ".join(([f"rotated by {best.rotation_deg}° counter-clockwise"] if best.rotation_deg else [])
                         + (["flipped in Y"] if best.flip_y else [])) or "as stored"
    as_given = (f"pixel variance {given_o.score:.3g} of mean²" if given_o is not None
                else "its shape does not fit the frames that way")
    return (f"the gain reference does not fit the movies as given ({orientation_options(*given)}: {as_given}); "
            f"{turn} it fits ({best.score:.3g}): use {orientation_options(best.rotation_deg, best.flip_y)}")
