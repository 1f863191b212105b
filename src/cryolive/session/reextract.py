"""Re-extraction of an exposure when its picks change (another picker, a new threshold, manual picks).

:func:`reextract_exposure` takes new picks for an exposure already processed and, from what the session stored —
the motion-corrected micrograph and the CTF fit (defocus, and the stage-tilt plane rebuilt from
``stage_tilt_deg`` / ``tilt_axis_deg``) — extracts the particles again, with the session's box sizes and
per-particle defocus. Nothing upstream is recomputed, and nothing is deleted:

- the new particles go to ``OUT/particles/<movie>.<tag>.mrcs`` and ``.star`` (``tag``: a short hash of the picks
  and extraction settings), beside the earlier ones, which stay on disk;
- the store gets a new ``picking`` result (``n_picks``, mean/median pick score: what curation reads) and a new
  ``extraction`` result pointing at the new files; the latest result of a stage is the one in use, so
  particles.star, curation and 2D use the new particles from then on;
- the exposure's particle count is updated; its 2D classes (indices into the old stack) are cleared and it is
  marked not fed, so the streaming 2D classifier is fed the new particles (the old ones stay in its statistics,
  as for a rejected exposure, see :mod:`cryolive.session.curation`);
- with ``write_files`` the curation is redone and exposures.star / particles.star rewritten.

Example::

    from cryolive.session.reextract import reextract_exposure
    r = reextract_exposure("OUT", "mic_0007", picks.coords_yx_px, picks.scores, picker="template")
    r.n_particles, r.particles_star
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..config import Settings, settings_hash
from .curation import open_session_store, recurate, stored_settings
from .pipeline import StageFunctions, _box_sizes, _np, movie_stem, stage_hashes
from .store import SessionStore


@dataclass
class ReextractResult:
    """What a re-extraction did: particles kept (inside the micrograph), the files written (relative to OUT)."""

    exposure_id: int
    n_picks: int
    n_particles: int
    particles_star: str
    particles_mrcs: str
    seconds: float


def landscape_from_tilt(stage_tilt_deg: float, tilt_axis_deg: float, pixel_size_angstrom: float,
                        image_shape: tuple[int, int]):
    """The defocus plane of :class:`cryolive.preprocess.ctf_landscape.CTFLandscape` from its tilt and axis (as
    recorded in the CTF stage's metrics): a callable ``coords_yx_px (n, 2) -> (n,)`` offset in Å from the centre,
    rising by ``tan(tilt) · pixel`` Å per pixel along ``(−sin φ, cos φ)`` in (x, y). None if not finite."""
    import torch

    if not (math.isfinite(stage_tilt_deg) and math.isfinite(tilt_axis_deg)):
        return None
    slope = math.tan(math.radians(stage_tilt_deg)) * pixel_size_angstrom  # Å per px
    a = -math.sin(math.radians(tilt_axis_deg)) * slope  # along x
    b = math.cos(math.radians(tilt_axis_deg)) * slope  # along y
    h, w = image_shape

    def offset(coords_yx_px):
        c = torch.as_tensor(coords_yx_px, dtype=torch.float32).reshape(-1, 2)
        return a * (c[:, 1] - w / 2) + b * (c[:, 0] - h / 2)

    return offset


def _find_exposure(store: SessionStore, exposure: int | str) -> int:
    if isinstance(exposure, (int, np.integer)):
        store.get_exposure(int(exposure))
        return int(exposure)
    for e in store.exposures():
        if str(exposure) in (e.name, e.path, Path(e.path).name):
            return e.id
    raise KeyError(f"no exposure {exposure!r} in {store.path.parent}")


def reextract_exposure(out: str | os.PathLike, exposure: int | str, coords_yx_px, scores=None,
                       picker: str = "manual", settings: Settings | None = None, store: SessionStore | None = None,
                       stages: StageFunctions | None = None, write_files: bool = True,
                       device: str = "cpu") -> ReextractResult:
    """Extract exposure ``exposure`` (id or movie name) again at ``coords_yx_px (n, 2)`` (y, x, micrograph pixels)
    with ``scores (n,)`` (default: ones), recording it as picked by ``picker``. ``device``: where extraction runs
    ("cpu", "cuda", ...; resolved here). See the module docstring.

    Raises KeyError (unknown exposure) or ValueError (exposure not done, or its micrograph / CTF missing).
    """
    import torch

    from ..config import resolve_device
    from ..io.mrc import read_mrc, write_mrc
    from ..io.star import write_star

    t0 = time.perf_counter()
    out = Path(out)
    own = store is None
    store = open_session_store(out) if own else store
    try:
        settings = stored_settings(store) if settings is None else settings
        eid = _find_exposure(store, exposure)
        exp = store.get_exposure(eid)
        if exp.status != "done":
            raise ValueError(f"exposure {exp.name} is {exp.status}, not done: nothing to re-extract from")
        motion = store.stage_result(eid, "motion")
        ctf = store.stage_result(eid, "ctf")
        if motion is None or "micrograph" not in motion["outputs"] or ctf is None:
            raise ValueError(f"exposure {exp.name} has no stored micrograph or CTF fit")
        mic_path = out / motion["outputs"]["micrograph"]
        if not mic_path.is_file():
            raise ValueError(f"the micrograph of {exp.name} is missing: {mic_path}")
        fns = (stages or StageFunctions()).resolved()
        coords = np.asarray(coords_yx_px, dtype=np.float64).reshape(-1, 2)
        scores = np.ones(len(coords)) if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(scores) != len(coords):
            raise ValueError(f"{len(coords)} picks but {len(scores)} scores")
        micrograph, _ = read_mrc(mic_path)
        dev = resolve_device(device)
        micrograph = torch.from_numpy(np.ascontiguousarray(micrograph, dtype=np.float32)).to(dev)
        px = settings.micrograph_pixel_size_angstrom
        box, out_box = _box_sizes(fns, settings)
        if len(coords):
            ext = fns.extract_particles(micrograph, torch.as_tensor(coords, dtype=torch.float32, device=dev), box,
                                        out_box, invert_contrast=settings.extraction.invert_contrast)
            kept = _np(ext.kept).astype(bool).reshape(-1)
            images = _np(ext.images).astype(np.float32).reshape(-1, out_box, out_box)
        else:
            kept, images = np.zeros(0, dtype=bool), np.zeros((0, out_box, out_box), np.float32)
        cm = ctf["metrics"]
        glob = SimpleNamespace(defocus_u=cm["defocus_u"], defocus_v=cm["defocus_v"],
                               defocus_angle_deg=cm["defocus_angle_deg"])
        land = landscape_from_tilt(float(cm.get("stage_tilt_deg", float("nan"))),
                                   float(cm.get("tilt_axis_deg", float("nan"))), px, tuple(micrograph.shape))
        ck = coords[kept]
        n = len(ck)
        if n:
            t_ck = torch.as_tensor(ck, dtype=torch.float32)
            dfs = fns.per_particle_defocus(t_ck, glob) if land is None else fns.per_particle_defocus(
                t_ck, glob, landscape=land)
            du, dv, da = (_np(v).astype(np.float64).reshape(n) for v in dfs)
        else:
            du = dv = da = np.zeros(0)
        hashes = stage_hashes(settings)
        tag = hashlib.sha256(coords.tobytes() + scores.tobytes() + hashes["extraction"].encode()).hexdigest()[:10]
        stem = movie_stem(exp.path)
        stack_rel = f"particles/{stem}.{tag}.mrcs"
        star_rel = f"particles/{stem}.{tag}.star"
        particle_px = px * box / out_box
        write_mrc(out / stack_rel, images, particle_px, stack=True)
        import pandas as pd

        rows = pd.DataFrame({
            "rlnImageName": [f"{i + 1:06d}@{stack_rel}" for i in range(n)],
            "rlnMicrographName": [motion["outputs"]["micrograph"]] * n,
            "rlnCoordinateX": ck[:, 1], "rlnCoordinateY": ck[:, 0],
            "rlnDefocusU": du, "rlnDefocusV": dv, "rlnDefocusAngle": da,
            "rlnOpticsGroup": np.ones(n, dtype=int),
            "cryolivePickScore": scores[kept],
        })
        write_star(out / star_rel, {"particles": rows})
        h_pick = settings_hash(hashes["ctf"], "reextract", picker, tag)
        store.record_stage(eid, "picking", h_pick, {
            "seconds": 0.0, "n_picks": int(len(coords)), "picker": picker,
            "mean_pick_score": float(scores.mean()) if len(scores) else float("nan"),
            "median_pick_score": float(np.median(scores)) if len(scores) else float("nan")})
        seconds = time.perf_counter() - t0
        store.record_stage(eid, "extraction", settings_hash(h_pick, settings.extraction), {
            "seconds": seconds, "n_particles": n, "box_size_px": int(box), "output_box_size_px": int(out_box),
            "particle_pixel_size_angstrom": float(particle_px)},
            {"particles_mrcs": stack_rel, "particles_star": star_rel})
        store.mark_done(eid, n)
        store.clear_particle_classes(eid)
        store.mark_unfed_2d([eid])
        if write_files:
            recurate(out, store, settings)
        return ReextractResult(eid, int(len(coords)), n, star_rel, stack_rel, time.perf_counter() - t0)
    finally:
        if own:
            store.close()
