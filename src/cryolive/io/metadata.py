"""Acquisition metadata from EPU (per-movie XML) and SerialEM (``.mdoc``), and its check against the settings.

EPU writes ``GridSquare_<id>/Data/FoilHole_<hole>_Data_<area>_<n>_<date>_<time>.xml`` next to each movie
(``..._fractions.tiff`` / ``.eer``): a ``MicroscopeImage`` document whose lengths are in metres, angles in
radians and dose in electrons per m². SerialEM writes ``<movie>.mdoc`` (or one ``.mdoc`` per tilt series):
``key = value`` lines, a global header then ``[ZValue = n]`` / ``[FrameSet = n]`` sections; pixel spacing in
Å, defocus in µm (negative = underfocus), angles in degrees, dose in e/Å². Thermo Fisher software (EPU, Tomo,
Velox) writes MRC files whose extended header (``exttyp`` ``FEI1`` or ``FEI2``) holds one metadata block per
section: lengths in metres, HT in volts, dose in electrons per m², angles in degrees, exposure time in seconds
(:func:`read_fei_extended_header`; the block layout is mrcfile's ``FEI1`` dtype).

Everything becomes a :class:`MovieMetadata` in cryolive's units (Å, positive underfocus, degrees, e/Å²);
missing fields are ``None``. :func:`reconcile` lists where the settings given on the command line disagree
with the metadata; the command line wins, but never silently.

Examples::

    md = read_epu_xml("GridSquare_123/Data/FoilHole_456_Data_789_3_20240101_120000.xml")
    md.pixel_size_angstrom, md.total_dose, md.grid_square, md.foil_hole
    sections = read_mdoc("tilt_01.mdoc")            # one MovieMetadata per section
    read_fei_metadata("FoilHole_1_fractions.mrc")   # from the FEI1/FEI2 extended header, or None
    for d in reconcile(settings, md):
        log.warning(d.message)
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict


class MovieMetadata(BaseModel):
    """What the acquisition software says about one movie (``None`` where it says nothing)."""

    model_config = ConfigDict(frozen=True)

    source: str  # "epu", "serialem" or "fei" (MRC extended header); "epu+fei" when both filled it
    movie_name: str | None = None
    pixel_size_angstrom: float | None = None
    voltage_kv: float | None = None
    total_dose: float | None = None  # e/Å², whole exposure
    dose_rate: float | None = None  # as the software reports it (EPU: e/px/s on the camera; SerialEM: e/unbinned px/s)
    exposure_time_s: float | None = None
    n_frames: int | None = None
    defocus_target_angstrom: float | None = None  # positive = underfocus
    defocus_angstrom: float | None = None  # the microscope's current defocus value, positive = underfocus
    stage_tilt_deg: float | None = None  # alpha
    stage_position_um: tuple[float, float] | None = None  # x, y
    beam_shift: tuple[float, float] | None = None  # EPU BeamShift / FEI header Shift X, Y (microscope units)
    image_shift: tuple[float, float] | None = None  # SerialEM ImageShift (µm at the specimen)
    magnification: float | None = None
    grid_square: str | None = None
    foil_hole: str | None = None
    timestamp: str | None = None

    @property
    def dose_per_frame(self) -> float | None:
        if self.total_dose is None or not self.n_frames:
            return None
        return self.total_dose / self.n_frames


class MetadataError(ValueError):
    """A metadata file cannot be parsed at all (malformed XML, not an mdoc)."""


# ------------------------------------------------------------------------------------------------ EPU
def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el, *names):
    """Follow child elements by local name; None if any step is missing."""
    for name in names:
        if el is None:
            return None
        el = next((c for c in el if _local(c.tag) == name), None)
    return el


def _float(el) -> float | None:
    if el is None or el.text is None:
        return None
    try:
        return float(el.text.strip())
    except ValueError:
        return None


def _epu_custom_data(root) -> dict[str, str]:
    """EPU's ``CustomData``: ``KeyValueOfstringanyType`` pairs (Dose, AppliedDefocus, DoseOnCamera, ...)."""
    out = {}
    custom = next((el for el in root.iter() if _local(el.tag) == "CustomData"), None)
    if custom is None:
        return out
    for kv in custom:
        key, value = _child(kv, "Key"), _child(kv, "Value")
        if key is not None and key.text and value is not None and value.text is not None:
            out[key.text.strip()] = value.text.strip()
    return out


def _names_from_path(path: Path) -> tuple[str | None, str | None]:
    """Grid square and foil hole ids from an EPU path (``GridSquare_<id>/.../FoilHole_<id>_Data_...``)."""
    square = hole = None
    for part in path.parts:
        m = re.match(r"GridSquare_(\d+)", part)
        if m:
            square = m.group(1)
    m = re.match(r"FoilHole_(\d+)_", path.name)
    if m:
        hole = m.group(1)
    return square, hole


def read_epu_xml(path: str | os.PathLike) -> MovieMetadata:
    """Parse one EPU per-movie XML into :class:`MovieMetadata`. Raises :class:`MetadataError` if not XML."""
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise MetadataError(f"{path.name}: not a readable EPU XML file: {exc}") from exc
    micro = _child(root, "microscopeData")
    custom = _epu_custom_data(root)

    def custom_float(key):
        try:
            return float(custom[key])
        except (KeyError, ValueError):
            return None

    pixel_m = _float(_child(root, "SpatialScale", "pixelSize", "x", "numericValue"))
    voltage_v = _float(_child(micro, "gun", "AccelerationVoltage"))
    alpha_rad = _float(_child(micro, "stage", "Position", "A"))
    sx = _float(_child(micro, "stage", "Position", "X"))
    sy = _float(_child(micro, "stage", "Position", "Y"))
    bx = _float(_child(micro, "optics", "BeamShift", "_x"))
    by = _float(_child(micro, "optics", "BeamShift", "_y"))
    defocus_m = _float(_child(micro, "optics", "Defocus"))
    applied_m = custom_float("AppliedDefocus")
    dose_m2 = custom_float("Dose")
    square, hole = _names_from_path(path)
    timestamp = _child(micro, "acquisition", "acquisitionDateTime")
    import math

    return MovieMetadata(
        source="epu",
        movie_name=path.stem,
        pixel_size_angstrom=pixel_m * 1e10 if pixel_m else None,
        voltage_kv=voltage_v / 1000 if voltage_v else None,
        total_dose=dose_m2 * 1e-20 if dose_m2 is not None else None,
        dose_rate=custom_float("DoseOnCamera"),
        exposure_time_s=_float(_child(micro, "camera", "ExposureTime")),
        defocus_target_angstrom=-applied_m * 1e10 if applied_m is not None else None,
        defocus_angstrom=-defocus_m * 1e10 if defocus_m is not None else None,
        stage_tilt_deg=math.degrees(alpha_rad) if alpha_rad is not None else None,
        stage_position_um=(sx * 1e6, sy * 1e6) if sx is not None and sy is not None else None,
        beam_shift=(bx, by) if bx is not None and by is not None else None,
        magnification=_float(_child(micro, "optics", "TemMagnification", "NominalMagnification")),
        grid_square=square,
        foil_hole=hole,
        timestamp=timestamp.text.strip() if timestamp is not None and timestamp.text else None,
    )


# ------------------------------------------------------------------------------------------- SerialEM
def _parse_mdoc(text: str) -> tuple[dict[str, str], list[dict[str, str]]]:
    header: dict[str, str] = {}
    sections: list[dict[str, str]] = []
    current = header
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("[T ="):
            continue
        m = re.match(r"\[(\w+)\s*=\s*([^\]]*)\]", line)
        if m:
            current = {"_section": f"{m.group(1)} = {m.group(2).strip()}"}
            sections.append(current)
            continue
        if "=" in line:
            key, value = line.split("=", 1)
            current[key.strip()] = value.strip()
    return header, sections


def _numbers(value: str | None) -> list[float]:
    if value is None:
        return []
    out = []
    for tok in value.split():
        try:
            out.append(float(tok))
        except ValueError:
            return []
    return out


def read_mdoc(path: str | os.PathLike) -> list[MovieMetadata]:
    """Parse a SerialEM ``.mdoc``: one :class:`MovieMetadata` per section (header values fill the gaps).

    A file with only a header (no section) gives one entry. Raises :class:`MetadataError` if no
    ``key = value`` line is found.
    """
    path = Path(path)
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise MetadataError(f"{path.name}: unreadable mdoc: {exc}") from exc
    header, sections = _parse_mdoc(text)
    if not header and not sections:
        raise MetadataError(f"{path.name}: no 'key = value' lines; not a SerialEM mdoc")
    out = []
    for sec in sections or [{}]:
        d = {**header, **sec}

        def num(key, d=d):
            vals = _numbers(d.get(key))
            return vals[0] if vals else None

        def pair(key, d=d):
            vals = _numbers(d.get(key))
            return (vals[0], vals[1]) if len(vals) >= 2 else None

        sub = d.get("SubFramePath")
        name = re.split(r"[\\/]", sub)[-1] if sub else (path.name[:-5] if path.name.endswith(".mdoc") else None)
        target = num("TargetDefocus")
        defocus = num("Defocus")
        n_frames = num("NumSubFrames")
        stage = pair("StagePosition")
        out.append(MovieMetadata(
            source="serialem",
            movie_name=name,
            pixel_size_angstrom=num("PixelSpacing"),
            voltage_kv=num("Voltage"),
            total_dose=num("ExposureDose"),
            dose_rate=num("DoseRate"),
            exposure_time_s=num("ExposureTime"),
            n_frames=int(n_frames) if n_frames else None,
            defocus_target_angstrom=-target * 1e4 if target is not None else None,
            defocus_angstrom=-defocus * 1e4 if defocus is not None else None,
            stage_tilt_deg=num("TiltAngle"),
            stage_position_um=stage,
            image_shift=pair("ImageShift"),
            magnification=num("Magnification"),
            timestamp=d.get("DateTime"),
        ))
    return out


# ----------------------------------------------------------------------------- FEI extended MRC header
FEI_EXTENDED_HEADER_TYPES = (b"FEI1", b"FEI2")


def _fei_valid_bits(dtype) -> dict[str, tuple[str, int]]:
    """Field name → (bitmask field, bit) from the block layout: each ``Bitmask k`` flags the fields after it,
    in order, one bit each (the 48-byte unused range after the pixel size counts six); 32 bits per mask."""
    out, mask, bit = {}, None, 0
    for name in dtype.names:
        if name.startswith("Bitmask"):
            mask, bit = name, 0
            continue
        if mask is not None:
            out[name] = (mask, bit)
            bit += 6 if name == "Unused range" else 1
    return out


def _fei_blocks(path: Path):
    """(structured array of the FEI1 fields of every block present, nz, exttyp) or None without an FEI header.

    Raises :class:`MetadataError` when the header says FEI1/FEI2 but no block can be read."""
    import warnings

    import mrcfile
    from mrcfile.dtypes import get_ext_header_dtype

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as m:
                exttyp = bytes(m.header.exttyp)
                nz = int(m.header.nz)
                order = m.header.mode.dtype.byteorder
                declared = int(m.header.nsymbt)
                raw = b"" if m.extended_header is None else m.extended_header.tobytes()
    except Exception as exc:  # mrcfile raises many kinds of errors on garbage
        raise MetadataError(f"{path.name}: unreadable MRC header: {exc}") from exc
    if exttyp not in FEI_EXTENDED_HEADER_TYPES:
        return None
    if len(raw) < declared:
        raise MetadataError(f"{path.name}: {exttyp.decode()} extended header truncated: header declares "
                            f"{declared} bytes, the file holds {len(raw)}")
    base = get_ext_header_dtype(b"FEI1", "<")
    block = None
    for bo in (("<" if order in "<=|" else ">"), (">" if order in "<=|" else "<")):
        dtype = get_ext_header_dtype(b"FEI1", bo)
        if len(raw) < dtype.itemsize:
            break
        size = int(np.frombuffer(raw[:4], dtype=dtype["Metadata size"])[0])
        if dtype.itemsize <= size <= len(raw):
            block, base = size, dtype
            break
    if block is None:
        first = int.from_bytes(raw[:4], "little") if len(raw) >= 4 else None
        raise MetadataError(
            f"{path.name}: extended header type {exttyp.decode()} but its first block cannot be read "
            f"({len(raw)} bytes; metadata size field {first}, expected at least {base.itemsize}); ignored")
    n_blocks = min(nz, len(raw) // block)
    if n_blocks < nz:
        warnings.warn(f"{path.name}: {exttyp.decode()} extended header holds {n_blocks} blocks for {nz} "
                      f"sections; using those", RuntimeWarning, stacklevel=3)
    rows = np.frombuffer(raw[: n_blocks * block], dtype=np.uint8).reshape(n_blocks, block)[:, : base.itemsize]
    return np.ascontiguousarray(rows).view(base).reshape(n_blocks), nz, exttyp



def _fei_value(rec, name: str, valid: dict[str, tuple[str, int]]):
    """One field of one block, or None when its bitmask bit says not set (bitmasks all zero: trusted as is),
    or it is not finite."""
    mask, bit = valid[name]
    word = int(rec[mask])
    if word and not (word >> bit) & 1:
        return None
    value = rec[name]
    if isinstance(value, (bytes, np.bytes_)):
        return value.split(b"\0", 1)[0].decode("ascii", "replace").strip() or None
    value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def read_fei_extended_header(path: str | os.PathLike) -> list[MovieMetadata]:
    """One :class:`MovieMetadata` per section from an MRC file's FEI1/FEI2 extended header ([] if it has none).

    Fields read (units converted): HT (V → kV), dose (e/m² → e/Å²), integration time (s), defocus and applied
    defocus (m → Å, positive underfocus), alpha tilt (degrees), stage X/Y (m → µm), pixel size X (m → Å),
    Shift X/Y (beam shift, microscope units), magnification. A field whose bitmask bit is clear is None.
    Raises :class:`MetadataError` when the header says FEI1/FEI2 but no block can be read.
    """
    path = Path(path)
    found = _fei_blocks(path)
    if found is None:
        return []
    return _fei_sections(path, found[0])


def _fei_sections(path: Path, blocks) -> list[MovieMetadata]:
    """:func:`read_fei_extended_header` of the blocks ``_fei_blocks(path)`` already read."""
    valid = _fei_valid_bits(blocks.dtype)
    out = []
    for rec in blocks:
        def v(name, rec=rec):
            return _fei_value(rec, name, valid)

        ht, dose, t_int = v("HT"), v("Dose"), v("Integration time")
        px, defocus, applied = v("Pixel size X"), v("Defocus"), v("Applied defocus")
        sx, sy, bx, by = v("X-Stage"), v("Y-Stage"), v("Shift X"), v("Shift Y")
        mag = v("Magnification")
        out.append(MovieMetadata(
            source="fei",
            movie_name=path.name,
            pixel_size_angstrom=px * 1e10 if px and px > 0 else None,
            voltage_kv=ht / 1000 if ht and ht > 0 else None,
            total_dose=dose * 1e-20 if dose is not None and dose >= 0 else None,
            exposure_time_s=t_int if t_int is not None and t_int > 0 else None,
            n_frames=1,
            defocus_target_angstrom=-applied * 1e10 if applied is not None else None,
            defocus_angstrom=-defocus * 1e10 if defocus is not None else None,
            stage_tilt_deg=v("Alpha tilt"),
            stage_position_um=(sx * 1e6, sy * 1e6) if sx is not None and sy is not None else None,
            beam_shift=(bx, by) if bx is not None and by is not None else None,
            magnification=mag if mag and mag > 0 else None,
        ))
    return out


def read_fei_metadata(path: str | os.PathLike) -> MovieMetadata | None:
    """The exposure's metadata from an MRC movie's FEI1/FEI2 extended header (None if it has none).

    Optics, stage and shifts come from the first block. When there are several sections and every block says it
    is a dose fraction, the dose and the exposure time are the sums over the blocks; otherwise the first block's
    values are taken as the exposure's. ``n_frames`` is the number of sections. Raises :class:`MetadataError` on
    an unreadable FEI header (see :func:`read_fei_extended_header`).
    """
    path = Path(path)
    found = _fei_blocks(path)
    if found is None:
        return None
    blocks, nz, _ = found
    sections = _fei_sections(path, blocks)  # the header is read once
    valid = _fei_valid_bits(blocks.dtype)
    first = sections[0]
    update = {"n_frames": nz}
    fractions = [_fei_value(rec, "Is dose fraction", valid) for rec in blocks]
    if len(sections) > 1 and all(bool(f) for f in fractions):
        doses = [s.total_dose for s in sections]
        times = [s.exposure_time_s for s in sections]
        update["total_dose"] = sum(doses) * nz / len(doses) if None not in doses else None
        update["exposure_time_s"] = sum(times) * nz / len(times) if None not in times else None
    return first.model_copy(update=update)


# ------------------------------------------------------------------------------------- next to a movie
def find_metadata(movie_path: str | os.PathLike) -> MovieMetadata | None:
    """The acquisition metadata of a movie, if any: ``<movie>.mdoc``, or EPU's ``<stem>.xml`` (without
    ``_fractions``/``_EER``), and for MRC movies the FEI1/FEI2 extended header, which fills what the file beside
    it leaves unsaid (source ``"epu+fei"``); grid square and foil hole from EPU's names in the movie's path when
    the metadata has none. Returns the parsed metadata or None.

    A file beside the movie that cannot be parsed raises :class:`MetadataError`; an unreadable FEI extended
    header only warns (``RuntimeWarning``) and is ignored.
    """
    import warnings

    p = Path(movie_path)
    primary = None
    mdoc = p.with_name(p.name + ".mdoc")
    stem = re.sub(r"(_fractions|_Fractions|_EER)$", "", p.stem)
    xml = p.with_name(stem + ".xml")
    if mdoc.is_file():
        primary = read_mdoc(mdoc)[0]
    elif xml.is_file():
        primary = read_epu_xml(xml)
    fei = None
    if p.name.lower().endswith((".mrc", ".mrcs")) and p.is_file():
        try:
            fei = read_fei_metadata(p)
        except MetadataError as exc:
            warnings.warn(str(exc), RuntimeWarning, stacklevel=2)
    if primary is None or fei is None:
        md = primary or fei
    else:
        gaps = {k: v for k, v in fei.model_dump().items()
                if k not in ("source", "movie_name") and v is not None and getattr(primary, k) is None}
        md = primary.model_copy(update={**gaps, "source": f"{primary.source}+fei"})
    if md is not None and (md.grid_square is None or md.foil_hole is None):  # EPU's names in the movie's path
        square, hole = _names_from_path(p)
        md = md.model_copy(update={"grid_square": md.grid_square or square, "foil_hole": md.foil_hole or hole})
    return md


# ------------------------------------------------------------------------------------------- reconcile
@dataclass(frozen=True)
class Disagreement:
    """One setting where the command line and the metadata differ; the command-line value is used."""

    field: str
    cli_value: float
    metadata_value: float
    message: str


def reconcile(settings, metadata: MovieMetadata, rel_tol: float = 0.01,
              n_frames: int | None = None) -> list[Disagreement]:
    """Compare the settings given (a :class:`cryolive.config.Settings`) with acquisition metadata.

    Checks pixel size, voltage and dose per frame (from the metadata's total dose and ``n_frames`` — the
    movie's frame count — or the metadata's own frame count; the total dose instead when the settings give an EER
    total dose); a relative difference above ``rel_tol``
    is a :class:`Disagreement` whose message names both values and says which one is used.
    """
    optics = getattr(settings, "optics", settings)
    checks = [
        ("pixel size", "Å", getattr(optics, "pixel_size_angstrom", None), metadata.pixel_size_angstrom),
        ("voltage", "kV", getattr(optics, "voltage_kv", None), metadata.voltage_kv),
    ]
    frames = n_frames or metadata.n_frames
    eer_total = getattr(getattr(settings, "eer", None), "total_dose", None)
    if eer_total is not None and metadata.total_dose is not None:  # EER: the whole exposure's dose is given
        checks.append(("total dose", "e/Å²", eer_total, metadata.total_dose))
    elif metadata.total_dose is not None and frames:
        checks.append(("dose per frame", "e/Å²", getattr(settings, "dose_per_frame", None),
                       metadata.total_dose / frames))
    out = []
    where = f"{metadata.source} metadata" + (f" of {metadata.movie_name}" if metadata.movie_name else "")
    for name, unit, cli, meta in checks:
        if cli is None or meta is None or meta <= 0:
            continue
        if abs(cli - meta) > rel_tol * abs(meta):
            msg = (f"{name}: command line says {cli:.4g} {unit}, {where} says {meta:.4g} {unit} "
                   f"({100 * (cli - meta) / meta:+.1f} %); using the command line's {cli:.4g} {unit}")
            out.append(Disagreement(name, float(cli), float(meta), msg))
    return out
