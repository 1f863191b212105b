"""Watch a folder for new movies and hand over only those that are finished.

The rule, plainly: a file is taken when (1) its name matches one of the movie patterns (hidden and temporary
files, and detector references named ``*gain*``, ``*dark*`` or ``*defect*``, are ignored), (2) its size and
modification time have not changed for ``settle_s`` seconds, and (3) :func:`cryolive.io.movies.validate_movie` agrees that its header matches its size. A file that stays
unchanged but incomplete or unreadable for ``give_up_s`` seconds is reported as failed with the reason.
Files already known (in the session store, or taken before) are ignored. Polling only; no extra dependency.

Example::

    watcher = MovieWatcher("/data/session1", patterns="*.tif,*.mrc", settle_s=3.0,
                           is_known=store.has_exposure)
    ready, failed = watcher.poll()
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..io.movies import MovieError, validate_movie

TEMP_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".lock", ".swp", "~")


def split_patterns(patterns: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"*.tif,*.mrc"`` → ``["*.tif", "*.mrc"]``."""
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    return [p.strip() for p in patterns if p.strip()]


REFERENCE_WORDS = ("gain", "defect", "dark")


def is_candidate(name: str, patterns: list[str]) -> bool:
    """Whether a file name is a movie to consider: it matches a pattern, is not hidden or temporary, and is
    not a detector reference (a gain, dark or defect file lying beside the movies, e.g. ``gain.mrc``)."""
    if name.startswith((".", "~", "#")) or name.lower().endswith(TEMP_SUFFIXES):
        return False
    low = name.lower()
    stem = low.rsplit(".", 1)[0]
    if any(word in stem for word in REFERENCE_WORDS):
        return False
    return any(fnmatch.fnmatch(low, p.lower()) for p in patterns)


def find_movies(folder: str | os.PathLike, patterns: str | list[str]) -> list[Path]:
    """Movie files under ``folder`` (recursively, hidden folders skipped), sorted by path."""
    pats = split_patterns(patterns)
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(Path(root) / f for f in files if is_candidate(f, pats))
    return sorted(out)


@dataclass
class _Seen:
    size: int
    mtime: float
    stable_since: float


class MovieWatcher:
    """Polling watcher over one folder (see the module docstring for the rule).

    ``is_known(path) -> bool`` says whether the session already has a movie; ``expected_frame_shape``
    ``(h, w)`` is passed to ``validate_movie``; ``clock`` is ``time.monotonic`` (replaceable in tests).
    """

    def __init__(self, folder: str | os.PathLike, patterns: str | list[str] = "*.tif,*.tiff,*.mrc,*.mrcs,*.eer",
                 settle_s: float = 3.0, give_up_s: float = 120.0,
                 is_known: Callable[[Path], bool] | None = None,
                 expected_frame_shape: tuple[int, int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.folder = Path(folder)
        self.patterns = split_patterns(patterns)
        self.settle_s = float(settle_s)
        self.give_up_s = max(float(give_up_s), self.settle_s)
        self.is_known = is_known or (lambda p: False)
        self.expected_frame_shape = expected_frame_shape
        self.clock = clock
        self._seen: dict[Path, _Seen] = {}
        self._taken: set[Path] = set()
        self.last_reasons: dict[Path, str] = {}

    def poll(self) -> tuple[list[Path], list[tuple[Path, str]]]:
        """One look at the folder → (movies ready to process, [(movie, reason)] given up as bad)."""
        now = self.clock()
        ready: list[Path] = []
        failed: list[tuple[Path, str]] = []
        if not self.folder.is_dir():
            return ready, failed
        present = set()
        for path in find_movies(self.folder, self.patterns):
            path = path.resolve()
            present.add(path)
            if path in self._taken:
                continue
            if self.is_known(path):
                self._taken.add(path)
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            seen = self._seen.get(path)
            if seen is None or seen.size != st.st_size or seen.mtime != st.st_mtime:
                self._seen[path] = _Seen(st.st_size, st.st_mtime, now)
                continue
            stable_for = now - seen.stable_since
            if stable_for < self.settle_s:
                continue
            try:
                validate_movie(path, expected_frame_shape=self.expected_frame_shape)
            except MovieError as exc:
                self.last_reasons[path] = str(exc)
                if not exc.transient or stable_for >= self.give_up_s:
                    failed.append((path, str(exc)))
                    self._taken.add(path)
                    self._seen.pop(path, None)
                continue
            ready.append(path)
            self._taken.add(path)
            self._seen.pop(path, None)
            self.last_reasons.pop(path, None)
        for gone in set(self._seen) - present:  # deleted or renamed before they settled
            self._seen.pop(gone, None)
        return ready, failed

    @property
    def waiting(self) -> int:
        """How many files are seen but not yet settled/complete."""
        return len(self._seen)
