"""Motion-correction benchmark: seconds per movie and global-trajectory error, cryolive against teamtomo's
torch-motion-correction, on the same simulated movie in the same run.

Sizes (``--size``): ``small`` 1024×1024×24 at 1 Å/px (a smoke test, < 2 min with the peer), ``4k``
4096×4096×40 at 1 Å/px (Falcon 4 / K2-like), ``k3`` 4092×5760×40 at 0.83 Å/px (Gatan K3). Dose 1 e/Å² per
frame (40 e/Å² over 40 frames), global drift of up to 20 Å, smooth local motion of up to 3 Å.

The movie: full-frame physics simulation at 4k would take tens of minutes here, so the noiseless image is
assembled from 2048² tiles (1024² for ``small``), each a separate ``cryolive.simulate.MovieSimulator``
micrograph (particles of 6NY1 in vitreous ice, per-particle CTF, amorphous-ice structure; the specimen and
ice contrast kept apart). Every frame then gets the simulator's physics on the whole frame: local motion
(a smooth 5×5-control-point field, zero mean over its nodes, growing fast early, largest deviation
``--local-motion`` Å),
Grant–Grigorieff damage of the specimen at the frame's dose, the global drift by an exact Fourier shift
(the trajectory of the first tile's simulator: ``frame_t(r) ≈ frame_1(r − s_t − d_t(r))``), and Poisson
counts. Differences from ``MovieSimulator.frames()``: the local warp acts on the image after the CTF (the
simulator warps the potential before it; at ≤ 3 Å over thousands of pixels the Thon rings stretch by
< 0.1 %), there is no gain variation or hot pixels, and the tiles meet at seams (their particles stay away
from tile edges). The truth (:func:`true_motion`, specimen displacement relative to frame 1, (y, x) px,
docs/CONVENTIONS.md): for the global trajectory, the frame's mean motion, i.e. the drift ``s_t`` plus the local
field's mean over the whole area (bicubic between the nodes, the field is not zero on average over the area: up
to 0.2 px at 4k; a global trajectory cannot tell the two apart, so the drift alone is not its truth); for the
local motion, the total motion ``s_t + d_t(r)`` at a 9×9 grid of points ``r`` spanning the frame.

Written as LZW TIFF (uint8 counts, one page per frame, as EPU writes) and MRC (int16). Timed per movie:

* cryolive ``align_movie`` (``cryolive.preprocess.motion``; ``global`` = whole-frame alignment, ``patch`` =
  with the patch stage if the current API has one) on the frames in memory, and read + align from each file
  (``cryolive.io.movies.open_movie(...).read_all()``, decode included), dose-weighted sum included;
* the peer in its own venv and process (``bench/_peer_tmc.py``; set up by ``bash bench/setup_motion_peers.sh``):
  read of the MRC, ``estimate_global_motion`` (whole-frame cross-correlation with the middle frame) and then
  ``estimate_local_motion`` (spline deformation field, Adam) seeded with it. The peer returns trajectories,
  not a summed micrograph, so its time excludes any summation (in cryolive's favour for the peer).

Printed: a table of seconds per movie, the ratio cryolive / peer (both reading the MRC), the RMS error of
the global trajectory in px against the mean motion, anchored at frame 1 (as tests/preprocess/test_motion.py
measures it) and with the best constant offset removed (the peer measures against the middle frame), the RMS
error of the total motion at the 9×9 points (cryolive: ``MotionResult.shifts_at``; the peer: its deformation
field resampled there; a global-only estimate is the same everywhere), and, for reference, the anchored error
against the drift alone. The peer's sign convention and point order are checked against the truth on every run. Run with one thread (the CI machine has
two cores shared with other work; absolute seconds are noisy, the ratio within one run is the figure).

    bash bench/setup_motion_peers.sh                      # once: .bench-envs/torch-motion-correction
    OMP_NUM_THREADS=1 python bench/motion.py --size small # smoke test (< 2 min)
    OMP_NUM_THREADS=1 python bench/motion.py --size 4k --formats mrc,tiff --repeats 1
    OMP_NUM_THREADS=1 python bench/motion.py --size k3 --skip-peer
    OMP_NUM_THREADS=1 python bench/motion.py --size 4k --profile --skip-peer   # where cryolive's time goes
    python bench/motion.py --size 4k --device cuda --threads 16                # on a GPU machine
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = Path(os.environ.get("CRYOLIVE_BENCH_PEER_PYTHON")
                   or ROOT / ".bench-envs" / "torch-motion-correction" / "bin" / "python")  # a device machine: its python3

SIZES = {  # (h, w), frames, Å/px, tile side
    "small": ((1024, 1024), 24, 1.0, 1024),
    "4k": ((4096, 4096), 40, 1.0, 2048),
    "k3": ((4092, 5760), 40, 0.83, 2048),
}


# ---------------------------------------------------------------------------------------------- movie
def synthesize_movie(shape, n_frames, pixel_size, dose_per_frame, max_drift_angstrom, local_motion_angstrom,
                     seed, tile, voltage_kv=300.0, log=print):
    """Counts ``(t, h, w)`` uint8 (numpy) and the true global trajectory ``(t, 2)`` px (torch), see the module doc."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from cryolive.ctf import critical_exposure
    from cryolive.fourier import frequency_radius_2d, phase_shift_2d
    from cryolive.simulate import MovieSimulator, SimulationSettings

    h, w = shape
    ny, nx = math.ceil(h / tile), math.ceil(w / tile)
    particles = int(round(100 * (tile * pixel_size / 1024) ** 2))  # the simulator's default density
    spec = torch.empty(ny * tile, nx * tile)
    ice = torch.empty(ny * tile, nx * tile)
    t0 = time.perf_counter()
    for k in range(ny * nx):
        s = SimulationSettings(image_shape_px=(tile, tile), n_frames=n_frames, pixel_size_angstrom=pixel_size,
                               dose_per_frame=dose_per_frame, particles_per_micrograph=particles,
                               max_drift_angstrom=max_drift_angstrom, local_motion_angstrom=0.0,
                               gain_variation=0.0, n_hot_pixels=0, oversampling=1, seed=seed, voltage_kv=voltage_kv)
        sim = MovieSimulator(s, k)
        sim.contrast_reference()  # prepares the signal
        if k == 0:
            drift, n0 = sim.drift.clone(), sim.n0
        iy, ix = divmod(k, nx)
        sl = (slice(iy * tile, (iy + 1) * tile), slice(ix * tile, (ix + 1) * tile))
        spec[sl] = -sim.scale * torch.fft.irfft2(sim.spec_ft, s=(tile, tile))
        ice[sl] = -sim.scale * torch.fft.irfft2(sim.ice_ctf_ft, s=(tile, tile))
        del sim
    spec, ice = spec[:h, :w].contiguous(), ice[:h, :w].contiguous()
    log(f"  {ny * nx} tile(s) of {tile}² simulated in {time.perf_counter() - t0:.0f} s")

    amp = local_motion_angstrom / pixel_size
    use_local = amp > 0 and n_frames > 1
    if use_local:
        final = local_field_nodes(seed, amp)
        prof = local_profile(n_frames)
        field = F.interpolate(final.permute(2, 0, 1)[None], size=(h, w), mode="bicubic", align_corners=True)[0]
        by, bx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32),
                                indexing="ij")
        both = torch.stack([spec, ice])[None]  # (1, 2, h, w)
    ne = critical_exposure(frequency_radius_2d((h, w), pixel_size), voltage_kv)  # (h, w//2+1)
    gen = torch.Generator().manual_seed(seed * 104729 + 3)
    counts = np.empty((n_frames, h, w), dtype=np.uint8)
    t0 = time.perf_counter()
    for t in range(n_frames):
        if use_local and t > 0:
            d = field * prof[t]  # (2, h, w) y, x px
            grid = torch.stack([2 * (bx - d[1]) / (w - 1) - 1, 2 * (by - d[0]) / (h - 1) - 1], -1)[None]
            sp, ic = F.grid_sample(both, grid, mode="bicubic", padding_mode="border", align_corners=True)[0]
            del grid, d
        else:
            sp, ic = spec, ice
        damage = torch.exp(-(t + 0.5) * dose_per_frame / (2 * ne))
        ft = (torch.fft.rfft2(sp) * damage + torch.fft.rfft2(ic)) * phase_shift_2d(drift[t], (h, w))
        lam = n0 * (1 + torch.fft.irfft2(ft, s=(h, w)))
        counts[t] = torch.poisson(lam.clamp(min=0), generator=gen).clamp(max=255).to(torch.uint8).numpy()
        del ft, lam
    log(f"  {n_frames} frames of {h}×{w} (mean {counts[0].mean():.2f} counts/px) in {time.perf_counter() - t0:.0f} s")
    return counts, drift


def local_field_nodes(seed: int, amp_px: float):
    """The local field's ``(5, 5, 2)`` control values (y, x) px at the end of the exposure: zero mean over the
    nodes, largest node ``amp_px``. Bicubic between the nodes (corner nodes at the frame's corner pixels)."""
    import torch

    g = torch.Generator().manual_seed(seed * 7919 + 11)
    final = torch.randn(5, 5, 2, generator=g)
    final = final - final.mean((0, 1))
    return final * (amp_px / final.norm(dim=-1).max())


def local_profile(n_frames: int) -> list:
    """Fraction of the final local field reached in each frame (0 in frame 1, fast early, 1 in the last)."""
    tau = max(1.0, n_frames / 4)
    return [(1 - math.exp(-t / tau)) / (1 - math.exp(-(n_frames - 1) / tau)) if n_frames > 1 else 0.0
            for t in range(n_frames)]


def grid_points(shape, n: int = 9):
    """``(n², 2)`` (y, x) px: an ``n × n`` grid spanning the frame corner to corner, row-major."""
    import torch

    h, w = shape
    ys = torch.linspace(0, h - 1, n)
    xs = torch.linspace(0, w - 1, n)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], -1)


def true_motion(movie_meta: dict, drift, points_yx=None):
    """The simulated movie's true motion from its settings (``meta.json``'s ``movie``) and drift ``(t, 2)`` px.

    Returns ``(mean, at_points)``: ``mean (t, 2)`` the motion of the frame as a whole (the drift plus the local
    field's mean over every pixel of the frame: the field is zero on average over its 5×5 nodes, not over the
    area, and the whole-frame motion is what a global trajectory measures), and ``at_points (t, n, 2)`` the
    total motion at ``points_yx (n, 2)`` px of frame 1 (drift + local field there), or None. Both relative to
    frame 1. To first order in the field's gradient (≤ 3 px over thousands), a feature at ``r`` of frame 1
    sits at ``r + s_t + d_t(r)`` in frame ``t``.
    """
    import torch
    import torch.nn.functional as F

    drift = torch.as_tensor(drift, dtype=torch.float32)
    h, w = movie_meta["shape"]
    n = movie_meta["frames"]
    amp = movie_meta["local_motion"] / movie_meta["pixel_size"]
    if amp <= 0 or n < 2:
        pts = None if points_yx is None else drift[:, None, :].expand(-1, len(points_yx), -1).clone()
        return drift.clone(), pts
    nodes = local_field_nodes(movie_meta["seed"], amp).permute(2, 0, 1)[None]  # (1, 2, 5, 5)
    prof = torch.tensor(local_profile(n), dtype=torch.float32)
    area_mean = torch.zeros(2)
    for y0 in range(0, h, 1024):  # the exact mean over every pixel, in bands to bound memory
        rows = torch.arange(y0, min(y0 + 1024, h), dtype=torch.float32)
        yy, xx = torch.meshgrid(rows, torch.arange(w, dtype=torch.float32), indexing="ij")
        grid = torch.stack([2 * xx / (w - 1) - 1, 2 * yy / (h - 1) - 1], -1)[None]
        area_mean += F.grid_sample(nodes, grid, mode="bicubic", padding_mode="border",
                                   align_corners=True)[0].sum((1, 2))
    area_mean /= h * w
    mean = drift + prof[:, None] * area_mean[None]
    if points_yx is None:
        return mean, None
    p = torch.as_tensor(points_yx, dtype=torch.float32)
    grid = torch.stack([2 * p[:, 1] / (w - 1) - 1, 2 * p[:, 0] / (h - 1) - 1], -1)[None, None]
    at = F.grid_sample(nodes, grid, mode="bicubic", padding_mode="border", align_corners=True)[0, :, 0].T  # (n, 2)
    return mean, drift[:, None, :] + prof[:, None, None] * at[None]


def write_movie_files(counts, folder: Path, formats) -> dict:
    """Write ``counts (t, h, w)`` uint8 as ``movie.tif`` (LZW) and/or ``movie.mrc`` (int16); paths by format."""
    import mrcfile
    import numpy as np
    import tifffile

    out = {}
    t, h, w = counts.shape
    if "tiff" in formats:
        p = folder / "movie.tif"
        tifffile.imwrite(p, (f for f in counts), shape=(t, h, w), dtype=np.uint8, compression="lzw",
                         photometric="minisblack")
        out["tiff"] = p
    if "mrc" in formats or "peer" in formats:
        p = folder / "movie.mrc"
        with mrcfile.new_mmap(p, shape=(t, h, w), mrc_mode=1, overwrite=True) as m:
            for i in range(t):
                m.data[i] = counts[i]
        out["mrc"] = p
    return out


# ---------------------------------------------------------------------------------------------- metrics
def rms_anchored(est, truth) -> float:
    """RMS over frames of |est_t − truth_t| (px), both trajectories relative to frame 1."""
    return float((est - truth).norm(dim=-1).pow(2).mean().sqrt())


def rms_offset_free(est, truth) -> float:
    """As :func:`rms_anchored` after removing the best constant offset (the mean difference)."""
    d = est - truth
    return float((d - d.mean(0, keepdim=True)).norm(dim=-1).pow(2).mean().sqrt())


def rms_points(est, truth) -> float:
    """RMS over frames and points of the total motion's error (px), ``(t, n, 2)`` each, every point's
    trajectory taken relative to its own position in frame 1."""
    est = est - est[0:1]
    truth = truth - truth[0:1]
    return float((est - truth).norm(dim=-1).pow(2).mean().sqrt())


# ---------------------------------------------------------------------------------------------- cryolive
def cryolive_modes(requested):
    """``{mode: (MotionSettings, align_movie keyword arguments)}`` for the modes the current API offers.

    ``global``: whole-frame alignment only; ``patch``: the default settings with local (patch) motion —
    ``MotionSettings.patch_grid`` (5×5 by default; (1, 1) = global only), or, in the older API, ``n_patches``.
    """
    from cryolive.config import MotionSettings
    from cryolive.preprocess.motion import align_movie

    params = inspect.signature(align_movie).parameters
    has_grid = "patch_grid" in MotionSettings.model_fields
    modes = {}
    for m in requested:
        if m == "global":
            if has_grid:
                modes[m] = (MotionSettings(patch_grid=(1, 1)), {})
            else:
                modes[m] = (MotionSettings(), {"n_patches": 1} if "n_patches" in params else {})
        elif m == "patch":
            if has_grid:
                st = MotionSettings()
                if tuple(st.patch_grid) == (1, 1):
                    st = MotionSettings(patch_grid=(5, 5))
                modes[m] = (st, {})
            elif "n_patches" in params:
                modes[m] = (MotionSettings(), {"n_patches": 5})
            else:
                print("  (align_movie has no patch option; 'patch' mode skipped)")
        else:
            raise SystemExit(f"unknown cryolive mode {m!r} (global, patch)")
    return modes


def run_cryolive(source, pixel_size, dose_per_frame, device, mode, points=None):
    """Align one movie (a file path, decoded here, or a (t, h, w) tensor).

    Returns (shifts, decode s, total wall s, total CPU s of this process, total motion ``(t, n, 2)`` px at
    ``points (n, 2)`` or None).
    """
    import torch

    from cryolive.io.movies import open_movie
    from cryolive.preprocess.motion import align_movie

    settings, kwargs = mode

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0, c0 = time.perf_counter(), time.process_time()
    if isinstance(source, Path):
        frames = torch.from_numpy(open_movie(source).read_all())
    else:
        frames = source
    t_decode = time.perf_counter() - t0 if isinstance(source, Path) else 0.0
    frames = frames.to(device)
    res = align_movie(frames, pixel_size, dose_per_frame, 300.0, settings, **kwargs)
    res.micrograph.sum().item()  # the sum is part of the job
    sync()
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    shifts = res.shifts_yx_px.detach().cpu()
    at = res.shifts_at(points).detach().cpu() if points is not None and hasattr(res, "shifts_at") else None
    del frames, res
    return shifts, t_decode, total, cpu, at


def profile_cryolive(frames, pixel_size, dose_per_frame, device, mode, top=25):
    """cProfile of one in-memory ``align_movie`` in CPU seconds of this process (steady on a loaded machine; on
    CUDA, kernels run asynchronously and the times land on synchronising calls): torch ops show as builtins."""
    import cProfile
    import pstats

    import torch

    from cryolive.preprocess.motion import align_movie

    settings, kwargs = mode
    frames = frames.to(device)
    pr = cProfile.Profile(time.process_time) if device.type == "cpu" else cProfile.Profile()
    pr.enable()
    res = align_movie(frames, pixel_size, dose_per_frame, 300.0, settings, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    pr.disable()
    print(f"\nprofile of align_movie ({settings}, {kwargs}; {res.n_iterations} iterations), by own time:")
    pstats.Stats(pr).sort_stats("tottime").print_stats(top)
    print("by cumulative time:")
    pstats.Stats(pr).sort_stats("cumulative").print_stats(top)


# ---------------------------------------------------------------------------------------------- peer
def run_peer(mrc: Path, pixel_size, device, threads, iterations, patch, skip_optimiser, seed, workdir: Path,
             points=None):
    out = workdir / "peer.json"
    cmd = [str(PEER_PYTHON), str(ROOT / "bench" / "_peer_tmc.py"), str(mrc), str(out),
           "--pixel-size", str(pixel_size), "--device", str(device), "--threads", str(threads),
           "--iterations", str(iterations), "--patch", str(patch), "--seed", seed]
    if points is not None:
        cmd += ["--points", str(int(round(math.sqrt(len(points)))))]
    if skip_optimiser:
        cmd.append("--skip-optimiser")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TQDM_DISABLE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise RuntimeError(f"torch-motion-correction failed (exit {proc.returncode}):\n{tail}")
    res = json.loads(out.read_text())
    res["process_wall_seconds"] = wall
    return res


# ---------------------------------------------------------------------------------------------- main
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--frames", type=int, default=None, help="frames per movie (default: 24 small, 40 otherwise)")
    ap.add_argument("--dose-per-frame", type=float, default=1.0, help="e/Å² per frame")
    ap.add_argument("--max-drift", type=float, default=20.0, help="largest drift path length, Å")
    ap.add_argument("--local-motion", type=float, default=3.0, help="largest local deviation, Å")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N (cryolive and the peer)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads for both tools")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per cryolive configuration (min reported)")
    ap.add_argument("--formats", default="mrc,tiff",
                    help="cryolive inputs to time: memory (no decode), mrc, tiff (read + align)")
    ap.add_argument("--modes", default="global,patch", help="cryolive modes: global, patch")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--peer-iterations", type=int, default=100, help="optimiser iterations (package default 100)")
    ap.add_argument("--peer-patch", type=int, default=None, help="optimiser patch side px (default: 1/8 frame)")
    ap.add_argument("--peer-skip-optimiser", action="store_true")
    ap.add_argument("--peer-seed", choices=("global", "zero"), default="global",
                    help="peer optimiser's start: its global estimate (its workflow) or a zero field")
    ap.add_argument("--profile", nargs="?", const="first", choices=("first", "all"), default=None,
                    help="also profile an in-memory cryolive alignment (first mode, or all modes)")
    ap.add_argument("--workdir", default=None, help="keep the movie files and results here (default: temporary)")
    ap.add_argument("--json", default=None, help="write all figures to this JSON file")
    args = ap.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")
    shape, frames_default, px, tile = SIZES[args.size]
    n_frames = args.frames or frames_default
    formats = [f for f in args.formats.split(",") if f]
    modes = cryolive_modes([m for m in args.modes.split(",") if m])
    run_peer_now = not args.skip_peer
    if run_peer_now and not PEER_PYTHON.exists():
        raise SystemExit(f"peer not installed: run `bash bench/setup_motion_peers.sh` (looked for {PEER_PYTHON})")

    tmp = None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cryolive-bench-motion-")
        workdir = Path(tmp.name)

    print(f"motion benchmark: {shape[0]}×{shape[1]}×{n_frames} at {px} Å/px, {args.dose_per_frame} e/Å²/frame "
          f"({args.dose_per_frame * n_frames:.0f} e/Å²), drift ≤ {args.max_drift} Å, local ≤ {args.local_motion} Å; "
          f"device {device}, {args.threads} thread(s), {os.cpu_count()} CPU(s) seen (shared machine: seconds are noisy, "
          f"compare within the run)")
    # the movie: synthesised once per workdir and settings (meta.json), reused by later runs with --workdir
    meta = dict(shape=list(shape), frames=n_frames, pixel_size=px, dose_per_frame=args.dose_per_frame,
                max_drift=args.max_drift, local_motion=args.local_motion, seed=args.seed, tile=min(tile, max(shape)))
    meta_path = workdir / "meta.json"
    want_files = {"tiff": workdir / "movie.tif", "mrc": workdir / "movie.mrc"}
    if (meta_path.exists() and json.loads(meta_path.read_text()).get("movie") == meta
            and all(p.exists() for p in want_files.values())):
        truth = torch.tensor(json.loads(meta_path.read_text())["truth_yx_px"], dtype=torch.float32)
        files = want_files
        print(f"  reusing the movie in {workdir} (same settings)")
    else:
        counts, truth = synthesize_movie(shape, n_frames, px, args.dose_per_frame, args.max_drift,
                                         args.local_motion, args.seed, meta["tile"])
        truth = truth.to(torch.float32)
        t0 = time.perf_counter()
        files = write_movie_files(counts, workdir, {"tiff", "mrc"})
        del counts
        meta_path.write_text(json.dumps(dict(movie=meta, truth_yx_px=truth.tolist())))
        sizes = ", ".join(f"{k} {p.stat().st_size / 2**20:.0f} MiB" for k, p in files.items())
        print(f"  written in {time.perf_counter() - t0:.0f} s ({sizes})")
    print(f"  true drift: path {float((truth[1:] - truth[:-1]).norm(dim=-1).sum()) * px:.1f} Å, "
          f"end {[round(v, 2) for v in truth[-1].tolist()]} px")
    drift = truth
    points = grid_points(shape)
    truth, truth_pts = true_motion(meta, drift, points)
    print(f"  the frame's mean motion (drift + the local field's mean over the area) differs from the drift by up "
          f"to {float((truth - drift).norm(dim=-1).max()):.2f} px; the local field reaches "
          f"{float((truth_pts - truth[:, None]).norm(dim=-1).max()):.2f} px at the 9×9 points")

    def frames_in_memory():
        from cryolive.io.movies import open_movie

        return torch.from_numpy(open_movie(files["mrc"]).read_all())

    rows = []  # (tool, input, decode s, total wall s, total CPU s, shifts)
    frames_mem = frames_in_memory() if "memory" in formats else None
    for mode, mode_args in modes.items():
        for fmt in formats:
            source = frames_mem if fmt == "memory" else files[fmt]
            best = None
            for _ in range(max(1, args.repeats)):
                shifts, t_dec, total, cpu, at = run_cryolive(source, px, args.dose_per_frame, device, mode_args,
                                                             points)
                if best is None or total < best[2]:
                    best = (shifts, t_dec, total, cpu, at)
            rows.append((f"cryolive {mode}", fmt, best[1], best[2], best[3], best[0], best[4]))
            print(f"  cryolive {mode:6s} {fmt:6s}: {best[2]:7.1f} s (decode {best[1]:.1f} s; CPU {best[3]:.1f} s), "
                  f"RMS {rms_anchored(best[0], truth):.3f} px", flush=True)
    if args.profile:
        if frames_mem is None:
            frames_mem = frames_in_memory()
        for name in [m for m in ("global", "patch") if m in modes][: 1 if args.profile == "first" else None]:
            profile_cryolive(frames_mem, px, args.dose_per_frame, device, modes[name])
    del frames_mem

    peer = None
    if run_peer_now:
        patch = args.peer_patch or max(128, (min(shape) // 8) // 2 * 2)
        print(f"  running torch-motion-correction (own process; global, then optimiser with {patch}² patches, "
              f"{args.peer_iterations} iterations)...", flush=True)
        peer = run_peer(files["mrc"], px, device, args.threads, args.peer_iterations, patch,
                        args.peer_skip_optimiser, args.peer_seed, workdir, points)
        opt_label = "tmc global+optimiser" if args.peer_seed == "global" else "tmc optimiser (zero)"
        for key, label in (("global", "tmc global"), ("optimiser", opt_label)):
            if key not in peer:
                continue
            s = torch.tensor(peer[key]["shifts_yx_px"], dtype=torch.float32)
            e, e_flip = rms_offset_free(s, truth), rms_offset_free(-s, truth)
            if e_flip < 0.5 * e:
                print(f"  WARNING: {label} fits the truth better with the opposite sign ({e_flip:.3f} vs {e:.3f} px):"
                      f" the sign conversion in bench/_peer_tmc.py is wrong")
            at = peer[key].get("points_yx_px")
            if at is not None:
                at = torch.tensor(at, dtype=torch.float32)  # (t, n, 2), the points in bench order
                e_pts = rms_points(at, truth_pts)
                ng = int(round(math.sqrt(at.shape[1])))
                swapped = at.reshape(at.shape[0], ng, ng, 2).transpose(1, 2).reshape(at.shape)
                if rms_points(swapped, truth_pts) < 0.5 * e_pts:
                    print(f"  WARNING: {label}'s field fits the truth better with its grid transposed: the point "
                          f"order in bench/_peer_tmc.py is wrong")
            rows.append((label, "mrc", peer["read_seconds"], peer[key]["seconds_with_read"],
                         peer[key].get("cpu_seconds_with_read", float("nan")), s, at))
        print(f"  peer: torch-motion-correction {peer['version']} on torch {peer['torch']}, "
              f"process wall {peer['process_wall_seconds']:.0f} s")

    peer_ref = {r[0]: (r[3], r[4]) for r in rows if r[0].startswith("tmc")}
    ref_full = peer_ref.get("tmc global+optimiser") or peer_ref.get("tmc optimiser (zero)")
    ref_glob = peer_ref.get("tmc global")
    print()
    hdr = (f"{'tool':24s} {'input':6s} {'decode s':>8s} {'s/movie':>8s} {'CPU s':>8s} {'÷tmc full':>10s} "
           f"{'CPU ÷tmc full':>14s} {'÷tmc glob':>10s} {'global px fr.1':>15s} {'offset-free':>12s} "
           f"{'local px 9×9':>13s} {'vs drift fr.1':>14s}")
    print(hdr)
    print("-" * len(hdr))
    figures = []
    for tool, fmt, dec, total, cpu, s, at in rows:
        r_full = total / ref_full[0] if ref_full else None
        c_full = cpu / ref_full[1] if ref_full else None
        r_glob = total / ref_glob[0] if ref_glob else None
        ea, eo = rms_anchored(s, truth), rms_offset_free(s, truth)
        el = rms_points(at, truth_pts) if at is not None else None
        ed = rms_anchored(s, drift)
        f3 = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        print(f"{tool:24s} {fmt:6s} {dec:8.1f} {total:8.1f} {cpu:8.1f} {f3(r_full):>10s} {f3(c_full):>14s} "
              f"{f3(r_glob):>10s} {ea:15.3f} {eo:12.3f} {f3(el):>13s} {ed:14.3f}")
        figures.append(dict(tool=tool, input=fmt, decode_seconds=dec, seconds_per_movie=total, cpu_seconds=cpu,
                            ratio_to_tmc_full=r_full, cpu_ratio_to_tmc_full=c_full, ratio_to_tmc_global=r_glob,
                            rms_px_frame1=ea, rms_px_offset_free=eo, rms_px_local_points=el,
                            rms_px_frame1_vs_drift=ed, shifts_yx_px=s.tolist()))
    print(f"(÷tmc: this row's seconds per movie (wall, or CPU of its own process) over the peer's, both reading the "
          f"MRC file where input is mrc; CPU time is less sensitive to the machine's load. global: RMS of the "
          f"trajectory against the frame's true mean motion, anchored at frame 1 and with the best constant offset "
          f"removed; local: RMS of the total motion at a 9×9 grid of points spanning the frame (a global-only "
          f"estimate counts as the same motion everywhere); vs drift: against the simulator's drift alone, which "
          f"leaves out the local field's mean over the area. Zero-motion RMS would be "
          f"{rms_anchored(torch.zeros_like(truth), truth):.2f} px)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(
            size=args.size, shape=list(shape), frames=n_frames, pixel_size=px, dose_per_frame=args.dose_per_frame,
            device=str(device), threads=args.threads, truth_yx_px=truth.tolist(), drift_yx_px=drift.tolist(),
            rows=figures,
            peer={k: v for k, v in (peer or {}).items() if k not in ("global", "optimiser")},
            command=" ".join(sys.argv)), indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
