"""Movies of particles in vitreous ice with ground truth: one exposure at a time, frame by frame.

Per micrograph (randomness from ``(seed, index)``):

1. particles (uniform random orientations, :func:`cryolive.geometry.random_orientations`) and a few junk
   aggregates at random positions whose projected footprints do not overlap, away from the edges;
   heights spread through the ice;
2. projected potential of all of them on the full frame (solvent displaced), plus an amorphous-ice
   field (:mod:`cryolive.simulate.physics`);
3. CTF (with an imaging envelope ``exp(−B_env k²/4)``) per particle at its own defocus (micrograph defocus + stage-tilt plane + height): the frame is
   split into defocus slabs of ``defocus_step_angstrom`` and each slab gets its own CTF on the full
   frame (so delocalisation is exact); the ice follows the tilted plane by linear interpolation
   between slabs;
4. per frame t: smooth local motion deforms the specimen and ice potential (bicubic resampling) *before*
   the CTF, Grant–Grigorieff damage at the accumulated dose of the frame (specimen only), and global
   drift ``s_t`` (Fourier shift), giving ``frame_t ≈ frame_1(r − s_t − d_t(r))`` up to CTF delocalisation;
5. counts: ``raw = Poisson(N₀ (1 + C_t) · s)`` with ``N₀ = dose_per_frame × pixel²``, detector
   sensitivity ``s`` (gain reference ``= 1/s``), plus hot pixels.

The truth micrograph is ``n_frames · N₀ · (1 + C)`` without damage, motion or noise, in frame-1
coordinates (the scale of the aligned sum of gain-corrected counts).

Stage tilt: the defocus at pixel (x, y) is
``defocus_centre + tan(tilt) · pixel · ((x − w/2)(−sin φ) + (y − h/2) cos φ)``, φ the tilt axis angle
from the X axis (degrees in the truth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from ..ctf import calculate_ctf_2d, critical_exposure, electron_wavelength_angstrom
from ..fourier import frequency_radius_2d, phase_shift_2d
from ..geometry import matrix_to_euler_angles, random_rotations
from . import physics
from .structure import Atoms, _render, load_atoms, particle_diameter_angstrom, random_aggregate


class SimulationSettings(BaseModel):
    """Everything that decides a simulated dataset (units in the names; Å, degrees, e/Å²)."""

    model_config = ConfigDict(frozen=True)

    n_movies: int = Field(8, ge=0)
    structures: list[str] = Field(default_factory=lambda: ["6ny1"], description="built-in names or PDB/mmCIF paths")
    image_shape_px: tuple[int, int] = (1024, 1024)
    n_frames: int = Field(24, ge=1)
    pixel_size_angstrom: float = Field(1.0, gt=0)
    voltage_kv: float = 300.0
    cs_mm: float = 2.7
    amplitude_contrast: float = 0.1
    dose_per_frame: float = Field(1.0, gt=0, description="e/Å² per frame")
    particles_per_micrograph: int = Field(100, ge=0, description="attempted; fewer when they do not fit")
    junk_per_micrograph: int = Field(3, ge=0)
    carbon_coverage: float = Field(
        0.0, ge=0, lt=1, description="fraction of each micrograph on the carbon film at a hole edge (0: none)"
    )
    carbon_thickness_angstrom: float = Field(150.0, gt=0, description="carbon support film thickness, Å")
    defocus_range_angstrom: tuple[float, float] = (5000.0, 35000.0)
    max_astigmatism_angstrom: float = 500.0
    stage_tilt_deg: float = 0.0
    tilt_axis_deg: float | None = Field(None, description="None: random per micrograph")
    ice_thickness_range_angstrom: tuple[float, float] = (200.0, 500.0)
    particle_height_spread: bool = True
    bfactor_angstrom2: float = Field(20.0, description="B-factor of the particles' atoms, Å²")
    envelope_bfactor_angstrom2: float = Field(
        60.0, description="imaging envelope (partial coherence, detector MTF, intra-frame motion) on all signal, Å²"
    )
    max_drift_angstrom: float = 20.0
    local_motion_angstrom: float = Field(3.0, ge=0, description="largest local deviation from the global drift, Å")
    gain_variation: float = 0.1
    n_hot_pixels: int = 8
    energy_filter: bool = False
    defocus_step_angstrom: float | None = Field(None, description="CTF slab width; None: 0.1 rad phase error at Nyquist")
    movie_format: Literal["tiff", "mrc"] = "tiff"
    movie_prefix: str = "movie"
    oversampling: int = Field(2, ge=1, le=4)
    seed: int = 0


@dataclass
class Detector:
    """The camera: sensitivity ``(h, w)`` (gain reference = 1/sensitivity) and hot pixels."""

    sensitivity: torch.Tensor
    hot_pixels_yx: torch.Tensor  # (k, 2) int64 rows, cols
    hot_rates: torch.Tensor  # (k,) counts per frame

    @property
    def gain(self) -> torch.Tensor:
        return 1.0 / self.sensitivity


def make_detector(shape: tuple[int, int], gain_variation: float, n_hot_pixels: int, seed: int) -> Detector:
    """A detector: smooth (±gain_variation) plus per-pixel sensitivity variation, and hot pixels."""
    g = torch.Generator().manual_seed(int(seed) * 7919 + 17)
    h, w = shape
    coarse = torch.randn(1, 1, 9, 9, generator=g)
    smooth = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)[0, 0]
    smooth = smooth / smooth.std().clamp(min=1e-6)
    pixel = torch.randn(h, w, generator=g)
    s = 1 + gain_variation * (0.7 * smooth + 0.7 * pixel)
    s = s.clamp(0.5, 1.5)
    hot = torch.stack([torch.randint(0, h, (n_hot_pixels,), generator=g), torch.randint(0, w, (n_hot_pixels,), generator=g)], -1)
    rates = 20 + 60 * torch.rand(n_hot_pixels, generator=g)
    return Detector(s, hot, rates)


@dataclass
class MovieTruth:
    """Ground truth of one movie; shifts in pixels (specimen displacement, y, x)."""

    name: str
    defocus_u: float
    defocus_v: float
    defocus_angle_deg: float
    stage_tilt_deg: float
    tilt_axis_deg: float
    ice_thickness_angstrom: float
    shifts_yx_px: torch.Tensor  # (t, 2)
    local_grid_yx_px: torch.Tensor  # (gy, gx, 2) positions of the local-motion control points
    local_shifts_yx_px: torch.Tensor  # (t, gy, gx, 2) local displacement (add the global shift)
    particles: dict = field(default_factory=dict)  # columns: coords_yx_px (n,2), euler_deg (n,3), defocus_u/v/angle, structure, diameter
    reference: torch.Tensor | None = None  # (h, w) noiseless micrograph
    carbon_mask: torch.Tensor | None = None  # (h, w) bool, True on the carbon film (None: no carbon)


def _default_defocus_step(settings: SimulationSettings) -> float:
    if settings.defocus_step_angstrom:
        return float(settings.defocus_step_angstrom)
    lam = electron_wavelength_angstrom(settings.voltage_kv)
    k_nyq = 0.5 / settings.pixel_size_angstrom
    return max(5.0, 2 * 0.1 / (math.pi * lam * k_nyq**2))


def _footprint_cells(xy_px: torch.Tensor, cell: float, dilate: int) -> np.ndarray:
    """Occupied coarse cells (relative to the particle centre) of projected atoms ``(n, 2)`` (x, y),
    dilated by ``dilate`` cells → ``(m, 2)`` int (iy, ix)."""
    c = np.floor(xy_px.numpy() / cell).astype(np.int64)  # (n, 2) ix, iy
    lo = c.min(0) - dilate
    hi = c.max(0) + dilate
    occ = np.zeros((hi[1] - lo[1] + 1, hi[0] - lo[0] + 1), dtype=bool)
    occ[c[:, 1] - lo[1], c[:, 0] - lo[0]] = True
    out = occ.copy()
    for dy in range(-dilate, dilate + 1):
        for dx in range(-dilate, dilate + 1):
            out |= np.roll(np.roll(occ, dy, 0), dx, 1)  # padding of `dilate` prevents wrap-around
    iy, ix = np.nonzero(out)
    return np.stack([iy + lo[1], ix + lo[0]], -1)


def _place(footprints: list[np.ndarray], shape_cells: tuple[int, int], margin_cells: int, cell: float,
           g: torch.Generator, tries: int = 60, blocked: np.ndarray | None = None) -> list[tuple[float, float] | None]:
    """Random non-overlapping placement of footprints on a coarse occupancy grid → centres (y, x) in px or None.
    ``blocked``: cells ``shape_cells`` bool where nothing may be placed (the carbon film)."""
    occ = np.zeros(shape_cells, dtype=bool) if blocked is None else blocked.copy()
    out = []
    hc, wc = shape_cells
    for fp in footprints:
        placed = None
        lo = margin_cells - fp.min(0)
        hi = np.array([hc, wc]) - margin_cells - fp.max(0)
        if np.all(hi > lo):
            for _ in range(tries):
                u = torch.rand(2, generator=g).numpy()
                pos = np.floor(lo + u * (hi - lo)).astype(int)
                cells = fp + pos
                if not occ[cells[:, 0], cells[:, 1]].any():
                    occ[cells[:, 0], cells[:, 1]] = True
                    frac = torch.rand(2, generator=g).numpy()
                    placed = ((pos[0] + frac[0]) * cell, (pos[1] + frac[1]) * cell)
                    break
        out.append(placed)
    return out


def _drift_trajectory(n_frames: int, max_drift_px: float, g: torch.Generator) -> torch.Tensor:
    """Smooth random trajectory ``(t, 2)`` (y, x) px, s_1 = 0, fast early and slowing; path length ≤ max."""
    if n_frames == 1 or max_drift_px <= 0:
        return torch.zeros(n_frames, 2)
    t = torch.arange(1, n_frames, dtype=torch.float32)
    speed = torch.exp(-(t - 1) / max(1.0, n_frames / 5)) + 0.15
    turn = torch.cumsum(torch.randn(n_frames - 1, generator=g) * math.radians(12), 0)
    angle = 2 * math.pi * float(torch.rand(1, generator=g)) + turn
    steps = torch.stack([torch.sin(angle), torch.cos(angle)], -1) * speed[:, None]
    length = max_drift_px * (0.4 + 0.6 * float(torch.rand(1, generator=g)))
    steps = steps / steps.norm(dim=1).sum() * length
    return torch.cat([torch.zeros(1, 2), torch.cumsum(steps, 0)])


def _local_motion(n_frames: int, grid: int, amplitude_px: float, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Local motion as ``(profile (t,), final (grid, grid, 2))``: control-point displacements (y, x) px at frame t
    are ``profile[t] · final`` — zero mean over the grid, 0 at frame 1, growing smoothly (faster early)."""
    final = torch.randn(grid, grid, 2, generator=g)
    final = final - final.mean((0, 1))
    final = final * (amplitude_px / final.norm(dim=-1).max().clamp(min=1e-6))  # largest local deviation = amplitude
    t = torch.arange(n_frames, dtype=torch.float32)
    tau = max(1.0, n_frames / 4)
    prof = (1 - torch.exp(-t / tau)) / max(1e-6, 1 - math.exp(-(n_frames - 1) / tau)) if n_frames > 1 else t
    return prof, final


class MovieSimulator:
    """Simulates movie ``index`` of a dataset; ``frames()`` yields raw counts frame by frame.

    Use :meth:`truth` for the ground truth; memory stays at a few full-size frames.
    """

    def __init__(self, settings: SimulationSettings, index: int, detector: Detector | None = None,
                 models: list[Atoms] | None = None):
        self.s = settings
        self.index = index
        self.models = models if models is not None else [load_atoms(n) for n in settings.structures]
        self.detector = detector or make_detector(settings.image_shape_px, settings.gain_variation, settings.n_hot_pixels, settings.seed)
        self.g = torch.Generator().manual_seed(int(settings.seed) * 1_000_003 + int(index) + 1)
        ext = "tif" if settings.movie_format == "tiff" else "mrc"
        self.name = f"{settings.movie_prefix}_{index + 1:04d}.{ext}"
        self._prepare()

    # ------------------------------------------------------------------ setup
    def _prepare(self) -> None:
        s, g = self.s, self.g
        h, w = s.image_shape_px
        p = s.pixel_size_angstrom
        # micrograph parameters
        lo, hi = s.defocus_range_angstrom
        du = lo + (hi - lo) * float(torch.rand(1, generator=g))
        dv = du - s.max_astigmatism_angstrom * float(torch.rand(1, generator=g))
        dang = 180.0 * float(torch.rand(1, generator=g))
        axis = s.tilt_axis_deg if s.tilt_axis_deg is not None else 180.0 * float(torch.rand(1, generator=g))
        tlo, thi = s.ice_thickness_range_angstrom
        thick = tlo + (thi - tlo) * float(torch.rand(1, generator=g))
        self.drift = _drift_trajectory(s.n_frames, s.max_drift_angstrom / p, g)
        grid = 5
        self.local_profile, self.local_final = _local_motion(s.n_frames, grid, s.local_motion_angstrom / p, g)
        self.local = self.local_profile[:, None, None, None] * self.local_final  # (t, grid, grid, 2)
        gy = torch.linspace(0, h - 1, grid)
        gx = torch.linspace(0, w - 1, grid)
        self.local_grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij"), -1)

        # particles and junk: orientations, footprints, placement
        n_p, n_j = s.particles_per_micrograph, s.junk_per_micrograph
        diam = [particle_diameter_angstrom(m) for m in self.models]
        kinds = torch.randint(0, len(self.models), (n_p,), generator=g).tolist() if self.models else []
        junk_models = [  # half amorphous clumps, half clumps of fragments of the structures
            random_aggregate(float(np.mean(diam)) * (0.6 + 0.6 * float(torch.rand(1, generator=g))), generator=g,
                             source=self.models[j % len(self.models)] if self.models and j % 2 else None)
            for j in range(n_j)
        ]
        objects = [(self.models[k], self.models[k].name, diam[k]) for k in kinds]
        objects += [(m, "junk", particle_diameter_angstrom(m)) for m in junk_models]
        rots = random_rotations(len(objects), generator=g)
        cell = max(2.0, 4.0 / p)  # occupancy cell (px): footprints dilated by one cell keep ≥ ~4 Å gaps
        margin_cells = int(math.ceil((s.max_drift_angstrom / p + 4) / cell)) + 1
        # junk first (big, few) would bias; shuffle order
        order = torch.randperm(len(objects), generator=g).tolist()
        footprints = []
        rotated_xy = []
        for i in order:
            atoms = objects[i][0]
            xyz = atoms.coords @ rots[i].T / p  # (n, 3) image coordinates, px
            rotated_xy.append(xyz[:, :2])
            footprints.append(_footprint_cells(xyz[:, :2], cell, 1))
        shape_cells = (int(h // cell), int(w // cell))
        self.carbon_potential, self.carbon_mask, blocked = None, None, None
        if s.carbon_coverage > 0:  # own random stream: the rest of the micrograph is as without carbon
            gc = torch.Generator().manual_seed(int(s.seed) * 3_000_017 + int(self.index) + 11)
            self.carbon_pad_px = max(h, w) // 2
            self.carbon_potential, self.carbon_mask = physics.carbon_edge_potential(
                (h, w), p, s.carbon_coverage, s.carbon_thickness_angstrom, generator=gc, pad_px=self.carbon_pad_px)
            # a cell is blocked when any of its pixels is on carbon: max over the cell's forward window
            nc = int(math.ceil(cell)) + 1
            m = F.max_pool2d(F.pad(self.carbon_mask[None, None].float(), (0, nc, 0, nc)), nc, stride=1)[0, 0]
            iy = (torch.arange(shape_cells[0]) * cell).long()
            ix = (torch.arange(shape_cells[1]) * cell).long()
            blocked = m[iy][:, ix].bool().numpy()
        centres = _place(footprints, shape_cells, margin_cells, cell, g, blocked=blocked)
        self.objects = []  # (atoms, name, diameter, rotation, centre_yx, xy_rot)
        for j, i in enumerate(order):
            if centres[j] is None:
                continue
            self.objects.append((objects[i][0], objects[i][1], objects[i][2], rots[i], centres[j], rotated_xy[j]))
        # heights in the ice, defocus per object
        dfc = 0.5 * (du + dv)
        tilt = math.radians(s.stage_tilt_deg)
        nrm = (-math.sin(math.radians(axis)), math.cos(math.radians(axis)))  # (x, y) direction of increasing defocus

        def plane(y, x):
            return math.tan(tilt) * p * ((x - w / 2) * nrm[0] + (y - h / 2) * nrm[1])

        dz = []
        for obj in self.objects:
            spread = max(0.0, thick - obj[2]) / 2 if s.particle_height_spread else 0.0
            dz.append(plane(*obj[4]) + spread * (2 * float(torch.rand(1, generator=g)) - 1))
        self.obj_defocus_offset = torch.tensor(dz, dtype=torch.float32)
        self.params = dict(defocus_u=du, defocus_v=dv, defocus_angle_deg=dang, tilt_axis_deg=axis,
                           ice_thickness_angstrom=thick, plane=plane)
        self.ice_ft_seed = int(torch.randint(0, 2**62, (1,), generator=g))
        self._signal_prepared = False

    def _prepare_signal(self) -> None:
        """Projected potential → CTF per defocus slab → Fourier-space contrast of specimen and ice."""
        s = self.s
        h, w = s.image_shape_px
        p = s.pixel_size_angstrom
        par = self.params
        thick = par["ice_thickness_angstrom"]
        v_ice = physics.ice_mean_potential_volt() if thick > 0 else 0.0
        os_ = s.oversampling
        while os_ > 1 and h * w * os_**2 > 20_000_000:  # memory: one oversampled frame per element
            os_ -= 1
        # all objects' atoms on one canvas, per element (union of element lists)
        elements = tuple(sorted(set(e for o in self.objects for e in o[0].elements))) or ("C",)
        pos, chans, owner = [], [], []
        for k, (atoms, _name, _d, _r, (cy, cx), xy) in enumerate(self.objects):
            remap = torch.tensor([elements.index(e) for e in atoms.elements])
            pos.append(torch.stack([xy[:, 1] + cy, xy[:, 0] + cx], -1))
            chans.append(remap[atoms.element_index])
            owner.append(torch.full((atoms.n_atoms,), k, dtype=torch.int64))
        if pos:
            pos_t = torch.cat(pos)
            vp = _render(pos_t[None], torch.cat(chans), elements, (h, w), p, os_, s.bfactor_angstrom2, v_ice,
                         17.0, 1.2)[0]
            # object label map (dilated footprint) for splitting into defocus slabs
            label = torch.zeros(h * w, dtype=torch.float32)
            own = torch.cat(owner)
            iy = pos_t[:, 0].round().long().clamp(0, h - 1)
            ix = pos_t[:, 1].round().long().clamp(0, w - 1)
            label[iy * w + ix] = (own + 1).float()
            r = int(math.ceil(4.0 / p))
            label = F.max_pool2d(label.view(1, 1, h, w), 2 * r + 1, stride=1, padding=r)[0, 0].long()
        else:
            vp = torch.zeros(h, w)
            label = torch.zeros(h, w, dtype=torch.long)

        du, dv, da = par["defocus_u"], par["defocus_v"], par["defocus_angle_deg"]
        astig = du - dv
        dfc = 0.5 * (du + dv)
        step = _default_defocus_step(s)

        def ctf_at(mean_defocus: float) -> torch.Tensor:
            u = mean_defocus + astig / 2
            return calculate_ctf_2d(u, u - astig, da, s.voltage_kv, s.cs_mm, s.amplitude_contrast, p, (h, w),
                                    bfactor_angstrom2=s.envelope_bfactor_angstrom2)

        # specimen: one slab per defocus bin of the objects; the real-space slabs and their CTFs are kept so
        # that local motion can deform the specimen *before* the CTF acts (as in the microscope)
        spec_ft = torch.zeros(h, w // 2 + 1, dtype=torch.complex64)
        spec_parts, spec_ctfs = [], []
        if self.objects:
            off = self.obj_defocus_offset
            bins = torch.round(off / step).long()
            lut = torch.full((len(self.objects) + 1,), -(10**9), dtype=torch.long)
            lut[1:] = bins
            bin_map = lut[label]
            for b in torch.unique(bins).tolist():
                part = vp * (bin_map == b)
                ctf_b = ctf_at(dfc + b * step)
                spec_ft += torch.fft.rfft2(part) * ctf_b
                spec_parts.append(part)
                spec_ctfs.append(ctf_b)
        # ice: zero-mean fluctuations at the tilted plane (linear interpolation between slabs)
        gi = torch.Generator().manual_seed(self.ice_ft_seed)
        ice_ft = physics.ice_potential_ft((h, w), p, thick, gi)
        ice = torch.fft.irfft2(ice_ft, s=(h, w))
        ice_parts, ice_ctfs = [], []
        if s.stage_tilt_deg:
            yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
            plane_map = par["plane"](yy, xx) / step  # in slabs
            b0 = int(math.floor(float(plane_map.min())))
            b1 = int(math.ceil(float(plane_map.max())))
            ice_ctf_ft = torch.zeros_like(ice_ft)
            for b in range(b0, b1 + 1):
                wgt = (1 - (plane_map - b).abs()).clamp(min=0)
                if float(wgt.max()) > 0:
                    ctf_b = ctf_at(dfc + b * step)
                    ice_ctf_ft += torch.fft.rfft2(ice * wgt) * ctf_b
                    ice_parts.append(ice * wgt)
                    ice_ctfs.append(ctf_b)
        else:
            ctf_c = ctf_at(dfc)
            ice_ctf_ft = ice_ft * ctf_c
            ice_parts.append(ice)
            ice_ctfs.append(ctf_c)
        # the carbon film at a hole edge (not deformed locally): CTF at the centre's defocus on a grid extended
        # beyond the image (its step must not wrap around the periodic boundary), cropped, added to the ice
        self.carbon_ctf_ft = None
        if self.carbon_potential is not None:
            pad = self.carbon_pad_px
            big = self.carbon_potential.shape
            u = dfc + astig / 2
            ctf_big = calculate_ctf_2d(u, u - astig, da, s.voltage_kv, s.cs_mm, s.amplitude_contrast, p, big,
                                       bfactor_angstrom2=s.envelope_bfactor_angstrom2)
            carbon = torch.fft.irfft2(torch.fft.rfft2(self.carbon_potential) * ctf_big, s=big)[pad : pad + h, pad : pad + w]
            self.carbon_ctf_ft = torch.fft.rfft2(carbon)
            ice_ctf_ft = ice_ctf_ft + self.carbon_ctf_ft
        self._slabs = (spec_parts, spec_ctfs, ice_parts, ice_ctfs)
        self.scale = physics.contrast_scale(s.voltage_kv, s.amplitude_contrast, thick, s.energy_filter)
        self.n0 = physics.mean_counts_per_pixel(s.dose_per_frame, p, thick, s.voltage_kv, s.energy_filter)
        self.spec_ft = spec_ft  # V·Å after CTF, Fourier
        self.ice_ctf_ft = ice_ctf_ft
        self._signal_prepared = True

    # ------------------------------------------------------------------ outputs
    def contrast_reference(self) -> torch.Tensor:
        """Noise-free fractional contrast ``C`` (h, w) of the undamaged specimen in frame-1 coordinates."""
        if not self._signal_prepared:
            self._prepare_signal()
        h, w = self.s.image_shape_px
        return -self.scale * torch.fft.irfft2(self.spec_ft + self.ice_ctf_ft, s=(h, w))

    def reference_micrograph(self) -> torch.Tensor:
        """``n_frames · N₀ · (1 + C)`` (h, w): the noiseless, motion-free, damage-free sum of gain-corrected counts."""
        c = self.contrast_reference()
        return self.s.n_frames * self.n0 * (1 + c)

    def expected_frames(self) -> Iterator[torch.Tensor]:
        """Expected gain-corrected counts per frame ``(h, w)`` (damage and motion applied, no noise)."""
        if not self._signal_prepared:
            self._prepare_signal()
        s = self.s
        h, w = s.image_shape_px
        p = s.pixel_size_angstrom
        ne = critical_exposure(frequency_radius_2d((h, w), p), s.voltage_kv)
        use_local = s.local_motion_angstrom > 0 and s.n_frames > 1
        if use_local:
            base_y, base_x = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
            # the local field is (time profile) × (final field): interpolate the final field once
            full_final = F.interpolate(self.local_final.permute(2, 0, 1)[None], size=(h, w), mode="bicubic",
                                       align_corners=True)[0]  # (2, h, w)
            spec_parts, spec_ctfs, ice_parts, ice_ctfs = self._slabs
            n_spec = len(spec_parts)
            parts = torch.stack(spec_parts + ice_parts)[None]  # (1, C, h, w) potential before the CTF
            ctfs = torch.stack(spec_ctfs + ice_ctfs)  # (C, h, w//2+1)
        for t in range(s.n_frames):
            dose = (t + 0.5) * s.dose_per_frame
            damage = torch.exp(-dose / (2 * ne))
            if use_local and t > 0:
                # the specimen (and the ice) deform smoothly; the CTF then acts on the deformed specimen, so
                # Thon rings keep their spacing (warping the image after the CTF would stretch them)
                d = full_final * float(self.local_profile[t])  # (2, h, w) y, x displacement, px
                grid = torch.stack([2 * (base_x - d[1]) / (w - 1) - 1, 2 * (base_y - d[0]) / (h - 1) - 1], -1)[None]
                warped = F.grid_sample(parts, grid, mode="bicubic", padding_mode="border", align_corners=True)[0]
                fts = torch.fft.rfft2(warped) * ctfs  # (C, h, w//2+1)
                ft = fts[:n_spec].sum(0) * damage + fts[n_spec:].sum(0)
                if self.carbon_ctf_ft is not None:
                    ft = ft + self.carbon_ctf_ft
                del warped, fts
            else:
                ft = self.spec_ft * damage + self.ice_ctf_ft
            ft = ft * phase_shift_2d(self.drift[t], (h, w))
            c = -self.scale * torch.fft.irfft2(ft, s=(h, w))
            yield self.n0 * (1 + c)

    def frames(self) -> Iterator[torch.Tensor]:
        """Raw detector counts per frame, ``(h, w)`` int32: Poisson(λ·sensitivity) plus hot pixels."""
        det = self.detector
        gn = torch.Generator().manual_seed(int(self.s.seed) * 2_000_003 + int(self.index) + 7)
        hy, hx = det.hot_pixels_yx[:, 0], det.hot_pixels_yx[:, 1]
        for lam in self.expected_frames():
            counts = torch.poisson((lam * det.sensitivity).clamp(min=0), generator=gn)
            if len(hy):
                counts[hy, hx] = torch.poisson(det.hot_rates, generator=gn)
            yield counts.to(torch.int32)

    def truth(self) -> MovieTruth:
        """Ground truth (computes the reference micrograph if not done yet)."""
        s = self.s
        par = self.params
        ref = self.reference_micrograph()
        objs = self.objects
        if objs:
            coords = torch.tensor([o[4] for o in objs], dtype=torch.float32)
            rots = torch.stack([o[3] for o in objs])
            eul = matrix_to_euler_angles(rots)
        else:
            coords = torch.zeros(0, 2)
            eul = torch.zeros(0, 3)
        off = self.obj_defocus_offset
        particles = dict(
            coords_yx_px=coords,
            euler_deg=eul,
            rotations=torch.stack([o[3] for o in objs]) if objs else torch.zeros(0, 3, 3),
            defocus_u=par["defocus_u"] + off,
            defocus_v=par["defocus_v"] + off,
            defocus_angle_deg=torch.full((len(objs),), par["defocus_angle_deg"]),
            structure=[o[1] for o in objs],
            diameter_angstrom=torch.tensor([o[2] for o in objs], dtype=torch.float32),
        )
        return MovieTruth(
            name=self.name,
            defocus_u=par["defocus_u"],
            defocus_v=par["defocus_v"],
            defocus_angle_deg=par["defocus_angle_deg"],
            stage_tilt_deg=s.stage_tilt_deg,
            tilt_axis_deg=par["tilt_axis_deg"],
            ice_thickness_angstrom=par["ice_thickness_angstrom"],
            shifts_yx_px=self.drift.clone(),
            local_grid_yx_px=self.local_grid.clone(),
            local_shifts_yx_px=self.local.clone(),
            particles=particles,
            reference=ref,
            carbon_mask=None if self.carbon_mask is None else self.carbon_mask.clone(),
        )


__all__ = ["SimulationSettings", "MovieSimulator", "MovieTruth", "Detector", "make_detector"]
