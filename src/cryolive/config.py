"""Typed settings shared by the CLI, the session and the algorithms.

Units are in the field names: Å for lengths and defocus, kV, mm for Cs, e/Å² for dose.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Optics(BaseModel):
    """Microscope optics of one optics group."""

    model_config = ConfigDict(frozen=True)

    pixel_size_angstrom: float = Field(1.0, gt=0, description="pixel size of the movie frames, Å")
    voltage_kv: float = Field(300.0, gt=0, description="acceleration voltage, kV")
    cs_mm: float = Field(2.7, ge=0, description="spherical aberration, mm")
    amplitude_contrast: float = Field(0.1, ge=0, lt=1, description="fraction of amplitude contrast")


class MotionSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    bfactor_angstrom2: float = 150.0
    max_iterations: int = 10
    dose_weighting: bool = True
    write_no_dw: bool = False
    # local (patch) motion, preprocess.motion_patch: patch grid (rows, columns); (1, 1) aligns globally only
    patch_grid: tuple[int, int] = (5, 5)
    local_bfactor_angstrom2: float | None = Field(None, description="B-factor of the patch alignment (None: "
                                                  "bfactor_angstrom2)")
    patch_size_factor: float = Field(2.0, gt=0, description="patch side in grid cells (2: half-overlapping)")
    local_time_degree: int = Field(3, ge=1, description="polynomial degree in time of the local motion model")
    local_prior_angstrom: float | None = Field(2.0, gt=0, description="expected RMS of the local field (Å): "
                                               "weak prior on directions the patches barely constrain; a field "
                                               "no larger than noise is removed by the fit's noise test (None: none)")
    local_smoothness: float = Field(0.0, ge=0, description="curvature penalty on the local field across the control grid")
    local_max_iterations: int = Field(6, ge=1)
    local_frame_group: int | None = Field(None, ge=1, description="consecutive frames summed per patch "
                                          "measurement (None: about 2 e/Å² per group)")
    max_local_shift_px: float = Field(12.0, gt=0, description="largest residual shift searched per patch, px")
    warp_group_tolerance_px: float = Field(0.2, gt=0, description="frames warped together when their local "
                                           "fields differ by less than this, px")
    power_spectrum: bool = False
    power_spectrum_tile_px: int = 512


class EerSettings(BaseModel):
    """How EER movies become dose fractions (see ``io.movies.EerOptions`` and ``session.pipeline.eer_options``)."""

    model_config = ConfigDict(frozen=True)

    upsampling: Literal[1, 2, 4] = Field(1, description="render events on a 1×/2×/4× grid from their sub-pixel "
                                         "bits, then Fourier-bin back to the physical pixels")
    fraction_frames: int | None = Field(None, ge=1, description="raw EER frames per fraction")
    total_dose: float | None = Field(None, gt=0, description="e/Å² of the whole exposure; with dose_per_frame "
                                     "(per fraction) it decides fraction_frames")


class CTFSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    min_resolution_angstrom: float = 30.0
    max_resolution_angstrom: float = 4.0
    min_defocus_angstrom: float = 2000.0
    max_defocus_angstrom: float = 50000.0
    tile_size_px: int = 512
    # defocus landscape (preprocess.ctf_landscape.estimate_ctf_patches): patch grid (rows, columns) and ± search
    landscape_patches: tuple[int, int] = (5, 5)
    landscape_search_range_angstrom: float = 3000.0
    # specimen flags (preprocess.ctf_landscape.assess_specimen)
    carbon_heterogeneity_threshold: float = 1.35
    thick_ice_ring_power: float = 0.045


class PickingSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    particle_diameter_angstrom: float = 150.0
    threshold: float | None = None
    max_picks_per_micrograph: int = 2000
    picker: Literal["blob", "template", "learned"] = Field(
        "blob", description="blob (reference-free), template (templates_path) or learned (learned_model_path)"
    )
    templates_path: str | None = Field(
        None, description="MRC stack of templates (2D class averages or projections, particles white)"
    )
    templates_pixel_size_angstrom: float | None = Field(None, gt=0, description="None: from the MRC header")
    template_angle_step_deg: float = Field(10.0, gt=0, le=180, description="in-plane rotation step, degrees")
    learned_model_path: str | None = Field(None, description="a LearnedPicker saved with LearnedPicker.save")
    templates_from_2d: bool = Field(
        False, description="live: pick with this picker until 2D classes are selected, then with templates made "
        "from the selected class averages (OUT/class2d/templates.mrcs, rewritten as the classes and the selection "
        "change)"
    )

    @model_validator(mode="after")
    def _picker_inputs(self):
        if self.picker == "template" and not self.templates_path:
            raise ValueError("picker 'template' needs templates_path (an MRC stack of templates)")
        if self.picker == "learned" and not self.learned_model_path:
            raise ValueError("picker 'learned' needs learned_model_path (a model saved by LearnedPicker.save)")
        return self


class ExtractionSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    box_size_px: int | None = None  # None: about 1.5 × particle diameter, rounded to an even good FFT size
    output_box_size_px: int | None = None  # None: Fourier-crop to about 2.5 Å/px, min 64
    invert_contrast: bool = True


class Class2DSettings(BaseModel):
    model_config = ConfigDict(frozen=True)

    n_classes: int = 20
    batch_size: int = 1000
    min_particles_to_start: int = 500
    n_psi: int = 24
    max_shift_px: int = 4


class AcceptanceSettings(BaseModel):
    """A minimal rule deciding whether an exposure's particles go on to 2D (and into particles.star)."""

    model_config = ConfigDict(frozen=True)

    max_ctf_resolution_angstrom: float = Field(
        10.0, gt=0, description="reject an exposure whose CTF fit is only good to a resolution worse than this, Å"
    )


class OpticsGroupSettings(BaseModel):
    """Optics groups (rlnOpticsGroup) from the acquisition metadata's beam shifts: ``preprocess.optics_groups``.

    ``n_groups`` 1 (default, RELION's): one group; N: the multi-shot positions (e.g. 9 for 3×3); None: as many as
    the beam shifts show. Exposures without a beam shift are grouped by grid square."""

    model_config = ConfigDict(frozen=True)

    n_groups: int | None = Field(1, ge=1, description="1: one optics group; N: beam-shift positions; None: auto")
    min_gap: float = Field(6.0, gt=1, description="spacing between positions / jitter within one, at least")
    max_pending: int = Field(60, ge=2, description="exposures that may wait while the grouping is learned")


class Settings(BaseModel):
    """Everything a session needs to know to process movies."""

    model_config = ConfigDict(frozen=True)

    optics: Optics = Optics()
    dose_per_frame: float = Field(1.0, gt=0, description="e/Å² per movie frame")
    gain_path: str | None = None
    gain_flip_y: bool = False
    gain_rotate: Literal[0, 90, 180, 270] = Field(
        0, description="rotate the gain reference counter-clockwise by this many degrees (as shown with row 0 at "
        "the top), before any flip; RELION's/MotionCor2's gain_rot N (N × 90° clockwise) is (360 − 90·N) % 360 here"
    )
    gain_flip: Literal["none", "y", "x"] = Field(
        "none", description="then flip the gain reference: y = upside down (rows), x = left to right (columns); "
        "RELION's/MotionCor2's gain_flip 1 = y, 2 = x. gain_flip_y=True is the same as 'y'"
    )
    defect_path: str | None = Field(
        None, description="detector defects of the movie frames: a SerialEM defect list, a MotionCor2 'x y w h' "
        "file or an MRC/TIFF defect map (nonzero = bad), see io.defects; replaced in every frame before alignment"
    )
    movie_bin: int = Field(
        1, ge=1, description="Fourier-crop every frame by this factor after gain and defect correction (super-"
        "resolution movies: 2); micrographs, CTF and particles then have pixel size optics.pixel_size_angstrom × "
        "movie_bin (optics.pixel_size_angstrom stays the movie's own, as RELION's rlnMicrographOriginalPixelSize)"
    )
    motion: MotionSettings = MotionSettings()
    eer: EerSettings = EerSettings()
    ctf: CTFSettings = CTFSettings()
    picking: PickingSettings = PickingSettings()
    extraction: ExtractionSettings = ExtractionSettings()
    class2d: Class2DSettings = Class2DSettings()
    acceptance: AcceptanceSettings = AcceptanceSettings()
    optics_groups: OpticsGroupSettings = OpticsGroupSettings()
    symmetry: str = "C1"
    device: str = "cpu"
    n_workers: int = 2
    movie_pattern: str = "*.tif,*.tiff,*.mrc,*.mrcs,*.eer"

    @model_validator(mode="after")
    def _one_gain_flip(self):
        if self.gain_flip_y and self.gain_flip == "x":
            raise ValueError("gain_flip_y (flip in Y) and gain_flip 'x' contradict each other: give one flip")
        return self

    @property
    def gain_orientation(self) -> tuple[int, bool]:
        """The gain's orientation as ``io.movies.read_gain`` takes it: ``(rotate counter-clockwise deg, flip_y)``.

        A flip in X after a rotation by r equals a flip in Y after a rotation by r + 180°.
        """
        if self.gain_flip == "x":
            return (int(self.gain_rotate) + 180) % 360, True
        return int(self.gain_rotate), bool(self.gain_flip_y or self.gain_flip == "y")

    @property
    def micrograph_pixel_size_angstrom(self) -> float:
        """Pixel size of the micrographs (and of everything made from them): the movie's × ``movie_bin``, Å."""
        return float(self.optics.pixel_size_angstrom) * int(self.movie_bin)

    def frame_preparation(self) -> dict:
        """The settings for gain orientation, defects and binning that differ from the defaults (for stage
        hashes: sessions that do not use them keep the hashes they had before these settings existed)."""
        out = {}
        if self.gain_rotate:
            out["gain_rotate"] = int(self.gain_rotate)
        if self.gain_flip != "none":
            out["gain_flip"] = self.gain_flip
        if self.defect_path:
            out["defect_path"] = self.defect_path
        if self.movie_bin != 1:
            out["movie_bin"] = int(self.movie_bin)
        return out


def settings_hash(*parts: BaseModel | dict | str | float | int | None) -> str:
    """A short stable hash of the settings that decide a stage's result."""
    blob = json.dumps(
        [p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts],
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_device(device: str = "cpu"):
    """Resolve a device string once ("cpu", "cuda", "cuda:1", "auto") into a torch.device."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available on this machine")
    return dev


DeviceName = Literal["cpu", "cuda", "auto"]
