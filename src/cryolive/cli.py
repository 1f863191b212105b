"""cryolive: live cryo-EM processing, from movies to particles and streaming 2D classes.

Commands:

\b
  process   process the movies that are there, to the end of the pipeline, and exit
  live      watch a folder and process movies as the microscope writes them (resumes on restart)
  simulate  write a simulated dataset with its ground truth (and optionally replay it into a folder)
  curate    show or change the exposure curation thresholds of a session (running or not)
  serve     run the facility server and web dashboard over registered sessions (pip install 'cryolive[server]')
  serve-admin  users, tokens and sessions of the facility server

Examples:

\b
  cryolive simulate data_sim --n-movies 8 --size 1024 --frames 24
  cryolive process data_sim/movies --out out --pixel-size 1.0 --voltage 300 --cs 2.7 --dose-per-frame 1.0 --gain data_sim/gain.mrc
  cryolive live demo_watch --out demo_out --pixel-size 1.0 --dose-per-frame 1.0 --stop-after-idle 60
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False, rich_markup_mode=None)

log = logging.getLogger("cryolive")

# ---------------------------------------------------------------------------------------------- options
PIXEL_SIZE = typer.Option(..., "--pixel-size", help="pixel size of the movie frames, Å")
VOLTAGE = typer.Option(300.0, "--voltage", help="acceleration voltage, kV")
CS = typer.Option(2.7, "--cs", help="spherical aberration, mm")
AMPLITUDE = typer.Option(0.1, "--amplitude-contrast", help="fraction of amplitude contrast")
DOSE = typer.Option(..., "--dose-per-frame", help="dose per movie frame, e/Å²")
GAIN = typer.Option(None, "--gain", help="gain reference (MRC or TIFF), multiplicative: corrected = raw × gain")
GAIN_FLIP = typer.Option(False, "--gain-flip-y", help="flip the gain reference in Y (rows) before use (= --gain-flip y)")
GAIN_ROTATE = typer.Option(0, "--gain-rotate", help="rotate the gain reference counter-clockwise by 0, 90, 180 or 270 "
                           "degrees (row 0 shown at the top), before the flip; RELION's/MotionCor2's --gain_rot N is "
                           "(360 - 90 N) mod 360 here")
GAIN_FLIP_AXIS = typer.Option("none", "--gain-flip", help="then flip the gain reference: none, y (upside down) or x "
                              "(left to right); RELION's/MotionCor2's --gain_flip 1 is y, 2 is x")
DEFECT_FILE = typer.Option(None, "--defect-file", help="detector defects, replaced in every frame before alignment: "
                           "a SerialEM defect list, a MotionCor2 'x y w h' file or an MRC/TIFF defect map (nonzero = "
                           "bad), in the orientation of the movie frames")
MOVIE_BIN = typer.Option(1, "--bin", help="Fourier-crop every frame by this factor after gain and defect correction "
                         "(2 for super-resolution movies); outputs then have pixel size --pixel-size × --bin "
                         "(--pixel-size is the movie's)")
DIAMETER = typer.Option(150.0, "--particle-diameter", help="particle diameter, Å")
SYMMETRY = typer.Option("C1", "--symmetry", help="point-group symmetry (for 3D)")
PICKER = typer.Option("blob", "--picker", help="blob (reference-free), template (--templates) or learned "
                      "(--picker-model)")
TEMPLATES = typer.Option(None, "--templates", help="MRC stack of picking templates (2D class averages or "
                         "projections, particles white); pixel size from its header")
PICKER_MODEL = typer.Option(None, "--picker-model", help="a learned picker saved by LearnedPicker.save")
TEMPLATES_FROM_2D = typer.Option(False, "--templates-from-2d", help="once 2D classes are selected (automatically "
                                 "or on the dashboard), pick new exposures with templates from the selected class "
                                 "averages (OUT/class2d/templates.mrcs)")
DEVICE = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto")
WORKERS = typer.Option(2, "--workers", help="worker processes for the per-exposure stages (0: in this process)")
N_CLASSES = typer.Option(20, "--classes", help="number of 2D classes")
MIN_2D = typer.Option(500, "--min-particles-2d", help="particles needed before 2D classification starts")
PATTERN = typer.Option("*.tif,*.tiff,*.mrc,*.mrcs,*.eer", "--pattern", help="movie file patterns, comma-separated")
NO_DW = typer.Option(False, "--write-no-dw", help="also write the non-dose-weighted sums (<movie>_noDW.mrc)")
EER_UPSAMPLING = typer.Option(1, "--eer-upsampling", help="EER: render events on a 1, 2 or 4× finer grid from their "
                              "sub-pixel bits, then Fourier-bin back to the physical pixels (less aliasing)")
EER_FRACTION = typer.Option(None, "--eer-fraction-frames", help="EER: raw frames per fraction (default: from "
                            "--eer-total-dose and --dose-per-frame, else about 40 fractions)")
EER_TOTAL_DOSE = typer.Option(None, "--eer-total-dose", help="EER: e/Å² of the whole exposure; fractions then hold "
                              "about --dose-per-frame each")
PATCHES = typer.Option("5x5", "--motion-patches", help="local motion patch grid, ROWSxCOLUMNS (1x1: global only)")
OPTICS_GROUPS = typer.Option("1", "--optics-groups", help="optics groups from the beam shifts in the acquisition "
                             "metadata (EPU XML, SerialEM mdoc, FEI MRC header): 1 (default: one group, as RELION), "
                             "N (the multi-shot positions, e.g. 9 for 3x3) or auto")
VERBOSE = typer.Option(False, "--verbose", "-v", help="log every exposure")
THRESHOLDS_FILE = typer.Option(None, "--thresholds",
                               help="exposure curation thresholds, JSON {\"max_ctf_resolution_angstrom\": 6, ...}")
THRESHOLD = typer.Option(None, "--threshold",
                         help="one curation threshold key=value (repeatable), e.g. max_motion_total_angstrom=40")


def _patch_grid(text: str) -> tuple[int, int]:
    try:
        rows, cols = (int(v) for v in str(text).lower().replace(",", "x").split("x"))
        if rows < 1 or cols < 1:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"--motion-patches must look like 5x5 (rows x columns ≥ 1), got {text!r}")
    return rows, cols


def _optics_groups(settings, text: str):
    """``settings`` with ``--optics-groups`` applied (1, N ≥ 1 or auto)."""
    from .config import OpticsGroupSettings

    value = str(text).strip().lower()
    try:
        n = None if value == "auto" else int(value)
        if n is not None and n < 1:
            raise ValueError
    except ValueError:
        raise typer.BadParameter(f"--optics-groups must be a number ≥ 1 or auto, got {text!r}")
    return settings.model_copy(update={"optics_groups": OpticsGroupSettings(n_groups=n)})


def _frame_options(settings, gain_rotate: int = 0, gain_flip: str = "none", defect_file=None, movie_bin: int = 1):
    """``settings`` with the gain orientation, defect file and binning options applied (checked)."""
    if gain_rotate not in (0, 90, 180, 270):
        raise typer.BadParameter(f"--gain-rotate must be 0, 90, 180 or 270, got {gain_rotate}")
    if gain_flip not in ("none", "y", "x"):
        raise typer.BadParameter(f"--gain-flip must be none, y or x, got {gain_flip!r}")
    if settings.gain_flip_y and gain_flip == "x":
        raise typer.BadParameter("--gain-flip-y and --gain-flip x contradict each other: give one flip")
    if movie_bin < 1:
        raise typer.BadParameter(f"--bin must be an integer ≥ 1, got {movie_bin}")
    if defect_file is not None and not Path(defect_file).is_file():
        raise typer.BadParameter(f"--defect-file {defect_file}: no such file")
    return settings.model_copy(update={
        "gain_rotate": int(gain_rotate), "gain_flip": gain_flip, "movie_bin": int(movie_bin),
        "defect_path": str(Path(defect_file).resolve()) if defect_file is not None else None})


def _check_defects(settings, movies=None) -> None:
    """Fail fast on an unusable defect file (every movie would fail with the same reason): read it for the frames
    of the first movie there is (without one, only its form can be checked later, per movie)."""
    if not settings.defect_path:
        return
    from .io.defects import read_defect_map
    from .io.movies import MovieError, open_movie
    from .session.session import expand_movie_args

    try:
        paths = expand_movie_args(movies, settings.movie_pattern)[:1] if movies else []
    except (OSError, ValueError):
        paths = []
    try:
        shape = open_movie(paths[0]).shape[1:] if paths else None
    except MovieError:
        shape = None  # that movie's own problem is reported by the session
    if shape is None:
        return
    try:
        mask = read_defect_map(settings.defect_path, shape)
    except MovieError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    log.info("defect file %s: %d bad pixels in %d×%d frames", settings.defect_path, int(mask.sum()), *shape)


def _settings(pixel_size, voltage, cs, amplitude_contrast, dose_per_frame, gain, gain_flip_y, particle_diameter,
              symmetry, device, workers, n_classes, min_particles_2d, pattern, write_no_dw, eer_upsampling=1,
              eer_fraction_frames=None, eer_total_dose=None, motion_patches="5x5", picker="blob", templates=None,
              picker_model=None, templates_from_2d=False):
    from .config import Class2DSettings, EerSettings, MotionSettings, Optics, PickingSettings, Settings

    if eer_upsampling not in (1, 2, 4):
        raise typer.BadParameter(f"--eer-upsampling must be 1, 2 or 4, got {eer_upsampling}")
    try:
        picking = PickingSettings(particle_diameter_angstrom=particle_diameter, picker=picker,
                                  templates_path=str(Path(templates).resolve()) if templates else None,
                                  learned_model_path=str(Path(picker_model).resolve()) if picker_model else None,
                                  templates_from_2d=templates_from_2d)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        errors = getattr(exc, "errors", None)
        msg = "; ".join(e.get("msg", "") for e in errors()) if callable(errors) else str(exc)
        raise typer.BadParameter(f"--picker {picker}: {msg}")
    for path, flag in ((templates, "--templates"), (picker_model, "--picker-model")):
        if path is not None and not Path(path).is_file():
            raise typer.BadParameter(f"{flag} {path}: no such file")

    return Settings(
        optics=Optics(pixel_size_angstrom=pixel_size, voltage_kv=voltage, cs_mm=cs,
                      amplitude_contrast=amplitude_contrast),
        dose_per_frame=dose_per_frame,
        gain_path=str(Path(gain).resolve()) if gain else None,
        gain_flip_y=gain_flip_y,
        motion=MotionSettings(write_no_dw=write_no_dw, patch_grid=_patch_grid(motion_patches)),
        eer=EerSettings(upsampling=eer_upsampling, fraction_frames=eer_fraction_frames, total_dose=eer_total_dose),
        picking=picking,
        class2d=Class2DSettings(n_classes=n_classes, min_particles_to_start=min_particles_2d),
        symmetry=symmetry, device=device, n_workers=workers, movie_pattern=pattern,
    )


def _thresholds(settings, path: Optional[Path], assignments: Optional[list[str]]):
    """Curation thresholds given on the command line (a JSON file, then key=value items on top), or None."""
    if path is None and not assignments:
        return None
    import json

    from .preprocess.curation import Thresholds
    from .session.curation import default_thresholds

    try:
        base = Thresholds(**json.loads(Path(path).read_text())) if path is not None else default_thresholds(settings)
        return base.updated(**Thresholds.parse_assignments(assignments or []))
    except (OSError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        typer.echo(f"error: thresholds: {exc}", err=True)
        raise typer.Exit(2) from exc


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # tifffile logs every unreadable page of a file still being written; cryolive reports the reason itself
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def _run_session(title: str, out: Path, settings, run, thresholds=None) -> None:
    """Open the session on ``out`` with a progress display, ``run(session)``, then print the summary."""
    from .session.session import Session

    with Progress(title) as progress:
        with Session(out, settings, progress=progress, thresholds=thresholds) as session:
            st = run(session)
            failures = [(e.name, e.error) for e in session.store.exposures("failed")]
            from .session.acquisition import summary_lines

            metadata_lines = summary_lines(session.store, settings)  # disagreements, optics groups
        progress.final(st)
    _summary(st, out, failures)
    for line in metadata_lines:
        typer.echo(line)


def _check_device(settings) -> None:
    """Fail fast, with the reason, on a device this machine does not have (e.g. --device cuda without a GPU)."""
    from .config import resolve_device

    try:
        resolve_device(settings.device)
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


def _check_gain(settings) -> None:
    """Fail fast on an unusable gain reference (every movie would fail with the same reason)."""
    if settings.gain_path:
        from .io.movies import MovieError, read_gain

        try:
            rotate, flip_y = settings.gain_orientation
            read_gain(settings.gain_path, flip_y=flip_y, rotate=rotate)
        except MovieError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc


def _check_gain_orientation(settings, movies, n_movies: int = 2) -> str | None:
    """Warn (never stop) when the gain reference fits the first movies better in another orientation than given.

    Sums the raw frames of up to ``n_movies`` movies and compares the 8 orientations of the gain as stored
    (:func:`cryolive.preprocess.gain.check_gain_orientation`) with the session's (``--gain-rotate``,
    ``--gain-flip``, ``--gain-flip-y``); the warning names the one that fits in those options' terms (and
    RELION's); returns the warning it logged, if any.
    """
    if not settings.gain_path:
        return None
    import torch

    from .io.movies import MovieError, open_movie, read_gain
    from .preprocess.gain import check_gain_orientation
    from .session.session import expand_movie_args

    try:
        gain = read_gain(settings.gain_path)  # as stored; the session's orientation is compared with the others
        total = None
        for path in expand_movie_args(movies, settings.movie_pattern)[:n_movies]:
            frames_sum = open_movie(path).read_all().sum(0)
            if frames_sum.shape not in (gain.shape, gain.shape[::-1]):
                return None  # the shape mismatch is reported per movie by the session
            total = frames_sum if total is None else total + frames_sum
    except (MovieError, OSError, ValueError) as exc:
        log.debug("gain orientation not checked: %s", exc)
        return None
    if total is None:
        return None
    warning = check_gain_orientation(torch.from_numpy(total), torch.from_numpy(gain), given=settings.gain_orientation)
    if warning:
        warning = f"{warning} (--gain {settings.gain_path})"
        log.warning(warning)
    return warning


class Progress:
    """Live progress: a rich panel on a terminal, plain log lines otherwise (one per change, at most every 5 s)."""

    def __init__(self, title: str):
        self.title = title
        self.tty = sys.stdout.isatty()
        self._live = None
        self._last_line = ""
        self._last_time = 0.0

    def __enter__(self):
        if self.tty:
            from rich.live import Live

            self._live = Live(self._render(None), refresh_per_second=2, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)

    def _render(self, st):
        from rich.table import Table

        table = Table(title=self.title, show_header=False)
        if st is None:
            table.add_row("status", "starting…")
            return table
        table.add_row("exposures done", str(st.n_done))
        table.add_row("failed", str(st.n_failed))
        table.add_row("queued / processing", f"{st.n_pending} / {st.n_processing}")
        table.add_row("particles", str(st.n_particles))
        table.add_row("exposures per hour", f"{st.exposures_per_hour:.0f}")
        table.add_row("2D: particles classified", str(st.n_particles_classified))
        table.add_row("2D: classes selected", str(st.n_classes))
        if st.last_error:
            table.add_row("last failure", st.last_error[:120])
        return table

    def __call__(self, st) -> None:
        if self._live is not None:
            self._live.update(self._render(st))
            return
        line = (f"done {st.n_done} failed {st.n_failed} queued {st.n_pending} processing {st.n_processing} "
                f"particles {st.n_particles} 2D {st.n_particles_classified} particles, {st.n_classes} classes selected")
        now = time.monotonic()
        if line != self._last_line and now - self._last_time >= 5.0:
            print(time.strftime("%H:%M:%S"), line, f"rate {st.exposures_per_hour:.0f}/h", flush=True)
            self._last_line, self._last_time = line, now

    def final(self, st) -> None:
        if self._live is None:
            self._last_time = 0.0
            self._last_line = ""
            self(st)


def _stop_on_sigterm() -> None:
    """Treat SIGTERM (kill, systemd, a batch system) like Ctrl-C: finish cleanly and write the outputs."""
    import signal

    def _raise(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)


def _summary(st, out: Path, failures: list[tuple[str, str]] = ()) -> None:
    typer.echo(f"{st.n_done} exposures done, {st.n_failed} failed, {st.n_particles} particles; results in {out}")
    for name, reason in list(failures)[:20]:
        typer.echo(f"  failed: {name}: {reason}")
    if len(failures) > 20:
        typer.echo(f"  ... and {len(failures) - 20} more (see {out}/session.sqlite)")


# ---------------------------------------------------------------------------------------------- process
@app.command()
def process(
    movies: list[str] = typer.Argument(..., help="movie files, glob patterns or folders"),
    out: Path = typer.Option(..., "--out", help="session folder (created; an existing one is resumed)"),
    pixel_size: float = PIXEL_SIZE, voltage: float = VOLTAGE, cs: float = CS,
    amplitude_contrast: float = AMPLITUDE, dose_per_frame: float = DOSE,
    gain: Optional[Path] = GAIN, gain_flip_y: bool = GAIN_FLIP, particle_diameter: float = DIAMETER,
    symmetry: str = SYMMETRY, device: str = DEVICE, workers: int = WORKERS, n_classes: int = N_CLASSES,
    min_particles_2d: int = MIN_2D, pattern: str = PATTERN, write_no_dw: bool = NO_DW,
    eer_upsampling: int = EER_UPSAMPLING, eer_fraction_frames: Optional[int] = EER_FRACTION,
    eer_total_dose: Optional[float] = EER_TOTAL_DOSE, motion_patches: str = PATCHES, verbose: bool = VERBOSE,
    thresholds: Optional[Path] = THRESHOLDS_FILE, threshold: Optional[list[str]] = THRESHOLD,
    gain_rotate: int = GAIN_ROTATE, gain_flip: str = GAIN_FLIP_AXIS, defect_file: Optional[Path] = DEFECT_FILE,
    movie_bin: int = MOVIE_BIN,
    picker: str = PICKER, templates: Optional[Path] = TEMPLATES, picker_model: Optional[Path] = PICKER_MODEL,
    templates_from_2d: bool = TEMPLATES_FROM_2D, optics_groups: str = OPTICS_GROUPS,
):
    """Process the movies that are there, to the end of the pipeline, and exit.

    Movies already done in OUT are not processed again. A bad movie (truncated, corrupt, wrong frame size)
    is recorded as failed with the reason and the others go on.

    Example:

    \b
      cryolive process data_sim/movies --out out --pixel-size 1.0 --voltage 300 --cs 2.7 --dose-per-frame 1.0 --gain data_sim/gain.mrc
    """
    _setup_logging(verbose)
    settings = _settings(pixel_size, voltage, cs, amplitude_contrast, dose_per_frame, gain, gain_flip_y,
                         particle_diameter, symmetry, device, workers, n_classes, min_particles_2d, pattern,
                         write_no_dw, eer_upsampling, eer_fraction_frames, eer_total_dose, motion_patches,
                         picker, templates, picker_model, templates_from_2d)
    settings = _optics_groups(settings, optics_groups)
    settings = _frame_options(settings, gain_rotate, gain_flip, defect_file, movie_bin)
    _check_device(settings)
    _check_gain(settings)
    _check_defects(settings, movies)
    _check_gain_orientation(settings, movies)
    _run_session(f"cryolive process → {out}", out, settings, lambda session: session.process(movies),
                 thresholds=_thresholds(settings, thresholds, threshold))


# ---------------------------------------------------------------------------------------------- live
@app.command()
def live(
    watch_dir: Path = typer.Argument(..., help="folder the microscope writes movies into (searched recursively)"),
    out: Path = typer.Option(..., "--out", help="session folder (created; an existing one is resumed)"),
    pixel_size: float = PIXEL_SIZE, voltage: float = VOLTAGE, cs: float = CS,
    amplitude_contrast: float = AMPLITUDE, dose_per_frame: float = DOSE,
    gain: Optional[Path] = GAIN, gain_flip_y: bool = GAIN_FLIP, particle_diameter: float = DIAMETER,
    symmetry: str = SYMMETRY, device: str = DEVICE, workers: int = WORKERS, n_classes: int = N_CLASSES,
    min_particles_2d: int = MIN_2D, pattern: str = PATTERN, write_no_dw: bool = NO_DW,
    eer_upsampling: int = EER_UPSAMPLING, eer_fraction_frames: Optional[int] = EER_FRACTION,
    eer_total_dose: Optional[float] = EER_TOTAL_DOSE, motion_patches: str = PATCHES,
    gain_rotate: int = GAIN_ROTATE, gain_flip: str = GAIN_FLIP_AXIS, defect_file: Optional[Path] = DEFECT_FILE,
    movie_bin: int = MOVIE_BIN,
    picker: str = PICKER, templates: Optional[Path] = TEMPLATES, picker_model: Optional[Path] = PICKER_MODEL,
    templates_from_2d: bool = TEMPLATES_FROM_2D, optics_groups: str = OPTICS_GROUPS,
    settle: float = typer.Option(3.0, "--settle", help="seconds a file's size and mtime must stay unchanged"),
    stop_after_idle: Optional[float] = typer.Option(None, "--stop-after-idle",
                                                    help="stop after this many seconds without new movies"),
    max_exposures: Optional[int] = typer.Option(None, "--max-exposures",
                                                help="stop once this many exposures are processed"),
    poll: float = typer.Option(1.0, "--poll", help="seconds between two looks at the folder"),
    verbose: bool = VERBOSE,
    thresholds: Optional[Path] = THRESHOLDS_FILE, threshold: Optional[list[str]] = THRESHOLD,
):
    """Watch a folder and process movies as they are written, until Ctrl-C or an idle timeout.

    A movie is taken once its size and modification time have been unchanged for --settle seconds and its
    header agrees with its size. Starting again on the same OUT resumes: movies done are not processed again
    and the 2D classes are reloaded.

    Example:

    \b
      cryolive live demo_watch --out demo_out --pixel-size 1.0 --dose-per-frame 1.0 --gain demo_sim/gain.mrc --stop-after-idle 60
    """
    _setup_logging(verbose)
    settings = _settings(pixel_size, voltage, cs, amplitude_contrast, dose_per_frame, gain, gain_flip_y,
                         particle_diameter, symmetry, device, workers, n_classes, min_particles_2d, pattern,
                         write_no_dw, eer_upsampling, eer_fraction_frames, eer_total_dose, motion_patches,
                         picker, templates, picker_model, templates_from_2d)
    settings = _optics_groups(settings, optics_groups)
    settings = _frame_options(settings, gain_rotate, gain_flip, defect_file, movie_bin)
    _check_device(settings)
    _check_gain(settings)
    _check_defects(settings, [str(watch_dir)] if watch_dir.is_dir() else None)
    curation_thresholds = _thresholds(settings, thresholds, threshold)
    _stop_on_sigterm()
    watch_dir.mkdir(parents=True, exist_ok=True)
    _run_session(f"cryolive live {watch_dir} → {out}", out, settings,
                 lambda session: session.live(watch_dir, settle_s=settle, stop_after_idle_s=stop_after_idle,
                                              max_exposures=max_exposures, poll_s=poll),
                 thresholds=curation_thresholds)


# ---------------------------------------------------------------------------------------------- curate
@app.command()
def curate(
    out: Path = typer.Argument(..., help="session folder (of a running or a finished session)"),
    set_: Optional[list[str]] = typer.Option(None, "--set", help="change a threshold: key=value (repeatable; "
                                             "value none removes it), e.g. max_ctf_resolution_angstrom=6"),
    thresholds: Optional[Path] = typer.Option(None, "--thresholds", help="replace all thresholds by this JSON file"),
    accept: Optional[list[str]] = typer.Option(None, "--accept", help="accept this exposure (movie name) whatever "
                                               "the thresholds (repeatable)"),
    reject: Optional[list[str]] = typer.Option(None, "--reject", help="reject this exposure (repeatable)"),
    clear: Optional[list[str]] = typer.Option(None, "--clear-override", help="remove the manual decision on an "
                                              "exposure (repeatable)"),
):
    """Show or change the exposure curation of a session: thresholds, manual accept/reject, and the counts.

    Every exposure is re-decided at once from the metrics already computed (nothing is recomputed or deleted);
    exposures.star and particles.star are rewritten, and a running session picks the change up. Without options:
    print the current thresholds and counts. Threshold names: see docs/CONVENTIONS.md (min_/max_ + metric).

    Examples:

    \b
      cryolive curate out --set max_ctf_resolution_angstrom=6 --set max_motion_total_angstrom=40
      cryolive curate out --set min_particle_count=20 --reject mic_0007
      cryolive curate out --thresholds thresholds.json
    """
    import json

    from .preprocess.curation import Thresholds
    from .session import curation as cur

    try:
        store = cur.open_session_store(out)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    try:
        overrides = {**{n: 1 for n in accept or []}, **{n: -1 for n in reject or []}, **{n: None for n in clear or []}}
        try:
            changes = Thresholds.parse_assignments(set_ or [])
            if thresholds is not None:
                new = Thresholds(**json.loads(thresholds.read_text())).updated(**changes)
                summary = cur.set_thresholds(out, new, store=store)
            elif changes:
                summary = cur.set_thresholds(out, changes, store=store)
            else:
                summary = None
            if overrides:
                summary = cur.set_override(out, overrides, store=store)
            if summary is None:
                summary = cur.recurate(out, store, cur.stored_settings(store), write_files=False)
        except (OSError, ValueError, KeyError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from exc
        bounds = ", ".join(f"{side}_{name}={v:g}" for name, side, v in summary.thresholds.bounds()) or "none"
        typer.echo(f"thresholds: {bounds}")
        c = summary.counts
        typer.echo(f"{c['accepted']} accepted, {c['rejected']} rejected, {c['pending']} pending "
                   f"({summary.seconds * 1000:.0f} ms)")
    finally:
        store.close()


# ---------------------------------------------------------------------------------------------- simulate
@app.command()
def simulate(
    out: Path = typer.Argument(..., help="folder for the dataset (movies/, gain.mrc, truth/)"),
    n_movies: int = typer.Option(8, "--n-movies", help="number of movies"),
    size: int = typer.Option(1024, "--size", help="frame size in pixels (square)"),
    frames: int = typer.Option(24, "--frames", help="frames per movie"),
    pixel_size: float = typer.Option(1.0, "--pixel-size", help="pixel size, Å"),
    dose_per_frame: float = typer.Option(1.0, "--dose-per-frame", help="dose per frame, e/Å²"),
    fmt: str = typer.Option("mrc", "--format", help="movie format: mrc or tiff (LZW)"),
    structure: str = typer.Option("6ny1", "--structure", help="bundled structure: 6ny1 or 3j5p"),
    seed: int = typer.Option(0, "--seed", help="random seed"),
    replay_into: Optional[Path] = typer.Option(None, "--replay-into",
                                               help="then copy the movies into this folder at microscope pace"),
    replay_interval: float = typer.Option(2.0, "--replay-interval", help="seconds between two replayed movies"),
):
    """Write a simulated dataset with its ground truth; optionally replay it into a watched folder.

    With --replay-into, movies are written into that folder one after the other, each progressively (as a
    microscope does), every --replay-interval seconds, as soon as they are simulated.

    Examples:

    \b
      cryolive simulate data_sim --n-movies 8 --size 1024 --frames 24 --format tiff
      cryolive simulate demo_sim --n-movies 20 --size 512 --replay-into demo_watch --replay-interval 2
    """
    from . import simulate as sim

    if fmt not in ("mrc", "tiff"):
        raise typer.BadParameter("--format must be mrc or tiff")
    settings = sim.SimulationSettings(n_movies=n_movies, image_shape_px=(size, size), n_frames=frames,
                                      pixel_size_angstrom=pixel_size, dose_per_frame=dose_per_frame,
                                      movie_format=fmt, structures=[structure], seed=seed)
    if replay_into is None:
        sim.simulate_dataset(out, settings)
        typer.echo(f"{n_movies} movies written to {Path(out) / 'movies'}")
    else:
        sim.simulate_live(out, replay_into, settings, interval_s=replay_interval)
        typer.echo(f"{n_movies} movies replayed into {replay_into}")


# ---------------------------------------------------------------------------------------------- serve
@app.command()
def serve(
    root: Path = typer.Option(..., "--root", help="facility root holding server.sqlite (see serve-admin)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address to bind (default: this machine only)"),
    port: int = typer.Option(8765, "--port", help="TCP port"),
    poll: float = typer.Option(0.5, "--poll", help="seconds between two looks at each open session's store"),
):
    """Run the web dashboard and its API (REST + WebSocket push) over the sessions registered in ROOT.

    Every API route needs a token (Authorization: Bearer, or the browser's login); a user sees only the
    sessions they own or were granted. Binds 127.0.0.1 unless --host says otherwise; put a TLS proxy in
    front to serve other machines.

    Example:

    \b
      cryolive serve-admin add-user alice --root /facility
      cryolive serve-admin issue-token alice --root /facility --days 30
      cryolive serve-admin add-session krios1-run7 /data/run7/out --owner alice --root /facility
      cryolive serve --root /facility --port 8765     # then open http://127.0.0.1:8765
    """
    try:
        import uvicorn

        from .server.app import create_app
        from .server.registry import RegistryError
    except ImportError as exc:
        typer.echo(f"error: the server needs its extra: pip install 'cryolive[server]' ({exc})", err=True)
        raise typer.Exit(2) from exc
    try:
        application = create_app(root, poll_s=poll)
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: serving on {host}: use TLS (a reverse proxy) so tokens do not cross the network "
                   "in clear", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


admin = typer.Typer(help="Users, tokens and sessions of the facility server (ROOT/server.sqlite).",
                    no_args_is_help=True, add_completion=False, rich_markup_mode=None)
app.add_typer(admin, name="serve-admin")
ROOT = typer.Option(..., "--root", help="facility root (server.sqlite is created there)")


def _registry(root: Path):
    from .server.registry import Registry

    return Registry(root)


def _admin_call(fn):
    from .server.registry import RegistryError

    try:
        return fn()
    except RegistryError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@admin.command("add-user")
def admin_add_user(name: str = typer.Argument(..., help="user name"), root: Path = ROOT):
    """Create a user (then issue them a token)."""
    _admin_call(lambda: _registry(root).add_user(name))
    typer.echo(f"user {name} added")


@admin.command("issue-token")
def admin_issue_token(name: str = typer.Argument(..., help="user name"), root: Path = ROOT,
                      days: float = typer.Option(30.0, "--days", help="days until the token expires"),
                      label: str = typer.Option("", "--label", help="a note, e.g. where it is used")):
    """Issue a token (printed once; only its hash is stored)."""
    token = _admin_call(lambda: _registry(root).issue_token(name, days=days, label=label))
    typer.echo(token)


@admin.command("revoke-tokens")
def admin_revoke(name: str = typer.Argument(..., help="user name"), root: Path = ROOT):
    """Revoke every token of a user."""
    n = _admin_call(lambda: _registry(root).revoke_tokens(name))
    typer.echo(f"{n} tokens revoked")


@admin.command("add-session")
def admin_add_session(session_id: str = typer.Argument(..., help="id used in the dashboard's URLs"),
                      out: Path = typer.Argument(..., help="session folder (holding session.sqlite)"),
                      owner: str = typer.Option(..., "--owner", help="user who owns it"), root: Path = ROOT,
                      title: str = typer.Option("", "--title", help="a title for the session list")):
    """Register a session folder under an id, owned by a user."""
    rec = _admin_call(lambda: _registry(root).add_session(session_id, out, owner, title))
    typer.echo(f"session {rec.id} → {rec.out_dir} (owner {rec.owner})")


@admin.command("grant")
def admin_grant(session_id: str = typer.Argument(...), user: str = typer.Argument(...), root: Path = ROOT):
    """Let another user see a session."""
    _admin_call(lambda: _registry(root).grant(session_id, user))
    typer.echo(f"{user} may see {session_id}")


@admin.command("list")
def admin_list(root: Path = ROOT):
    """Users and sessions."""
    reg = _registry(root)
    typer.echo("users: " + ", ".join(reg.users()))
    for rec in reg.sessions():
        typer.echo(f"session {rec.id}: {rec.out_dir} (owner {rec.owner})")


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    app()
