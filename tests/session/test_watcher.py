"""The watcher takes a movie only when it is finished, and only once."""

from __future__ import annotations

import threading
import time

import mrcfile
import numpy as np

from cryolive.session.watcher import MovieWatcher, is_candidate


def test_candidates_ignore_hidden_and_temporary_files():
    pats = ["*.tif", "*.mrc"]
    assert is_candidate("a.tif", pats) and is_candidate("A.MRC", pats)
    assert not is_candidate(".a.tif", pats)
    assert not is_candidate("a.tif.tmp", pats)
    assert not is_candidate("a.txt", pats)
    assert not is_candidate("gain.mrc", pats) and not is_candidate("K3_Gain_ref.tif", pats)


def test_file_being_written_is_not_taken_until_complete_and_settled(tmp_path, movie_writer):
    watch = tmp_path / "watch"
    watch.mkdir()
    src = movie_writer(tmp_path / "src.mrc", t=8, shape=(64, 64))
    payload = src.read_bytes()
    target = watch / "m.mrc"
    finished = threading.Event()

    def writer():
        with open(target, "wb") as f:
            for i in range(0, len(payload), 4096):
                f.write(payload[i : i + 4096])
                f.flush()
                time.sleep(0.03)
        finished.set()

    settle = 0.3
    w = MovieWatcher(watch, "*.mrc", settle_s=settle)
    th = threading.Thread(target=writer)
    th.start()
    taken_at = None
    while taken_at is None:
        ready, failed = w.poll()
        assert not failed
        if ready:
            assert ready == [target.resolve()]
            taken_at = time.monotonic()
            assert finished.is_set(), "taken while still being written"
        time.sleep(0.02)
    th.join()
    assert target.read_bytes() == payload
    ready, failed = w.poll()
    assert ready == [] and failed == []


def test_settled_but_incomplete_file_waits_then_fails(tmp_path, movie_writer):
    watch = tmp_path / "watch"
    watch.mkdir()
    p = movie_writer(watch / "cut.mrc", t=8)
    with open(p, "r+b") as f:
        f.truncate(p.stat().st_size - 500)
    now = [0.0]
    w = MovieWatcher(watch, "*.mrc", settle_s=1.0, give_up_s=10.0, clock=lambda: now[0])
    assert w.poll() == ([], [])
    now[0] = 2.0
    assert w.poll() == ([], [])  # settled, but the header says more: maybe still coming
    assert "truncated" in w.last_reasons[p.resolve()]
    now[0] = 11.0
    ready, failed = w.poll()
    assert ready == [] and len(failed) == 1 and "truncated" in failed[0][1]


def test_known_and_already_taken_files_are_ignored(tmp_path, movie_writer):
    watch = tmp_path / "watch"
    watch.mkdir()
    a = movie_writer(watch / "a.mrc")
    b = movie_writer(watch / "b.mrc", seed=1)
    now = [0.0]
    w = MovieWatcher(watch, "*.mrc", settle_s=1.0, is_known=lambda p: p == a.resolve(), clock=lambda: now[0])
    w.poll()
    now[0] = 5.0
    assert w.poll() == ([b.resolve()], [])
    now[0] = 10.0
    assert w.poll() == ([], [])


def test_wrong_frame_size_fails_at_once(tmp_path):
    watch = tmp_path / "watch"
    watch.mkdir()
    with mrcfile.new(watch / "odd.mrc") as m:
        m.set_data(np.zeros((3, 32, 32), np.uint8))
    now = [0.0]
    w = MovieWatcher(watch, "*.mrc", settle_s=1.0, expected_frame_shape=(64, 64), clock=lambda: now[0])
    w.poll()
    now[0] = 1.5
    ready, failed = w.poll()
    assert ready == [] and "frame size 32×32 differs from the session's 64×64" in failed[0][1]
