"""Feed movies into a watched folder at microscope pace, as a detector writes them.

- :func:`replay` copies existing movies (a ``movies/`` folder or a dataset folder holding one) into
  ``watch_dir`` one every ``interval_s`` seconds. Each file is written progressively under its final
  name, in ``n_chunks`` chunks with ``chunk_pause_s`` pauses, so it reaches its final size only at the
  end — the case a watcher's completeness check must handle.
- :func:`simulate_live` simulates a dataset (truth into ``out_dir``) and writes each movie into
  ``watch_dir`` as soon as it is simulated, at most one every ``interval_s`` seconds.

Example::

    from cryolive.simulate import SimulationSettings, replay, simulate_live
    replay("sim", "watch", interval_s=5)
    simulate_live("sim_truth", "watch", SimulationSettings(n_movies=20), interval_s=10)
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

from .dataset import (
    _write_settings,
    simulate_movie_with_truth,
    write_detector,
    write_reference_maps,
    write_truth_tables,
)
from .movies import SimulationSettings, make_detector

MOVIE_SUFFIXES = (".tif", ".tiff", ".mrc", ".mrcs", ".eer")


def _movie_files(src: Path) -> list[Path]:
    folder = src / "movies" if (src / "movies").is_dir() else src
    if src.is_file():
        return [src]
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in MOVIE_SUFFIXES)


def write_progressively(src: Path, dst: Path, n_chunks: int = 4, chunk_pause_s: float = 0.2) -> Path:
    """Copy ``src`` to ``dst`` in ``n_chunks`` appends with ``chunk_pause_s`` pauses (flushed each time)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    n_chunks = max(1, int(n_chunks))
    chunk = max(1, -(-size // n_chunks))
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        for i in range(n_chunks):
            data = fin.read(chunk)
            if not data:
                break
            fout.write(data)
            fout.flush()
            os.fsync(fout.fileno())
            if i < n_chunks - 1 and chunk_pause_s > 0:
                time.sleep(chunk_pause_s)
    return dst


def replay(
    source: str | os.PathLike,
    watch_dir: str | os.PathLike,
    interval_s: float = 10.0,
    n_chunks: int = 4,
    chunk_pause_s: float = 0.2,
    limit: int | None = None,
    on_written: Callable[[Path], None] | None = None,
) -> list[Path]:
    """Copy the movies of ``source`` (a movie folder, a dataset folder with ``movies/``, or one file) into
    ``watch_dir``, one every ``interval_s`` seconds, each written in ``n_chunks`` chunks.

    Args:
        source: folder of movies or a dataset folder written by :func:`simulate_dataset`.
        watch_dir: the folder a live session watches (created if needed).
        interval_s: time from the start of one movie to the start of the next (s).
        n_chunks, chunk_pause_s: how the file grows (its size is final only after the last chunk).
        limit: copy at most this many movies.
        on_written: called with each destination path once it is complete.

    Returns the destination paths, in order.
    """
    src = Path(source)
    files = _movie_files(src)[: limit if limit is not None else None]
    watch = Path(watch_dir)
    watch.mkdir(parents=True, exist_ok=True)
    written = []
    for i, f in enumerate(files):
        t0 = time.monotonic()
        dst = write_progressively(f, watch / f.name, n_chunks, chunk_pause_s)
        written.append(dst)
        if on_written:
            on_written(dst)
        if i < len(files) - 1:
            time.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
    return written


def simulate_live(
    out_dir: str | os.PathLike,
    watch_dir: str | os.PathLike,
    settings: SimulationSettings | None = None,
    interval_s: float = 10.0,
    n_chunks: int = 4,
    chunk_pause_s: float = 0.2,
    on_written: Callable[[Path], None] | None = None,
) -> dict:
    """Simulate ``settings.n_movies`` movies and write each into ``watch_dir`` as it is produced.

    Ground truth (gain, maps, truth tables, noiseless micrographs, ``simulation.json``) goes to
    ``out_dir`` as in :func:`simulate_dataset` (truth tables rewritten after every movie), and the
    gain reference is also copied to ``watch_dir/gain.mrc`` first. Movies are simulated into a
    temporary folder and then written progressively into ``watch_dir``; a new movie starts at most
    every ``interval_s`` seconds (slower if simulation takes longer). Returns a summary like
    :func:`simulate_dataset`.
    """
    settings = settings or SimulationSettings()
    out = Path(out_dir)
    watch = Path(watch_dir)
    out.mkdir(parents=True, exist_ok=True)
    watch.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    _write_settings(out, settings, {"status": "running"})
    detector = make_detector(settings.image_shape_px, settings.gain_variation, settings.n_hot_pixels, settings.seed)
    write_detector(out, detector, settings)
    shutil.copyfile(out / "gain.mrc", watch / "gain.mrc")
    write_reference_maps(out, settings)
    truths, movies = [], []
    with tempfile.TemporaryDirectory(prefix="cryolive_sim_") as tmp:
        for i in range(settings.n_movies):
            t0 = time.monotonic()
            truth = simulate_movie_with_truth(out, settings, i, detector, movie_dir=Path(tmp))
            truths.append(truth)
            write_truth_tables(out, truths, settings)
            src = Path(tmp) / truth.name
            dst = write_progressively(src, watch / truth.name, n_chunks, chunk_pause_s)
            src.unlink()
            movies.append(str(dst))
            if on_written:
                on_written(dst)
            if i < settings.n_movies - 1:
                time.sleep(max(0.0, interval_s - (time.monotonic() - t0)))
    seconds = time.perf_counter() - t_start
    n_junk = sum(sum(1 for s in t.particles["structure"] if s == "junk") for t in truths)
    n_all = sum(len(t.particles["structure"]) for t in truths)
    summary = {
        "out_dir": str(out),
        "watch_dir": str(watch),
        "movies": movies,
        "n_movies": len(truths),
        "n_particles": n_all - n_junk,
        "n_junk": n_junk,
        "seconds": round(seconds, 3),
    }
    _write_settings(out, settings, summary)
    return summary


__all__ = ["replay", "simulate_live", "write_progressively"]
