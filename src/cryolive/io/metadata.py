"""Acquisition metadata from EPU (per-movie XML) and SerialEM (``.mdoc``), and its check against the settings.

EPU writes ``GridSquare_<id>/Data/FoilHole_<hole>_Data_<area>_<n>_<date>_<time>.xml`` next to each movie
(``..._fractions.tiff`` / ``.eer``): a ``MicroscopeImage`` document whose lengths are in metres, angles in
radians and dose in electrons per m². SerialEM writes ``<movie>.mdoc`` (or one ``.mdoc`` per tilt series):
``key = value`` lines, a global header then ``[ZValue = n]`` / ``[FrameSet = n]`` sections; pixel spacing in
Å, defocus in µm (negative = underfocus), angles in degrees, dose in e/Å².

Everything becomes a :class:`MovieMetadata` in cryolive's units (Å, positive underfocus, degrees, e/Å²);
missing fields are ``None``. :func:`reconcile` lists where the settings given on the command line disagree
with the metadata; the command line wins, but never silently.

Examples::

    md = read_epu_xml("GridSquare_123/Data/FoilHole_456_Data_789_3_20240101_120000.xml")
    md.pixel_size_angstrom, md.total_dose, md.grid_square, md.foil_hole
    sections = read_mdoc("tilt_01.mdoc")            # one MovieMetadata per section
    for d in reconcile(settings, md):
        log.warning(d.message)
"""

from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict


class MovieMetadata(BaseModel):
    """What the acquisition software says about one movie (``None`` where it says nothing)."""

    model_config = ConfigDict(frozen=True)

    source: str  # "epu" or "serialem"
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
    beam_shift: tuple[float, float] | None = None  # EPU BeamShift (microscope units)
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


def find_metadata(movie_path: str | os.PathLike) -> MovieMetadata | None:
    """The metadata file next to a movie, if any: ``<movie>.mdoc``, or EPU's ``<stem>.xml`` (without
    ``_fractions``/``_EER``). Returns the parsed metadata or None."""
    p = Path(movie_path)
    mdoc = p.with_name(p.name + ".mdoc")
    if mdoc.is_file():
        return read_mdoc(mdoc)[0]
    stem = re.sub(r"(_fractions|_Fractions|_EER)$", "", p.stem)
    xml = p.with_name(stem + ".xml")
    if xml.is_file():
        return read_epu_xml(xml)
    return None


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
    movie's frame count — or the metadata's own frame count); a relative difference above ``rel_tol``
    is a :class:`Disagreement` whose message names both values and says which one is used.
    """
    optics = getattr(settings, "optics", settings)
    checks = [
        ("pixel size", "Å", getattr(optics, "pixel_size_angstrom", None), metadata.pixel_size_angstrom),
        ("voltage", "kV", getattr(optics, "voltage_kv", None), metadata.voltage_kv),
    ]
    frames = n_frames or metadata.n_frames
    if metadata.total_dose is not None and frames:
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
