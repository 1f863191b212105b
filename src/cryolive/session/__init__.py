"""Orchestration: it owns the state and the I/O, never the maths.

- :mod:`.store`: the session's SQLite store (``OUT/session.sqlite``), the source of truth for resuming.
- :mod:`.watcher`: finds finished movies in a folder (size and mtime settled, header matches size).
- :mod:`.pipeline`: the per-exposure chain run in workers (:func:`~.pipeline.process_exposure`).
- :mod:`.executor`: local worker processes (Dask distributed is the extension point).
- :mod:`.session`: :class:`~.session.Session`, which ties them together and writes the aggregate files.

Example::

    from cryolive.config import Settings
    from cryolive.session.session import Session

    with Session("OUT", Settings(dose_per_frame=1.0)) as s:
        s.process(["movies/"])
"""
