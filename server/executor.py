"""Running jobs outside the event loop.

A dispatcher thread takes queued jobs from the database (oldest first) and runs at most
``workers`` of them at a time, each in a worker process of a ``ProcessPoolExecutor``
(spawn start method): :func:`run_job` calls the library's ``fit_volume`` there and
writes progress to the database itself. The API process never runs fitting code, so
status calls stay fast whatever the jobs do.

With a Dask scheduler, the worker process connects to it (once) and hands ``fit_volume``
a :class:`~server.dask_executor.DaskJobExecutor`: the voxel chunks become Dask tasks on
the cluster and the dictionary is shipped to the cluster once per job.

Cancellation is a flag file in the job directory (``cancel``), polled through
``fit_volume``'s ``should_cancel``; a job that has not stopped ``cancel_kill_seconds``
after the request (stuck in a long library call) has its worker process killed, and the
other jobs that shared the pool go back to the queue without losing an attempt. Worker
processes also stop when the API process dies
(parent-death signal on Linux, parent-pid check elsewhere), so a restarted server never
races an orphan over the same job directory.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import gc
import logging
import multiprocessing
import os
import shutil
import signal
import sqlite3
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.errors import InputError
from fingerprint.volume_models import is_volume_model

from .config import Settings
from .db import Database, FinalStatus, Job, JobKind
from .limits import InputLimits, job_fit_options
from .storage import JobStorage, is_disk_full

logger = logging.getLogger(__name__)

__all__ = ["Dispatcher", "JobOutcome", "JobSpec", "run_job"]

_PROGRESS_INTERVAL = 0.25  # s between progress writes
#: Seconds stop() lets worker processes exit on their own before killing them: idle
#: workers (no job running) and workers that were running a job (re-queued anyway).
_STOP_IDLE_SECONDS = 10.0
_STOP_GRACE_SECONDS = 2.0


class JobOutcome(TypedDict):
    """What a job's run gives the dispatcher (picklable): its final state, the error
    message of a failure, the output file names and the result summary."""

    status: FinalStatus
    error: str | None
    outputs: list[str]
    result: dict[str, Any]


def _failed(error: str) -> JobOutcome:
    return {"status": "failed", "error": error, "outputs": [], "result": {}}


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to run one job (picklable)."""

    job_id: str
    kind: JobKind
    model: str
    options: dict[str, Any]
    inputs: dict[str, str]
    job_dir: str
    db_path: str
    dictionary_dir: str
    threads: int
    attempt: int
    parent_pid: int | None = None
    dask_scheduler: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class _Progress:
    """Throttled progress writer."""

    def __init__(self, db: Database, job_id: str) -> None:
        self.db = db
        self.job_id = job_id
        self._last = 0.0
        self._last_value = -1.0

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        fraction = float(fraction)
        if fraction < 1.0 and now - self._last < _PROGRESS_INTERVAL:
            return
        if fraction <= self._last_value:
            return
        self._last, self._last_value = now, fraction
        try:
            self.db.set_progress(self.job_id, min(fraction, 0.999))
        except Exception:  # progress is best effort; never fail a fit for it
            logger.debug("progress write failed", exc_info=True)


def _cancel_check(spec: JobSpec, stop_event: threading.Event | None) -> Callable[[], bool]:
    flag = Path(spec.job_dir) / "cancel"

    def should_cancel() -> bool:
        if flag.exists():
            return True
        if stop_event is not None and stop_event.is_set():
            return True
        return spec.parent_pid is not None and os.getppid() != spec.parent_pid

    return should_cancel


def _run_fit(spec: JobSpec, progress: Callable[[float], None],
             should_cancel: Callable[[], bool], executor: cf.Executor | None
             ) -> dict[str, Any]:
    # the library's fitting stack is imported in the worker processes that run jobs
    from fingerprint.fitting.pipeline import fit_volume, read_fsl_scheme

    job_dir = Path(spec.job_dir)
    partial = job_dir / f"outputs.partial.{spec.attempt}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    inputs = {k: str(job_dir / "inputs" / v) for k, v in spec.inputs.items()}
    options = spec.options
    timing = {name: float(options[name]) for name in ("delta", "Delta", "TE")
              if options.get(name) is not None}
    # the job's fit options, validated by the library's one options object
    fit_options = job_fit_options(options)
    mask: Any = inputs.get("mask")
    if spec.extra.get("limits"):  # the heavy input checks, under the job's limits
        from .limits import check_job_inputs

        default_mask = check_job_inputs(
            Path(inputs["dwi"]), Path(inputs["bval"]), Path(inputs["bvec"]),
            Path(mask) if mask else None, timing, InputLimits(**spec.extra["limits"]),
            should_cancel, mask_rule=fit_options.mask_rule)
        if default_mask is not None:
            mask = default_mask
    kwargs: dict[str, Any] = {
        "mask": mask, "threads": spec.threads, "executor": executor,
        "progress": progress, "should_cancel": should_cancel,
        "dictionary_dir": spec.dictionary_dir,
    }
    if options.get("prefix"):
        kwargs["prefix"] = options["prefix"]
    kwargs.update(timing)
    scheme = read_fsl_scheme(inputs["bval"], inputs["bvec"], **timing)
    with _dictionary_budget(spec, scheme, fit_options.dictionary_size, fit_options.seed):
        result = fit_volume(spec.model, inputs["dwi"], inputs["bval"], inputs["bvec"],
                            partial, options=fit_options, **kwargs)
    names = []
    root = partial.resolve()
    for path in result.files:
        path = Path(path)
        if not path.is_absolute() and not path.exists():
            path = partial / path
        try:
            names.append(path.resolve().relative_to(root).as_posix())
        except ValueError:
            raise RuntimeError(f"the fit wrote {path} outside its output directory") from None
    final = job_dir / "outputs"
    shutil.rmtree(final, ignore_errors=True)
    os.rename(partial, final)
    info: dict[str, Any] = {"n_voxels": int(getattr(result, "n_voxels", 0)),
                            "seconds": float(getattr(result, "seconds", 0.0))}
    if result.dictionary is not None:
        info["dictionary"] = Path(result.dictionary).name
    return {"outputs": sorted(names), "result": info}


@contextlib.contextmanager
def _dictionary_budget(spec: JobSpec, scheme: AcquisitionScheme, size: int | None,
                       seed: int | None) -> Iterator[None]:
    """Hold the job's dictionary as in use, and keep the dictionary cache within its
    budget (``spec.extra['dictionary_cache_bytes']``): before a build, least recently
    used dictionaries not in use are evicted to make room for it; a dictionary larger
    than the whole budget is refused."""
    budget = spec.extra.get("dictionary_cache_bytes")
    if not budget or is_volume_model(spec.model):  # mc_csd builds no dictionary
        yield
        return
    from fingerprint.dictionary import prepare_build, store_path
    from fingerprint.dictionary.cache import evict_to_budget, in_use

    request = prepare_build(spec.model, scheme, size=size, seed=seed)
    target = store_path(spec.dictionary_dir, request.key)
    with in_use(target):
        if not target.exists():
            need = int(request.size) * int(scheme.number_of_measurements) * 4
            if need > budget:
                raise InputError(
                    f"a dictionary of {request.size:,} atoms takes about {need / 2**30:.3g} "
                    f"GiB, more than the server's dictionary cache budget of "
                    f"{budget / 2**30:.3g} GiB; ask for a smaller dictionary size")
            evict_to_budget(spec.dictionary_dir, budget, need=need, keep=(target,))
        yield
        evict_to_budget(spec.dictionary_dir, budget, keep=(target,))


def _run_dictionary(spec: JobSpec, progress: Callable[[float], None],
                    should_cancel: Callable[[], bool]) -> dict[str, Any]:
    # imported in the worker processes that run jobs
    from fingerprint.dictionary import get_or_build_dictionary
    from fingerprint.io.gradients import read_bvals_bvecs

    job_dir = Path(spec.job_dir)
    options = spec.options
    scheme = read_bvals_bvecs(str(job_dir / "inputs" / spec.inputs["bval"]),
                              str(job_dir / "inputs" / spec.inputs["bvec"]),
                              delta=options.get("delta"), Delta=options.get("Delta"),
                              TE=options.get("TE"))
    kwargs: dict[str, Any] = {"size": options.get("size"), "seed": options.get("seed", 0),
                              "directory": spec.dictionary_dir, "progress": progress,
                              "n_jobs": spec.threads}
    kwargs["should_cancel"] = should_cancel
    with _dictionary_budget(spec, scheme, options.get("size"), options.get("seed", 0)):
        dictionary = get_or_build_dictionary(spec.model, scheme, **kwargs)
    path = Path(dictionary.path)
    info: dict[str, Any] = {"dictionary": path.name}
    for attr in ("key", "size", "n_atoms"):
        value = getattr(dictionary, attr, None)
        if isinstance(value, (str, int)):
            info[attr] = value
    return {"outputs": [], "result": info}


_DASK_CLIENT: Any = None
_DASK_LOCK = threading.Lock()


def _dask_client(address: str) -> Any:
    """This process's client of the Dask scheduler at ``address`` (connected once)."""
    global _DASK_CLIENT
    with _DASK_LOCK:
        client = _DASK_CLIENT
        if client is not None and (client.scheduler is None
                                   or str(client.scheduler.address) != address
                                   or client.status not in ("running", "connecting")):
            try:
                client.close(timeout=5)
            except Exception:  # pragma: no cover - already broken
                pass
            client = None
        if client is None:
            from distributed import Client

            try:
                client = Client(address, timeout="20s", set_as_default=False)
            except Exception as exc:
                raise OSError(f"cannot reach the Dask scheduler {address}: {exc}") from None
            _DASK_CLIENT = client
        return client


def public_message(message: str, spec: JobSpec) -> str:
    """``message`` without server paths: uploaded files are named by their form field,
    the job and dictionary directories by placeholders."""
    inputs = Path(spec.job_dir) / "inputs"
    for field_name, name in sorted(spec.inputs.items(), key=lambda kv: -len(kv[1])):
        message = message.replace(str(inputs / name), f"'{field_name}'")
    for path, label in ((inputs, "<inputs>"), (Path(spec.job_dir), "<job>"),
                        (Path(spec.dictionary_dir), "<dictionaries>"),
                        (Path(spec.db_path).parent, "<data>")):
        message = message.replace(str(path), label)
    return message


def run_job(spec: JobSpec, *, executor: cf.Executor | None = None,
            stop_event: threading.Event | None = None) -> JobOutcome:
    """Run one job to completion; returns ``{'status', 'error', 'outputs', 'result'}``.

    Called in a worker process of the dispatcher's pool. With ``spec.dask_scheduler``
    (and no ``executor``), the fit's voxel chunks run on that Dask cluster. Never raises
    for a job's own failure: errors become ``status='failed'`` with a message;
    cancellation becomes ``status='cancelled'``.
    """
    from fingerprint.errors import CancelledError, FingerprintError

    db = Database(spec.db_path)
    progress = _Progress(db, spec.job_id)
    should_cancel = _cancel_check(spec, stop_event)
    own_executor = None
    try:
        if spec.kind == "fit" and executor is None and spec.dask_scheduler:
            from .dask_executor import DaskJobExecutor

            executor = own_executor = DaskJobExecutor(_dask_client(spec.dask_scheduler))
        if spec.kind == "fit":
            out = _run_fit(spec, progress, should_cancel, executor)
        elif spec.kind == "dictionary":
            out = _run_dictionary(spec, progress, should_cancel)
        else:
            raise RuntimeError(f"unknown job kind {spec.kind!r}")
        return {"status": "succeeded", "error": None, "outputs": out["outputs"],
                "result": out["result"]}
    except CancelledError:
        return {"status": "cancelled", "error": "cancelled", "outputs": [], "result": {}}
    except (FingerprintError, ValueError, OSError, sqlite3.OperationalError) as exc:
        if is_disk_full(exc) or "GB free" in str(exc):  # ENOSPC, or the library's estimate
            logger.warning("job %s: not enough disk space: %s", spec.job_id, exc)
            error = public_message(f"not enough disk space on the server to run this job "
                                   f"({exc}); try again later", spec)
        else:
            logger.info("job %s failed: %s", spec.job_id, exc)
            error = public_message(f"{type(exc).__name__}: {exc}", spec)
        return _failed(error)
    except Exception as exc:
        logger.error("job %s crashed:\n%s", spec.job_id, traceback.format_exc())
        return _failed(public_message(f"internal error ({type(exc).__name__}: {exc})", spec))
    finally:
        if own_executor is not None:  # whatever is left of the job on the cluster
            own_executor.shutdown(wait=False, cancel_futures=True)
        for stale in Path(spec.job_dir).glob(f"outputs.partial.{spec.attempt}"):
            shutil.rmtree(stale, ignore_errors=True)
        db.close()


PID_FILE = "worker.pid"


def run_in_worker(function: Callable[[JobSpec], JobOutcome], spec: JobSpec) -> JobOutcome:
    """What the pool runs: note this process's id in the job directory (so a job that
    ignores its cancellation can be stopped), then run ``function(spec)``."""
    pid_file = Path(spec.job_dir) / PID_FILE
    try:
        pid_file.write_text(str(os.getpid()))
    except OSError:  # the job directory is gone: nothing to run
        return _failed("the job's files are missing")
    try:
        return function(spec)
    finally:
        pid_file.unlink(missing_ok=True)


def _worker_init(parent_pid: int) -> None:
    """Worker-process start-up: die with the parent, ignore Ctrl-C (the parent handles
    it), and import the library once so the first job does not pay for it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:  # not Linux: the parent-pid check in should_cancel remains
        pass
    if os.getppid() != parent_pid:
        os._exit(1)
    try:
        import fingerprint.fitting.pipeline  # noqa: F401
    except Exception:  # reported when a job actually needs it
        pass


def _warmup() -> int:
    return os.getpid()


class Dispatcher:
    """Feeds queued jobs from the database to the executor; one instance per server."""

    def __init__(self, settings: Settings, db: Database, storage: JobStorage) -> None:
        self.settings = settings
        self.db = db
        self.storage = storage
        self.workers = settings.workers
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._running: dict[str, tuple[cf.Future, JobSpec]] = {}
        self._pool: cf.Executor | None = None
        self._client: Any = None
        self._client_error: str | None = None
        self._lock = threading.Lock()
        self.mode: Literal["process", "dask"] = ("dask" if settings.dask_scheduler
                                                 else "process")
        #: what a worker process runs for a job (replaceable in tests)
        self.job_function: Callable[[JobSpec], JobOutcome] = run_job
        self._cancel_seen: dict[str, float] = {}
        self._killed_for_cancel = False

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        self._pool = self._new_process_pool()
        self._thread = threading.Thread(target=self._loop, name="fingerprint-dispatcher",
                                        daemon=True)
        self._thread.start()

    def _new_process_pool(self) -> cf.ProcessPoolExecutor:
        pool = cf.ProcessPoolExecutor(max_workers=self.workers,
                                      mp_context=multiprocessing.get_context("spawn"),
                                      initializer=_worker_init, initargs=(os.getpid(),))
        for _ in range(self.workers):  # start the workers now, not on the first job
            pool.submit(_warmup)
        return pool

    def stop(self) -> None:
        """Stop dispatching; running jobs go back to the queue (not counted as attempts)
        and are resumed by the next start."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            running = dict(self._running)
            self._running.clear()
        for job_id in running:
            self.db.requeue(job_id, "re-queued: the server stopped during the run",
                            refund_attempt=True)
        pool = self._pool
        if pool is not None:
            processes = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            # idle workers leave on their own (running their exit handlers, which release
            # what they registered with multiprocessing's resource tracker); only those
            # still busy with a job after the grace period are killed
            deadline = time.monotonic() + (_STOP_GRACE_SECONDS if running else
                                           _STOP_IDLE_SECONDS)
            for proc in processes:
                proc.join(timeout=max(0.0, deadline - time.monotonic()))
            for proc in processes:
                if proc.is_alive():
                    try:
                        proc.kill()
                    except Exception:  # already gone
                        pass
            for proc in processes:
                proc.join(timeout=5)
            manager = getattr(pool, "_executor_manager_thread", None)
            if manager is not None:  # let the pool release its queues and semaphores
                manager.join(timeout=5)
            # the pool's queues hold named semaphores, unlinked only when the queues are
            # collected: drop the last references now, or the interpreter exits with them
            # alive and multiprocessing's resource tracker warns of leaked semaphores
            self._pool = None
            del pool, processes, manager
            gc.collect()
        if self._client is not None:
            try:
                self._client.close(timeout=5)
            except Exception:  # pragma: no cover - best effort
                pass

    def wake(self) -> None:
        self._wake.set()

    # -- health ------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        if self._thread is None or not self._thread.is_alive():
            return False, "the dispatcher thread is not running"
        if self._pool is None or getattr(self._pool, "_broken", False):
            return False, "the worker process pool is broken"
        if self.mode == "process":
            return True, f"{self.workers} worker process(es)"
        if self._client is None:
            return False, (f"not connected to the Dask scheduler {self.settings.dask_scheduler}"
                           + (f": {self._client_error}" if self._client_error else ""))
        status = getattr(self._client, "status", "running")
        if status != "running":
            return False, f"Dask client is {status}"
        return True, (f"Dask scheduler {self.settings.dask_scheduler}, "
                      f"{self.workers} job process(es)")

    @property
    def running_ids(self) -> set[str]:
        with self._lock:
            return set(self._running)

    # -- loop --------------------------------------------------------------------------
    def _connect_dask(self) -> bool:
        if self._client is not None:
            return True
        try:
            from distributed import Client

            self._client = Client(self.settings.dask_scheduler, timeout="10s",
                                  set_as_default=False)
            self._client_error = None
            logger.info("connected to the Dask scheduler %s", self.settings.dask_scheduler)
            return True
        except Exception as exc:
            self._client_error = str(exc) or type(exc).__name__
            logger.warning("cannot reach the Dask scheduler %s: %s",
                           self.settings.dask_scheduler, self._client_error)
            return False

    def _loop(self) -> None:
        next_dask_try = 0.0
        while not self._stop.is_set():
            try:
                self._reap()
                self._enforce_cancels()
                if self.mode == "dask" and self._client is None:
                    if time.monotonic() >= next_dask_try and not self._connect_dask():
                        next_dask_try = time.monotonic() + 5.0
                if self.mode == "process" or (
                        self._client is not None
                        and getattr(self._client, "status", "running") == "running"):
                    self._fill()  # with Dask: only while the scheduler is reachable
            except Exception:  # keep dispatching whatever happens to one job
                logger.exception("dispatcher iteration failed")
            self._wake.wait(self.settings.poll_interval)
            self._wake.clear()

    def _limits(self, job: Job) -> InputLimits:
        """The input limits of ``job`` (those of a per-voxel non-linear fit when its model
        and options run one)."""
        try:
            options = job_fit_options(job.options)
        except InputError:  # refused when the job runs (it was validated at upload)
            return InputLimits.from_settings(self.settings)
        return InputLimits.from_settings(self.settings, job.model, options)

    def _spec(self, job: Job) -> JobSpec:
        return JobSpec(
            job_id=job.id, kind=job.kind, model=job.model, options=job.options,
            inputs=job.inputs, job_dir=str(self.storage.job_dir(job.id)),
            db_path=str(self.db.path),
            dictionary_dir=str(self.settings.resolved_dictionary_dir),
            threads=int(job.options.get("threads") or self.settings.threads_per_job),
            attempt=int(job.attempts),
            parent_pid=os.getpid(), dask_scheduler=self.settings.dask_scheduler,
            extra={"limits": asdict(self._limits(job)),
                   "dictionary_cache_bytes": int(self.settings.dictionary_cache_bytes)})

    def _fill(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                if len(self._running) >= self.workers:
                    return
                busy = set(self._running)
            job = self.db.next_queued(exclude=busy)
            if job is None:
                return
            if not self.db.claim(job.id):
                continue
            job = self.db.get_job(job.id)
            if job is None or self._pool is None:  # pragma: no cover - rows stay; started
                return
            spec = self._spec(job)
            try:
                future = self._pool.submit(run_in_worker, self.job_function, spec)
            except Exception as exc:  # pool broken or shutting down
                logger.warning("cannot submit job %s: %s", job.id, exc)
                self.db.requeue(job.id, refund_attempt=True)
                self._replace_pool()
                return
            future.add_done_callback(lambda _f: self._wake.set())
            with self._lock:
                self._running[job.id] = (future, spec)
            logger.info("job %s (%s, %s) started, attempt %d", job.id, job.kind,
                        job.model, spec.attempt)

    def _enforce_cancels(self) -> None:
        """Kill the worker process of a job still running ``cancel_kill_seconds`` after
        its owner cancelled it."""
        now = time.monotonic()
        with self._lock:
            running = dict(self._running)
        for job_id in list(self._cancel_seen):
            if job_id not in running:
                del self._cancel_seen[job_id]
        for job_id, (future, spec) in running.items():
            if future.done() or not (Path(spec.job_dir) / "cancel").exists():
                continue
            first = self._cancel_seen.setdefault(job_id, now)
            if now - first < self.settings.cancel_kill_seconds:
                continue
            self._cancel_seen[job_id] = now  # try again after another grace period
            try:
                pid = int((Path(spec.job_dir) / PID_FILE).read_text())
            except (OSError, ValueError):
                continue
            pool_pids = set(getattr(self._pool, "_processes", None) or {})
            if pid not in pool_pids:  # never signal a process that is not our worker
                continue
            logger.warning("job %s ignored its cancellation for %g s: killing its worker "
                           "process %d", job_id, self.settings.cancel_kill_seconds, pid)
            self._killed_for_cancel = True
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:  # already gone
                pass

    def _replace_pool(self) -> None:
        if self._stop.is_set():
            return
        old = self._pool
        try:
            if old is not None:
                old.shutdown(wait=False, cancel_futures=True)
        except Exception:  # pragma: no cover
            pass
        self._pool = self._new_process_pool()
        self._killed_for_cancel = False
        logger.warning("worker process pool replaced")

    def _reap(self) -> None:
        if getattr(self._pool, "_broken", False):
            # a worker died: every job of the pool fails; collect them all in one go
            with self._lock:
                futures = [f for f, _ in self._running.values()]
            cf.wait(futures, timeout=5)
        with self._lock:
            done = {k: v for k, v in self._running.items() if v[0].done()}
        if not done:
            return
        broken = False
        for job_id, (future, spec) in done.items():
            try:
                outcome = future.result()
            except cf.process.BrokenProcessPool:
                broken = True
                outcome = None
            except Exception as exc:
                logger.exception("job %s raised outside the runner", job_id)
                outcome = _failed(f"internal error ({exc})")
            if self._stop.is_set():
                return  # stop() re-queues whatever is left
            with self._lock:
                self._running.pop(job_id, None)
            self._record(job_id, spec, outcome)
        if broken:
            self._replace_pool()

    def _record(self, job_id: str, spec: JobSpec, outcome: JobOutcome | None) -> None:
        job = self.db.get_job(job_id)
        if job is None:
            return
        if outcome is None:  # the worker process died (killed, out of memory, ...)
            if job.cancel_requested:
                self.db.finish(job_id, "cancelled", error="cancelled by the owner")
            elif self._killed_for_cancel:  # collateral of stopping a cancelled job
                self.db.requeue(job_id, "re-queued: the worker pool was restarted to stop "
                                        "a cancelled job", refund_attempt=True)
            elif job.attempts < self.settings.max_attempts:
                self.db.requeue(job_id, "re-queued: the worker process died")
            else:
                self.db.finish(job_id, "failed", error=(
                    f"the worker process died during each of {job.attempts} attempts "
                    "(out of memory?)"))
        else:
            status = outcome["status"]
            if status == "cancelled" and not job.cancel_requested:
                # stopped by the server itself (e.g. the parent died): run it again
                self.db.requeue(job_id, "re-queued: the run was interrupted")
            else:
                error = ("cancelled by the owner" if status == "cancelled"
                         else outcome.get("error"))
                self.db.finish(job_id, status, error=error, outputs=outcome.get("outputs"),
                               result=outcome.get("result"))
        job = self.db.get_job(job_id)
        if job is None:  # pragma: no cover - rows are never removed
            return
        logger.info("job %s finished: %s%s", job_id, job.status,
                    f" ({job.error})" if job.status == "failed" else "")
        if outcome is None or job.status == "cancelled":  # no half-built dictionary
            self._clean_dictionary_builds()
        if job.deleted:
            self.storage.remove_job(job_id)
        elif job.status == "cancelled":
            shutil.rmtree(self.storage.partial_outputs_dir(job_id), ignore_errors=True)

    def _clean_dictionary_builds(self) -> None:
        try:
            from fingerprint.dictionary.cache import cleanup_stale_builds

            cleanup_stale_builds(self.settings.resolved_dictionary_dir)
        except Exception:  # best effort: the next build of the same key cleans up too
            logger.debug("cleaning dictionary build leftovers failed", exc_info=True)
