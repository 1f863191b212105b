"""What the dashboard shows of one session, read from its store and files (never from a client's path).

:class:`SessionData` wraps one registered session folder ``OUT/``: its ``session.sqlite`` (read with a separate
connection, so a running session is never blocked for long) and the CONTRACT files under it. Every file it opens
comes from the store's recorded outputs or the CONTRACT's fixed names, and is checked to lie inside ``OUT/``.

The exposure table is kept in memory, columnar, and refreshed incrementally: SQLite's ``PRAGMA data_version``
tells when another connection (the session) committed, and only exposures updated since the last refresh are
read again — so a page of 10,000 exposures costs one scan once, then a few rows per new exposure.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from ..preprocess.curation import METRICS as _CURATION_METRICS
from ..session.session import MANUAL_SELECTION_KEY as CLASS_SELECTION_KEY
from ..session.store import SessionStore
from . import curation_bridge as cb
from .png import bin_image, encode_png, to_uint8

# columns of the exposure table sent to the dashboard: name → (stage, metric key or callable)

METRIC_COLUMNS = tuple(_CURATION_METRICS)  # every curation metric (cryolive.preprocess.curation.METRICS)


class NotFound(LookupError):
    """The thing asked for does not exist (or is outside the session): the route answers 404."""


def _f(x) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _json_list(a: np.ndarray, digits: int = 4) -> list:
    """Floats rounded for the wire, NaN → None."""
    out = np.round(np.asarray(a, dtype=np.float64), digits).tolist()
    return [None if (v != v or v in (math.inf, -math.inf)) else v for v in out]


class SessionData:
    """Read access (and the dashboard's commands) for one session folder."""

    def __init__(self, session_id: str, out_dir: str | os.PathLike):
        self.id = session_id
        self.out = Path(out_dir).resolve()
        db_path = self.out / "session.sqlite"
        if not db_path.is_file():
            raise NotFound(f"session {session_id}: no store")
        self.store = SessionStore(db_path)  # for the commands (small writes in the key-value table)
        self._db = sqlite3.connect(str(db_path), check_same_thread=False, timeout=30.0, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        self._rows: dict[int, dict] = {}  # exposure id → row (status, times, metrics)
        self._watermark = -1.0  # largest 'updated' seen
        self._data_version = None
        self._local_changes = 0  # commands written by this server (data_version ignores our own commits)
        self._columns_cache = None
        self._columns_version = None
        self._images: OrderedDict = OrderedDict()  # small LRU of rendered PNGs

    def close(self) -> None:
        with self._lock:
            self._db.close()
            self.store.close()

    # ------------------------------------------------------------------ change detection
    def version(self) -> tuple[int, int]:
        """Changes as ``(data_version of the store, commands by this server)``: differs after any commit."""
        with self._lock:
            dv = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        return dv, self._local_changes

    def bump(self) -> None:
        with self._lock:
            self._local_changes += 1

    def refresh(self) -> list[int]:
        """Read exposures changed since the last refresh; return their ids (incremental)."""
        with self._lock:
            dv = self.version()
            if dv == self._data_version and self._rows is not None and self._watermark >= 0:
                return []
            rows = self._db.execute("SELECT id, name, status, error, n_particles, created, updated, finished "
                                    "FROM exposures WHERE updated >= ? ORDER BY id", (self._watermark,)).fetchall()
            changed = []
            for r in rows:
                row = {k: r[k] for k in ("id", "name", "status", "error", "n_particles", "created", "updated",
                                         "finished")}
                old = self._rows.get(row["id"])
                if old is None or repr(old) != repr(row):  # repr: NaN equals NaN
                    self._rows[row["id"]] = row
                    changed.append(row["id"])
                self._watermark = max(self._watermark, float(r["updated"]))
            self._data_version = dv
            if changed:
                self._columns_cache = None
            return changed

    # ------------------------------------------------------------------ tables
    def settings(self) -> dict:
        return self.store.get_value("settings", {}) or {}

    def _columns(self) -> dict[str, np.ndarray]:
        """Columnar metrics of the exposures done, in id order, with ``_pending`` flags per metric (cached until
        the store changes). From :func:`cryolive.session.curation.exposure_table` — the table the session decides
        on, kept in the store's metrics cache, so reading 10,000 exposures is one query once the cache is warm."""
        from ..session.curation import exposure_table

        self.refresh()
        with self._lock:
            version = self.version()
            if self._columns_cache is not None and self._columns_version == version:
                return self._columns_cache
            table = exposure_table(self.store)
            frame = table.frame
            done = (frame["status"] == "done").to_numpy()
            cols = {"id": frame["exposure_id"].to_numpy(dtype=np.int64)[done]}
            for name in METRIC_COLUMNS:
                cols[name] = frame[name].to_numpy(dtype=np.float64)[done]
            cols["_pending"] = {name: np.asarray(table.pending[name].to_numpy(), dtype=bool)[done]
                                for name in METRIC_COLUMNS if name in table.pending}
            cols["_overrides"] = np.asarray(table.overrides)[done]
            cols["_names"] = [n for n, d in zip(frame["name"].tolist(), done) if d]
            finished = {r["id"]: r["finished"] for r in self._rows.values()}
            cols["finished"] = np.array([_f(finished.get(int(i))) for i in cols["id"]], dtype=np.float64)
            self._columns_cache = cols
            self._columns_version = self.version()  # after exposure_table's own cache writes
            return cols

    def thresholds(self):
        return cb.load_thresholds(self.store)

    def decisions(self):
        """The columnar table and the decision on each of its exposures (current thresholds and overrides)."""
        cols = self._columns()
        return cols, cb.decide_table(cols, cols["_pending"], self.thresholds(), cols["_overrides"])

    def exposure_table(self, since_id: int = 0, exclude: set[int] | None = None) -> dict:
        """Columnar JSON of the exposures done (ids > ``since_id``, and not in ``exclude``), with the decision
        under the current thresholds."""
        cols, dec = self.decisions()
        sel = cols["id"] > int(since_id)
        if exclude:
            sel &= ~np.isin(cols["id"], np.fromiter(exclude, dtype=np.int64, count=len(exclude)))
        out = {"ids": cols["id"][sel].tolist(), "finished": _json_list(cols["finished"][sel], 3),
               "names": [n for n, s in zip(cols["_names"], sel) if s]}
        out["metrics"] = {name: _json_list(cols[name][sel]) for name in METRIC_COLUMNS}
        out["status"] = dec.status[sel].astype(int).tolist()
        out["reasons"] = [str(r) for r in np.asarray(dec.reason_text)[sel]]
        return out

    def decision_arrays(self) -> dict:
        cols, dec = self.decisions()
        counts = dec.counts()
        return {"ids": cols["id"].tolist(), "status": dec.status.astype(int).tolist(),
                "reasons": [str(r) for r in dec.reason_text], "counts": counts}

    def summary(self) -> dict:
        """Counts, rates over the last hour, the controls' state and which panels have data."""
        self.refresh()
        with self._lock:
            rows = list(self._rows.values())
        counts = {s: 0 for s in ("pending", "processing", "done", "failed")}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        now = time.time()
        done = [r for r in rows if r["status"] == "done" and r["finished"]]
        particles = int(sum(int(r["n_particles"] or 0) for r in done))
        first = min((r["created"] for r in rows), default=now)
        window = min(3600.0, max(now - first, 1.0))
        recent = [r for r in done if r["finished"] >= now - window]
        cols, dec = self.decisions()
        dcounts = dec.counts()
        accepted_particles = int(np.nansum(np.where(dec.accepted, cols["particle_count"], 0.0))) if len(
            cols["id"]) else 0
        paused = self.store.get_value("paused") or {}
        return {
            "id": self.id, "counts": counts, "n_exposures": len(rows), "n_particles": particles,
            "n_accepted": dcounts.get("accepted", 0), "n_rejected": dcounts.get("rejected", 0),
            "n_pending_decision": dcounts.get("pending", 0), "accepted_particles": accepted_particles,
            "exposures_per_hour": 3600.0 * len(recent) / window,
            "particles_per_hour": 3600.0 * sum(int(r["n_particles"] or 0) for r in recent) / window,
            "paused": bool(paused.get("paused", False)) if isinstance(paused, dict) else bool(paused),
            "class2d": self.class2d_info(),
            "has_map": self._contract_file("refine3d/map.mrc") is not None,
            "has_fsc": self._contract_file("refine3d/fsc.star") is not None,
            "particles_classified": int(self.store.get_value("class2d_particles_seen", 0) or 0),
            "last_update": max((r["updated"] for r in rows), default=None),
        }

    # ------------------------------------------------------------------ files
    def _inside(self, rel: str | None) -> Path | None:
        """``OUT/rel`` if it exists and lies inside OUT (a tampered store cannot point elsewhere)."""
        if not rel or not isinstance(rel, str) or "\x00" in rel:
            return None
        p = (self.out / rel).resolve()
        try:
            p.relative_to(self.out)
        except ValueError:
            return None
        return p if p.is_file() else None

    def _contract_file(self, rel: str) -> Path | None:
        return self._inside(rel)

    def _stage(self, exposure_id: int, stage: str) -> dict | None:
        return self.store.stage_result(int(exposure_id), stage)

    def exposure(self, exposure_id: int) -> dict:
        """One exposure: its row, every stage's metrics, and what images exist for it."""
        try:
            exp = self.store.get_exposure(int(exposure_id))
        except KeyError:
            raise NotFound("no such exposure") from None
        stages = {s: (self._stage(exp.id, s) or {}).get("metrics") for s in ("motion", "ctf", "picking", "extraction")}
        cols, dec = self.decisions()
        idx = np.flatnonzero(cols["id"] == exp.id)
        decision = None
        if len(idx):
            decision = {"status": int(dec.status[idx[0]]), "reasons": str(dec.reason_text[idx[0]])}
        mic = self._micrograph_path(exp.id)
        return {"id": exp.id, "name": exp.name, "status": exp.status, "error": exp.error,
                "n_particles": exp.n_particles, "finished": exp.finished, "stages": stages,
                "decision": decision, "has_micrograph": mic is not None}

    def _micrograph_path(self, exposure_id: int) -> Path | None:
        motion = self._stage(exposure_id, "motion")
        if not motion:
            return None
        return self._inside(motion["outputs"].get("micrograph"))

    def _cached(self, key, make):
        with self._lock:
            if key in self._images:
                self._images.move_to_end(key)
                return self._images[key]
        value = make()
        with self._lock:
            self._images[key] = value
            while len(self._images) > 64:
                self._images.popitem(last=False)
        return value

    def _read_micrograph(self, exposure_id: int) -> tuple[np.ndarray, Path]:
        import mrcfile

        path = self._micrograph_path(exposure_id)
        if path is None:
            raise NotFound("no micrograph for this exposure")
        with mrcfile.open(path, permissive=True) as m:
            data = np.asarray(m.data, dtype=np.float32)
        if data.ndim == 3:
            data = data[0]
        return data, path

    def micrograph_png(self, exposure_id: int, max_size: int = 768) -> bytes:
        """The motion-corrected micrograph, binned to ``max_size`` pixels at most and low-pass filtered."""
        path = self._micrograph_path(exposure_id)
        if path is None:
            raise NotFound("no micrograph for this exposure")
        key = ("mic", str(path), path.stat().st_mtime_ns, max_size)

        def make():
            data, _ = self._read_micrograph(exposure_id)
            small, f = bin_image(data, max_size)
            px = _micrograph_pixel_size(self.settings())
            small = _lowpass(small, px * f, 20.0)
            return encode_png(to_uint8(small, 0.5, 99.5))

        return self._cached(key, make)

    def picks(self, exposure_id: int) -> dict:
        """Particle coordinates (pixels of the micrograph), the micrograph shape and the particle radius."""
        from ..io.star import read_star

        ext = self._stage(exposure_id, "extraction")
        motion = self._stage(exposure_id, "motion")
        if motion is None:
            raise NotFound("no micrograph for this exposure")
        b = int(motion["metrics"].get("movie_bin", 1) or 1)  # frame_shape is the movie's, before binning
        h, w = ((motion["metrics"].get("frame_shape") or [0, 0])[:2])
        h, w = int(h) // b, int(w) // b
        settings = self.settings()
        px = _micrograph_pixel_size(settings)
        diameter = float((settings.get("picking") or {}).get("particle_diameter_angstrom", 150.0))
        out = {"height": int(h), "width": int(w), "radius_px": 0.5 * diameter / px, "x": [], "y": [], "score": []}
        star = self._inside((ext or {}).get("outputs", {}).get("particles_star")) if ext else None
        if star is not None:
            df = read_star(star)
            df = df.get("particles") if isinstance(df, dict) else df
            if df is not None and len(df):
                out["x"] = _json_list(df["rlnCoordinateX"].to_numpy(), 1)
                out["y"] = _json_list(df["rlnCoordinateY"].to_numpy(), 1)
                if "cryolivePickScore" in df:
                    out["score"] = _json_list(df["cryolivePickScore"].to_numpy(), 3)
        return out

    def power_spectrum(self, exposure_id: int, tile: int = 512) -> tuple[bytes, dict]:
        """The power spectrum (left half) beside the fitted CTF² (right half) as a PNG, and the 1D profile
        (spectrum and fit against spatial frequency) for the plot.

        The CTF stage's own dashboard files (``ctf/<movie>_diag.png`` and ``ctf/<movie>.star``'s
        ``data_ctf_profile``, docs/CONVENTIONS.md) when it wrote them; otherwise computed here from the
        micrograph (averaged periodogram, background-flattened) and the fitted defocus."""
        ctf = self._stage(exposure_id, "ctf")
        if ctf is None:
            raise NotFound("no CTF estimate for this exposure")
        diag_png = self._inside(ctf["outputs"].get("ctf_diag_png"))
        ctf_star = self._inside(ctf["outputs"].get("ctf_star"))
        if diag_png is not None and ctf_star is not None:
            key = ("ps-files", str(diag_png), diag_png.stat().st_mtime_ns, ctf_star.stat().st_mtime_ns)
            return self._cached(key, lambda: (diag_png.read_bytes(), _profile_from_star(ctf_star, ctf["metrics"])))
        path = self._micrograph_path(exposure_id)
        if path is None:
            raise NotFound("no micrograph for this exposure")
        key = ("ps", str(path), path.stat().st_mtime_ns, tile)

        def make():
            data, _ = self._read_micrograph(exposure_id)
            return _power_spectrum_figure(data, ctf["metrics"], self.settings(), tile)

        return self._cached(key, make)

    # ------------------------------------------------------------------ 2D classes
    def _classes_table(self):
        from ..io.star import read_star

        star = self._contract_file("class2d/classes.star")
        if star is None:
            return None
        blocks = read_star(star)
        df = blocks.get("model_classes") if isinstance(blocks, dict) else blocks
        if df is None and isinstance(blocks, dict) and blocks:
            df = next(iter(blocks.values()))
        return df

    def class2d_info(self) -> dict:
        df = self._classes_table()
        return {"n_classes": 0 if df is None else int(len(df))}

    def classes(self) -> dict:
        df = self._classes_table()
        if df is None:
            return {"classes": [], "selection": self.class_selection()}
        sel = self.class_selection()
        manual = set(sel["selected"]) if sel["manual"] else None
        out = []
        for i, r in enumerate(df.to_dict("records")):
            number = int(r.get("rlnClassNumber", i + 1))
            auto = bool(int(r.get("cryoliveSelected", 0)))
            out.append({"number": number, "distribution": _f(r.get("rlnClassDistribution")),
                        "resolution_angstrom": _f(r.get("rlnEstimatedResolution")),
                        "particles": _f(r.get("cryoliveParticleCount")), "auto_selected": auto,
                        "selected": (number in manual) if manual is not None else auto})
        for c in out:
            for k in ("distribution", "resolution_angstrom", "particles"):
                if not math.isfinite(c[k]):
                    c[k] = None
        return {"classes": out, "selection": sel}

    def classes_png(self) -> bytes:
        """All class averages side by side in one row (each scaled on its own), for the gallery."""
        import mrcfile

        path = self._contract_file("class2d/classes.mrcs")
        if path is None:
            raise NotFound("no 2D classes yet")
        key = ("classes", str(path), path.stat().st_mtime_ns)

        def make():
            with mrcfile.open(path, permissive=True) as m:
                stack = np.asarray(m.data, dtype=np.float32)
            if stack.ndim == 2:
                stack = stack[None]
            tiles = [to_uint8(img, 0.5, 99.5) for img in stack]
            return encode_png(np.concatenate(tiles, axis=1))

        return self._cached(key, make)

    def class_selection(self) -> dict:
        raw = self.store.get_value(CLASS_SELECTION_KEY)
        if not raw:
            return {"manual": False, "selected": [], "by": None, "time": None}
        return {"manual": True, "selected": [int(c) for c in raw.get("selected", [])], "by": raw.get("by"),
                "time": raw.get("time")}

    def set_class_selection(self, selected: list[int], user: str) -> dict:
        df = self._classes_table()
        if df is None:
            raise NotFound("no 2D classes yet")
        numbers = {int(n) for n in df.get("rlnClassNumber", range(1, len(df) + 1))}
        bad = sorted(set(selected) - numbers)
        if bad:
            raise ValueError(f"no such classes: {bad}")
        chosen = sorted(set(int(c) for c in selected))
        # also as classify2d.ClassSelection's overrides (0-based class index → keep), for a session that uses it
        overrides = {str(n - 1): n in chosen for n in sorted(numbers)}
        self.store.set_value(CLASS_SELECTION_KEY, {"selected": chosen, "by": user, "time": time.time(),
                                                   "class_selection": {"overrides": overrides}})
        self.bump()
        return self.class_selection()

    # ------------------------------------------------------------------ commands
    def set_thresholds(self, changes: dict, user: str):
        """Change some bounds: every exposure is re-decided, the decisions recorded in the store and
        exposures.star rewritten (see :mod:`.curation_bridge`). Returns the new thresholds."""
        summary = cb.save_thresholds(self.out, self.store, changes, user)
        self.bump()
        return summary.thresholds

    def set_paused(self, paused: bool, user: str) -> None:
        self.store.set_value("paused", {"paused": bool(paused), "by": user, "time": time.time()})
        self.bump()

    # ------------------------------------------------------------------ 3D
    def map_slices_png(self) -> bytes:
        import mrcfile

        path = self._contract_file("refine3d/map.mrc")
        if path is None:
            raise NotFound("no map yet")
        key = ("map", str(path), path.stat().st_mtime_ns)

        def make():
            with mrcfile.open(path, permissive=True) as m:
                vol = np.asarray(m.data, dtype=np.float32)
            if vol.ndim != 3:
                raise NotFound("the map is not 3D")
            z, y, x = (s // 2 for s in vol.shape)
            sl = [vol[z], vol[:, y, :], vol[:, :, x]]
            size = max(max(s.shape) for s in sl)
            tiles = []
            for s in sl:
                t = np.zeros((size, size), dtype=np.float32) + float(np.median(s))
                t[: s.shape[0], : s.shape[1]] = s
                tiles.append(to_uint8(t, 0.5, 99.8))
            return encode_png(np.concatenate(tiles, axis=1))

        return self._cached(key, make)

    def fsc(self) -> dict:
        from ..io.star import read_star

        path = self._contract_file("refine3d/fsc.star")
        if path is None:
            raise NotFound("no FSC yet")
        blocks = read_star(path)
        df = next(iter(blocks.values())) if isinstance(blocks, dict) else blocks
        res_col = "rlnResolution" if "rlnResolution" in df else None
        fsc_col = next((c for c in ("rlnFourierShellCorrelationCorrected", "rlnFourierShellCorrelation")
                        if c in df), None)
        if res_col is None or fsc_col is None:
            raise NotFound("FSC table without rlnResolution / rlnFourierShellCorrelation")
        return {"resolution_inv_angstrom": _json_list(df[res_col].to_numpy(), 5),
                "fsc": _json_list(df[fsc_col].to_numpy(), 4)}




def _micrograph_pixel_size(settings: dict) -> float:
    """Pixel size of the micrographs, Å, from the session's settings (a dict): the movie's × ``movie_bin``."""
    px = float((settings.get("optics") or {}).get("pixel_size_angstrom", 1.0))
    return px * int(settings.get("movie_bin", 1) or 1)


def _lowpass(img: np.ndarray, pixel_size_angstrom: float, resolution_angstrom: float) -> np.ndarray:
    """Gaussian low-pass to about ``resolution_angstrom`` (display only: particles visible at a glance)."""
    h, w = img.shape
    ky = np.fft.fftfreq(h)[:, None] / pixel_size_angstrom
    kx = np.fft.rfftfreq(w)[None, :] / pixel_size_angstrom
    filt = np.exp(-0.5 * (ky ** 2 + kx ** 2) * resolution_angstrom ** 2)
    a = img - img.mean()
    return np.fft.irfft2(np.fft.rfft2(a) * filt, s=(h, w)).astype(np.float32)


def _profile_from_star(path: Path, metrics: dict) -> dict:
    """The 1D CTF profile written by the CTF stage (``data_ctf_profile``)."""
    from ..io.star import read_star

    df = read_star(path)["ctf_profile"]
    res = _f(metrics.get("max_resolution_angstrom"))
    out = {"k_inv_angstrom": _json_list(df["rlnResolution"].to_numpy(), 5),
           "spectrum": _json_list(df["cryoliveCtfSpectrum"].to_numpy(), 4),
           "ctf2": _json_list(df["cryoliveCtfFit"].to_numpy(), 4),
           "fit_resolution_angstrom": res if math.isfinite(res) else None}
    if "cryoliveCtfFitCorrelation" in df:
        out["correlation"] = _json_list(df["cryoliveCtfFitCorrelation"].to_numpy(), 4)
    return out


def _power_spectrum_figure(data: np.ndarray, ctf: dict, settings: dict, tile: int) -> tuple[bytes, dict]:
    import torch

    from ..ctf import calculate_ctf_2d

    h, w = data.shape
    tile = int(min(tile, max(64, min(h, w) // 3)) // 2 * 2)  # enough tiles to average the noise down
    a = data - data.mean()
    ps = np.zeros((tile, tile), dtype=np.float64)
    n = 0
    step = tile // 2
    win = np.outer(np.hanning(tile), np.hanning(tile))
    for y in range(0, h - tile + 1, step):
        for x in range(0, w - tile + 1, step):
            t = a[y: y + tile, x: x + tile]
            ps += np.abs(np.fft.fft2((t - t.mean()) * win)) ** 2
            n += 1
    ps = np.fft.fftshift(np.log(ps / max(n, 1) + 1e-12))
    yy, xx = np.indices(ps.shape) - tile // 2
    r = np.hypot(yy, xx).astype(np.int64)
    nr = tile // 2
    radial = np.bincount(r.ravel(), ps.ravel(), minlength=nr + 2)[: nr] / np.maximum(
        np.bincount(r.ravel(), minlength=nr + 2)[: nr], 1)
    # background: a wide running mean of the rotational average, subtracted in 2D and 1D
    k = max(5, nr // 8) | 1
    padded = np.pad(radial, k // 2, mode="edge")
    background = np.convolve(padded, np.ones(k) / k, mode="valid")[: nr]
    flat = ps - np.interp(r.clip(0, nr - 1), np.arange(nr), background)
    optics = settings.get("optics") or {}
    px = _micrograph_pixel_size(settings)
    du, dv, da = _f(ctf.get("defocus_u")), _f(ctf.get("defocus_v")), _f(ctf.get("defocus_angle_deg"))
    model = np.zeros_like(ps)
    if all(math.isfinite(v) for v in (du, dv, da)):
        c = calculate_ctf_2d(du, dv, da, float(optics.get("voltage_kv", 300.0)), float(optics.get("cs_mm", 2.7)),
                             float(optics.get("amplitude_contrast", 0.1)), px, (tile, tile), rfft=False)
        model = np.fft.fftshift((c ** 2).numpy().astype(np.float64))
    img = np.zeros((tile, tile), dtype=np.float32)
    lo, hi = np.percentile(flat[r < nr], [2, 99.5])
    left = np.clip((flat - lo) / max(hi - lo, 1e-9), 0, 1)
    img[:, : tile // 2] = left[:, : tile // 2]
    img[:, tile // 2:] = model[:, tile // 2:]
    centre = r < max(2, nr // 40)
    img[centre] = 0
    png = encode_png((img * 255).astype(np.uint8))
    model_radial = np.bincount(r.ravel(), model.ravel(), minlength=nr + 2)[: nr] / np.maximum(
        np.bincount(r.ravel(), minlength=nr + 2)[: nr], 1)
    flat_radial = radial - background
    res_limit = _f(ctf.get("max_resolution_angstrom"))
    profile = {"k_inv_angstrom": _json_list(np.arange(nr) / (tile * px), 5),
               "spectrum": _json_list(flat_radial, 4), "ctf2": _json_list(model_radial, 4),
               "fit_resolution_angstrom": res_limit if math.isfinite(res_limit) else None}
    del torch
    return png, profile
