"""A ``concurrent.futures.Executor`` on a Dask cluster, one per job.

``fit_volume`` hands every voxel chunk to its ``executor`` together with the same large
objects (the dictionary / estimator). Dask's own ``ClientExecutor`` would serialise those
with every task; :class:`DaskJobExecutor` instead scatters each large argument to the
cluster the first time it is seen and passes the resulting Dask future to later tasks,
so the dictionary crosses the network once (workers then copy it from each other as they
need it), while each voxel chunk is a task of its own. Tasks are submitted with
``pure=False`` (no hashing of large arguments).

:meth:`shutdown` (called when the job ends, however it ends) cancels the job's tasks that
have not run yet and releases everything it scattered, so a cancelled job stops using
the cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import threading
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["SCATTER_THRESHOLD", "DaskJobExecutor"]

#: Arguments at least this large (bytes, as estimated by ``dask.sizeof``) are scattered.
SCATTER_THRESHOLD = 1 << 20

_SCALARS = (str, bytes, int, float, bool, complex, type(None))


@dataclass
class _Shipped:
    value: Any          # kept alive so that id(value) stays unique while cached
    future: Any         # the Dask future of the scattered value
    uses: int = 0       # tasks that were given it
    pending: int = 0    # of which not finished yet


class DaskJobExecutor(cf.Executor):
    """Run ``fn(*args, **kwargs)`` calls as tasks on ``client``'s cluster."""

    def __init__(self, client: Any, *, scatter_threshold: int = SCATTER_THRESHOLD) -> None:
        self._client = client
        self._threshold = int(scatter_threshold)
        self._lock = threading.Lock()
        self._shipped: dict[int, _Shipped] = {}
        self._tasks: set[Any] = set()
        self._shutdown = False
        self.n_scattered = 0
        self.n_tasks = 0

    # -- arguments -----------------------------------------------------------------------
    def _large(self, value: Any) -> bool:
        if isinstance(value, _SCALARS):
            return False
        try:
            from dask.sizeof import sizeof

            return int(sizeof(value)) >= self._threshold
        except Exception:  # unknown size: ship it with the task
            return False

    def _ship(self, value: Any, used: list[_Shipped]) -> Any:
        with self._lock:
            entry = self._shipped.get(id(value))
        if entry is None or entry.value is not value:
            if not self._large(value):
                return value
            [future] = self._client.scatter([value], hash=False)
            entry = _Shipped(value, future)
            with self._lock:
                self._shipped[id(value)] = entry
                self.n_scattered += 1
            logger.debug("scattered a %s to the cluster", type(value).__name__)
        with self._lock:
            entry.uses += 1
            entry.pending += 1
        used.append(entry)
        return entry.future

    def _task_done(self, used: list[_Shipped]) -> None:
        release = []
        with self._lock:
            for entry in used:
                entry.pending -= 1
                # a value given to one task only (e.g. a voxel chunk) is dropped as soon as
                # that task is done; shared values stay until the job ends
                if entry.uses == 1 and entry.pending == 0:
                    if self._shipped.get(id(entry.value)) is entry:
                        del self._shipped[id(entry.value)]
                    release.append(entry.future)
        for future in release:
            try:
                future.release()
            except Exception:  # pragma: no cover - client already closed
                pass

    # -- Executor API ----------------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs) -> cf.Future:  # noqa: D102
        if self._shutdown:
            raise RuntimeError("cannot schedule new tasks after shutdown")
        used: list[_Shipped] = []
        args = tuple(self._ship(a, used) for a in args)
        kwargs = {k: self._ship(v, used) for k, v in kwargs.items()}
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
            self._task_done(used)
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
        for entry in shipped:
            try:
                entry.future.release()
            except Exception:  # pragma: no cover
                pass
