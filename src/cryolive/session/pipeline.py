"""The per-exposure chain, run in worker processes: movie → motion → CTF → picking → extraction.

:func:`process_exposure` reads one movie (and the gain), corrects hot pixels, aligns the frames, estimates
the CTF on the non-dose-weighted sum (with the defocus landscape / stage tilt when the micrograph spans at least
two CTF tiles each way, and a relative ice thickness), picks particles, extracts them, and writes per CONTRACT.md::

    OUT/motion/<movie>.star            data_general + data_global_shift (RELION layout), data_local_shift and
                                       data_local_motion_model with local (patch) motion
    OUT/micrographs/<movie>.mrc        dose-weighted sum (<movie>_noDW.mrc with settings.motion.write_no_dw)
    OUT/particles/<movie>.mrcs         extracted particles (contrast inverted: particles white)
    OUT/particles/<movie>.star         their rows for OUT/particles.star
    OUT/ctf/<movie>.star               CTF fit and its 1D profile for the dashboard (data_ctf, data_ctf_profile)
    OUT/ctf/<movie>_diag.mrc, .png     2D half-and-half diagnostic (left: spectrum, right: fitted CTF²)

Each file is written atomically before the worker returns, and only the session process records the
returned :class:`ExposureOutcome` in the store, so a crash leaves either nothing or a complete result.
Workers never touch the database.

The algorithms are imported lazily from ``cryolive.preprocess``; :class:`StageFunctions` lets a caller
(tests) pass other functions with the same signatures.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import Settings, settings_hash
from ..io.movies import EerOptions, MovieError, read_gain, validate_movie

STAGES = ("motion", "ctf", "picking", "extraction")


@dataclass(frozen=True)
class StageFunctions:
    """The algorithms the chain calls; ``None`` means cryolive's own (imported lazily in the worker).

    Signatures are those of ``cryolive.preprocess`` (see docs/CONVENTIONS.md). Functions given here must be
    picklable (module-level) to run in worker processes.
    """

    align_movie: Callable | None = None
    estimate_ctf: Callable | None = None
    pick_blobs: Callable | None = None
    extract_particles: Callable | None = None
    default_box_sizes: Callable | None = None
    per_particle_defocus: Callable | None = None
    estimate_ctf_patches: Callable | None = None
    estimate_ice_thickness: Callable | None = None
    assess_specimen: Callable | None = None
    detect_hot_pixels: Callable | None = None
    correct_defects: Callable | None = None

    def resolved(self) -> StageFunctions:
        """Fill every ``None`` with cryolive's implementation."""
        fns = {}
        for f in dataclasses.fields(self):
            fn = getattr(self, f.name)
            if fn is None:
                fn = _default_function(f.name)
            fns[f.name] = fn
        return StageFunctions(**fns)


def _default_function(name: str) -> Callable:
    if name in ("align_movie", "detect_hot_pixels", "correct_defects"):
        from ..preprocess import motion

        return getattr(motion, name)
    if name == "estimate_ctf":
        from ..preprocess.ctf_fit import estimate_ctf

        return estimate_ctf
    if name in ("estimate_ctf_patches", "estimate_ice_thickness", "assess_specimen"):
        from ..preprocess import ctf_landscape

        return getattr(ctf_landscape, name)
    if name == "pick_blobs":
        from ..preprocess.picking import pick_blobs

        return pick_blobs
    from ..preprocess import extraction

    return getattr(extraction, name)


@dataclass
class StageOutcome:
    """One stage's result: metrics (incl. ``seconds``) and output paths relative to OUT."""

    stage: str
    settings_hash: str
    metrics: dict
    outputs: dict


@dataclass
class ExposureOutcome:
    """What a worker returns for one movie. ``ok=False``: ``error`` says why; ``transient``: retry later."""

    path: str
    name: str
    ok: bool
    error: str | None = None
    transient: bool = False
    stages: list[StageOutcome] = field(default_factory=list)
    n_particles: int = 0
    frame_shape: tuple[int, int] | None = None
    seconds: float = 0.0


def stage_hashes(settings: Settings) -> dict[str, str]:
    """The settings hash of each stage; each includes the hash of the stage before it."""
    h_motion = settings_hash(settings.optics, settings.dose_per_frame, settings.gain_path, settings.gain_flip_y,
                             settings.motion, settings.eer)
    prep = settings.frame_preparation()  # gain rotation/flip, defect file, binning: only when set (old hashes kept)
    if prep:
        h_motion = settings_hash(h_motion, prep)
    h_ctf = settings_hash(h_motion, settings.ctf)
    h_pick = settings_hash(h_ctf, settings.picking)
    h_extract = settings_hash(h_pick, settings.extraction)
    return {"motion": h_motion, "ctf": h_ctf, "picking": h_pick, "extraction": h_extract}


def eer_options(settings: Settings) -> EerOptions:
    """How this session turns EER raw frames into fractions (``settings.eer``; see ``config.EerSettings``).

    Events are rendered at ``upsampling`` × and Fourier-binned back to the physical pixels, so micrographs keep
    the session's pixel size; the fraction size is ``fraction_frames`` raw frames, or decided from the session's
    dose per frame (= per fraction) and ``total_dose``, or about 40 fractions.
    """
    e = settings.eer
    return EerOptions(fraction_frames=e.fraction_frames,
                      dose_per_fraction=settings.dose_per_frame if e.total_dose else None,
                      total_dose=e.total_dose, upsampling=int(e.upsampling), bin_factor=int(e.upsampling))


def _dose_per_frame(movie, settings: Settings) -> float:
    """e/Å² per frame of this movie: for EER with a total dose, what its fractions really hold (a whole number of
    raw frames each), else the session's dose per frame."""
    if getattr(movie, "format", None) == "eer" and settings.eer.total_dose:
        return float(settings.eer.total_dose) * movie.fraction_frames / movie.n_raw_frames
    return float(settings.dose_per_frame)


def movie_stem(path: str | os.PathLike) -> str:
    """``/data/mic_001.tif`` → ``mic_001`` (the name of all its outputs)."""
    name = Path(path).name
    for suffix in (".tiff", ".tif", ".mrcs", ".mrc", ".eer"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def output_paths(out_dir: str | os.PathLike, stem: str) -> dict[str, Path]:
    """Where one movie's outputs go (absolute paths)."""
    out = Path(out_dir)
    return {
        "motion_star": out / "motion" / f"{stem}.star",
        "micrograph": out / "micrographs" / f"{stem}.mrc",
        "micrograph_nodw": out / "micrographs" / f"{stem}_noDW.mrc",
        "particles_mrcs": out / "particles" / f"{stem}.mrcs",
        "particles_star": out / "particles" / f"{stem}.star",
        "ctf_star": out / "ctf" / f"{stem}.star",
        "ctf_diag_mrc": out / "ctf" / f"{stem}_diag.mrc",
        "ctf_diag_png": out / "ctf" / f"{stem}_diag.png",
    }


def _read_cached(cache: dict, path: str, params: tuple, read):
    """``read()`` of the file ``path``, kept in ``cache`` for the next call with the same ``params`` (once per
    worker process; read again if the file changes: size or mtime). Without the file, ``read()`` reports why."""
    try:
        st = os.stat(path)
    except OSError:
        return read()  # raises MovieError with the reason
    key = (str(path), *params, st.st_size, st.st_mtime_ns)
    if cache.get("key") != key:
        cache.clear()
        cache["value"] = read()
        cache["key"] = key
    return cache["value"]


def _cached_gain(path: str, flip_y: bool, movie_shape: tuple[int, int], rotate: int = 0) -> np.ndarray:
    """The gain reference, read once per worker process (re-read if the file changes). Do not modify it.
    ``rotate`` (counter-clockwise degrees) then ``flip_y``: ``Settings.gain_orientation``."""
    return _read_cached(_GAIN_CACHE, path, (bool(flip_y), int(rotate), tuple(movie_shape)),
                        lambda: read_gain(path, flip_y=flip_y, rotate=rotate, movie_shape=movie_shape))


_GAIN_CACHE: dict = {}


def _cached_defects(path: str, frame_shape: tuple[int, int]) -> np.ndarray:
    """The defect file as a bool mask ``(h, w)`` of the movie frames (``io.defects.read_defect_map``), read once
    per worker process (again if the file changes). Do not modify it. Raises ``MovieError`` with the reason."""
    from ..io.defects import read_defect_map

    return _read_cached(_DEFECT_CACHE, path, (tuple(frame_shape),), lambda: read_defect_map(path, frame_shape))


_DEFECT_CACHE: dict = {}
#: this worker's last defect mask per frame shape: a detector's hot pixels mostly persist from movie to movie, so
#: the next movie has them corrected as its frames are decoded (align_movie's defects_hint; the result does not
#: depend on it, only the work left once the movie's own mask is known)
_DEFECT_HINT: dict = {}


def prepare_movie(movie, gain: np.ndarray | None, defect_mask: np.ndarray | None, settings: Settings,
                  fns: StageFunctions):
    """The movie as the alignment reads it, and the gain left for :func:`read_and_align_movie` → ``(movie, gain)``.

    Without a defect file and without binning: the movie and the gain unchanged (the gain is applied per chunk
    and its zeros are corrected with the hot pixels). Otherwise an :class:`io.prepared.PreparedMovie` that, per
    chunk on the decoding thread, multiplies by the gain, replaces the defect file's pixels and the gain's zeros
    (``fns.correct_defects``), then Fourier-bins by ``settings.movie_bin`` (the gain and the defects are at the
    movie's own, e.g. super-resolution, sampling); the gain returned is then None. Hot pixels are found later on
    the sum of the prepared frames.
    """
    b = int(settings.movie_bin)
    if defect_mask is None and b == 1:
        return movie, gain
    from ..io.prepared import PreparedMovie

    static = None if defect_mask is None else np.asarray(defect_mask, dtype=bool)
    if gain is not None and not gain.all():
        static = (gain == 0) if static is None else (static | (gain == 0))
    return PreparedMovie(movie, gain=gain, defect_mask=static, correct=fns.correct_defects, bin_factor=b), None


def _to_float(x) -> float:
    if x is None:
        return float("nan")
    if hasattr(x, "item"):
        return float(x.item())
    return float(x)


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _local_motion_blocks(local, general: dict, scale: float = 1.0) -> dict:
    """The motion STAR's local-motion tables (see :class:`cryolive.preprocess.motion_patch.LocalMotionModel`).

    ``local_shift`` (RELION's columns): per frame and patch centre, the model's residual displacement to add to
    the global shift, px of the movie (``scale``: the binning factor; RELION's convention). ``local_motion_model``:
    cryolive's model (in micrograph px), one row per time power and control point
    (``L_t = Σ_j z_t^j Σ_ab CatmullRom_ab(y, x) C_jab``, ``z_t = (frame − 1)/(T − 1)``, control points corner to
    corner). ``general`` gains the model's shape; rlnMotionModelVersion stays 0 (not RELION's polynomial).
    """
    import pandas as pd

    centres = _np(local.patch_centres_yx_px).astype(np.float64) * scale  # (p, 2)
    res = _np(local.shifts_at(local.patch_centres_yx_px)).astype(np.float64) * scale  # (t, p, 2)
    t, p = res.shape[:2]
    shift_df = pd.DataFrame({
        "rlnMicrographFrameNumber": np.repeat(np.arange(1, t + 1), p),
        "rlnCoordinateX": np.tile(centres[:, 1], t), "rlnCoordinateY": np.tile(centres[:, 0], t),
        "rlnMicrographShiftX": res[..., 1].reshape(-1), "rlnMicrographShiftY": res[..., 0].reshape(-1),
    })
    c = _np(local.coefficients).astype(np.float64)  # (degree, ky, kx, 2)
    deg, ky, kx = c.shape[:3]
    jj, yy, xx = np.meshgrid(np.arange(1, deg + 1), np.arange(ky), np.arange(kx), indexing="ij")
    model_df = pd.DataFrame({
        "cryoliveTimePower": jj.reshape(-1), "cryoliveControlPointRow": yy.reshape(-1),
        "cryoliveControlPointColumn": xx.reshape(-1),
        "cryoliveCoeffX": c[..., 1].reshape(-1), "cryoliveCoeffY": c[..., 0].reshape(-1),
    })
    general.update({"cryoliveLocalControlRows": int(ky), "cryoliveLocalControlColumns": int(kx),
                    "cryoliveLocalTimeDegree": int(deg)})
    return {"local_shift": shift_df, "local_motion_model": model_df}


def process_exposure(path: str | os.PathLike, settings: Settings, out_dir: str | os.PathLike,
                     stages: StageFunctions | None = None,
                     expected_frame_shape: tuple[int, int] | None = None) -> ExposureOutcome:
    """Run the per-exposure chain on one movie and write its outputs (see the module docstring).

    Never raises for a problem with the movie: the outcome says ``ok=False`` with the reason, and whether it
    is ``transient`` (the file may still be growing) or permanent.
    """
    t_start = time.perf_counter()
    path = Path(path)
    stem = movie_stem(path)
    outcome = ExposureOutcome(path=str(path), name=stem, ok=False)
    stage = "read"
    try:
        outcome.stages = _run_chain(path, stem, settings, Path(out_dir), stages or StageFunctions(),
                                    expected_frame_shape, outcome)
        outcome.ok = True
    except MovieError as exc:
        outcome.error = str(exc)
        outcome.transient = exc.transient
    except Exception as exc:  # an algorithm failed on this movie: permanent for these settings
        stage = getattr(exc, "_cryolive_stage", stage)
        outcome.error = f"{stage}: {type(exc).__name__}: {exc}"
        outcome.transient = False
        outcome.stages = []
        tb = traceback.format_exc(limit=4)
        outcome.error += "\n" + tb if os.environ.get("CRYOLIVE_DEBUG") else ""
    outcome.seconds = time.perf_counter() - t_start
    return outcome


def read_and_align_movie(movie, gain: np.ndarray | None, settings: Settings, dose_per_frame: float,
                         fns: StageFunctions, device, overlap: bool = True):
    """Decode an opened movie, apply the gain, replace defect pixels and align it → ``(motion, defect_mask,
    decode_seconds)`` (``defect_mask``: ``(h, w)`` bool, the pixels replaced).

    Defects: the hot pixels that ``fns.detect_hot_pixels`` finds on the gain-corrected sum of all frames, plus
    the pixels where the gain is 0 (defects in a Falcon ``.gain``); they are replaced as
    ``preprocess.motion.correct_defects`` does. ``overlap=True`` (cryolive's own ``align_movie`` and
    ``correct_defects`` only): the movie is decoded and gain-corrected a few frames at a time on background
    threads while the alignment transforms the frames already read, and the defects are corrected once the sum
    is known (``align_movie(defects=...)``, the same result; the previous movie's mask, corrected as the frames
    arrive, leaves only the difference to update); ``decode_seconds`` is then 0 (it is part of the alignment's
    time). ``overlap=False``: the whole movie is decoded first, and ``fns.correct_defects`` and
    ``fns.align_movie`` are called on the stack ``(t, h, w)`` on ``device``.
    """
    import torch

    from ..io.prepared import GainCorrectedMovie
    from ..preprocess.picking import _dilate  # (h, w) bool mask grown by a radius, px

    optics = settings.optics
    gain_defects = None
    if gain is not None and not gain.all():
        gain_defects = torch.from_numpy(gain == 0)  # (h, w) bool

    def defects(frames_sum):
        mask = fns.detect_hot_pixels(frames_sum)  # (h, w) bool
        if settings.movie_bin > 1:  # a super-resolution hot pixel rings after Fourier binning: take its neighbours
            mask = _dilate(mask, 1)  # 3×3
        return mask if gain_defects is None else mask | gain_defects.to(mask.device)

    if overlap:
        source = movie if gain is None else GainCorrectedMovie(movie, gain)
        shape = tuple(source.shape[1:])
        motion = fns.align_movie(source, settings.micrograph_pixel_size_angstrom, dose_per_frame, optics.voltage_kv,
                                 settings.motion, device=device, defects=defects,
                                 defects_hint=_DEFECT_HINT.get(shape))
        _DEFECT_HINT.clear()
        _DEFECT_HINT[shape] = motion.defect_mask
        return motion, motion.defect_mask, 0.0
    t0 = time.perf_counter()
    frames = movie.read_all()  # (t, h, w) float32
    if gain is not None:
        frames *= gain[None]
    t_decode = time.perf_counter() - t0
    frames_t = torch.from_numpy(frames).to(device)  # (t, h, w)
    del frames
    hot = defects(frames_t.sum(0))  # (h, w) bool
    if bool(hot.any()):
        frames_t = fns.correct_defects(frames_t, hot)
    motion = fns.align_movie(frames_t, settings.micrograph_pixel_size_angstrom, dose_per_frame, optics.voltage_kv,
                             settings.motion)
    return motion, hot, t_decode


def _tag(stage: str):
    """Context manager tagging any exception raised inside with the stage it came from."""

    class _Tag:
        def __enter__(self):
            return self

        def __exit__(self, exc_type, exc, tb):
            if exc is not None and not isinstance(exc, MovieError):
                try:
                    exc._cryolive_stage = stage
                except Exception:
                    pass
            return False

    return _Tag()


def _run_chain(path: Path, stem: str, settings: Settings, out: Path, stages: StageFunctions,
               expected_frame_shape, outcome: ExposureOutcome) -> list[StageOutcome]:
    import torch

    from ..config import resolve_device
    from ..io.mrc import write_mrc
    from ..io.star import write_star

    fns = stages.resolved()
    hashes = stage_hashes(settings)
    paths = output_paths(out, stem)
    device = resolve_device(settings.device)
    optics = settings.optics
    px = settings.micrograph_pixel_size_angstrom  # the movie's pixel size × settings.movie_bin
    results: list[StageOutcome] = []

    # ---------------------------------------------------------------- read, gain, hot pixels
    t0 = time.perf_counter()
    movie = validate_movie(path, expected_frame_shape=expected_frame_shape, decode=False,
                           eer=eer_options(settings))
    outcome.frame_shape = tuple(movie.shape[1:])
    dose_per_frame = _dose_per_frame(movie, settings)
    gain = None
    if settings.gain_path:
        rotate, flip_y = settings.gain_orientation
        gain = _cached_gain(settings.gain_path, flip_y, tuple(movie.shape[1:]), rotate)
    file_defects = _cached_defects(settings.defect_path, tuple(movie.shape[1:])) if settings.defect_path else None
    source, source_gain = prepare_movie(movie, gain, file_defects, settings, fns)  # binned: (t, h/b, w/b)
    t_read = time.perf_counter() - t0

    # ---------------------------------------------------------------- decoding, hot pixels, motion
    with _tag("motion"):
        t0 = time.perf_counter()
        # cryolive's own alignment decodes the movie while it transforms the frames already read; injected
        # functions get the decoded stack
        overlap = stages.align_movie is None and stages.correct_defects is None
        motion, defect_mask, t_decode = read_and_align_movie(source, source_gain, settings, dose_per_frame, fns,
                                                             device, overlap=overlap)
        n_hot = int(defect_mask.sum())
        t_read += t_decode
        shifts = _np(motion.shifts_yx_px).astype(np.float64)  # (t, 2) (y, x)
        micrograph = motion.micrograph
        micrograph_nodw = motion.micrograph_nodw if motion.micrograph_nodw is not None else motion.micrograph
        t, h, w = movie.shape  # the movie's own frames (before binning)
        b = int(settings.movie_bin)
        import pandas as pd

        # as RELION writes it: image size, pixel size and shifts (global and local) in the movie's own pixels;
        # the micrographs are binned by rlnMicrographBinning
        general = {
            "rlnImageSizeX": int(w), "rlnImageSizeY": int(h), "rlnImageSizeZ": int(t),
            "rlnMicrographMovieName": str(path), "rlnMicrographGainName": settings.gain_path or "",
            "rlnMicrographBinning": float(b), "rlnMicrographOriginalPixelSize": float(optics.pixel_size_angstrom),
            "rlnMicrographDoseRate": dose_per_frame, "rlnMicrographPreExposure": 0.0,
            "rlnVoltage": float(optics.voltage_kv), "rlnMicrographStartFrame": 1, "rlnMotionModelVersion": 0,
        }
        shift_df = pd.DataFrame({
            "rlnMicrographFrameNumber": np.arange(1, t + 1),
            "rlnMicrographShiftX": shifts[:, 1] * b,
            "rlnMicrographShiftY": shifts[:, 0] * b,
        })
        if settings.defect_path:
            general["rlnMicrographDefectFile"] = settings.defect_path
        blocks = {"general": general, "global_shift": shift_df}
        local = getattr(motion, "local_motion", None)
        if local is not None:
            blocks.update(_local_motion_blocks(local, general, scale=b))
        write_star(paths["motion_star"], blocks)
        write_mrc(paths["micrograph"], micrograph, px)
        outputs = {"motion_star": _rel(paths["motion_star"], out), "micrograph": _rel(paths["micrograph"], out)}
        if settings.motion.write_no_dw:
            write_mrc(paths["micrograph_nodw"], micrograph_nodw, px)
            outputs["micrograph_nodw"] = _rel(paths["micrograph_nodw"], out)
        metrics = {
            # seconds: decoding (overlapped with the alignment unless decode_overlapped is False), hot pixels,
            # alignment, sums and outputs; read_seconds: opening the movie and the gain (+ decoding if not overlapped)
            "seconds": time.perf_counter() - t0 - t_decode, "read_seconds": t_read, "decode_overlapped": overlap,
            "n_frames": int(t),
            "frame_shape": [int(h), int(w)], "n_hot_pixels": n_hot, "movie_bin": b,
            "n_defect_file_pixels": int(file_defects.sum()) if file_defects is not None else 0,
            "accum_motion_total": _to_float(getattr(motion, "accum_motion_total", None)),
            "accum_motion_early": _to_float(getattr(motion, "accum_motion_early", None)),
            "accum_motion_late": _to_float(getattr(motion, "accum_motion_late", None)),
            "max_local_deviation_angstrom": _to_float(getattr(motion, "max_local_deviation_angstrom", None)),
        }
        results.append(StageOutcome("motion", hashes["motion"], metrics, outputs))

    # ---------------------------------------------------------------- CTF
    with _tag("ctf"):
        t0 = time.perf_counter()
        ctf = fns.estimate_ctf(micrograph_nodw, px, optics.voltage_kv, optics.cs_mm, optics.amplitude_contrast,
                               settings.ctf)
        landscape, tilt_metrics = _ctf_landscape(fns, micrograph_nodw, ctf, settings)
        ice = fns.estimate_ice_thickness(micrograph_nodw, px, settings.ctf.tile_size_px)
        specimen = fns.assess_specimen(micrograph_nodw, px, settings.ctf, ice=ice)
        metrics = {
            "seconds": time.perf_counter() - t0,
            "defocus_u": _to_float(ctf.defocus_u), "defocus_v": _to_float(ctf.defocus_v),
            "defocus_angle_deg": _to_float(ctf.defocus_angle_deg), "astigmatism": _to_float(ctf.astigmatism),
            "max_resolution_angstrom": _to_float(ctf.max_resolution_angstrom),
            "figure_of_merit": _to_float(ctf.figure_of_merit),
            # relative (dimensionless) ice thickness, see preprocess.ctf_landscape.estimate_ice_thickness
            "ice_thickness_angstrom": _to_float(getattr(ice, "relative_thickness", None)),
            "ice_flag": str(getattr(ice, "flag", "not_measurable")),
            # "ok", "carbon", "thick_ice" or "carbon+thick_ice": preprocess.ctf_landscape.assess_specimen
            "specimen_flag": str(specimen.flag),
            "ice_ring_power": _to_float(specimen.ice_ring_power),
            "carbon_heterogeneity": _to_float(specimen.carbon_heterogeneity),
            **tilt_metrics,
        }
        outputs = _write_ctf_diagnostics(ctf, metrics, settings, paths, out)
        results.append(StageOutcome("ctf", hashes["ctf"], metrics, outputs))

    # ---------------------------------------------------------------- picking
    with _tag("picking"):
        t0 = time.perf_counter()
        ctf_params = {"defocus_u": _to_float(ctf.defocus_u), "defocus_v": _to_float(ctf.defocus_v),
                      "defocus_angle_deg": _to_float(ctf.defocus_angle_deg), "voltage_kv": optics.voltage_kv,
                      "cs_mm": optics.cs_mm, "amplitude_contrast": optics.amplitude_contrast}
        picks = _pick(fns, micrograph, px, settings.picking, ctf_params)
        coords = _np(picks.coords_yx_px).reshape(-1, 2).astype(np.float64)  # (n, 2) (y, x)
        scores = _np(picks.scores).reshape(-1).astype(np.float64)
        metrics = {"seconds": time.perf_counter() - t0, "n_picks": int(len(coords)),  # scores: for curation
                   "mean_pick_score": float(scores.mean()) if len(scores) else float("nan"),
                   "median_pick_score": float(np.median(scores)) if len(scores) else float("nan")}
        results.append(StageOutcome("picking", hashes["picking"], metrics, {}))

    # ---------------------------------------------------------------- extraction
    with _tag("extraction"):
        import pandas as pd

        t0 = time.perf_counter()
        box, out_box = _box_sizes(fns, settings)
        particle_px = px * box / out_box
        if len(coords):
            coords_t = torch.as_tensor(coords, dtype=torch.float32, device=micrograph.device
                                       if hasattr(micrograph, "device") else None)
            ext = fns.extract_particles(micrograph, coords_t, box, out_box,
                                        invert_contrast=settings.extraction.invert_contrast)
            kept = _np(ext.kept).astype(bool).reshape(-1)  # (n,)
            images = _np(ext.images)  # (n_kept, b, b)
        else:
            kept = np.zeros(0, dtype=bool)
            images = np.zeros((0, out_box, out_box), dtype=np.float32)
        coords_kept = coords[kept]
        scores_kept = scores[kept]
        n = int(len(coords_kept))
        du, dv, da = _particle_defocus(fns, ctf, coords_kept, landscape)
        write_mrc(paths["particles_mrcs"], images.astype(np.float32).reshape(n, out_box, out_box), particle_px,
                  stack=True)
        stack_rel = _rel(paths["particles_mrcs"], out)
        rows = pd.DataFrame({
            "rlnImageName": [f"{i + 1:06d}@{stack_rel}" for i in range(n)],
            "rlnMicrographName": [_rel(paths["micrograph"], out)] * n,
            "rlnCoordinateX": coords_kept[:, 1] if n else np.zeros(0),
            "rlnCoordinateY": coords_kept[:, 0] if n else np.zeros(0),
            "rlnDefocusU": du, "rlnDefocusV": dv, "rlnDefocusAngle": da,
            "rlnOpticsGroup": np.ones(n, dtype=int),
            "cryolivePickScore": scores_kept,
        })
        write_star(paths["particles_star"], {"particles": rows})
        metrics = {"seconds": time.perf_counter() - t0, "n_particles": n, "box_size_px": int(box),
                   "output_box_size_px": int(out_box), "particle_pixel_size_angstrom": float(particle_px)}
        outputs = {"particles_mrcs": stack_rel, "particles_star": _rel(paths["particles_star"], out)}
        results.append(StageOutcome("extraction", hashes["extraction"], metrics, outputs))
        outcome.n_particles = n
    return results


def _pick(fns: StageFunctions, micrograph, px: float, picking, ctf_params: dict):
    """Pick with the picker the settings choose: ``blob`` (``fns.pick_blobs``), ``template`` (the MRC stack at
    ``picking.templates_path``) or ``learned`` (the model at ``picking.learned_model_path``)."""
    if picking.picker == "template":
        from ..preprocess.template_picking import pick_templates

        templates, tpx = _load_templates(picking.templates_path, picking.templates_pixel_size_angstrom)
        return pick_templates(micrograph, px, templates.to(micrograph.device), tpx, picking, ctf=ctf_params,
                              angle_step_deg=picking.template_angle_step_deg)
    if picking.picker == "learned":
        model = _load_learned_picker(picking.learned_model_path, str(micrograph.device))
        picks = model.pick(micrograph, px, ctf=ctf_params,
                           threshold="auto" if picking.threshold is None else picking.threshold,
                           max_picks=picking.max_picks_per_micrograph)
        return picks
    return fns.pick_blobs(micrograph, px, picking, ctf=ctf_params)


def _file_stamp(path: str) -> tuple[str, int, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime_ns, st.st_size


def _load_templates(path: str, pixel_size: float | None):
    """``(templates (k, b, b) tensor, pixel size Å)`` from an MRC stack (cached while the file is unchanged);
    a missing or unreadable file is a ``ValueError`` naming the path."""
    try:
        stamp = _file_stamp(path)
    except OSError as exc:
        raise ValueError(f"templates file {path!r} cannot be read: {exc}") from exc
    return _load_templates_cached(stamp, pixel_size)


@functools.lru_cache(maxsize=4)
def _load_templates_cached(stamp, pixel_size):
    import torch

    from ..io.mrc import read_mrc
    from ..preprocess.template_picking import templates_from_classes

    data, header_px = read_mrc(stamp[0])
    px = float(pixel_size or header_px or 0)
    if not px > 0:
        raise ValueError(f"templates file {stamp[0]!r} has no pixel size: set templates_pixel_size_angstrom")
    return templates_from_classes(torch.as_tensor(np.asarray(data, dtype=np.float32)), px), px


def _load_learned_picker(path: str, device: str):
    try:
        stamp = _file_stamp(path)
    except OSError as exc:
        raise ValueError(f"learned picker model {path!r} cannot be read: {exc}") from exc
    return _load_learned_cached(stamp, device)


@functools.lru_cache(maxsize=2)
def _load_learned_cached(stamp, device):
    from ..preprocess.learned_picking import LearnedPicker

    return LearnedPicker.load(stamp[0], device=device)


def _box_sizes(fns: StageFunctions, settings: Settings) -> tuple[int, int]:
    """(extraction box, output box) in pixels: from the settings, else cryolive's defaults."""
    ext = settings.extraction
    if ext.box_size_px is not None and ext.output_box_size_px is not None:
        return int(ext.box_size_px), int(ext.output_box_size_px)
    box, out_box = fns.default_box_sizes(settings.picking.particle_diameter_angstrom,
                                         settings.micrograph_pixel_size_angstrom)
    box = int(ext.box_size_px or box)
    out_box = int(ext.output_box_size_px or min(out_box, box))
    return box, out_box


def _ctf_landscape(fns: StageFunctions, micrograph_nodw, ctf, settings: Settings):
    """The defocus landscape (stage tilt) when the micrograph spans at least two CTF tiles each way.

    Returns ``(landscape or None, metrics)``; metrics ``stage_tilt_deg``, ``tilt_axis_deg`` (NaN when not
    estimated) and ``landscape_error`` when the fit failed (the exposure then goes on with one defocus).
    """
    h, w = micrograph_nodw.shape[-2:]
    nan = float("nan")
    metrics = {"stage_tilt_deg": nan, "tilt_axis_deg": nan}
    if min(h, w) < 2 * settings.ctf.tile_size_px:
        return None, metrics
    optics = settings.optics
    try:
        land = fns.estimate_ctf_patches(micrograph_nodw, settings.micrograph_pixel_size_angstrom, optics.voltage_kv,
                                        optics.cs_mm,
                                        optics.amplitude_contrast, settings.ctf, global_result=ctf,
                                        n_patches=tuple(settings.ctf.landscape_patches),
                                        search_range_angstrom=settings.ctf.landscape_search_range_angstrom)
    except Exception as exc:  # the global fit stands; per-particle defocus falls back to it
        metrics["landscape_error"] = f"{type(exc).__name__}: {exc}"
        return None, metrics
    metrics["stage_tilt_deg"] = _to_float(land.stage_tilt_deg)
    metrics["tilt_axis_deg"] = _to_float(land.tilt_axis_deg)
    return land, metrics


def _write_ctf_diagnostics(ctf, metrics: dict, settings: Settings, paths: dict, out: Path) -> dict:
    """The dashboard's CTF data (see docs/CONVENTIONS.md): ``OUT/ctf/<movie>.star`` (``data_ctf``: the fit;
    ``data_ctf_profile``: the 1D equiphase profile, fit and windowed correlation against frequency) and the 2D
    half-and-half image as MRC and 8-bit PNG. Only for fits that carry the profile (cryolive's estimate_ctf)."""
    if getattr(ctf, "frequencies_inv_angstrom", None) is None:
        return {}
    import pandas as pd

    from ..io.mrc import write_mrc
    from ..io.star import write_star
    from ..preprocess.ctf_fit import ctf_diagnostic_image_2d

    optics = settings.optics
    f = _np(ctf.frequencies_inv_angstrom).astype(np.float64)
    corr = getattr(ctf, "fit_correlation_1d", None)
    profile = pd.DataFrame({
        "rlnResolution": f, "rlnAngstromResolution": 1.0 / np.maximum(f, 1e-12),
        "cryoliveCtfSpectrum": _np(ctf.spectrum_1d).astype(np.float64),
        "cryoliveCtfFit": _np(ctf.fit_1d).astype(np.float64),
        "cryoliveCtfFitCorrelation": (_np(corr).astype(np.float64) if corr is not None else np.full(len(f), np.nan)),
    })
    summary = {"rlnDefocusU": metrics["defocus_u"], "rlnDefocusV": metrics["defocus_v"],
               "rlnDefocusAngle": metrics["defocus_angle_deg"], "rlnCtfAstigmatism": metrics["astigmatism"],
               "rlnCtfMaxResolution": metrics["max_resolution_angstrom"],
               "rlnCtfFigureOfMerit": metrics["figure_of_merit"],
               "rlnPhaseShift": _to_float(getattr(ctf, "phase_shift_deg", 0.0)),
               "rlnMicrographPixelSize": float(settings.micrograph_pixel_size_angstrom)}
    write_star(paths["ctf_star"], {"ctf": summary, "ctf_profile": profile})
    outputs = {"ctf_star": _rel(paths["ctf_star"], out)}
    if getattr(ctf, "power_spectrum", None) is not None:
        diag = _np(ctf_diagnostic_image_2d(ctf, settings.micrograph_pixel_size_angstrom, optics.voltage_kv,
                                           optics.cs_mm, optics.amplitude_contrast, settings.ctf)).astype(np.float32)
        write_mrc(paths["ctf_diag_mrc"], diag, float(settings.micrograph_pixel_size_angstrom))
        import imagecodecs

        png = imagecodecs.png_encode(np.clip((diag + 3.0) * (255.0 / 6.0), 0, 255).astype(np.uint8))
        from ..io.atomic import atomic_path

        with atomic_path(paths["ctf_diag_png"]) as tmp:
            tmp.write_bytes(png)
        outputs["ctf_diag_mrc"] = _rel(paths["ctf_diag_mrc"], out)
        outputs["ctf_diag_png"] = _rel(paths["ctf_diag_png"], out)
    return outputs


def _particle_defocus(fns: StageFunctions, ctf, coords_yx: np.ndarray, landscape=None):
    """Per-particle defocus U, V (Å) and angle (deg) as numpy float64 arrays ``(n,)`` (with the defocus landscape
    when there is one)."""
    import torch

    n = len(coords_yx)
    if n == 0:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    coords = torch.as_tensor(coords_yx, dtype=torch.float32)
    if landscape is None:
        du, dv, da = fns.per_particle_defocus(coords, ctf)
    else:
        du, dv, da = fns.per_particle_defocus(coords, ctf, landscape=landscape)
    return tuple(_np(v).astype(np.float64).reshape(n) for v in (du, dv, da))


def _rel(path: Path, out: Path) -> str:
    return os.path.relpath(path, out)
