"""Fixtures for orchestration tests: small movies on disk and simple stage functions injected in place of
the algorithms (the orchestration's behaviour — files, store, failures, resume — does not depend on them;
the end-to-end test runs cryolive's real algorithms)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import mrcfile
import numpy as np
import pytest
import tifffile
import torch

from cryolive.config import Class2DSettings, Optics, PickingSettings, Settings
from cryolive.session.pipeline import StageFunctions

FRAME = (64, 64)


def write_movie(path, t=4, shape=FRAME, seed=0):
    """A Poisson-count movie as MRC (uint8 → mode 0) or LZW TIFF, by suffix."""
    data = np.random.default_rng(seed).poisson(2.0, size=(t, *shape)).astype(np.uint8)
    if str(path).endswith((".tif", ".tiff")):
        tifffile.imwrite(path, data, compression="lzw", photometric="minisblack")
    else:
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(data)
    return path


def sum_frames(frames, pixel_size_angstrom, dose_per_frame, voltage_kv, settings):
    total = frames.sum(0)
    t = frames.shape[0]
    return SimpleNamespace(shifts_yx_px=torch.zeros(t, 2), micrograph=total, micrograph_nodw=total.clone(),
                           power_spectrum=None, accum_motion_total=0.0, accum_motion_early=0.0,
                           accum_motion_late=0.0)


def sum_frames_or_die(frames, pixel_size_angstrom, dose_per_frame, voltage_kv, settings):
    """Fault injection: the worker process dies (as on a segfault or the OOM killer) on 3-frame movies."""
    if frames.shape[0] == 3:
        import os

        os._exit(3)
    return sum_frames(frames, pixel_size_angstrom, dose_per_frame, voltage_kv, settings)


def ctf_that_raises(image, pixel_size_angstrom, voltage_kv, cs_mm, amplitude_contrast, settings):
    raise ValueError("no Thon rings")


def fixed_ctf(image, pixel_size_angstrom, voltage_kv, cs_mm, amplitude_contrast, settings):
    return SimpleNamespace(defocus_u=15000.0, defocus_v=14000.0, defocus_angle_deg=30.0, astigmatism=1000.0,
                           max_resolution_angstrom=5.0, figure_of_merit=0.3)


def grid_picks(micrograph, pixel_size_angstrom, settings, ctf=None):
    ys, xs = torch.meshgrid(torch.arange(12, 56, 12.0), torch.arange(12, 56, 12.0), indexing="ij")
    coords = torch.stack([ys.flatten(), xs.flatten()], -1)
    return SimpleNamespace(coords_yx_px=coords, scores=torch.linspace(1, 0, len(coords)))


def crop_boxes(micrograph, coords_yx_px, box_size_px, output_box_size_px, invert_contrast=True):
    h, w = micrograph.shape
    half = box_size_px // 2
    c = coords_yx_px.round().long()
    kept = (c[:, 0] - half >= 0) & (c[:, 1] - half >= 0) & (c[:, 0] + half <= h) & (c[:, 1] + half <= w)
    ims = [micrograph[y - half : y + half, x - half : x + half] for y, x in c[kept].tolist()]
    images = torch.stack(ims) if ims else torch.zeros(0, box_size_px, box_size_px)
    return SimpleNamespace(images=-images if invert_contrast else images, kept=kept)


def box_sizes(particle_diameter_angstrom, pixel_size_angstrom):
    return 16, 16


def constant_defocus(coords_yx_px, ctf):
    n = len(coords_yx_px)
    return (np.full(n, ctf.defocus_u), np.full(n, ctf.defocus_v), np.full(n, ctf.defocus_angle_deg))


FAKE_STAGES = StageFunctions(align_movie=sum_frames, estimate_ctf=fixed_ctf, pick_blobs=grid_picks,
                             extract_particles=crop_boxes, default_box_sizes=box_sizes,
                             per_particle_defocus=constant_defocus,
                             detect_hot_pixels=lambda s: torch.zeros(s.shape, dtype=torch.bool),
                             correct_defects=lambda f, m: f)


@pytest.fixture
def movie_writer():
    """``write_movie(path, t=4, shape=(64, 64), seed=0)``: a small MRC or LZW TIFF movie."""
    return write_movie


def _no_hot_pixels(frames_sum):
    return torch.zeros(frames_sum.shape, dtype=torch.bool)


def _unchanged(frames, mask):
    return frames


FAKE_STAGES = dataclasses.replace(FAKE_STAGES, detect_hot_pixels=_no_hot_pixels, correct_defects=_unchanged)
CRASHING_STAGES = dataclasses.replace(FAKE_STAGES, align_movie=sum_frames_or_die)


@pytest.fixture
def failing_ctf_stages():
    """Like ``fake_stages``, but the CTF estimation raises ValueError."""
    return dataclasses.replace(FAKE_STAGES, estimate_ctf=ctf_that_raises)


@pytest.fixture
def fake_stages():
    return FAKE_STAGES


@pytest.fixture
def crashing_stages():
    """Like ``fake_stages``, but the worker process dies on movies of 3 frames (module-level: picklable)."""
    return CRASHING_STAGES


@pytest.fixture
def small_settings():
    """Settings for 64×64 movies, processed in this process (n_workers=0); 2D never starts."""
    return Settings(optics=Optics(pixel_size_angstrom=2.0), dose_per_frame=1.0, n_workers=0,
                    picking=PickingSettings(particle_diameter_angstrom=20.0),
                    class2d=Class2DSettings(min_particles_to_start=10**9))
