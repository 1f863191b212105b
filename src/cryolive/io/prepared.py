"""Frames prepared as they are decoded: gain, static detector defects, then Fourier binning.

:class:`PreparedMovie` wraps an opened :class:`~cryolive.io.movies.Movie` so that ``read_frames`` (hence
``read_all`` and ``iter_chunks``, which calls it on its decoding thread) returns, a few frames at a time:

1. ``raw × gain`` (the gain at the movie's own, e.g. super-resolution, sampling);
2. the pixels of ``defect_mask`` (a defect file, the zeros of a Falcon gain) replaced by ``correct(frames, mask)``
   (e.g. ``preprocess.motion.correct_defects``) — before binning, so that a bad column does not ring;
3. Fourier cropping by ``bin_factor``: each frame ``(h, w)`` becomes ``(h/b, w/b)``, its spectrum cut at the new
   Nyquist frequency (no aliasing), and multiplied by ``b²`` so that an output pixel holds the **counts of the
   physical pixel** it covers (the sum of its ``b × b`` super-resolution pixels, exactly so for the mean). Dose
   weighting and CTF use e/Å² and the output pixel size ``b ×`` the movie's, so they see the same physics as
   a movie recorded at the physical pixel; the Poisson statistics are kept as well (mean = variance per pixel).

Examples::

    from cryolive.preprocess.motion import correct_defects
    movie = PreparedMovie(open_movie("superres.tif"), gain=gain, defect_mask=mask, correct=correct_defects,
                          bin_factor=2)
    movie.shape                      # (t, h/2, w/2)
    for start, frames in movie.iter_chunks(4): ...
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .movies import Movie, MovieError


class PreparedMovie(Movie):
    """A movie read through gain, defect replacement and Fourier binning (see the module docstring).

    ``movie``: the opened movie (frames ``(t, h, w)``); ``gain``: float32 ``(h, w)`` multiplicative gain or
    None; ``defect_mask``: bool ``(h, w)`` or None; ``correct``: ``(frames torch (n, h, w), mask (h, w)) ->
    frames`` (required with a mask); ``bin_factor``: integer ≥ 1, ``h`` and ``w`` must give even sizes
    ``h/b``, ``w/b`` (when ``b > 1``). ``shape`` is ``(t, h/b, w/b)``; other attributes are the wrapped movie's. Raises
    :class:`MovieError` (permanent) if the sizes do not fit.
    """

    def __init__(self, movie: Movie, gain: np.ndarray | None = None, defect_mask: np.ndarray | None = None,
                 correct: Callable | None = None, bin_factor: int = 1):
        t, h, w = movie.shape
        b = int(bin_factor)
        if b < 1:
            raise MovieError(f"{movie.path.name}: binning factor must be an integer ≥ 1, got {bin_factor}")
        if b > 1 and (h % b or w % b or (h // b) % 2 or (w // b) % 2):
            raise MovieError(f"{movie.path.name}: frames of {h}×{w} cannot be binned by {b} to an even size")
        if gain is not None:
            gain = np.asarray(gain, dtype=np.float32)
            if tuple(gain.shape) != (h, w):
                raise MovieError(f"{movie.path.name}: gain reference shape {gain.shape[0]}×{gain.shape[1]} differs "
                                 f"from the movie frames {h}×{w}")
        if defect_mask is not None:
            defect_mask = np.asarray(defect_mask, dtype=bool)
            if tuple(defect_mask.shape) != (h, w):
                raise MovieError(f"{movie.path.name}: defect map shape {defect_mask.shape[0]}×{defect_mask.shape[1]} "
                                 f"differs from the movie frames {h}×{w}")
            if not defect_mask.any():
                defect_mask = None
            elif correct is None:
                raise ValueError("PreparedMovie: a defect mask needs a correct(frames, mask) function")
        super().__init__(movie.path, movie.format, (t, h // b, w // b), np.dtype(np.float32))
        self.movie = movie
        self.gain = gain
        self.defect_mask = defect_mask
        self.correct = correct
        self.bin_factor = b

    def __getattr__(self, name):  # only called for attributes not found here: those of the wrapped movie
        if name == "movie":
            raise AttributeError(name)
        return getattr(self.movie, name)

    @property
    def threads(self) -> int | None:  # decoding threads: the wrapped movie's
        return self.movie.threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        self.movie.threads = value

    def read_frames(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Frames ``start..stop-1`` prepared, float32 ``(n, h/b, w/b)`` (counts per output pixel)."""
        import torch

        from ..fourier import fourier_crop_2d

        frames = self.movie.read_frames(start, stop)  # (n, h, w) float32, a new array
        if self.gain is not None:
            frames *= self.gain[None]
        if self.defect_mask is None and self.bin_factor == 1:
            return frames
        x = torch.from_numpy(frames)
        if self.defect_mask is not None:
            x = self.correct(x, torch.from_numpy(self.defect_mask))
        if self.bin_factor == 1:
            return np.ascontiguousarray(x.numpy(), dtype=np.float32)
        b = self.bin_factor
        n, h, w = x.shape
        out = np.empty((n, h // b, w // b), dtype=np.float32)
        for i in range(n):  # one frame at a time: the super-resolution spectrum is the large temporary
            out[i] = (fourier_crop_2d(x[i], (h // b, w // b)) * float(b * b)).numpy()
        return out

    def __repr__(self) -> str:
        return (f"PreparedMovie({self.movie!r}, gain={self.gain is not None}, "
                f"defects={0 if self.defect_mask is None else int(self.defect_mask.sum())}, bin={self.bin_factor})")


class GainCorrectedMovie(PreparedMovie):
    """The movie's frames multiplied by a gain reference as they are decoded (a :class:`PreparedMovie` with a
    gain only): ``read_frames``/``read_all``/``iter_chunks`` give ``raw × gain`` float32, the multiplication done
    in place on the decoding thread. ``gain``: float32 ``(h, w)`` of the movie's frame shape, not modified."""

    def __init__(self, movie: Movie, gain: np.ndarray):
        super().__init__(movie, gain=gain)
