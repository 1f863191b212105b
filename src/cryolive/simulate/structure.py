"""Atomic models → electrostatic (Coulomb) potential: projections and maps for simulation.

Physics
-------
Electron scattering factors are the 5-Gaussian fits of International Tables Vol. C, Table 4.3.2.2
(Peng et al. 1996, as tabulated by gemmi: ``gemmi.Element(x).c4322``),
``f_e(s) = Σ_i a_i exp(-b_i s²)`` in Å with ``s = sinθ/λ = q/2`` (``q = |k|`` in 1/Å).
The potential of an atom is ``V(r) = (h² / 2π m₀ e) ∫ f_e(q) exp(2πi q·r) d³q`` with
``h² / (2π m₀ e) = 2π a₀ e = 47.878 V·Å²`` (Kirkland, *Advanced Computing in Electron Microscopy*).
Hence the 2D Fourier transform of the *projected* potential of one atom is ``47.878 · f_e(|k|)``
(V·Å³), and its integral over the image plane is ``47.878 · Σ a_i``.

An optional isotropic B-factor multiplies ``f_e`` by ``exp(-B q²/4)``. An optional solvent
(ice) displacement subtracts, for every atom, the potential of the water it displaces:
``V_solvent · v_atom`` times a normalised Gaussian of width ``σ`` (so particles in ice have the
contrast of ``V_protein − V_ice``).

Geometry follows :mod:`cryolive.geometry`: ``A`` maps atom coordinates (x, y, z), Å, centred on
the centre of mass, to image coordinates; projections integrate over the new z. Image column
``= x'/pixel + box//2 + shift_x``, row ``= y'/pixel + box//2 + shift_y``. Maps are indexed
``(z, y, x)`` as mrcfile writes them, with the centre at voxel ``box//2`` on each axis.

Implementation: atoms are spread (bilinear / trilinear weights) on a grid oversampled ``oversampling``
times, per element; the grids are Fourier transformed, cropped to the output band, multiplied by
each element's form factor (divided by the interpolation kernel's transform, ``sinc²``), summed and
transformed back. Batched over projections, chunked to bound memory. Output values are samples, at
pixel centres, of the potential band-limited to the output Nyquist frequency (no pixel-area average;
detector MTF and other imaging envelopes belong to the image simulators).
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

#: h² / (2π m₀ e) = 2π a₀ e in V·Å² (Kirkland 2010): converts f_e (Å) into potential (V·Å³).
POTENTIAL_PER_SCATTERING_FACTOR = 47.8788

#: Built-in models shipped in ``cryolive/data``.
BUILTIN_STRUCTURES = ("6ny1", "3j5p")

#: Volume of solvent one (heavy) atom of a biomolecule displaces, Å³ (≈ 14 Da per heavy atom incl.
#: its hydrogens at a partial specific volume of 0.73 cm³/g).
DEFAULT_ATOM_VOLUME_ANGSTROM3 = 17.0


@dataclass(frozen=True)
class Atoms:
    """An atomic model ready for simulation.

    Attributes:
        coords: ``(n, 3)`` float32 tensor, Å, (x, y, z), centred on the centre of mass.
        element_index: ``(n,)`` int64 tensor indexing ``elements``.
        elements: element symbols present, e.g. ``("C", "N", "O", "S")``.
        name: a short name ("6ny1", a file stem, or "junk").
    """

    coords: torch.Tensor
    element_index: torch.Tensor
    elements: tuple[str, ...]
    name: str = "model"

    @property
    def n_atoms(self) -> int:
        return int(self.coords.shape[0])

    @property
    def element_symbols(self) -> np.ndarray:
        """Per-atom element symbol, ``(n,)`` array of str."""
        return np.asarray(self.elements, dtype=object)[self.element_index.numpy()]

    @staticmethod
    def from_arrays(coords, elements_per_atom, name: str = "model", centre: bool = True) -> "Atoms":
        """Build from ``coords (n, 3)`` Å and a per-atom sequence of element symbols.

        With ``centre=True`` the coordinates are moved so the centre of mass is at the origin.
        """
        xyz = torch.as_tensor(np.asarray(coords, dtype=np.float64)).reshape(-1, 3)
        raw_uniq, inverse = np.unique(np.asarray(elements_per_atom, dtype=str), return_inverse=True)
        norm = [_normalise_symbol(e) for e in raw_uniq]
        uniq = tuple(sorted(set(norm)))
        lookup = np.array([uniq.index(e) for e in norm], dtype=np.int64)
        idx = torch.as_tensor(lookup[inverse.reshape(-1)], dtype=torch.int64)
        if centre and len(idx):
            mass = torch.as_tensor([_element(e).weight for e in uniq], dtype=torch.float64)[idx]
            xyz = xyz - (xyz * mass[:, None]).sum(0) / mass.sum()
        return Atoms(xyz.to(torch.float32), idx, uniq, name)


def _normalise_symbol(symbol: str) -> str:
    s = str(symbol).strip()
    return s[:1].upper() + s[1:].lower() if s else "C"


@functools.lru_cache(maxsize=None)
def _element(symbol: str):
    import gemmi

    el = gemmi.Element(symbol)
    if el.atomic_number == 0:  # unknown element: treat as carbon
        el = gemmi.Element("C")
    return el


@functools.lru_cache(maxsize=None)
def electron_scattering_coefficients(symbol: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """5-Gaussian electron scattering coefficients ``(a (Å), b (Å²))`` of an element.

    International Tables Vol. C Table 4.3.2.2 (Peng et al. 1996), ``f_e(s) = Σ a_i exp(-b_i s²)``,
    ``s = sinθ/λ`` in 1/Å. Unknown elements fall back to carbon.
    """
    c = _element(_normalise_symbol(symbol)).c4322
    a, b = c.a, c.b
    if sum(a) == 0:  # not tabulated
        c = _element("C").c4322
        a, b = c.a, c.b
    return tuple(float(v) for v in a), tuple(float(v) for v in b)


def electron_scattering_factor(symbol: str, q_inv_angstrom: torch.Tensor) -> torch.Tensor:
    """``f_e`` (Å) of an element at spatial frequencies ``q = 1/d`` (1/Å), same shape as ``q``."""
    a, b = electron_scattering_coefficients(symbol)
    s2 = (q_inv_angstrom / 2) ** 2
    out = torch.zeros_like(q_inv_angstrom)
    for ai, bi in zip(a, b):
        out = out + ai * torch.exp(-bi * s2)
    return out


def _builtin_path(name: str) -> Path | None:
    key = name.lower()
    if key not in BUILTIN_STRUCTURES:
        return None
    ref = resources.files("cryolive") / "data" / f"{key}.pdb"
    return Path(str(ref))


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, name: str) -> Atoms:
    import gemmi

    st = gemmi.read_structure(path)
    st.remove_alternative_conformations()
    st.remove_hydrogens()
    st.remove_waters()
    if len(st) == 0:
        raise ValueError(f"no model in {path}")
    coords, symbols = [], []
    for chain in st[0]:
        for res in chain:
            for atom in res:
                p = atom.pos
                coords.append((p.x, p.y, p.z))
                symbols.append(atom.element.name)
    if not coords:
        raise ValueError(f"no atoms in {path}")
    return Atoms.from_arrays(np.asarray(coords), symbols, name=name)


def load_atoms(path_or_name: str | os.PathLike) -> Atoms:
    """Read a PDB/mmCIF file (or a built-in name, ``"6ny1"`` or ``"3j5p"``) → :class:`Atoms`.

    First model only; hydrogens, waters and alternative conformations are dropped; coordinates are
    centred on the centre of mass. Results are cached (treat the returned tensors as read-only).
    """
    if isinstance(path_or_name, Atoms):
        return path_or_name
    builtin = _builtin_path(str(path_or_name))
    if builtin is not None:
        return _load_cached(str(builtin), str(path_or_name).lower())
    path = Path(path_or_name)
    if not path.exists():
        raise FileNotFoundError(f"no structure file {path} (built-in names: {', '.join(BUILTIN_STRUCTURES)})")
    return _load_cached(str(path.resolve()), path.stem.split(".")[0])


def particle_diameter_angstrom(atoms: Atoms) -> float:
    """Diameter (Å) of the sphere around the centre of mass that holds every atom, plus 2 Å of atom size."""
    if atoms.n_atoms == 0:
        return 0.0
    return float(2 * atoms.coords.norm(dim=1).max() + 2.0)


# ----------------------------------------------------------------------------------------------
# kernels


def _form_factor_kernels(
    elements: tuple[str, ...],
    q: torch.Tensor,
    bfactor_angstrom2: float,
    solvent_potential_volt: float,
    atom_volume_angstrom3: float,
    solvent_sigma_angstrom: float,
) -> torch.Tensor:
    """Fourier transform (V·Å³) of the projected potential of one atom of each element: ``(E, *q.shape)``."""
    out = []
    solvent = None
    if solvent_potential_volt:
        solvent = solvent_potential_volt * atom_volume_angstrom3 * torch.exp(-2 * math.pi**2 * solvent_sigma_angstrom**2 * q**2)
    bf = torch.exp(-bfactor_angstrom2 * q**2 / 4) if bfactor_angstrom2 else None
    for e in elements:
        k = POTENTIAL_PER_SCATTERING_FACTOR * electron_scattering_factor(e, q)
        if bf is not None:
            k = k * bf
        if solvent is not None:
            k = k - solvent
        out.append(k)
    return torch.stack(out)


def _sinc(x: torch.Tensor) -> torch.Tensor:
    return torch.sinc(x)  # sin(πx)/(πx)


def _crop_rfft(ft: torch.Tensor, big: tuple[int, ...], small: tuple[int, ...]) -> torch.Tensor:
    """Crop an rfftn spectrum ``(..., *big[:-1], big[-1]//2+1)`` to the band of ``small`` (all even)."""
    if tuple(big) == tuple(small):
        return ft
    nd = len(big)
    out = ft[..., : small[-1] // 2 + 1]
    for ax in range(nd - 1):
        dim = ft.dim() - nd + ax
        n, m = big[ax], small[ax]
        lo = out.narrow(dim, 0, m // 2)
        hi = out.narrow(dim, n - m // 2, m // 2)
        out = torch.cat([lo, hi], dim=dim)
    return out


def _rfft_freqs(shape: tuple[int, ...], spacing: float) -> list[torch.Tensor]:
    """Frequency grids (1/Å) of an rfftn of ``shape`` with sample ``spacing`` Å, broadcastable."""
    axes = []
    nd = len(shape)
    for ax, n in enumerate(shape):
        f = torch.fft.rfftfreq(n, d=spacing) if ax == nd - 1 else torch.fft.fftfreq(n, d=spacing)
        view = [1] * nd
        view[ax] = -1
        axes.append(f.view(view))
    return axes


def _scatter_linear(
    grid: torch.Tensor, pos: torch.Tensor, channel: torch.Tensor, shape: tuple[int, ...]
) -> None:
    """Add unit weights of points ``pos (b, n, d)`` (grid units, axes in the order of ``shape``) into the
    flat ``grid (b·C·prod(shape),)`` with (bi/tri)linear weights; ``channel (n,)`` picks the channel.

    Points (corners) outside the grid get zero weight.
    """
    b, n, d = pos.shape
    base_f = torch.floor(pos)
    frac = pos - base_f
    base = base_f.long()
    n_ch = grid.numel() // (b * math.prod(shape))
    offset = (torch.arange(b).view(b, 1) * n_ch + channel.view(1, n)) * math.prod(shape)  # (b, n)
    # per axis and corner bit: flat index term and weight (zero outside the grid)
    terms = []
    stride = 1
    strides = [0] * d
    for ax in reversed(range(d)):
        strides[ax] = stride
        stride *= shape[ax]
    for ax in range(d):
        per_bit = []
        b_ax = base[..., ax]
        all_inside = bool(b_ax.min() >= 0) and bool(b_ax.max() + 1 < shape[ax])  # fast path: no masking
        for bit in (0, 1):
            i = b_ax + bit
            w = frac[..., ax] if bit else 1 - frac[..., ax]
            if all_inside:
                per_bit.append((i * strides[ax], w))
            else:
                inside = (i >= 0) & (i < shape[ax])
                per_bit.append((i.clamp_(0, shape[ax] - 1) * strides[ax], w * inside))
        terms.append(per_bit)
    for corner in range(2**d):
        idx = offset
        w = None
        for ax in range(d):
            it, wt = terms[ax][(corner >> ax) & 1]
            idx = idx + it
            w = wt if w is None else w * wt
        grid.index_add_(0, idx.reshape(-1), w.reshape(-1))


def _render(
    pos_grid: torch.Tensor,
    element_index: torch.Tensor,
    elements: tuple[str, ...],
    out_shape: tuple[int, ...],
    pixel_size_angstrom: float,
    oversampling: int,
    bfactor_angstrom2: float,
    solvent_potential_volt: float,
    atom_volume_angstrom3: float,
    solvent_sigma_angstrom: float,
) -> torch.Tensor:
    """Potential sampled on ``out_shape`` from points ``pos_grid (b, n, d)`` in output-pixel units
    (axis order as ``out_shape``) → ``(b, *out_shape)``; 2D: V·Å (projected), 3D: V."""
    b, n, d = pos_grid.shape
    os_ = int(oversampling)
    big = tuple(s * os_ for s in out_shape)
    dims = tuple(range(-d, 0))
    fine = pixel_size_angstrom / os_
    freqs = _rfft_freqs(out_shape, pixel_size_angstrom)
    q = torch.sqrt(sum(f**2 for f in freqs))
    kernels = _form_factor_kernels(
        elements, q, bfactor_angstrom2, solvent_potential_volt, atom_volume_angstrom3, solvent_sigma_angstrom
    )  # (E, ...) V·Å³ per atom
    interp = 1.0
    for f in freqs:
        interp = interp * _sinc(f * fine) ** 2
    kernels = kernels / interp / fine**d  # unit weights per fine cell → per Å^d
    total = None
    # one element at a time keeps memory at one (b, *big) grid
    for e in range(len(elements)):
        sel = element_index == e
        if not bool(sel.any()):
            continue
        grid = torch.zeros(b * math.prod(big), dtype=torch.float32)
        # a point at output coordinate u sits at oversampled coordinate u·os (pixel centres coincide at 0)
        _scatter_linear(grid, pos_grid[:, sel] * os_, torch.zeros(int(sel.sum()), dtype=torch.int64), big)
        ft = torch.fft.rfftn(grid.view(b, *big), dim=dims)
        del grid
        ft = _crop_rfft(ft, big, out_shape) * kernels[e]
        total = ft if total is None else total + ft
    if total is None:
        return torch.zeros(b, *out_shape)
    scale = math.prod(out_shape) / math.prod(big)
    return torch.fft.irfftn(total, s=out_shape, dim=dims) * scale


def _chunk_size(n_atoms: int, n_el: int, grid_numel: int) -> int:
    by_atoms = max(1, 2_000_000 // max(n_atoms, 1))
    by_grid = max(1, 16_000_000 // max(grid_numel, 1))
    return max(1, min(by_atoms, by_grid))


def project_atoms_2d(
    atoms: Atoms,
    rotations: torch.Tensor,
    box_px: int,
    pixel_size_angstrom: float,
    shifts_yx_px: torch.Tensor | None = None,
    bfactor_angstrom2: float = 0.0,
    solvent_potential_volt: float = 0.0,
    oversampling: int = 2,
    atom_volume_angstrom3: float = DEFAULT_ATOM_VOLUME_ANGSTROM3,
    solvent_sigma_angstrom: float = 1.2,
) -> torch.Tensor:
    """Projected potential (V·Å) of ``atoms`` in ``b`` orientations → ``(b, box_px, box_px)`` float32.

    Args:
        atoms: the model (coordinates in Å about the centre of mass).
        rotations: ``(b, 3, 3)`` (or ``(3, 3)``) matrices ``A`` of :mod:`cryolive.geometry`
            (atom ``r`` → image ``A r``; projection along the new z).
        box_px: output box (even), the centre of mass lands at pixel ``(box//2, box//2)`` + shift.
        pixel_size_angstrom: Å per pixel.
        shifts_yx_px: optional ``(b, 2)`` shifts (y, x) in pixels, content moved by ``+shift``.
        bfactor_angstrom2: isotropic B-factor applied to every atom (Å²).
        solvent_potential_volt: mean potential of the embedding solvent (ice ≈ 4.6 V); when > 0 each
            atom displaces ``atom_volume_angstrom3`` of it (contrast relative to the solvent).
        oversampling: spreading grid oversampling (2 is accurate to a few 1e-3; 1 is faster).
    """
    rot = rotations.to(torch.float32)
    if rot.dim() == 2:
        rot = rot[None]
    b = rot.shape[0]
    if box_px % 2:
        raise ValueError("box_px must be even")
    shifts = None if shifts_yx_px is None else torch.as_tensor(shifts_yx_px, dtype=torch.float32).reshape(b, 2)
    xyz = atoms.coords
    centre = box_px // 2
    chunk = _chunk_size(atoms.n_atoms, len(atoms.elements), (box_px * oversampling) ** 2)
    out = []
    for start in range(0, b, chunk):
        r = rot[start : start + chunk]
        img = torch.einsum("bij,nj->bni", r[:, :2, :], xyz) / pixel_size_angstrom  # (c, n, 2) x', y'
        pos = torch.stack([img[..., 1], img[..., 0]], -1) + centre  # (c, n, 2) row, col
        if shifts is not None:
            pos = pos + shifts[start : start + chunk, None, :]
        out.append(
            _render(
                pos, atoms.element_index, atoms.elements, (box_px, box_px), pixel_size_angstrom, oversampling,
                bfactor_angstrom2, solvent_potential_volt, atom_volume_angstrom3, solvent_sigma_angstrom,
            )
        )
    return torch.cat(out, 0)


def atoms_to_volume(
    atoms: Atoms,
    box_px: int,
    pixel_size_angstrom: float,
    bfactor_angstrom2: float = 0.0,
    solvent_potential_volt: float = 0.0,
    oversampling: int = 2,
    atom_volume_angstrom3: float = DEFAULT_ATOM_VOLUME_ANGSTROM3,
    solvent_sigma_angstrom: float = 1.2,
) -> torch.Tensor:
    """Coulomb potential map (V) of ``atoms`` → ``(box, box, box)`` float32 indexed ``(z, y, x)``.

    The centre of mass is at voxel ``(box//2,)*3``. ``volume.sum(0) * pixel_size_angstrom`` equals
    ``project_atoms_2d(atoms, identity, box, pixel_size)[0]`` (same band limit and sampling).
    """
    if box_px % 2:
        raise ValueError("box_px must be even")
    xyz = atoms.coords / pixel_size_angstrom
    pos = torch.stack([xyz[:, 2], xyz[:, 1], xyz[:, 0]], -1)[None] + box_px // 2  # (1, n, 3) z, y, x
    return _render(
        pos, atoms.element_index, atoms.elements, (box_px,) * 3, pixel_size_angstrom, oversampling,
        bfactor_angstrom2, solvent_potential_volt, atom_volume_angstrom3, solvent_sigma_angstrom,
    )[0]


def random_aggregate(
    diameter_angstrom: float,
    generator: torch.Generator | None = None,
    n_blobs: int | None = None,
    density_per_angstrom3: float = 1.0 / DEFAULT_ATOM_VOLUME_ANGSTROM3,
    source: Atoms | None = None,
) -> Atoms:
    """A junk "aggregate": a clump of 2–7 overlapping blobs inside a sphere of ``diameter_angstrom``.

    Without ``source`` each blob is amorphous protein-like matter: pseudo-atoms (C:N:O:S ≈ 62:17:20:1) at
    protein atom density. With ``source`` each blob is a fragment of that model (its atoms within a random
    sphere, randomly rotated) — broken and clumped particles. The result is centred like a model.
    """
    from ..geometry import random_rotations

    g = generator
    if n_blobs is None:
        n_blobs = int(torch.randint(2, 8, (1,), generator=g))
    radius = diameter_angstrom / 2
    pts, syms = [], []
    for _ in range(n_blobs):
        r_blob = radius * (0.25 + 0.3 * float(torch.rand(1, generator=g)))
        d = torch.randn(3, generator=g)
        centre = d / d.norm() * (radius - r_blob) * float(torch.rand(1, generator=g)) ** 0.5
        if source is not None and source.n_atoms:
            pick = source.coords[int(torch.randint(0, source.n_atoms, (1,), generator=g))]
            near = (source.coords - pick).norm(dim=1) < r_blob
            frag = source.coords[near] - pick
            rot = random_rotations(1, generator=g)[0]
            pts.append(frag @ rot.T + centre)
            syms.append(source.element_symbols[near.numpy()])
            continue
        n = int(density_per_angstrom3 * 4 / 3 * math.pi * r_blob**3)
        u = torch.randn(n, 3, generator=g)
        u = u / u.norm(dim=1, keepdim=True) * r_blob * torch.rand(n, 1, generator=g) ** (1 / 3)
        pts.append(u + centre)
        probs = torch.tensor([0.62, 0.17, 0.20, 0.01])
        idx = torch.multinomial(probs, n, replacement=True, generator=g)
        syms.append(np.array(["C", "N", "O", "S"])[idx.numpy()])
    xyz = torch.cat(pts)
    return Atoms.from_arrays(xyz.numpy(), np.concatenate(syms), name="junk")


__all__ = [
    "Atoms",
    "load_atoms",
    "particle_diameter_angstrom",
    "project_atoms_2d",
    "atoms_to_volume",
    "random_aggregate",
    "electron_scattering_factor",
    "electron_scattering_coefficients",
    "POTENTIAL_PER_SCATTERING_FACTOR",
]
