"""A session folder as ``cryolive live`` leaves it, built quickly for the server's tests and benchmark.

The store is written through :class:`cryolive.session.store.SessionStore` (the same calls the session makes) with
per-exposure metrics drawn the way a real collection looks: defocus cycling over the targets 0.8–2.5 µm with
scatter, CTF fit resolution mostly 3.5–6 Å with a tail of bad exposures (thick ice, drift), motion mostly
5–25 Å with occasional large drift, relative ice thickness correlated with the fit resolution, particle counts
falling in thick ice. The first ``n_micrographs`` exposures also get real image files: physically simulated
micrographs (weak-phase particles, amorphous ice, junk, the CTF of that exposure's defocus, Poisson counts; from
``tests/preprocess/_synthetic_micrographs.py``) written as ``micrographs/<name>.mrc``, their particle
coordinates as ``particles/<name>.star``, and 2D class averages made by averaging boxes of those particles
(``class2d/classes.mrcs`` + ``classes.star``, as the session writes them).
"""

from __future__ import annotations

import importlib.util
import math
import sqlite3
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cryolive.config import CTFSettings, Optics, PickingSettings, Settings
from cryolive.io.mrc import write_mrc
from cryolive.io.star import write_star
from cryolive.session.pipeline import stage_hashes
from cryolive.session.store import SessionStore

_MICROGRAPHS = Path(__file__).resolve().parents[1] / "preprocess" / "_synthetic_micrographs.py"


def _synthetic_micrographs():
    import sys

    name = "_cryolive_synthetic_micrographs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _MICROGRAPHS)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def session_settings(pixel_size: float = 1.5, diameter: float = 150.0) -> Settings:
    return Settings(optics=Optics(pixel_size_angstrom=pixel_size), dose_per_frame=1.0,
                    picking=PickingSettings(particle_diameter_angstrom=diameter),
                    ctf=CTFSettings(tile_size_px=128))  # tiles for the small simulated micrographs


def simulated_metrics(n: int, seed: int = 0, start_index: int = 0) -> list[dict]:
    """Per-exposure metrics of a realistic collection (see the module docstring)."""
    rng = np.random.default_rng(seed + 7919 * start_index)
    targets = np.array([8000, 11000, 14000, 17000, 20000, 25000], dtype=float)
    out = []
    for k in range(n):
        i = start_index + k
        bad_ice = rng.random() < 0.12
        drift = rng.random() < 0.08
        ice = float(np.clip(rng.normal(1.6 if bad_ice else 1.0, 0.15), 0.4, 3.0))
        res = 3.3 + rng.gamma(2.0, 0.7) + (rng.uniform(4, 15) if bad_ice else 0.0) + (rng.uniform(2, 8) if drift else 0)
        defocus = targets[i % len(targets)] + rng.normal(0, 600)
        astig = abs(rng.normal(250, 150))
        motion_total = rng.gamma(3.0, 4.0) + (rng.uniform(30, 80) if drift else 0.0)
        early = motion_total * rng.uniform(0.3, 0.5)
        n_particles = int(rng.poisson(90 if not bad_ice else 25))
        out.append({
            "defocus_u": defocus + astig / 2, "defocus_v": defocus - astig / 2,
            "defocus_angle_deg": float(rng.uniform(-90, 90)), "astigmatism": astig,
            "max_resolution_angstrom": float(res), "figure_of_merit": float(np.clip(0.5 - 0.02 * res, 0.02, 0.5)),
            "ice_thickness_angstrom": ice, "stage_tilt_deg": float(abs(rng.normal(0, 1.0))),
            "tilt_axis_deg": float(rng.uniform(0, 360)),
            "accum_motion_total": float(motion_total), "accum_motion_early": float(early),
            "accum_motion_late": float(motion_total - early), "n_particles": n_particles,
        })
    return out


class SyntheticSession:
    """Builds and grows a session folder ``out`` (the store is written as the session would write it)."""

    def __init__(self, out: str | Path, settings: Settings | None = None, seed: int = 0,
                 micrograph_shape: tuple[int, int] = (384, 384)):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.settings = settings or session_settings()
        self.seed = seed
        self.shape = micrograph_shape
        self.hashes = stage_hashes(self.settings)
        self.n = 0
        with SessionStore(self.out / "session.sqlite") as store:
            store.set_value("settings", self.settings.model_dump(mode="json"))
            store.set_value("frame_shape", list(self.shape))
        self._boxes: list[np.ndarray] = []

    def store(self) -> SessionStore:
        return SessionStore(self.out / "session.sqlite")

    def add_exposures(self, n: int, with_micrographs: int = 0, finished: float | None = None,
                      interval_s: float = 30.0) -> list[int]:
        """Record ``n`` exposures done (``with_micrographs`` of them with image files); return their ids."""
        metrics = simulated_metrics(n, self.seed, self.n)
        ids = []
        now = time.time() if finished is None else finished
        with self.store() as store:
            for k, m in enumerate(metrics):
                i = self.n + k
                name = f"FoilHole_{1000 + i}_Data_{i:05d}"
                eid, _ = store.add_exposure(self.out / "movies" / f"{name}.tif", 1 << 20, now)
                store.mark_processing(eid)
                outputs = {"motion_star": f"motion/{name}.star"}
                n_particles = m["n_particles"]
                ctf_outputs = {}
                if k < with_micrographs:
                    outputs["micrograph"], n_particles, ctf_outputs = self._write_micrograph(name, m, i)
                store.record_stage(eid, "motion", self.hashes["motion"], {
                    "seconds": 1.0, "n_frames": 40, "frame_shape": list(self.shape),
                    "accum_motion_total": m["accum_motion_total"], "accum_motion_early": m["accum_motion_early"],
                    "accum_motion_late": m["accum_motion_late"]}, outputs)
                store.record_stage(eid, "ctf", self.hashes["ctf"], {k2: m[k2] for k2 in (
                    "defocus_u", "defocus_v", "defocus_angle_deg", "astigmatism", "max_resolution_angstrom",
                    "figure_of_merit", "ice_thickness_angstrom", "stage_tilt_deg", "tilt_axis_deg")}, ctf_outputs)
                store.record_stage(eid, "picking", self.hashes["picking"], {"seconds": 0.1, "n_picks": n_particles})
                store.record_stage(eid, "extraction", self.hashes["extraction"], {
                    "seconds": 0.1, "n_particles": n_particles, "box_size_px": 160, "output_box_size_px": 64,
                    "particle_pixel_size_angstrom": 3.75},
                    {"particles_star": f"particles/{name}.star", "particles_mrcs": f"particles/{name}.mrcs"})
                store.mark_done(eid, n_particles)
                ids.append(eid)
        self.n += n
        return ids

    def _write_micrograph(self, name: str, m: dict, i: int) -> tuple[str, int]:
        syn = _synthetic_micrographs()
        px = self.settings.optics.pixel_size_angstrom
        defocus = 0.5 * (m["defocus_u"] + m["defocus_v"])
        mic = syn.make_micrograph(seed=self.seed * 1000 + i, shape=self.shape, pixel_size_angstrom=px,
                                  diameter_angstrom=self.settings.picking.particle_diameter_angstrom,
                                  defocus_angstrom=defocus, astigmatism_angstrom=m["astigmatism"], dose=40.0,
                                  n_particles=40, n_junk=1)
        # the store's CTF metrics: cryolive's own fit of this micrograph, with the dashboard files the CTF stage
        # writes (docs/CONVENTIONS.md: ctf/<movie>.star with data_ctf_profile, ctf/<movie>_diag.png)
        ctf_outputs = self._fit_ctf(name, mic.noisy, m)
        img = mic.noisy.numpy().astype(np.float32)
        rel = f"micrographs/{name}.mrc"
        write_mrc(self.out / rel, img, px)
        yx = mic.true_yx_px.numpy()
        write_star(self.out / "particles" / f"{name}.star", {"particles": pd.DataFrame({
            "rlnImageName": [f"{j + 1:06d}@particles/{name}.mrcs" for j in range(len(yx))],
            "rlnMicrographName": [rel] * len(yx),
            "rlnCoordinateX": yx[:, 1], "rlnCoordinateY": yx[:, 0],
            "rlnDefocusU": [m["defocus_u"]] * len(yx), "rlnDefocusV": [m["defocus_v"]] * len(yx),
            "rlnDefocusAngle": [m["defocus_angle_deg"]] * len(yx), "rlnOpticsGroup": [1] * len(yx),
            "cryolivePickScore": np.linspace(1.0, 0.2, len(yx)),
        })})
        half = int(round(0.75 * self.settings.picking.particle_diameter_angstrom / px))
        for y, x in yx.round().astype(int):
            if half <= y < img.shape[0] - half and half <= x < img.shape[1] - half:
                # the expected image (what an average of many such particles converges to), particles white
                self._boxes.append(-mic.noiseless.numpy()[y - half: y + half, x - half: x + half])
        return rel, int(len(yx)), ctf_outputs

    def _fit_ctf(self, name: str, micrograph, m: dict) -> dict:
        import imagecodecs

        from cryolive.preprocess.ctf_fit import ctf_diagnostic_image_2d, estimate_ctf

        o, ctf_settings = self.settings.optics, self.settings.ctf
        fit = estimate_ctf(micrograph, o.pixel_size_angstrom, o.voltage_kv, o.cs_mm, o.amplitude_contrast,
                           ctf_settings)
        m.update({"defocus_u": float(fit.defocus_u), "defocus_v": float(fit.defocus_v),
                  "defocus_angle_deg": float(fit.defocus_angle_deg), "astigmatism": float(fit.astigmatism),
                  "max_resolution_angstrom": float(fit.max_resolution_angstrom),
                  "figure_of_merit": float(fit.figure_of_merit)})
        f = np.asarray(fit.frequencies_inv_angstrom, dtype=np.float64)
        write_star(self.out / "ctf" / f"{name}.star", {
            "ctf": {"rlnDefocusU": m["defocus_u"], "rlnDefocusV": m["defocus_v"],
                    "rlnDefocusAngle": m["defocus_angle_deg"], "rlnCtfAstigmatism": m["astigmatism"],
                    "rlnCtfMaxResolution": m["max_resolution_angstrom"], "rlnCtfFigureOfMerit": m["figure_of_merit"],
                    "rlnPhaseShift": 0.0, "rlnMicrographPixelSize": o.pixel_size_angstrom},
            "ctf_profile": pd.DataFrame({
                "rlnResolution": f, "rlnAngstromResolution": 1.0 / np.maximum(f, 1e-12),
                "cryoliveCtfSpectrum": np.asarray(fit.spectrum_1d, dtype=np.float64),
                "cryoliveCtfFit": np.asarray(fit.fit_1d, dtype=np.float64),
                "cryoliveCtfFitCorrelation": np.asarray(fit.fit_correlation_1d, dtype=np.float64)})})
        diag = np.asarray(ctf_diagnostic_image_2d(fit, o.pixel_size_angstrom, o.voltage_kv, o.cs_mm,
                                                  o.amplitude_contrast, ctf_settings), dtype=np.float32)
        (self.out / "ctf" / f"{name}_diag.png").write_bytes(
            imagecodecs.png_encode(np.clip((diag + 3.0) * (255.0 / 6.0), 0, 255).astype(np.uint8)))
        return {"ctf_star": f"ctf/{name}.star", "ctf_diag_png": f"ctf/{name}_diag.png"}

    def write_classes(self, n_classes: int = 8) -> None:
        """2D class averages from the particle boxes collected so far (as the session writes class2d/)."""
        boxes = np.stack(self._boxes) if self._boxes else np.zeros((n_classes, 64, 64), np.float32)
        groups = np.array_split(np.arange(len(boxes)), n_classes)
        averages = np.stack([boxes[g].mean(0) if len(g) else np.zeros(boxes.shape[1:]) for g in groups])
        averages = averages.astype(np.float32)
        write_mrc(self.out / "class2d" / "classes.mrcs", averages, self.settings.optics.pixel_size_angstrom, stack=True)
        counts = np.array([len(g) for g in groups], dtype=float)
        res = np.where(counts > 0, 12.0 + np.arange(n_classes), 999.0)
        table = pd.DataFrame({
            "rlnReferenceImage": [f"{i + 1:06d}@class2d/classes.mrcs" for i in range(n_classes)],
            "rlnClassNumber": np.arange(1, n_classes + 1),
            "rlnClassDistribution": counts / max(counts.sum(), 1), "rlnEstimatedResolution": res,
            "cryoliveParticleCount": counts, "cryoliveSelected": (np.arange(n_classes) % 2 == 0).astype(int),
        })
        write_star(self.out / "class2d" / "classes.star", {"model_classes": table})

    def add_exposures_bulk(self, n: int, t0: float | None = None, interval_s: float = 12.0) -> None:
        """Many exposures at once (the benchmark's 10,000), straight into the store's tables in one transaction,
        with the same rows the session's calls write (no image files)."""
        import json

        metrics = simulated_metrics(n, self.seed, self.n)
        t0 = time.time() - n * interval_s if t0 is None else t0
        with self.store():  # schema
            pass
        db = sqlite3.connect(str(self.out / "session.sqlite"), isolation_level=None)
        db.execute("BEGIN IMMEDIATE")
        for k, m in enumerate(metrics):
            i = self.n + k
            name = f"FoilHole_{1000 + i}_Data_{i:05d}"
            t = t0 + k * interval_s
            cur = db.execute("INSERT INTO exposures (path, name, size, mtime, status, attempts, n_particles, created, "
                             "updated, finished) VALUES (?, ?, ?, ?, 'done', 1, ?, ?, ?, ?)",
                             (str(self.out / "movies" / f"{name}.tif"), name, 1 << 20, t, m["n_particles"], t, t, t))
            eid = cur.lastrowid
            rows = [
                ("motion", {"accum_motion_total": m["accum_motion_total"], "accum_motion_early": m["accum_motion_early"],
                            "accum_motion_late": m["accum_motion_late"], "frame_shape": list(self.shape)}),
                ("ctf", {k2: m[k2] for k2 in ("defocus_u", "defocus_v", "defocus_angle_deg", "astigmatism",
                                               "max_resolution_angstrom", "figure_of_merit", "ice_thickness_angstrom",
                                               "stage_tilt_deg", "tilt_axis_deg")}),
                ("picking", {"n_picks": m["n_particles"]}),
                ("extraction", {"n_particles": m["n_particles"]}),
            ]
            db.executemany("INSERT INTO stage_results VALUES (?, ?, ?, ?, ?, ?)",
                           [(eid, st, self.hashes[st], json.dumps(v), "{}", t) for st, v in rows])
        db.execute("COMMIT")
        db.close()
        self.n += n


def finite(x) -> bool:
    return x is not None and math.isfinite(x)
