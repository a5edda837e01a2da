"""Immutable diffusion acquisition schemes (dmipy-compatible API).

An :class:`AcquisitionScheme` holds, in SI units, everything a forward model needs about
the N measurements of a diffusion-weighted acquisition: b-values (s/m²), unit gradient
directions, and — when the pulse timing is known — q-values (1/m), gradient strengths
(T/m), pulse duration ``delta`` and separation ``Delta`` (s), and the echo time ``TE`` (s).

Measurements are grouped into shells the way dmipy does it: measurements are first split
by their unique timing (``delta``, ``Delta``, ``TE``, whichever are known), then, inside
each timing group, b-values are clustered with single linkage so that two measurements
whose b-values differ by at most ``min_b_shell_distance`` share a shell. Shells are
numbered group by group (timing groups in increasing lexicographic order) and, inside a
group, by increasing mean b-value; a shell's b-value is the mean b-value of its members.

Relations used throughout (narrow-pulse PGSE)::

    q = gamma * G * delta / (2 pi)
    b = (Delta - delta / 3) * (2 pi q)²

Schemes are immutable: attributes cannot be re-assigned and every array is read-only.
Methods that "change" a scheme (:meth:`AcquisitionScheme.subset`,
:meth:`AcquisitionScheme.select_shells`, :meth:`AcquisitionScheme.rotated`) return a new
one.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, overload

import numpy as np

from fingerprint.core.backends import backend
from fingerprint.core.constants import GYROMAGNETIC_RATIO
from fingerprint.errors import InputError

if TYPE_CHECKING:
    import os

    from dipy.core.gradients import GradientTable
    from numpy.typing import ArrayLike

__all__ = [
    "AcquisitionScheme",
    "DmipyAcquisitionScheme",
    "MeasurementSet",
    "acquisition_scheme_from_schemefile",
    "acquisition_scheme_from_bvalues",
    "acquisition_scheme_from_gradient_strengths",
    "acquisition_scheme_from_qvalues",
    "b_from_g",
    "b_from_q",
    "calculate_shell_bvalues_and_indices",
    "g_from_b",
    "g_from_q",
    "gtab_dipy2dmipy",
    "gtab_dipy2fingerprint",
    "gtab_dmipy2dipy",
    "gtab_fingerprint2dipy",
    "q_from_b",
    "q_from_g",
]

logger = logging.getLogger(__name__)

#: Default b-value at or below which a measurement counts as a b0, s/m².
DEFAULT_B0_THRESHOLD = 10e6
#: Default minimum b-value distance between two shells, s/m².
DEFAULT_MIN_B_SHELL_DISTANCE = 50e6
#: Tolerance on the norm of DWI gradient directions given to the constructors.
UNIT_NORM_TOLERANCE = 1e-3

# Resolution of the rounding applied before hashing (SI units): 0.1 s/mm² for b-values,
# 1e-4 for direction components, 0.1 µs for timings.
_HASH_B_RESOLUTION = 1e5
_HASH_DIRECTION_RESOLUTION = 1e-4
_HASH_TIME_RESOLUTION = 1e-7
_HASH_VERSION = 1


# --------------------------------------------------------------------------- conversions
def q_from_b(b: ArrayLike, delta: ArrayLike, Delta: ArrayLike) -> np.ndarray:
    """q-value (1/m) from b-value (s/m²), pulse duration and separation (s)."""
    tau = np.asarray(Delta, dtype=float) - np.asarray(delta, dtype=float) / 3.0
    return np.sqrt(np.asarray(b, dtype=float) / tau) / (2.0 * np.pi)


def b_from_q(q: ArrayLike, delta: ArrayLike, Delta: ArrayLike) -> np.ndarray:
    """b-value (s/m²) from q-value (1/m), pulse duration and separation (s)."""
    tau = np.asarray(Delta, dtype=float) - np.asarray(delta, dtype=float) / 3.0
    return (2.0 * np.pi * np.asarray(q, dtype=float)) ** 2 * tau


def q_from_g(g: ArrayLike, delta: ArrayLike, gyromagnetic_ratio: float = GYROMAGNETIC_RATIO
             ) -> np.ndarray:
    """q-value (1/m) from gradient strength (T/m) and pulse duration (s)."""
    return (np.asarray(g, dtype=float) * np.asarray(delta, dtype=float) * gyromagnetic_ratio
            / (2.0 * np.pi))


def g_from_q(q: ArrayLike, delta: ArrayLike, gyromagnetic_ratio: float = GYROMAGNETIC_RATIO
             ) -> np.ndarray:
    """Gradient strength (T/m) from q-value (1/m) and pulse duration (s)."""
    q = np.asarray(q, dtype=float)
    delta = np.asarray(delta, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = 2.0 * np.pi * q / (delta * gyromagnetic_ratio)
    return np.where(q == 0.0, 0.0, g)


def b_from_g(g: ArrayLike, delta: ArrayLike, Delta: ArrayLike,
             gyromagnetic_ratio: float = GYROMAGNETIC_RATIO) -> np.ndarray:
    """b-value (s/m²) from gradient strength (T/m), pulse duration and separation (s)."""
    delta = np.asarray(delta, dtype=float)
    tau = np.asarray(Delta, dtype=float) - delta / 3.0
    return (np.asarray(g, dtype=float) * gyromagnetic_ratio * delta) ** 2 * tau


def g_from_b(b: ArrayLike, delta: ArrayLike, Delta: ArrayLike,
             gyromagnetic_ratio: float = GYROMAGNETIC_RATIO) -> np.ndarray:
    """Gradient strength (T/m) from b-value (s/m²), pulse duration and separation (s)."""
    return g_from_q(q_from_b(b, delta, Delta), delta, gyromagnetic_ratio)


# --------------------------------------------------------------------------- helpers
@overload
def _readonly(array: np.ndarray) -> np.ndarray: ...
@overload
def _readonly(array: np.ndarray | None) -> np.ndarray | None: ...
def _readonly(array: np.ndarray | None) -> np.ndarray | None:
    if array is None:
        return None
    out = np.array(array, copy=True)
    out.setflags(write=False)
    return out


def _as_vector(name: str, value: Any, n: int | None) -> np.ndarray:
    """``value`` as a finite float (n,) array; scalars are broadcast to length n."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{name} must be numeric: {exc}") from None
    if arr.ndim == 0:
        if n is None:
            raise InputError(f"{name} must be a one-dimensional array, got a scalar")
        arr = np.full(n, float(arr))
    elif arr.ndim != 1:
        raise InputError(f"{name} must be a scalar or a one-dimensional array of length "
                         f"{n if n is not None else 'N'}; got shape {arr.shape}")
    if n is not None and arr.shape[0] != n:
        raise InputError(f"{name} has {arr.shape[0]} values but there are {n} measurements")
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(f"{name} contains non-finite values (NaN or inf) at measurement "
                         f"index {_first(bad)}")
    return arr


def _first(mask: np.ndarray, limit: int = 5) -> str:
    idx = np.flatnonzero(mask)
    text = ", ".join(str(int(i)) for i in idx[:limit])
    return text + (f" (and {idx.size - limit} more)" if idx.size > limit else "")


_UNITS = {"qvalues": "1/m", "gradient_strengths": "T/m", "delta": "s", "Delta": "s", "TE": "s"}


def _optional_vector(name: str, value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    arr = _as_vector(name, value, n)
    if (arr < 0).any():
        raise InputError(f"{name} must be zero or positive ({_UNITS.get(name, 'SI')}); "
                         f"negative at measurement index {_first(arr < 0)}")
    return arr


def _check_timing_units(delta: np.ndarray | None, Delta: np.ndarray | None,
                        TE: np.ndarray | None) -> None:
    for name, arr in (("delta", delta), ("Delta", Delta), ("TE", TE)):
        if arr is not None and arr.size and float(arr.max()) > 1.0:
            logger.warning("%s reaches %g s: timings must be given in seconds "
                           "(milliseconds given?)", name, float(arr.max()))


def _check_b_units(bvalues: np.ndarray) -> None:
    bmax = float(bvalues.max()) if bvalues.size else 0.0
    if 0.0 < bmax < 1e6:
        logger.warning("the largest b-value is %g s/m² (%g s/mm²): b-values must be given "
                       "in s/m² (s/mm² given? multiply by 1e6)", bmax, bmax / 1e6)


def _unit_directions(gradient_directions: Any, n: int, b0_mask: np.ndarray,
                     tolerance: float | None = UNIT_NORM_TOLERANCE,
                     bvalues: np.ndarray | None = None) -> np.ndarray:
    """(n, 3) directions: unit for every measurement with b > 0 that has one, zero otherwise.

    The b=0 threshold (``b0_mask``) only decides which measurements must have a direction:
    those above it (a zero, NaN or infinite vector there is an error). Measurements at or
    below it keep their direction when they have one and b > 0 (the forward models use it:
    a stick at b = 9 s/mm² is not 1); zero, NaN or infinite vectors of b=0 measurements
    become zero rows. With ``tolerance`` None every non-zero direction is normalised;
    otherwise directions above the threshold whose norm differs from 1 by more than
    ``tolerance`` are an error.
    """
    try:
        dirs = np.array(gradient_directions, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"gradient_directions must be numeric: {exc}") from None
    if dirs.ndim != 2 or dirs.shape[1] != 3:
        raise InputError(f"gradient_directions must have shape (N, 3); got {dirs.shape}")
    if dirs.shape[0] != n:
        raise InputError(f"gradient_directions has {dirs.shape[0]} rows but there are {n} "
                         "b/q/G values")
    finite = np.isfinite(dirs).all(axis=1)
    dwi = ~b0_mask
    bad = dwi & ~finite
    if bad.any():
        raise InputError("gradient_directions contains non-finite values (NaN or inf) at "
                         f"measurement index {_first(bad)}")
    dirs = np.where(finite[:, None], dirs, 0.0)
    norms = np.linalg.norm(dirs, axis=1)
    zero = dwi & (norms == 0.0)
    if zero.any():
        raise InputError("gradient_directions has a zero vector for diffusion-weighted "
                         f"measurement index {_first(zero)} (only b0s may have no direction)")
    if tolerance is not None:
        off = dwi & (np.abs(norms - 1.0) > tolerance)
        if off.any():
            raise InputError("gradient_directions must be unit vectors; norms of measurement "
                             f"index {_first(off)} are "
                             f"{', '.join(f'{x:.4g}' for x in norms[off][:5])}")
    weighted = dwi.copy()
    if bvalues is not None:
        weighted |= (np.asarray(bvalues) > 0) & (norms > 1e-8)
    out = np.zeros_like(dirs)
    out[weighted] = dirs[weighted] / norms[weighted, None]
    return out


def calculate_shell_bvalues_and_indices(bvalues: ArrayLike, max_distance: float = 20e6
                                        ) -> tuple[np.ndarray, np.ndarray]:
    """Cluster b-values into shells (single linkage, dmipy's ``fcluster`` semantics).

    Two b-values whose distance is at most ``max_distance`` (s/m²) are linked; shells are
    the connected groups, numbered by increasing mean b-value.

    Returns ``(shell_indices (N,) int, shell_bvalues (S,) s/m²)``.
    """
    b = np.asarray(bvalues, dtype=float).ravel()
    if b.size == 0:
        return np.zeros(0, dtype=int), np.zeros(0)
    order = np.argsort(b, kind="stable")
    gaps = np.diff(b[order]) > max_distance
    labels_sorted = np.concatenate([[0], np.cumsum(gaps)])
    indices = np.empty(b.size, dtype=int)
    indices[order] = labels_sorted
    # mean of each cluster over its members in their original order
    members = _members(indices)
    shell_b = np.array([b[m].mean() for m in members])
    # clusters are contiguous in sorted order so their means already increase; keep the
    # explicit sort for ties of identical means
    rank = np.argsort(shell_b, kind="stable")
    relabel = np.empty(shell_b.size, dtype=int)
    relabel[rank] = np.arange(shell_b.size)
    return relabel[indices], shell_b[rank]


def _members(labels: np.ndarray) -> list[np.ndarray]:
    """Indices of each label 0..L-1 of ``labels``, each in increasing order."""
    perm = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    return np.split(perm, np.cumsum(counts)[:-1])


def _group_shells(bvalues: np.ndarray, delta: np.ndarray | None, Delta: np.ndarray | None,
                  TE: np.ndarray | None, min_b_shell_distance: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    n = bvalues.size
    columns = [c for c in (delta, Delta, TE) if c is not None]
    timing = np.column_stack(columns) if columns else np.zeros((n, 1))
    # timing groups in increasing lexicographic order of (delta, Delta, TE)
    _, group = np.unique(timing, axis=0, return_inverse=True)
    shell_indices = np.zeros(n, dtype=int)
    shell_bvalues: list[np.ndarray] = []
    offset = 0
    for members in _members(np.asarray(group).ravel()):
        idx, sb = calculate_shell_bvalues_and_indices(bvalues[members], min_b_shell_distance)
        shell_indices[members] = idx + offset
        shell_bvalues.append(sb)
        offset += sb.size
    return shell_indices, np.concatenate(shell_bvalues)


def _check_consistency(b: np.ndarray, q: np.ndarray | None, g: np.ndarray | None,
                       delta: np.ndarray | None, Delta: np.ndarray | None) -> None:
    """b, q and G given together must satisfy the PGSE relations."""
    if q is not None and delta is not None and Delta is not None:
        expected = b_from_q(q, delta, Delta)
        bad = ~np.isclose(b, expected, rtol=1e-6, atol=1e3)
        if bad.any():
            raise InputError("bvalues and qvalues disagree with b = (Delta - delta/3)(2 pi q)² "
                             f"at measurement index {_first(bad)}")
    if q is not None and g is not None and delta is not None:
        bad = ~np.isclose(q, q_from_g(g, delta), rtol=1e-6, atol=1e-3)
        if bad.any():
            raise InputError("qvalues and gradient_strengths disagree with "
                             f"q = gamma G delta / (2 pi) at measurement index {_first(bad)}")


def _fmt(value: Any, scale: float, digits: int = 1) -> str:
    if value is None:
        return "N/A"
    return f"{value * scale:.{digits}f}"


# --------------------------------------------------------------------------- measurement sets
@dataclass(frozen=True, eq=False)
class MeasurementSet:
    """What a signal kernel needs about M measurements (SI units, read-only arrays).

    b: (M,) b-values, s/m².
    q: (M,) q-values, 1/m, or None when the timing is unknown.
    G: (M,) gradient strengths, T/m, or None.
    delta: (M,) pulse durations, s, or None.
    Delta: (M,) pulse separations, s, or None.
    directions: (M, 3) unit gradient directions (zero rows for b0s or when meaningless).
    """

    b: np.ndarray
    q: np.ndarray | None
    G: np.ndarray | None
    delta: np.ndarray | None
    Delta: np.ndarray | None
    directions: np.ndarray

    def __post_init__(self) -> None:
        for name in ("b", "q", "G", "delta", "Delta"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _readonly(np.asarray(value, dtype=float)))
        object.__setattr__(self, "directions",
                           _readonly(np.asarray(self.directions, dtype=float).reshape(-1, 3)))
        m = self.b.shape[0]
        for name in ("q", "G", "delta", "Delta"):
            value = getattr(self, name)
            if value is not None and value.shape != (m,):
                raise InputError(f"MeasurementSet.{name} must have shape ({m},), "
                                 f"got {value.shape}")
        if self.directions.shape[0] != m:
            raise InputError(f"MeasurementSet.directions must have {m} rows, "
                             f"got {self.directions.shape[0]}")

    @property
    def number_of_measurements(self) -> int:
        """M, the number of measurements."""
        return int(self.b.shape[0])

    @property
    def tau(self) -> np.ndarray | None:
        """Effective diffusion time ``Delta - delta / 3`` (s), or None."""
        if self.delta is None or self.Delta is None:
            return None
        return self.Delta - self.delta / 3.0

    def __len__(self) -> int:
        return self.number_of_measurements


# --------------------------------------------------------------------------- scheme
class AcquisitionScheme:
    """An immutable diffusion acquisition scheme (SI units).

    Build one with :func:`acquisition_scheme_from_bvalues`,
    :func:`acquisition_scheme_from_qvalues`, :func:`acquisition_scheme_from_gradient_strengths`
    or a reader in :mod:`fingerprint.io.gradients`; the constructor itself takes already
    consistent arrays.

    Attributes
    ----------
    bvalues : (N,) b-values, s/m².
    gradient_directions : (N, 3) unit vectors; zero rows where b = 0 (or where a
        measurement at or below ``b0_threshold`` has no direction).
    qvalues, gradient_strengths : (N,) in 1/m and T/m, or None without timing.
    delta, Delta, TE : (N,) pulse duration, pulse separation and echo time in s, or None.
    b0_threshold, min_b_shell_distance : shell-grouping settings, s/m².
    b0_mask : (N,) bool, ``bvalues <= b0_threshold``: the measurements that give S0.
        It never changes the physics: forward models use every measurement's own
        b-value, direction and timing.
    shell_indices : (N,) shell of each measurement; shell_bvalues (S,) mean b per shell.
    shell_qvalues, shell_gradient_strengths, shell_delta, shell_Delta, shell_TE :
        (S,) values of the first measurement of each shell, or None.
    shell_b0_mask : (S,) bool; unique_dwi_indices: the shells that are not b0 shells.
    hash : stable hex content hash of the rounded SI arrays.
    """

    __slots__ = (
        "bvalues", "gradient_directions", "qvalues", "gradient_strengths", "delta", "Delta",
        "TE", "tau", "b0_threshold", "min_b_shell_distance", "b0_mask", "number_of_b0s",
        "number_of_measurements", "shell_indices", "shell_bvalues", "shell_b0_mask",
        "shell_qvalues", "shell_gradient_strengths", "shell_delta", "shell_Delta",
        "shell_TE", "unique_dwi_indices", "hash", "_measurements",
    )

    # the attributes (set once in __init__; annotations only, for type checkers)
    bvalues: np.ndarray
    gradient_directions: np.ndarray
    qvalues: np.ndarray | None
    gradient_strengths: np.ndarray | None
    delta: np.ndarray | None
    Delta: np.ndarray | None
    TE: np.ndarray | None
    tau: np.ndarray | None
    b0_threshold: float
    min_b_shell_distance: float
    b0_mask: np.ndarray
    number_of_b0s: int
    number_of_measurements: int
    shell_indices: np.ndarray
    shell_bvalues: np.ndarray
    shell_b0_mask: np.ndarray
    shell_qvalues: np.ndarray | None
    shell_gradient_strengths: np.ndarray | None
    shell_delta: np.ndarray | None
    shell_Delta: np.ndarray | None
    shell_TE: np.ndarray | None
    unique_dwi_indices: np.ndarray
    hash: str
    _measurements: MeasurementSet

    def __init__(self, bvalues: ArrayLike, gradient_directions: ArrayLike,
                 qvalues: ArrayLike | None = None, gradient_strengths: ArrayLike | None = None,
                 delta: ArrayLike | None = None, Delta: ArrayLike | None = None,
                 TE: ArrayLike | None = None,
                 min_b_shell_distance: float = DEFAULT_MIN_B_SHELL_DISTANCE,
                 b0_threshold: float = DEFAULT_B0_THRESHOLD) -> None:
        b = _as_vector("bvalues", bvalues, None)
        n = b.shape[0]
        if n == 0:
            raise InputError("an acquisition scheme needs at least one measurement")
        if (b < 0).any():
            raise InputError(f"bvalues must be zero or positive; negative at measurement index "
                             f"{_first(b < 0)}")
        b0_threshold = float(b0_threshold)
        min_b_shell_distance = float(min_b_shell_distance)
        if not np.isfinite(b0_threshold) or b0_threshold < 0:
            raise InputError(f"b0_threshold must be a finite non-negative b-value in s/m², "
                             f"got {b0_threshold}")
        if not np.isfinite(min_b_shell_distance) or min_b_shell_distance < 0:
            raise InputError("min_b_shell_distance must be a finite non-negative b-value in "
                             f"s/m², got {min_b_shell_distance}")
        b0_mask = b <= b0_threshold
        dirs = _unit_directions(gradient_directions, n, b0_mask, bvalues=b)
        q = _optional_vector("qvalues", qvalues, n)
        g = _optional_vector("gradient_strengths", gradient_strengths, n)
        d = _optional_vector("delta", delta, n)
        D = _optional_vector("Delta", Delta, n)
        te = _optional_vector("TE", TE, n)

        _check_consistency(b, q, g, d, D)
        shell_indices, shell_bvalues = _group_shells(b, d, D, te, min_b_shell_distance)
        first = np.unique(shell_indices, return_index=True)[1]

        def shell(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None else arr[first]

        if te is not None:
            b0_te = set(np.unique(te[b0_mask]).tolist())
            missing = sorted(set(np.unique(te).tolist()) - b0_te)
            if missing:
                logger.warning("no b0 measurement for echo time(s) %s s: signals of those "
                               "measurements cannot be normalised by their own b0",
                               ", ".join(f"{x:g}" for x in missing))
        if not b0_mask.any():
            logger.warning("no b0 measurements (b <= %g s/m²) in the acquisition scheme; check "
                           "b0_threshold and the b-value units", b0_threshold)

        set_ = object.__setattr__
        set_(self, "bvalues", _readonly(b))
        set_(self, "gradient_directions", _readonly(dirs))
        set_(self, "qvalues", _readonly(q))
        set_(self, "gradient_strengths", _readonly(g))
        set_(self, "delta", _readonly(d))
        set_(self, "Delta", _readonly(D))
        set_(self, "TE", _readonly(te))
        set_(self, "tau", _readonly(None if d is None or D is None else D - d / 3.0))
        set_(self, "b0_threshold", b0_threshold)
        set_(self, "min_b_shell_distance", min_b_shell_distance)
        set_(self, "b0_mask", _readonly(b0_mask))
        set_(self, "number_of_b0s", int(b0_mask.sum()))
        set_(self, "number_of_measurements", int(n))
        set_(self, "shell_indices", _readonly(shell_indices))
        set_(self, "shell_bvalues", _readonly(shell_bvalues))
        set_(self, "shell_b0_mask", _readonly(shell_bvalues <= b0_threshold))
        set_(self, "shell_qvalues", _readonly(shell(q)))
        set_(self, "shell_gradient_strengths", _readonly(shell(g)))
        set_(self, "shell_delta", _readonly(shell(d)))
        set_(self, "shell_Delta", _readonly(shell(D)))
        set_(self, "shell_TE", _readonly(shell(te)))
        set_(self, "unique_dwi_indices", _readonly(np.unique(shell_indices[~b0_mask])))
        set_(self, "_measurements", MeasurementSet(b=b, q=q, G=g, delta=d, Delta=D,
                                                   directions=dirs))
        set_(self, "hash", self._content_hash())

    # ----------------------------------------------------------------- immutability
    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"AcquisitionScheme is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"AcquisitionScheme is immutable: cannot delete {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (AcquisitionScheme, (
            np.array(self.bvalues), np.array(self.gradient_directions),
            None if self.qvalues is None else np.array(self.qvalues),
            None if self.gradient_strengths is None else np.array(self.gradient_strengths),
            None if self.delta is None else np.array(self.delta),
            None if self.Delta is None else np.array(self.Delta),
            None if self.TE is None else np.array(self.TE),
            self.min_b_shell_distance, self.b0_threshold))

    def __copy__(self) -> AcquisitionScheme:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> AcquisitionScheme:
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AcquisitionScheme):
            return NotImplemented
        return self.hash == other.hash

    def __hash__(self) -> int:
        return hash(self.hash)

    def __len__(self) -> int:
        return self.number_of_measurements

    def __repr__(self) -> str:
        timing = "with timing" if self.delta is not None and self.Delta is not None \
            else "without timing"
        return (f"AcquisitionScheme({self.number_of_measurements} measurements, "
                f"{self.number_of_b0s} b0, {int(np.sum(~self.shell_b0_mask))} DWI shells, "
                f"{timing}, hash={self.hash[:12]})")

    # ----------------------------------------------------------------- hashing
    def _content_hash(self) -> str:
        def ints(arr: np.ndarray | None, resolution: float) -> list[int] | None:
            if arr is None:
                return None
            return [int(x) for x in np.rint(np.asarray(arr) / resolution).astype(np.int64)
                    .ravel()]

        payload = {
            "version": _HASH_VERSION,
            "b": ints(self.bvalues, _HASH_B_RESOLUTION),
            "directions": ints(self.gradient_directions, _HASH_DIRECTION_RESOLUTION),
            "delta": ints(self.delta, _HASH_TIME_RESOLUTION),
            "Delta": ints(self.Delta, _HASH_TIME_RESOLUTION),
            "TE": ints(self.TE, _HASH_TIME_RESOLUTION),
            "b0_threshold": int(round(self.b0_threshold / _HASH_B_RESOLUTION)),
            "min_b_shell_distance": int(round(self.min_b_shell_distance / _HASH_B_RESOLUTION)),
        }
        text = json.dumps(payload, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    # ----------------------------------------------------------------- measurement views
    @property
    def measurements(self) -> MeasurementSet:
        """All N measurements as a :class:`MeasurementSet`."""
        return self._measurements

    def unique_measurements(self) -> tuple[MeasurementSet, np.ndarray]:
        """The U distinct (b, q, delta, Delta) combinations, ignoring directions.

        Returns ``(MeasurementSet with U rows and zero directions, inverse (N,) int)`` with
        ``unique.b[inverse] == bvalues``.
        """
        cols = [self.bvalues]
        for arr in (self.qvalues, self.delta, self.Delta):
            cols.append(np.zeros(self.number_of_measurements) if arr is None else arr)
        table = np.column_stack(cols)
        _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
        inverse = np.asarray(inverse).ravel()

        def take(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None else arr[first]

        unique = MeasurementSet(b=self.bvalues[first], q=take(self.qvalues),
                                G=take(self.gradient_strengths), delta=take(self.delta),
                                Delta=take(self.Delta), directions=np.zeros((first.size, 3)))
        return unique, np.asarray(_readonly(inverse.astype(int)))

    def spherical_mean_groups(self) -> tuple[MeasurementSet, np.ndarray]:
        """Exact shell spherical means: the distinct (b, q, delta, Delta) groups and the
        (S, G) weights that average them into shells.

        A shell's spherical mean is the average of its members' own spherical means, each
        at the member's b-value and timing, so a shell whose b-values jitter (995-1005
        s/mm²) or mix (50 and 100 s/mm²) is still exact:
        ``shell_mean = weights @ group_means``. Members at or below ``b0_threshold`` count
        only in shells made of such measurements (b=0 shells), as in the data's shell
        means. Returns ``(MeasurementSet with G rows and zero directions, weights (S, G))``.
        """
        groups, inverse = self.unique_measurements()
        s, g = self.number_of_shells, groups.number_of_measurements
        b0 = np.asarray(self.b0_mask, dtype=bool)
        shell_b0 = np.asarray(self.shell_b0_mask, dtype=bool)
        shells = np.asarray(self.shell_indices)
        counted = ~b0 | shell_b0[shells]
        counts = np.zeros((s, g))
        np.add.at(counts, (shells[counted], inverse[counted]), 1.0)
        empty = counts.sum(axis=1) == 0  # a DWI shell holding only b0 members
        if empty.any():
            np.add.at(counts, (shells[np.isin(shells, np.flatnonzero(empty))],
                               inverse[np.isin(shells, np.flatnonzero(empty))]), 1.0)
        weights = counts / counts.sum(axis=1, keepdims=True)
        return groups, _readonly(weights)

    def shell_measurements(self) -> MeasurementSet:
        """One row per shell (shell b, q, G, delta, Delta; zero directions)."""
        s = self.shell_bvalues.shape[0]
        return MeasurementSet(b=self.shell_bvalues, q=self.shell_qvalues,
                              G=self.shell_gradient_strengths, delta=self.shell_delta,
                              Delta=self.shell_Delta, directions=np.zeros((s, 3)))

    @property
    def number_of_shells(self) -> int:
        """S, the number of shells (b0 shells included)."""
        return int(self.shell_bvalues.shape[0])

    # ----------------------------------------------------------------- derived schemes
    def _indices(self, selection: Any) -> np.ndarray:
        n = self.number_of_measurements
        if isinstance(selection, slice):
            return np.arange(n)[selection]
        sel = np.asarray(selection)
        if sel.dtype == bool:
            if sel.shape != (n,):
                raise InputError(f"a boolean measurement mask must have shape ({n},), "
                                 f"got {sel.shape}")
            idx = np.flatnonzero(sel)
        elif np.issubdtype(sel.dtype, np.integer):
            idx = np.atleast_1d(sel).ravel()
            if idx.size and (idx.min() < -n or idx.max() >= n):
                raise InputError(f"measurement indices must lie in [-{n}, {n}); "
                                 f"got {int(idx.min())}..{int(idx.max())}")
            idx = np.where(idx < 0, idx + n, idx)
        else:
            raise InputError("select measurements with a boolean mask, integer indices or a "
                             f"slice; got dtype {sel.dtype}")
        if idx.size == 0:
            raise InputError("the selection contains no measurement")
        return idx

    def subset(self, mask_or_indices: ArrayLike) -> AcquisitionScheme:
        """A new scheme made of the selected measurements (shells are regrouped)."""
        idx = self._indices(mask_or_indices)

        def take(arr: np.ndarray | None) -> np.ndarray | None:
            return None if arr is None else np.array(arr[idx])

        return AcquisitionScheme(
            np.array(self.bvalues[idx]), np.array(self.gradient_directions[idx]),
            take(self.qvalues), take(self.gradient_strengths), take(self.delta),
            take(self.Delta), take(self.TE), self.min_b_shell_distance, self.b0_threshold)

    def __getitem__(self, selection: Any) -> AcquisitionScheme:
        return self.subset(selection)

    def select_shells(self, shell_ids: ArrayLike) -> AcquisitionScheme:
        """A new scheme with only the measurements of the given shell indices."""
        ids = np.atleast_1d(np.asarray(shell_ids))
        if ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"shell_ids must be a non-empty list of integer shell indices; "
                             f"got {shell_ids!r}")
        s = self.number_of_shells
        bad = [int(i) for i in ids if not 0 <= i < s]
        if bad:
            raise InputError(f"shell indices {bad} do not exist: this scheme has shells "
                             f"0..{s - 1}")
        return self.subset(np.isin(self.shell_indices, ids))

    @overload
    def return_pruned_acquisition_scheme(self, shell_indices: ArrayLike,
                                         data: None = None) -> AcquisitionScheme: ...

    @overload
    def return_pruned_acquisition_scheme(self, shell_indices: ArrayLike, data: ArrayLike
                                         ) -> tuple[AcquisitionScheme, np.ndarray]: ...

    def return_pruned_acquisition_scheme(self, shell_indices: ArrayLike,
                                         data: ArrayLike | None = None
                                         ) -> AcquisitionScheme | tuple[AcquisitionScheme,
                                                                        np.ndarray]:
        """dmipy name of :meth:`select_shells`; also prunes ``data[..., N]`` when given."""
        pruned = self.select_shells(shell_indices)
        if data is None:
            return pruned
        mask = np.isin(self.shell_indices, np.atleast_1d(shell_indices))
        return pruned, np.asarray(data)[..., mask]

    def with_b0_threshold(self, b0_threshold: float) -> AcquisitionScheme:
        """The same measurements with another b=0 threshold (s/m²): it decides which
        measurements normalise S0 (and the shells' b0 flags), never the physics."""
        if float(b0_threshold) == self.b0_threshold:
            return self
        return AcquisitionScheme(
            np.array(self.bvalues), np.array(self.gradient_directions), self.qvalues,
            self.gradient_strengths, self.delta, self.Delta, self.TE,
            self.min_b_shell_distance, float(b0_threshold))

    def rotated(self, R: ArrayLike) -> AcquisitionScheme:
        """A new scheme with every gradient direction rotated by the 3x3 rotation ``R``."""
        rot = np.asarray(R, dtype=float)
        if rot.shape != (3, 3) or not np.isfinite(rot).all():
            raise InputError(f"R must be a finite 3x3 rotation matrix, got shape {rot.shape}")
        if not np.allclose(rot @ rot.T, np.eye(3), atol=1e-6) or np.linalg.det(rot) < 0:
            raise InputError("R must be a proper rotation matrix (orthonormal, determinant +1)")
        dirs = np.array(self.gradient_directions) @ rot.T
        return AcquisitionScheme(
            np.array(self.bvalues), dirs, self.qvalues, self.gradient_strengths, self.delta,
            self.Delta, self.TE, self.min_b_shell_distance, self.b0_threshold)

    # ----------------------------------------------------------------- text
    def summary(self) -> str:
        """A readable table of the shells (b in s/mm², G in mT/m, timings in ms)."""
        lines = [
            "Acquisition scheme summary",
            f"total number of measurements: {self.number_of_measurements}",
            f"number of b0 measurements: {self.number_of_b0s}",
            f"number of DWI shells: {int(np.sum(~self.shell_b0_mask))}",
            f"b0 threshold: {self.b0_threshold / 1e6:g} s/mm², "
            f"min shell distance: {self.min_b_shell_distance / 1e6:g} s/mm²",
            f"hash: {self.hash}",
            "",
            f"{'shell':<6}|{'# meas':<8}|{'b [s/mm²]':<12}|{'G [mT/m]':<10}|"
            f"{'delta [ms]':<11}|{'Delta [ms]':<11}|{'TE [ms]':<8}",
        ]

        def at(arr: np.ndarray | None, i: int) -> float | None:
            return None if arr is None else float(arr[i])

        for i in range(self.number_of_shells):
            lines.append(
                f"{i:<6}|{int(np.sum(self.shell_indices == i)):<8}|"
                f"{self.shell_bvalues[i] / 1e6:<12.1f}|"
                f"{_fmt(at(self.shell_gradient_strengths, i), 1e3):<10}|"
                f"{_fmt(at(self.shell_delta, i), 1e3, 2):<11}|"
                f"{_fmt(at(self.shell_Delta, i), 1e3, 2):<11}|"
                f"{_fmt(at(self.shell_TE, i), 1e3, 2):<8}")
        return "\n".join(lines)

    @property
    def print_acquisition_info(self) -> str:
        """dmipy name: logs the :meth:`summary` table (INFO) and returns it."""
        text = self.summary()
        logger.info("%s", text)
        return text

    # ----------------------------------------------------------------- other formats
    def to_schemefile(self, filename: str | os.PathLike[str]) -> None:
        """Write the scheme as a Camino ``.scheme`` file (dmipy name)."""
        backend("write_camino_scheme")(self, filename)

    def to_dipy(self) -> GradientTable:
        """The equivalent DIPY ``GradientTable`` (needs DIPY)."""
        return gtab_fingerprint2dipy(self)


# --------------------------------------------------------------------------- constructors
def _timing(reference: np.ndarray, delta: Any, Delta: Any, TE: Any
            ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    n = reference.shape[0]
    d = _optional_vector("delta", delta, n)
    D = _optional_vector("Delta", Delta, n)
    te = _optional_vector("TE", TE, n)
    _check_timing_units(d, D, te)
    return d, D, te


def _check_tau(nonzero: np.ndarray, delta: np.ndarray | None, Delta: np.ndarray | None
               ) -> None:
    if delta is None or Delta is None:
        return
    bad = nonzero & (delta <= 0)
    if bad.any():
        raise InputError(f"delta must be positive for diffusion-weighted measurements; zero at "
                         f"measurement index {_first(bad)}")
    bad = nonzero & (Delta - delta / 3.0 <= 0)
    if bad.any():
        raise InputError("Delta - delta/3 must be positive for diffusion-weighted measurements "
                         f"(Delta < delta/3 at measurement index {_first(bad)})")
    bad = nonzero & (Delta < delta)
    if bad.any():
        raise InputError("the pulse separation Delta must be at least the pulse duration delta "
                         f"(swapped?): Delta < delta at measurement index {_first(bad)}")


def _reference_vector(name: str, values: Any) -> np.ndarray:
    arr = _as_vector(name, values, None)
    if arr.shape[0] == 0:
        raise InputError(f"{name} is empty: an acquisition scheme needs at least one "
                         "measurement")
    if (arr < 0).any():
        raise InputError(f"{name} must be zero or positive; negative at measurement index "
                         f"{_first(arr < 0)}")
    return arr


def acquisition_scheme_from_bvalues(bvalues: ArrayLike, gradient_directions: ArrayLike,
                                    delta: ArrayLike | None = None, Delta: ArrayLike | None = None,
                                    TE: ArrayLike | None = None,
                                    min_b_shell_distance: float = DEFAULT_MIN_B_SHELL_DISTANCE,
                                    b0_threshold: float = DEFAULT_B0_THRESHOLD
                                    ) -> AcquisitionScheme:
    """Acquisition scheme from b-values (s/m²) and unit gradient directions (N, 3).

    ``delta``, ``Delta`` (pulse duration and separation, s) and ``TE`` (s) are optional
    scalars or (N,) arrays; q-values and gradient strengths are derived when both delta and
    Delta are given. ``min_b_shell_distance`` and ``b0_threshold`` are in s/m². A
    b-value of 1000 s/mm² must be given as 1000e6.
    """
    b = _reference_vector("bvalues", bvalues)
    _check_b_units(b)
    d, D, te = _timing(b, delta, Delta, TE)
    q = g = None
    if d is not None and D is not None:
        _check_tau(b > 0, d, D)
        q = np.zeros_like(b)
        pos = b > 0
        q[pos] = q_from_b(b[pos], d[pos], D[pos])
        g = g_from_q(q, d)
    return AcquisitionScheme(b, gradient_directions, q, g, d, D, te, min_b_shell_distance,
                             b0_threshold)


def acquisition_scheme_from_qvalues(qvalues: ArrayLike, gradient_directions: ArrayLike,
                                    delta: ArrayLike | None, Delta: ArrayLike | None,
                                    TE: ArrayLike | None = None,
                                    min_b_shell_distance: float = DEFAULT_MIN_B_SHELL_DISTANCE,
                                    b0_threshold: float = DEFAULT_B0_THRESHOLD
                                    ) -> AcquisitionScheme:
    """Acquisition scheme from q-values (1/m), directions, delta and Delta (s)."""
    q = _reference_vector("qvalues", qvalues)
    if delta is None or Delta is None:
        raise InputError("acquisition_scheme_from_qvalues needs both delta and Delta "
                         "(seconds)")
    d, D, te = _timing(q, delta, Delta, TE)
    assert d is not None and D is not None  # both given (checked above)
    _check_tau(q > 0, d, D)
    b = b_from_q(q, d, D)
    g = g_from_q(q, d)
    return AcquisitionScheme(b, gradient_directions, q, g, d, D, te, min_b_shell_distance,
                             b0_threshold)


def acquisition_scheme_from_gradient_strengths(
        gradient_strengths: ArrayLike, gradient_directions: ArrayLike, delta: ArrayLike | None,
        Delta: ArrayLike | None, TE: ArrayLike | None = None,
        min_b_shell_distance: float = DEFAULT_MIN_B_SHELL_DISTANCE,
        b0_threshold: float = DEFAULT_B0_THRESHOLD) -> AcquisitionScheme:
    """Acquisition scheme from gradient strengths (T/m), directions, delta and Delta (s)."""
    g = _reference_vector("gradient_strengths", gradient_strengths)
    if delta is None or Delta is None:
        raise InputError("acquisition_scheme_from_gradient_strengths needs both delta and "
                         "Delta (seconds)")
    d, D, te = _timing(g, delta, Delta, TE)
    assert d is not None and D is not None  # both given (checked above)
    _check_tau(g > 0, d, D)
    if float(g.max()) > 10.0:
        logger.warning("gradient strengths reach %g T/m: they must be given in T/m "
                       "(mT/m given?)", float(g.max()))
    q = q_from_g(g, d)
    b = b_from_q(q, d, D)
    return AcquisitionScheme(b, gradient_directions, q, g, d, D, te, min_b_shell_distance,
                             b0_threshold)


# --------------------------------------------------------------------------- DIPY
def _dipy_gradients() -> Any:
    try:
        from dipy.core import gradients  # lazy: optional dependency
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("DIPY is needed to convert gradient tables: pip install dipy "
                          "(or pip install fingerprint-mri[dipy])") from exc
    return gradients


def gtab_dipy2fingerprint(dipy_gradient_table: GradientTable,
                          min_b_shell_distance: float = DEFAULT_MIN_B_SHELL_DISTANCE,
                          b0_threshold: float = DEFAULT_B0_THRESHOLD) -> AcquisitionScheme:
    """Acquisition scheme from a DIPY ``GradientTable`` (b-values in s/mm² there).

    ``small_delta`` / ``big_delta`` of the table become delta / Delta; without them the
    scheme has no timing (a warning is logged).
    """
    gradients = _dipy_gradients()
    if not isinstance(dipy_gradient_table, gradients.GradientTable):
        raise InputError("expected a dipy GradientTable, got "
                         f"{type(dipy_gradient_table).__name__}")
    gtab = dipy_gradient_table
    delta, Delta = gtab.small_delta, gtab.big_delta
    if delta is None or Delta is None:
        logger.warning("the DIPY gradient table has no big_delta/small_delta: the scheme has "
                       "no pulse timing and cannot be used with models that need it")
    bvals = np.asarray(gtab.bvals, dtype=float) * 1e6
    bvecs = np.array(gtab.bvecs, dtype=float)
    # DIPY keeps whatever vectors the b0s had: the scheme zeroes those of b = 0 and keeps
    # (normalised) those of 0 < b <= b0_threshold, which the forward models use
    return acquisition_scheme_from_bvalues(bvals, bvecs, delta=delta, Delta=Delta,
                                           min_b_shell_distance=min_b_shell_distance,
                                           b0_threshold=b0_threshold)


def _single_value(name: str, arr: np.ndarray | None) -> float | None:
    if arr is None:
        return None
    values = np.unique(arr)
    if values.size > 1:
        raise InputError(f"a DIPY GradientTable holds a single {name}; this scheme has "
                         f"{values.size} different values")
    return float(values[0])


def gtab_fingerprint2dipy(scheme: AcquisitionScheme) -> GradientTable:
    """DIPY ``GradientTable`` of ``scheme`` (needs a single delta and Delta, if any)."""
    gradients = _dipy_gradients()
    if not isinstance(scheme, AcquisitionScheme):
        raise InputError(f"expected an AcquisitionScheme, got {type(scheme).__name__}")
    delta = _single_value("delta (small_delta)", scheme.delta)
    Delta = _single_value("Delta (big_delta)", scheme.Delta)
    return gradients.gradient_table(
        np.array(scheme.bvalues) / 1e6, bvecs=np.array(scheme.gradient_directions),
        big_delta=Delta, small_delta=delta, b0_threshold=scheme.b0_threshold / 1e6)


def acquisition_scheme_from_schemefile(
        file_path: str | os.PathLike[str],
        min_b_shell_distance: float = DEFAULT_MIN_B_SHELL_DISTANCE,
        b0_threshold: float = DEFAULT_B0_THRESHOLD) -> AcquisitionScheme:
    """Acquisition scheme from a Camino ``.scheme`` file (dmipy name).

    See :func:`fingerprint.io.gradients.read_camino_scheme`.
    """
    scheme: AcquisitionScheme = backend("read_camino_scheme")(
        file_path, min_b_shell_distance=min_b_shell_distance, b0_threshold=b0_threshold)
    return scheme


#: dmipy's class name, for ported code that checks ``isinstance``.
DmipyAcquisitionScheme = AcquisitionScheme

#: dmipy's names of the DIPY converters.
gtab_dipy2dmipy = gtab_dipy2fingerprint
gtab_dmipy2dipy = gtab_fingerprint2dipy
