"""A ``concurrent.futures.Executor`` on a Dask cluster, one per job.

``fit_volume`` hands each voxel chunk to its ``executor`` as one task, together with a
small handle naming the dictionary on shared storage (each Dask worker process loads it
once and caches the estimator). Should a caller pass the same large object to many tasks
instead, Dask's own ``ClientExecutor`` would serialise it with every task;
:class:`DaskJobExecutor` scatters a large argument to the cluster as soon as it is
passed a second time and hands later tasks the Dask future, so it crosses the network
at most twice per job (workers then copy it from each other). Arguments used once (the
voxel chunks) travel with their task. Tasks are submitted with ``pure=False`` (no hashing
of large arguments).

``_max_workers`` is the cluster's thread count when the executor is made, so callers that
size their window of tasks in flight from it (``fit_volume`` does) keep the cluster busy.

:meth:`shutdown` (called when the job ends, however it ends) cancels the job's tasks that
have not run yet and releases everything it scattered, so a cancelled job stops using
the cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import distributed

logger = logging.getLogger(__name__)

__all__ = ["SCATTER_THRESHOLD", "DaskJobExecutor"]

#: Arguments at least this large (bytes, as estimated by ``dask.sizeof``) are scattered.
SCATTER_THRESHOLD = 1 << 20

_SCALARS = (str, bytes, int, float, bool, complex, type(None))


@dataclass
class _Shipped:
    value: Any          # kept alive so that id(value) stays unique while cached
    future: Any         # the Dask future of the scattered value


class DaskJobExecutor(cf.Executor):
    """Run ``fn(*args, **kwargs)`` calls as tasks on ``client``'s cluster."""

    def __init__(self, client: distributed.Client, *,
                 scatter_threshold: int = SCATTER_THRESHOLD) -> None:
        self._client = client
        self._threshold = int(scatter_threshold)
        self._lock = threading.Lock()
        self._shipped: dict[int, _Shipped] = {}
        self._seen: dict[int, weakref.ref] = {}  # large values passed once so far
        self._tasks: set[Any] = set()
        self._shutdown = False
        self.n_scattered = 0
        self.n_tasks = 0
        try:
            self._max_workers = max(1, int(sum(client.nthreads().values())))
        except Exception:  # pragma: no cover - scheduler unreachable: a modest window
            self._max_workers = 2

    # -- arguments -----------------------------------------------------------------------
    def _forget(self, key: int, _ref: object) -> None:
        """Drop ``key`` from the values seen once (their object is gone)."""
        self._seen.pop(key, None)

    def _large(self, value: Any) -> bool:
        if isinstance(value, _SCALARS):
            return False
        try:
            from dask.sizeof import sizeof

            return int(sizeof(value)) >= self._threshold
        except Exception:  # unknown size: ship it with the task
            return False

    def _ship(self, value: Any) -> Any:
        """``value`` itself, or the Dask future of its scattered copy once it is reused."""
        if isinstance(value, _SCALARS):
            return value
        key = id(value)
        with self._lock:
            entry = self._shipped.get(key)
            if entry is not None and entry.value is value:
                return entry.future
            seen = self._seen.get(key)
            reused = seen is not None and seen() is value
        if not reused:
            if self._large(value):
                try:
                    ref = weakref.ref(value, functools.partial(self._forget, key))
                except TypeError:  # not weak-referenceable: treated as used once
                    return value
                with self._lock:
                    self._seen[key] = ref
            return value
        [future] = self._client.scatter([value], hash=False)
        with self._lock:
            self._seen.pop(key, None)
            self._shipped[key] = _Shipped(value, future)
            self.n_scattered += 1
        logger.debug("scattered a reused %s to the cluster", type(value).__name__)
        return future

    # -- Executor API ----------------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs) -> cf.Future:  # noqa: D102
        if self._shutdown:
            raise RuntimeError("cannot schedule new tasks after shutdown")
        args = tuple(self._ship(a) for a in args)
        kwargs = {k: self._ship(v) for k, v in kwargs.items()}
        task = self._client.submit(fn, *args, pure=False, **kwargs)
        cf_future: cf.Future = cf.Future()
        with self._lock:
            self._tasks.add(task)
            self.n_tasks += 1

        def on_cf_done(f: cf.Future) -> None:
            if f.cancelled():
                task.cancel()

        def on_task_done(t: Any) -> None:
            with self._lock:
                self._tasks.discard(t)
            if t.status == "cancelled":
                cf_future.cancel()
            if not cf_future.set_running_or_notify_cancel():
                return  # cancelled (by the caller or on the cluster)
            if t.status == "finished":
                try:
                    cf_future.set_result(t.result())
                except BaseException as exc:  # pragma: no cover - lost between states
                    cf_future.set_exception(exc)
            else:
                try:
                    t.result()
                except BaseException as exc:
                    cf_future.set_exception(exc)
                else:  # pragma: no cover
                    cf_future.set_exception(RuntimeError(f"Dask task ended as {t.status}"))

        cf_future.add_done_callback(on_cf_done)
        task.add_done_callback(on_task_done)
        return cf_future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting tasks; with ``cancel_futures`` (or ``wait=False``) cancel the
        tasks still queued or running on the cluster; release scattered data."""
        self._shutdown = True
        with self._lock:
            tasks = list(self._tasks)
        if cancel_futures or not wait:
            if tasks:
                try:
                    self._client.cancel(tasks)
                except Exception:  # pragma: no cover - client closed
                    logger.debug("cancelling Dask tasks failed", exc_info=True)
        elif tasks:
            from distributed import wait as dask_wait

            dask_wait(tasks)
        with self._lock:
            shipped = list(self._shipped.values())
            self._shipped.clear()
            self._seen.clear()
        for entry in shipped:
            try:
                entry.future.release()
            except Exception:  # pragma: no cover
                pass
