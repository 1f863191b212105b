"""Where per-exposure work runs: local worker processes by default, in-process for tests and debugging.

* :class:`LocalExecutor`: a ``ProcessPoolExecutor`` with ``n_workers`` processes started with the *spawn*
  method (safe with torch and threads); each worker sets ``torch.set_num_threads(1)`` so that N workers use
  N cores.
* :class:`InlineExecutor`: runs each task in the calling process when it is submitted (``n_workers=0``).
* Dask distributed (many GPUs or nodes) is the extension point: an executor is anything with
  ``submit(fn, *args, **kwargs) -> concurrent.futures.Future``-like objects (``.done()``, ``.result()``) and
  ``shutdown()``; a ``DaskExecutor`` wrapping ``distributed.Client(scheduler_address)`` fits this interface
  and will be added by :func:`make_executor` when a scheduler address is given (not implemented yet).

Example::

    with make_executor(n_workers=2) as ex:
        fut = ex.submit(process_exposure, path, settings, out_dir)
        outcome = fut.result()
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os


def _init_worker(n_threads: int = 1) -> None:
    """Worker start: one thread per process for torch and the BLAS libraries."""
    os.environ.setdefault("OMP_NUM_THREADS", str(n_threads))
    import torch

    torch.set_num_threads(n_threads)


class LocalExecutor:
    """Worker processes on this machine (spawn context, one torch thread each)."""

    def __init__(self, n_workers: int = 2):
        self.n_workers = max(1, int(n_workers))
        self._pool = self._new_pool()

    def _new_pool(self) -> cf.ProcessPoolExecutor:
        return cf.ProcessPoolExecutor(max_workers=self.n_workers, mp_context=mp.get_context("spawn"),
                                      initializer=_init_worker)

    def submit(self, fn, *args, **kwargs) -> cf.Future:
        return self._pool.submit(fn, *args, **kwargs)

    def restart(self) -> None:
        """Replace a broken pool (a worker died) by a fresh one."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = self._new_pool()

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)

    @property
    def capacity(self) -> int:
        """How many tasks to keep in flight: one per worker (so "processing" in the store means running)."""
        return self.n_workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


class InlineExecutor:
    """Run tasks in this process, at submit time; the returned future is already done."""

    n_workers = 0
    capacity = 1

    def submit(self, fn, *args, **kwargs) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the future carries it, like a pool's would
            fut.set_exception(exc)
        return fut

    def restart(self) -> None:
        pass

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()


def make_executor(n_workers: int = 2, scheduler_address: str | None = None):
    """``n_workers >= 1``: :class:`LocalExecutor`; ``0``: :class:`InlineExecutor`.

    ``scheduler_address`` (a Dask distributed scheduler) is the extension point for running the same task
    functions on many machines; it is not implemented yet and raises ``NotImplementedError``.
    """
    if scheduler_address:
        raise NotImplementedError(
            "running on a Dask scheduler is not implemented yet; run with local workers (--workers N)"
        )
    if int(n_workers) <= 0:
        return InlineExecutor()
    return LocalExecutor(int(n_workers))
