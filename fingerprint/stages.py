"""Stage profile of a fit: where the time of ``fit_volume`` / ``model.fit`` goes.

The fitting code marks its stages (reading, mask, frames, features, search, posterior,
refinement, quality, writing, ...) with :func:`stage`; nothing is measured unless a
:class:`StageProfile` is active (:func:`profile_stages`), and then each stage costs two
clock reads. ``fingerprint fit --profile`` and ``scripts/bench_noddi.py --profile`` print
the table, so a regression in one stage shows in one command.

>>> with profile_stages() as prof:
...     fit_volume("noddi", "dwi.nii.gz", "dwi.bval", "dwi.bvec", "out")
>>> print(prof.table())

Stage times are summed over the threads that ran them (a reader thread overlapping the
fit adds its own time), so their total can exceed the wall time; the table gives both.
Work done in other processes (executor workers) is not seen.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

__all__ = ["Laps", "StageProfile", "active_profile", "profile_stages", "stage",
           "unrecorded"]


@dataclass
class StageProfile:
    """Seconds and calls per stage name (names with ``/`` are sub-stages of their
    parent: ``fit/search`` is part of ``fit``)."""

    seconds: dict[str, float] = field(default_factory=dict)
    #: process CPU seconds (all threads) during each stage: steadier than wall time on a
    #: loaded machine, but stages that overlap in time each count the other's CPU too
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    #: when each stage first began and last ended (seconds from the profile's start): a
    #: timeline that shows what overlapped what (a reader thread and the fit) and when
    #: the first voxel was fitted
    began: dict[str, float] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    #: voxels fitted while the profile was active (for the per-voxel column)
    voxels: int = 0
    started: float = field(default_factory=time.perf_counter)
    stopped: float | None = None
    cpu_started: float = field(default_factory=time.process_time)
    cpu_stopped: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, seconds: float, calls: int = 1, cpu: float = 0.0) -> None:
        """Add ``seconds`` of wall time, ``cpu`` seconds of process CPU time (and
        ``calls``) to stage ``name``."""
        end = time.perf_counter() - self.started
        begin = end - float(seconds)
        with self._lock:
            self.seconds[name] = self.seconds.get(name, 0.0) + float(seconds)
            self.cpu_seconds[name] = self.cpu_seconds.get(name, 0.0) + float(cpu)
            self.calls[name] = self.calls.get(name, 0) + int(calls)
            self.began[name] = min(self.began.get(name, begin), begin)
            self.ended[name] = max(self.ended.get(name, end), end)

    def count_voxels(self, n: int) -> None:
        """Count ``n`` fitted voxels."""
        with self._lock:
            self.voxels += int(n)

    @property
    def wall_seconds(self) -> float:
        """Wall time from activation to now (or to the end of the profiled block)."""
        end = self.stopped if self.stopped is not None else time.perf_counter()
        return end - self.started

    @property
    def cpu_total(self) -> float:
        """Process CPU seconds (all threads) from activation to now (or to the end)."""
        end = self.cpu_stopped if self.cpu_stopped is not None else time.process_time()
        return end - self.cpu_started

    def rows(self) -> list[tuple[str, float, int, float | None]]:
        """(stage, seconds, calls, µs per voxel or None), parents before their
        sub-stages, in the order the stages first ran."""
        with self._lock:
            names = list(self.seconds)
            secs = dict(self.seconds)
            calls = dict(self.calls)
            voxels = self.voxels
        return self._ordered(names, secs, calls, voxels)

    @staticmethod
    def _ordered(names: list[str], secs: dict[str, float], calls: dict[str, int],
                 voxels: int) -> list[tuple[str, float, int, float | None]]:
        order = {n: i for i, n in enumerate(names)}

        def key(name: str) -> tuple[int, ...]:
            parts = name.split("/")
            return tuple(order.get("/".join(parts[:i + 1]), len(order))
                         for i in range(len(parts)))

        return [(n, secs[n], calls[n], secs[n] / voxels * 1e6 if voxels else None)
                for n in sorted(names, key=key)]

    def table(self) -> str:
        """The profile as a plain-text table (stage, seconds, share of wall time,
        µs/voxel, CPU seconds of all threads, calls, and when the stage first began and
        last ended, in seconds from the start of the profile)."""
        wall = self.wall_seconds
        lines = [f"{'stage':<24} {'seconds':>9} {'share':>7} {'us/voxel':>9} "
                 f"{'cpu s':>8} {'calls':>6} {'from':>7} {'to':>7}"]
        with self._lock:
            cpu = dict(self.cpu_seconds)
            began, ended = dict(self.began), dict(self.ended)
        for name, sec, calls, per in self.rows():
            depth = name.count("/")
            label = "  " * depth + name.rsplit("/", 1)[-1]
            share = f"{100 * sec / wall:6.1f}%" if wall > 0 else "      -"
            per_s = f"{per:9.2f}" if per is not None else f"{'-':>9}"
            span = (f" {began[name]:7.2f} {ended[name]:7.2f}" if name in began
                    else f" {'-':>7} {'-':>7}")
            lines.append(f"{label:<24} {sec:9.3f} {share} {per_s} {cpu.get(name, 0.0):8.3f} "
                         f"{calls:6d}{span}")
        per_wall = f"{wall / self.voxels * 1e6:9.2f}" if self.voxels else f"{'-':>9}"
        lines.append(f"{'wall':<24} {wall:9.3f} {'100.0%':>7} {per_wall} "
                     f"{self.cpu_total:8.3f}   ({self.voxels} voxels)")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        """JSON-able form: wall seconds, voxels and the stages' seconds, CPU seconds,
        calls and span (``began`` / ``ended``, seconds from the profile's start)."""
        with self._lock:
            cpu = dict(self.cpu_seconds)
            began, ended = dict(self.began), dict(self.ended)
        return {"wall_seconds": self.wall_seconds, "cpu_seconds": self.cpu_total,
                "voxels": self.voxels,
                "stages": {n: {"seconds": s, "cpu_seconds": cpu.get(n, 0.0), "calls": c,
                               "began": began.get(n), "ended": ended.get(n)}
                           for n, s, c, _ in self.rows()}}


_ACTIVE: list[StageProfile] = []
_ACTIVE_LOCK = threading.Lock()


_LOCAL = threading.local()


def active_profile() -> StageProfile | None:
    """The innermost active profile of this process, or None (also inside
    :func:`unrecorded` in this thread)."""
    if getattr(_LOCAL, "unrecorded", False):
        return None
    return _ACTIVE[-1] if _ACTIVE else None


@contextlib.contextmanager
def unrecorded() -> Iterator[None]:
    """Stages (and voxels) of this thread are not recorded during the block: work that is
    not part of what is measured, such as a warm-up; other threads are not affected."""
    before = getattr(_LOCAL, "unrecorded", False)
    _LOCAL.unrecorded = True
    try:
        yield
    finally:
        _LOCAL.unrecorded = before


@contextlib.contextmanager
def profile_stages(profile: StageProfile | None = None) -> Iterator[StageProfile]:
    """Record the stages run in this process (all threads) during the block into
    ``profile`` (a new :class:`StageProfile` by default), which is yielded; logged at
    DEBUG at the end."""
    prof = profile if profile is not None else StageProfile()
    prof.started = time.perf_counter()
    prof.stopped = None
    prof.cpu_started = time.process_time()
    prof.cpu_stopped = None
    with _ACTIVE_LOCK:
        _ACTIVE.append(prof)
    try:
        yield prof
    finally:
        prof.stopped = time.perf_counter()
        prof.cpu_stopped = time.process_time()
        with _ACTIVE_LOCK:
            _ACTIVE.remove(prof)
        logger.debug("stage profile:\n%s", prof.table())


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` in the active profile (no cost without one)."""
    prof = active_profile()
    if prof is None:
        yield
        return
    t0 = time.perf_counter()
    c0 = time.process_time()
    try:
        yield
    finally:
        prof.add(name, time.perf_counter() - t0, cpu=time.process_time() - c0)


class Laps:
    """Consecutive stages of one code path: ``lap('frames')`` records the time since the
    previous lap (or since creation) as stage ``prefix + 'frames'``. Without an active
    profile it does nothing."""

    __slots__ = ("prefix", "profile", "last", "last_cpu")

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.profile = active_profile()
        self.last = time.perf_counter() if self.profile is not None else 0.0
        self.last_cpu = time.process_time() if self.profile is not None else 0.0

    def __call__(self, name: str) -> None:
        if self.profile is None:
            return
        now = time.perf_counter()
        cpu = time.process_time()
        self.profile.add(self.prefix + name, now - self.last, cpu=cpu - self.last_cpu)
        self.last = now
        self.last_cpu = cpu
