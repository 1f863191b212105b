"""Write a simulated dataset with its ground truth (docs/CONVENTIONS.md, "Ground truth written by
``cryolive simulate OUT``").

Layout::

    OUT/movies/<name>.tif|.mrc     raw counts (TIFF: LZW, one page per frame, uint8; MRC: int16)
    OUT/gain.mrc                   multiplicative gain reference (corrected = raw × gain)
    OUT/truth/exposures.star       per movie: defocus at the centre, tilt, ice, optics, dose per frame
    OUT/truth/motion/<name>.star   global_shift (specimen displacement, px) and local_shift tables
    OUT/truth/particles.star       every particle and junk object with position, angles, defocus
    OUT/truth/maps/<structure>.mrc potential maps (V, solvent displaced) at the simulation pixel size
    OUT/truth/micrographs/<name>.mrc  noiseless micrograph (scale of the aligned sum of gain-corrected counts)
    OUT/truth/hot_pixels.star      the detector's hot pixels
    OUT/simulation.json            the settings used and a summary

Orientation: every array (frames, gain, micrographs) is stored as mrcfile/tifffile return it (row 0 first);
coordinates refer to those arrays. RELION flips TIFF frames in Y on reading, so with RELION use the gain
flipped in Y for the TIFF movies.

Example::

    from cryolive.simulate import SimulationSettings, simulate_dataset
    summary = simulate_dataset("sim", SimulationSettings(n_movies=4, image_shape_px=(512, 512), seed=3))
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..fourier import good_fft_size
from ..io.atomic import atomic_path
from ..io.mrc import write_mrc
from ..io.star import write_star
from . import physics
from .movies import Detector, MovieSimulator, MovieTruth, SimulationSettings, make_detector
from .structure import atoms_to_volume, load_atoms, particle_diameter_angstrom


MICROGRAPH_COLUMNS = [
    "rlnMicrographMovieName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "cryoliveStageTiltDeg",
    "cryoliveTiltAxisDeg", "cryoliveIceThicknessAngstrom", "rlnMicrographOriginalPixelSize", "rlnVoltage",
    "rlnSphericalAberration", "rlnAmplitudeContrast", "cryoliveDosePerFrame", "cryoliveNumberOfFrames",
    "cryoliveNumberOfParticles",
]
PARTICLE_COLUMNS = [
    "rlnMicrographMovieName", "rlnCoordinateX", "rlnCoordinateY", "rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi",
    "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "cryoliveStructure", "cryoliveDiameterAngstrom",
]


def movie_dtype(settings: SimulationSettings) -> np.dtype:
    """Counts dtype: uint8 for TIFF (uint16 if the dose per pixel is high), int16 for MRC."""
    if settings.movie_format == "mrc":
        return np.dtype(np.int16)
    n0 = settings.dose_per_frame * settings.pixel_size_angstrom**2
    return np.dtype(np.uint8) if n0 * 1.6 + 10 * math.sqrt(n0) < 150 else np.dtype(np.uint16)


def write_movie(sim: MovieSimulator, path: str | os.PathLike, atomic: bool = True) -> Path:
    """Simulate and write one movie frame by frame (memory: a few frames). Returns the path.

    With ``atomic=True`` the file appears under its name only when complete.
    """
    path = Path(path)
    dtype = movie_dtype(sim.s)
    info = np.iinfo(dtype)
    h, w = sim.s.image_shape_px
    t = sim.s.n_frames

    def frames():
        for f in sim.frames():
            yield f.clamp(info.min, info.max).numpy().astype(dtype)

    def _write(target: Path):
        if sim.s.movie_format == "tiff":
            import tifffile

            tifffile.imwrite(target, frames(), shape=(t, h, w), dtype=dtype, compression="lzw", photometric="minisblack")
        else:
            import mrcfile

            with mrcfile.new_mmap(target, shape=(t, h, w), mrc_mode=1, overwrite=True) as m:
                for i, f in enumerate(frames()):
                    m.data[i] = f
                m.voxel_size = sim.s.pixel_size_angstrom

    path.parent.mkdir(parents=True, exist_ok=True)
    if atomic:
        with atomic_path(path) as tmp:
            _write(tmp)
    else:
        _write(path)
    return path


def _stem(name: str) -> str:
    return name.rsplit(".", 1)[0]


def micrograph_row(truth: MovieTruth, settings: SimulationSettings) -> dict:
    """The ``truth/exposures.star`` row of one movie."""
    return {
        "rlnMicrographMovieName": truth.name,
        "rlnDefocusU": truth.defocus_u,
        "rlnDefocusV": truth.defocus_v,
        "rlnDefocusAngle": truth.defocus_angle_deg,
        "cryoliveStageTiltDeg": truth.stage_tilt_deg,
        "cryoliveTiltAxisDeg": truth.tilt_axis_deg,
        "cryoliveIceThicknessAngstrom": truth.ice_thickness_angstrom,
        "rlnMicrographOriginalPixelSize": settings.pixel_size_angstrom,
        "rlnVoltage": settings.voltage_kv,
        "rlnSphericalAberration": settings.cs_mm,
        "rlnAmplitudeContrast": settings.amplitude_contrast,
        "cryoliveDosePerFrame": settings.dose_per_frame,
        "cryoliveNumberOfFrames": settings.n_frames,
        "cryoliveNumberOfParticles": int(sum(1 for s in truth.particles["structure"] if s != "junk")),
    }


def particle_rows(truth: MovieTruth) -> pd.DataFrame:
    """The ``truth/particles.star`` rows of one movie (coordinates: column/row px of the frame-1 micrograph)."""
    p = truth.particles
    n = len(p["structure"])
    return pd.DataFrame(
        {
            "rlnMicrographMovieName": [truth.name] * n,
            "rlnCoordinateX": p["coords_yx_px"][:, 1].numpy().astype(float),
            "rlnCoordinateY": p["coords_yx_px"][:, 0].numpy().astype(float),
            "rlnAngleRot": p["euler_deg"][:, 0].numpy().astype(float),
            "rlnAngleTilt": p["euler_deg"][:, 1].numpy().astype(float),
            "rlnAnglePsi": p["euler_deg"][:, 2].numpy().astype(float),
            "rlnDefocusU": p["defocus_u"].numpy().astype(float),
            "rlnDefocusV": p["defocus_v"].numpy().astype(float),
            "rlnDefocusAngle": p["defocus_angle_deg"].numpy().astype(float),
            "cryoliveStructure": list(p["structure"]),
            "cryoliveDiameterAngstrom": p["diameter_angstrom"].numpy().astype(float),
        }
    )


def write_motion_truth(truth: MovieTruth, path: str | os.PathLike) -> Path:
    """``truth/motion/<name>.star``: ``global_shift`` (1-based frames, specimen displacement in px)
    and ``local_shift`` (control points; local displacement to add to the global one)."""
    s = truth.shifts_yx_px
    t = s.shape[0]
    glob = pd.DataFrame(
        {
            "rlnMicrographFrameNumber": np.arange(1, t + 1),
            "rlnMicrographShiftX": s[:, 1].numpy().astype(float),
            "rlnMicrographShiftY": s[:, 0].numpy().astype(float),
        }
    )
    grid = truth.local_grid_yx_px.reshape(-1, 2)
    loc = truth.local_shifts_yx_px.reshape(t, -1, 2)
    n = grid.shape[0]
    local = pd.DataFrame(
        {
            "rlnMicrographFrameNumber": np.repeat(np.arange(1, t + 1), n),
            "rlnCoordinateX": np.tile(grid[:, 1].numpy(), t).astype(float),
            "rlnCoordinateY": np.tile(grid[:, 0].numpy(), t).astype(float),
            "rlnMicrographShiftX": loc[..., 1].reshape(-1).numpy().astype(float),
            "rlnMicrographShiftY": loc[..., 0].reshape(-1).numpy().astype(float),
        }
    )
    return write_star(path, {"global_shift": glob, "local_shift": local})


def write_reference_maps(out_dir: Path, settings: SimulationSettings) -> list[Path]:
    """``truth/maps/<structure>.mrc``: potential maps (V) with the B-factor and ice displacement of the simulation."""
    paths = []
    v_ice = physics.ice_mean_potential_volt() if settings.ice_thickness_range_angstrom[1] > 0 else 0.0
    for name in settings.structures:
        atoms = load_atoms(name)
        box = good_fft_size(int(math.ceil(particle_diameter_angstrom(atoms) * 1.25 / settings.pixel_size_angstrom)))
        os_ = 2 if (2 * box) ** 3 * len(atoms.elements) <= 60_000_000 else 1
        vol = atoms_to_volume(atoms, box, settings.pixel_size_angstrom, settings.bfactor_angstrom2, v_ice, os_)
        paths.append(write_mrc(out_dir / "truth" / "maps" / f"{atoms.name}.mrc", vol, settings.pixel_size_angstrom))
    return paths


def write_detector(out_dir: Path, detector: Detector, settings: SimulationSettings) -> None:
    write_mrc(out_dir / "gain.mrc", detector.gain, settings.pixel_size_angstrom)
    hp = detector.hot_pixels_yx
    write_star(out_dir / "truth" / "hot_pixels.star", {"hot_pixels": pd.DataFrame(
        {"rlnCoordinateX": hp[:, 1].numpy().astype(float), "rlnCoordinateY": hp[:, 0].numpy().astype(float)})})


def simulate_movie_with_truth(out_dir: Path, settings: SimulationSettings, index: int, detector: Detector,
                              movie_dir: Path | None = None, atomic: bool = True) -> MovieTruth:
    """Simulate movie ``index``: write it (to ``movie_dir`` or ``OUT/movies``), its motion truth and noiseless
    micrograph; return its truth."""
    sim = MovieSimulator(settings, index, detector)
    truth = sim.truth()
    write_mrc(out_dir / "truth" / "micrographs" / f"{_stem(sim.name)}.mrc", truth.reference, settings.pixel_size_angstrom)
    write_motion_truth(truth, out_dir / "truth" / "motion" / f"{_stem(sim.name)}.star")
    write_movie(sim, (movie_dir or out_dir / "movies") / sim.name, atomic=atomic)
    truth.reference = None
    return truth


def write_truth_tables(out_dir: Path, truths: list[MovieTruth], settings: SimulationSettings) -> None:
    """(Re)write ``truth/exposures.star`` and ``truth/particles.star`` for the movies so far."""
    mics = pd.DataFrame([micrograph_row(t, settings) for t in truths], columns=MICROGRAPH_COLUMNS)
    write_star(out_dir / "truth" / "exposures.star", {"micrographs": mics})
    parts = [particle_rows(t) for t in truths]
    parts_df = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=PARTICLE_COLUMNS)
    write_star(out_dir / "truth" / "particles.star", {"particles": parts_df})


def _write_settings(out_dir: Path, settings: SimulationSettings, summary: dict) -> None:
    with atomic_path(out_dir / "simulation.json") as tmp:
        tmp.write_text(json.dumps({"settings": settings.model_dump(mode="json"), "summary": summary}, indent=2))


def simulate_dataset(out_dir: str | os.PathLike, settings: SimulationSettings | None = None) -> dict:
    """Simulate ``settings.n_movies`` movies with their ground truth into ``out_dir`` (layout above).

    Returns a summary dict: ``out_dir``, ``movies`` (paths), ``n_movies``, ``n_particles``, ``n_junk``,
    ``seconds``, ``seconds_per_movie``.
    """
    settings = settings or SimulationSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _write_settings(out, settings, {"status": "running"})
    detector = make_detector(settings.image_shape_px, settings.gain_variation, settings.n_hot_pixels, settings.seed)
    write_detector(out, detector, settings)
    write_reference_maps(out, settings)
    truths = []
    for i in range(settings.n_movies):
        truths.append(simulate_movie_with_truth(out, settings, i, detector))
    write_truth_tables(out, truths, settings)
    seconds = time.perf_counter() - t0
    n_junk = sum(sum(1 for s in t.particles["structure"] if s == "junk") for t in truths)
    n_all = sum(len(t.particles["structure"]) for t in truths)
    summary = {
        "out_dir": str(out),
        "movies": [str(out / "movies" / t.name) for t in truths],
        "n_movies": len(truths),
        "n_particles": n_all - n_junk,
        "n_junk": n_junk,
        "seconds": round(seconds, 3),
        "seconds_per_movie": round(seconds / max(1, len(truths)), 3),
    }
    _write_settings(out, settings, summary)
    return summary


__all__ = ["simulate_dataset", "write_movie", "movie_dtype", "simulate_movie_with_truth", "write_truth_tables"]
