"""Replay at microscope pace: files appear progressively and end identical."""

import threading
import time

import tifffile

from cryolive.simulate import SimulationSettings, replay, simulate_live
from cryolive.io.star import read_star

TINY = dict(image_shape_px=(128, 128), n_frames=3, pixel_size_angstrom=3.0, particles_per_micrograph=2,
            junk_per_micrograph=0, oversampling=1, max_drift_angstrom=6.0)


def test_replay_writes_progressively(tmp_path):
    src = tmp_path / "src" / "movies"
    src.mkdir(parents=True)
    for i in range(2):
        (src / f"m{i}.tif").write_bytes(bytes(range(256)) * 40 * (i + 1))
    watch = tmp_path / "watch"
    sizes = []
    done = threading.Event()

    def observe():
        while not done.is_set():
            f = watch / "m0.tif"
            if f.exists():
                sizes.append(f.stat().st_size)
            time.sleep(0.005)

    th = threading.Thread(target=observe)
    th.start()
    out = replay(tmp_path / "src", watch, interval_s=0.0, n_chunks=4, chunk_pause_s=0.08)
    done.set()
    th.join()
    assert [p.name for p in out] == ["m0.tif", "m1.tif"]
    for i in range(2):
        assert (watch / f"m{i}.tif").read_bytes() == (src / f"m{i}.tif").read_bytes()
    final = (src / "m0.tif").stat().st_size
    assert any(0 < s < final for s in sizes)  # seen while incomplete


def test_simulate_live(tmp_path):
    settings = SimulationSettings(n_movies=2, seed=1, **TINY)
    summary = simulate_live(tmp_path / "truth", tmp_path / "watch", settings, interval_s=0.0, chunk_pause_s=0.0)
    assert summary["n_movies"] == 2
    names = sorted(p.name for p in (tmp_path / "watch").iterdir())
    assert names == ["gain.mrc", "movie_0001.tif", "movie_0002.tif"]
    with tifffile.TiffFile(tmp_path / "watch" / "movie_0002.tif") as tif:
        assert len(tif.pages) == 3
    mic = read_star(tmp_path / "truth" / "truth" / "exposures.star")["micrographs"]
    assert list(mic.rlnMicrographMovieName) == ["movie_0001.tif", "movie_0002.tif"]
