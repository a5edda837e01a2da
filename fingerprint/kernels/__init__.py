"""Numba kernels of fingerprint (nopython, cached on disk).

Every compiled kernel of the library lives in this package. Compiled machine code is cached
so that only the first run on a machine pays the compilation time. Where the cache goes:

1. ``NUMBA_CACHE_DIR`` when the user set it (numba's own setting; respected as is);
2. otherwise the package's own ``__pycache__`` directories when they are writable (numba's
   default);
3. otherwise numba's per-user cache directory when it is writable (numba's fallback);
4. otherwise a private directory under the system temporary directory, which this module
   hands to numba.

When none of these is writable, one warning is logged and kernels are compiled in memory at
each start (same results, slower start-up). Kernel modules decorate with :func:`njit` from
this package (a drop-in for :func:`numba.njit`) so that this fallback applies to them;
a bare ``numba.njit(cache=True)`` would raise instead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar, overload

import numba
import numba.core.event
import numpy as np

__all__ = [
    "defer_parallel",
    "CACHE_DIR",
    "SERIAL_WORK_THRESHOLD",
    "caching_enabled",
    "gauss_legendre_unit",
    "njit",
    "parallel_kernel",
    "prange",
    "run_kernel",
    "run_large",
    "run_parallel",
]

logger = logging.getLogger(__name__)

prange = numba.prange

#: A kernel function; :func:`njit` returns a numba dispatcher with the same call signature.
_F = TypeVar("_F", bound=Callable[..., Any])
#: What a kernel returns (an array or a tuple of arrays).
_R = TypeVar("_R")

_PACKAGE_DIR = Path(__file__).resolve().parent


def _writable(path: Path) -> bool:
    """True when ``path`` exists or can be created and a file can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError:
        return False
    return True


def _numba_user_cache_dir() -> Path | None:
    try:
        from numba.misc.appdirs import AppDirs  # lazy: optional dependency
    except ImportError:  # pragma: no cover - numba internals moved
        return None
    return Path(AppDirs(appname="numba", appauthor=False).user_cache_dir)


def _private_temp_dir() -> Path:
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"fingerprint-numba-cache-{uid}"


def _configure_cache() -> Path | None:
    """Choose where compiled kernels are cached; None when no directory is writable."""
    user_dir = os.environ.get("NUMBA_CACHE_DIR") or numba.config.CACHE_DIR
    if user_dir:
        path = Path(user_dir)
        if _writable(path):
            return path
        logger.warning("NUMBA_CACHE_DIR=%s is not writable; fingerprint's kernels will be "
                       "compiled at each start instead of being cached", user_dir)
        return None
    if _writable(_PACKAGE_DIR / "__pycache__"):
        return _PACKAGE_DIR / "__pycache__"
    numba_dir = _numba_user_cache_dir()
    if numba_dir is not None and _writable(numba_dir):
        return numba_dir
    private = _private_temp_dir()
    if _writable(private):
        numba.config.CACHE_DIR = str(private)
        logger.info("fingerprint's package directory is read-only: caching compiled kernels "
                    "in %s", private)
        return private
    logger.warning("no writable directory to cache compiled kernels (tried %s, %s and %s); "
                   "kernels will be compiled at each start (slower start-up, same results). "
                   "Set NUMBA_CACHE_DIR to a writable directory to enable the cache.",
                   _PACKAGE_DIR / "__pycache__", numba_dir, private)
    return None


#: Directory where compiled kernels are cached, or None when caching is impossible.
CACHE_DIR: Path | None = _configure_cache()
_cache_failure_logged = False


#: Marker left in the cache directory once kernels have been compiled there.
_COMPILED_MARKER = ".fingerprint-kernels-compiled"


class _CompileAnnouncer(numba.core.event.Listener):
    """Says once per process, at INFO, that fingerprint's kernels are being compiled:
    a first run on a machine spends most of its time there, and the user should know it
    is a one-off."""

    def __init__(self) -> None:
        self.announced = False
        self._lock = threading.Lock()

    def on_start(self, event: Any) -> None:
        if self.announced:
            return
        dispatcher = (event.data or {}).get("dispatcher")
        module = getattr(getattr(dispatcher, "py_func", None), "__module__", "") or ""
        if not module.startswith("fingerprint."):
            return
        with self._lock:
            if self.announced:
                return
            self.announced = True
            if CACHE_DIR is None or not caching_enabled():
                logger.info("compiling fingerprint's Numba kernels (no writable cache: "
                            "repeated at each start)")
                return
            marker = CACHE_DIR / _COMPILED_MARKER
            if marker.exists():
                logger.info("compiling Numba kernels not used before on this machine "
                            "(one-off; cached in %s)", CACHE_DIR)
            else:
                logger.info("first run on this machine: compiling fingerprint's Numba "
                            "kernels for this CPU (one-off, up to a minute; cached in %s, "
                            "later runs start in seconds)", CACHE_DIR)
                try:
                    marker.touch()
                except OSError:
                    pass

    def on_end(self, event: Any) -> None:
        pass


_ANNOUNCER = _CompileAnnouncer()
numba.core.event.register("numba:compile", _ANNOUNCER)


def caching_enabled() -> bool:
    """True when compiled kernels are cached on disk."""
    return CACHE_DIR is not None and not _cache_failure_logged


def _log_cache_failure(name: str, error: Exception) -> None:
    global _cache_failure_logged
    if not _cache_failure_logged:
        logger.warning("cannot cache compiled kernels (%s: %s); continuing without the cache "
                       "(kernels are compiled at each start)", name, error)
    _cache_failure_logged = True


@overload
def njit(func: _F, /) -> _F: ...


@overload
def njit(**options: Any) -> Callable[[_F], _F]: ...


def njit(*args: Any, **options: Any) -> Callable[..., Any]:
    """Drop-in replacement for :func:`numba.njit` honouring the cache fallback.

    ``cache=True`` is kept when a cache directory is available and silently dropped
    otherwise (after the one warning logged at import). Usable bare (``@njit``) or with
    options (``@njit(cache=True, parallel=True)``).
    """
    if len(args) == 1 and callable(args[0]) and not options:
        return _compile(args[0], {})
    if args:
        raise TypeError("fingerprint.kernels.njit takes options as keywords only")

    def decorator(func: Callable[..., Any]) -> Any:
        return _compile(func, options)

    return decorator


def _compile(func: Callable[..., Any], options: dict[str, Any]) -> Any:
    opts = dict(options)
    if opts.get("cache") and not caching_enabled():
        opts["cache"] = False
    try:
        return numba.njit(**opts)(func)
    except RuntimeError as error:
        if not opts.get("cache"):
            raise
        _log_cache_failure(func.__qualname__, error)
        opts["cache"] = False
        return numba.njit(**opts)(func)


_LAUNCH_LOCK = threading.RLock()


def run_parallel(kernel: Callable[..., _R], *args: Any) -> _R:
    """Call a ``parallel=True`` kernel safely from any thread.

    numba's ``workqueue`` threading layer (used when neither TBB nor OpenMP is available)
    aborts the process when two threads launch parallel kernels at once; launches are then
    serialised through one package-wide lock. Other layers run concurrently.

    A :func:`parallel_kernel` made with ``serial_rows`` runs its serial twin instead when
    its first argument has fewer rows than that (or Numba has one thread): small batches
    (the demo, one slice) then never pay the compilation of the parallel version, which
    takes several times longer than the serial one. Larger batches always run in parallel:
    the fitting kernels' batches are short, so a rule such as "parallel once a serial run
    proved slow" (kept for dictionary builds, see :func:`defer_parallel` and
    :func:`run_large`) would leave a fit serial for good, at half the speed on two cores.
    """
    serial_rows = getattr(kernel, "serial_rows", None)
    serial = getattr(kernel, "serial", None)  # set with serial_rows by parallel_kernel
    if serial_rows is not None and serial is not None:
        if numba.get_num_threads() == 1 or np.shape(args[0])[:1] < (serial_rows,):
            return serial(*args)
        if getattr(_DEFERRED, "active", False):
            return run_large(kernel, serial, *args)
    return _launch(kernel, *args)


_DEFERRED = threading.local()


@contextlib.contextmanager
def defer_parallel() -> Iterator[None]:
    """Within this block (in this thread), large batches of :func:`parallel_kernel`
    kernels follow :func:`run_large`: serial until a serial run proves slow. For one-off
    work such as the features of a dictionary's atoms, where compiling the parallel code on
    a first run would cost more than it saves."""
    previous = getattr(_DEFERRED, "active", False)
    _DEFERRED.active = True
    try:
        yield
    finally:
        _DEFERRED.active = previous


def _launch(kernel: Callable[..., _R], *args: Any) -> _R:
    """Launch a parallel kernel (under the package-wide lock with ``workqueue``)."""
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet: the layer is not chosen
        layer = None
    if layer is None or layer == "workqueue":
        with _LAUNCH_LOCK:
            return kernel(*args)
    return kernel(*args)


#: A serial run of a large batch longer than this (seconds, compilation excluded) makes the
#: later large batches of that kernel parallel (see :func:`run_large`).
SLOW_SERIAL_SECONDS = 5.0
_PARALLEL_WANTED: set[int] = set()


def _parallel_available(kernel: Any) -> bool:
    """True when the parallel version of ``kernel`` needs no compilation: already compiled
    or loaded in this process, or found in the on-disk cache of this machine."""
    if getattr(kernel, "overloads", None):
        return True
    try:
        return Path(kernel._cache._cache_file._index_path).exists()
    except Exception:  # caching off, or numba's internals moved: as if available
        return not caching_enabled()


def run_large(parallel: Callable[..., _R], serial: Callable[..., _R], *args: Any) -> _R:
    """Run a batch large enough to be worth a parallel launch.

    In parallel when the parallel version needs no compilation (see
    :func:`_parallel_available`), or once a serial run of the kernel has taken more than
    :data:`SLOW_SERIAL_SECONDS`; otherwise serially. Compiling a parallel kernel takes
    several times longer than its serial twin, so a first run on a machine (the demo, a
    small volume) compiles only serial code, and a long job switches to parallel code
    after its first slow batch. Both versions compute the same values."""
    if id(parallel) in _PARALLEL_WANTED or _parallel_available(parallel):
        return _launch(parallel, *args)
    compiled = len(getattr(serial, "overloads", ()))  # numba dispatcher: compiled versions
    t0 = time.perf_counter()
    out = serial(*args)
    if len(getattr(serial, "overloads", ())) == compiled and \
            time.perf_counter() - t0 > SLOW_SERIAL_SECONDS:
        _PARALLEL_WANTED.add(id(parallel))
    return out


#: Below this much work (about one exponential per unit) :func:`run_kernel` uses the
#: serial twin: waking the worker threads of a parallel launch costs microseconds on an idle
#: machine and milliseconds on a busy one, far more than a small batch itself.
SERIAL_WORK_THRESHOLD = 200_000


def parallel_kernel(*, serial_rows: int | None = None,
                    **options: Any) -> Callable[[_F], _F]:
    """Compile a ``prange`` kernel twice: parallel (returned) and serial (``.serial``).

    Both are compiled lazily (on first use) and cached (separate cache entries); options
    are those of :func:`numba.njit` (``cache=True`` and ``parallel`` are set here). Call
    through :func:`run_kernel` (the caller gives the work), or, with ``serial_rows``,
    through :func:`run_parallel` (serial below that many rows of the first argument).
    """

    def decorator(func: _F) -> _F:
        # nogil: threads fitting their own chunks run the serial twins side by side (and a
        # reader or writer thread runs during a parallel launch)
        opts = {"nogil": True, **options, "cache": True}
        parallel = _compile(func, {**opts, "parallel": True})
        twin = types.FunctionType(func.__code__, func.__globals__, func.__name__ + "_serial",
                                  func.__defaults__, func.__closure__)
        # numba's cache key holds the bytecode, not the options: a new name keeps a twin
        # cached before it released the GIL from being loaded
        twin.__qualname__ = func.__qualname__ + "_serial_nogil"
        twin.__module__ = func.__module__
        twin.__doc__ = func.__doc__
        parallel.serial = _compile(twin, {**opts, "parallel": False})
        parallel.serial_rows = None if serial_rows is None else int(serial_rows)
        return parallel

    return decorator


def run_kernel(kernel: Callable[..., _R], work: float, *args: Any) -> _R:
    """Run a :func:`parallel_kernel` on ``args``: serially for small ``work`` or one thread,
    otherwise in parallel (through :func:`run_parallel`)."""
    serial = getattr(kernel, "serial", None)
    if serial is not None and (work < SERIAL_WORK_THRESHOLD or numba.get_num_threads() == 1):
        return serial(*args)
    if serial is not None:
        return run_large(kernel, serial, *args)
    return run_parallel(kernel, *args)


@lru_cache(maxsize=64)
def gauss_legendre_unit(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights for integrals over ``[0, 1]`` (``n`` nodes,
    read-only arrays)."""
    x, w = np.polynomial.legendre.leggauss(int(n))
    nodes = 0.5 * (x + 1.0)
    weights = 0.5 * w
    nodes.setflags(write=False)
    weights.setflags(write=False)
    return nodes, weights
