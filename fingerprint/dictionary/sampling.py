"""Sampling the free parameters of a model to build dictionary atoms.

A model's free parameters (dmipy ``parameter_names``: fixed and linked parameters are
already removed) are described by a :class:`ParameterSpace`. A :class:`SamplingSpec`
says how to sample them (quasi-random Sobol points or a regular grid, the number of
atoms, the seed, per-parameter transforms and ranges). :func:`resolve_sampling` combines
both into a :class:`SamplingPlan`, whose :meth:`SamplingPlan.sample` returns any slice
``[start, stop)`` of the atoms' parameter vectors, so that a large dictionary is built
chunk by chunk without holding all parameters in memory.

How each kind of parameter is drawn from the unit cube:

- ordinary parameters: ``uniform`` (linear) or ``log`` spacing between the bounds (SI
  units). Diffusivities, diameters and Gamma shape/scale default to ``log``, everything
  else (odi, fractions, angles, ...) to ``uniform``.
- top-level partial volumes (when all of them are free): uniform on the simplex
  (Dirichlet(1, ..., 1) by stick-breaking through Beta inverse CDFs, which maps the unit
  cube smoothly onto the simplex so the low-discrepancy of the Sobol points survives).
  dmipy's default optimisation range (0.01, 0.99) is read as the whole [0, 1] interval;
  narrower lower bounds are honoured exactly by sampling the sub-simplex
  ``{v_i >= lo_i}``. Upper bounds are honoured for two partial volumes (through the
  other one's lower bound) and rejected for more.
- nested partial volumes (e.g. ``SD1WatsonDistributed_1_partial_volume_0``) are ordinary
  [0, 1] parameters (again reading dmipy's default (0.01, 0.99) as [0, 1]).
- Gamma diameter distributions (``mean_diameter``: the Gamma scale ``beta`` -> a range
  of mean diameters): instead of shape and scale, the mean diameter 2 alpha beta is
  spaced evenly over that range, and the shape alpha (its transform, log by default)
  from the larger of its lower bound and the smallest alpha that keeps beta within its
  bounds, up to its upper bound; beta = mean / (2 alpha). Shape and scale are poorly
  identified one by one, their mean diameter much better: sampled this way the atoms
  (the matched estimate's prior) are even in what the data determine.
- orientations: when the model has exactly one orientation parameter, atoms are stored
  in the canonical frame (theta = 0, phi = 0: axis along z) and the orientation takes no
  sampling dimension; otherwise every orientation is uniform on the sphere
  (theta = arccos(1 - 2u), phi = pi (2v - 1)).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.parameter_layout import ParameterLayout
from fingerprint.errors import InputError

if TYPE_CHECKING:
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

__all__ = [
    "METHODS",
    "TRANSFORMS",
    "ParameterInfo",
    "ParameterSpace",
    "SamplingPlan",
    "SamplingSpec",
    "default_transform",
    "resolve_sampling",
]

METHODS = ("sobol", "grid")
TRANSFORMS = ("uniform", "log")

#: Local parameter names (the part after the last ``<Model>_<n>_``) sampled with log spacing.
LOG_SPACED = ("lambda_par", "lambda_perp", "lambda_iso", "lambda_inf", "diameter", "alpha", "beta")

#: dmipy's default optimisation range of a partial volume; read as [0, 1] when sampling.
DMIPY_DEFAULT_FRACTION_RANGE = (0.01, 0.99)

_TOP_LEVEL_PV = re.compile(r"^partial_volume_\d+$")
_ANY_PV = re.compile(r"(^|_)partial_volume_\d+$")


def default_transform(name: str) -> str:
    """Default transform of parameter ``name``: ``'log'`` for diffusivities, diameters and
    Gamma alpha/beta, ``'uniform'`` otherwise."""
    for local in LOG_SPACED:
        if name == local or name.endswith("_" + local):
            return "log"
    return "uniform"


@dataclass(frozen=True)
class ParameterInfo:
    """One free parameter of a model.

    ``bounds`` holds one (low, high) pair per component, in SI units.
    ``kind`` is ``'scalar'``, ``'orientation'`` (cardinality 2: theta, phi in radians) or
    ``'partial_volume'`` (a top-level volume fraction).
    """

    name: str
    cardinality: int
    bounds: tuple[tuple[float, float], ...]
    kind: str = "scalar"


@dataclass(frozen=True)
class ParameterSpace:
    """The free parameters of a model in parameter-vector (dmipy) order.

    ``n_partial_volumes`` is the number of top-level partial volumes of the model, free or
    not; they are sampled on the simplex only when all of them are free.
    """

    parameters: tuple[ParameterInfo, ...]
    n_partial_volumes: int = -1

    def __post_init__(self) -> None:
        if self.n_partial_volumes < 0:
            n = sum(1 for p in self.parameters if p.kind == "partial_volume")
            object.__setattr__(self, "n_partial_volumes", n)

    @classmethod
    def from_model(cls, model: MultiCompartmentModelProperties) -> ParameterSpace:
        """Describe the free parameters of a (dmipy-compatible) multi-compartment model.

        Uses ``parameter_names``, ``parameter_cardinality``, ``parameter_ranges`` (scaled
        units) and ``parameter_scales`` (so bounds set with
        ``set_parameter_optimization_bounds`` are respected), plus
        ``orientation_parameter_names`` and ``partial_volume_names`` when present.
        """
        names = list(model.parameter_names)
        cardinality = dict(model.parameter_cardinality)
        ranges = model.parameter_ranges
        scales = model.parameter_scales
        orientation = getattr(model, "orientation_parameter_names", None)
        if orientation is None:
            types = getattr(model, "parameter_types", {}) or {}
            orientation = [n for n in names if types.get(n) == "orientation"]
        orientation = set(orientation)
        pv_names = getattr(model, "partial_volume_names", None)
        if pv_names is None:
            pv_names = [n for n in names if _TOP_LEVEL_PV.match(n)]
        n_pv = len(pv_names)
        pv_names = set(pv_names)
        infos = []
        for name in names:
            card = int(cardinality[name])
            kind = "orientation" if name in orientation else (
                "partial_volume" if name in pv_names else "scalar")
            bounds: tuple[tuple[float, float], ...]
            if kind == "orientation":
                bounds = ((0.0, math.pi), (-math.pi, math.pi))
            else:
                bounds = _si_bounds(name, ranges[name], scales[name], card)
            infos.append(ParameterInfo(name, card, bounds, kind))
        return cls(tuple(infos), n_pv)

    @property
    def names(self) -> list[str]:
        """Free parameter names in vector order."""
        return [p.name for p in self.parameters]

    @property
    def cardinality(self) -> dict[str, int]:
        return {p.name: p.cardinality for p in self.parameters}

    @property
    def vector_length(self) -> int:
        """Length of a parameter vector (sum of cardinalities)."""
        return sum(p.cardinality for p in self.parameters)

    @property
    def orientation_names(self) -> list[str]:
        return [p.name for p in self.parameters if p.kind == "orientation"]

    @property
    def partial_volume_names(self) -> list[str]:
        return [p.name for p in self.parameters if p.kind == "partial_volume"]

    @property
    def canonical_orientation(self) -> bool:
        """True when the model has exactly one orientation parameter (atoms along z)."""
        return len(self.orientation_names) == 1

    def offsets(self) -> dict[str, int]:
        """Column offset of every parameter in the parameter vector."""
        return ParameterLayout.from_cardinality(
            {p.name: p.cardinality for p in self.parameters}).offsets

    def resolve(self, name: str) -> str:
        """Full name of free parameter ``name`` (exact, or an unambiguous suffix such as
        ``'SD1Watson_1_odi'`` or ``'odi'``)."""
        names = self.names
        if name in names:
            return name
        matches = [n for n in names if n.endswith("_" + name)]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise InputError(f"parameter name {name!r} is ambiguous: it matches {matches}")
        raise InputError(
            f"{name!r} is not a free parameter of the model; free parameters: {names}")


def _si_bounds(name: str, rng: Any, scale: Any, card: int) -> tuple[tuple[float, float], ...]:
    arr = np.asarray(rng, dtype=float).reshape(card, 2)
    sc = np.broadcast_to(np.asarray(scale, dtype=float).reshape(-1), (card,))
    out = []
    for (lo, hi), s in zip(arr, sc, strict=True):
        lo, hi = float(lo) * float(s), float(hi) * float(s)
        if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
            raise InputError(f"parameter {name!r} has an invalid range ({lo}, {hi})")
        if _ANY_PV.search(name) and np.isclose(lo, DMIPY_DEFAULT_FRACTION_RANGE[0]) and \
                np.isclose(hi, DMIPY_DEFAULT_FRACTION_RANGE[1]):
            lo, hi = 0.0, 1.0
        out.append((lo, hi))
    return tuple(out)


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample a model's free parameters.

    Parameters
    ----------
    size:
        number of atoms (for ``method='grid'`` the grid is the largest regular grid with
        at most ``size`` points unless ``points`` gives per-parameter counts).
    seed:
        seed of the scrambled Sobol sequence.
    method:
        ``'sobol'`` (scrambled quasi-random, default) or ``'grid'``.
    transforms:
        parameter name (full or unambiguous suffix) -> ``'uniform'`` or ``'log'``.
    ranges:
        parameter name -> (low, high) in SI units, overriding the model's bounds
        (must lie inside them).
    points:
        grid only: parameter name -> number of grid points.
    mean_diameter:
        a Gamma distribution's scale ``beta`` (full name or suffix) -> (low, high) mean
        diameter 2 alpha beta (m), sampled evenly, with the shape ``alpha`` (the
        parameter of the same distribution) from what keeps beta in bounds (see the
        module docstring).
    """

    size: int = 100_000
    seed: int = 0
    method: str = "sobol"
    transforms: Mapping[str, str] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    points: Mapping[str, int] = field(default_factory=dict)
    mean_diameter: Mapping[str, tuple[float, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"sampling method must be one of {METHODS}, got {self.method!r}")
        if isinstance(self.size, bool) or int(self.size) != self.size or self.size < 1:
            raise InputError(f"dictionary size must be a positive integer, got {self.size!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name, t in self.transforms.items():
            if t not in TRANSFORMS:
                raise InputError(
                    f"transform of {name!r} must be one of {TRANSFORMS}, got {t!r}")
        for name, r in self.ranges.items():
            try:
                lo, hi = (float(v) for v in r)
            except (TypeError, ValueError):
                raise InputError(
                    f"range of {name!r} must be a pair (low, high), got {r!r}") from None
            if not (np.isfinite(lo) and np.isfinite(hi)) or hi < lo:
                raise InputError(f"range of {name!r} must satisfy low <= high, got {r!r}")
        for name, n in self.points.items():
            if int(n) != n or n < 1:
                raise InputError(f"grid points of {name!r} must be a positive integer")
        for name, r in self.mean_diameter.items():
            try:
                lo, hi = (float(v) for v in r)
            except (TypeError, ValueError):
                raise InputError(f"mean_diameter of {name!r} must be a pair (low, high) in "
                                 f"m, got {r!r}") from None
            if not (np.isfinite(lo) and np.isfinite(hi)) or not 0 < lo <= hi:
                raise InputError(f"mean_diameter of {name!r} must satisfy 0 < low <= high "
                                 f"(m), got {r!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "seed", int(self.seed))

    def replace(self, **changes: Any) -> SamplingSpec:
        """A copy with some fields changed (``None`` values are ignored)."""
        values: dict[str, Any] = {
            "size": self.size, "seed": self.seed, "method": self.method,
            "transforms": dict(self.transforms), "ranges": dict(self.ranges),
            "points": dict(self.points), "mean_diameter": dict(self.mean_diameter),
        }
        values.update({k: v for k, v in changes.items() if v is not None})
        return SamplingSpec(**values)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SamplingSpec:
        """Build from a mapping such as a recipe's ``[sampling]`` table."""
        known = {"size", "seed", "method", "transforms", "ranges", "points", "mean_diameter"}
        unknown = set(data) - known
        if unknown:
            raise InputError(
                f"unknown sampling field(s) {sorted(unknown)}; expected some of {sorted(known)}")
        values = dict(data)
        for key in ("ranges", "mean_diameter"):
            if key in values:
                values[key] = {k: tuple(v) for k, v in values[key].items()}
        return cls(**values)


@dataclass(frozen=True)
class _Block:
    """One parameter's share of the unit-cube dimensions."""

    name: str
    kind: str  # 'scalar', 'canonical', 'sphere', 'simplex', 'mean_diameter'
    column: int  # first column in the parameter vector (simplex: list in `columns`)
    dims: int
    transforms: tuple[str, ...] = ()
    bounds: tuple[tuple[float, float], ...] = ()
    columns: tuple[int, ...] = ()
    #: mean_diameter: the shape's block (its column, transform and bounds are used)
    shape: _Block | None = None


class SamplingPlan:
    """A resolved sampling: which unit-cube dimension feeds which parameter, and how.

    ``plan.sample(start, stop)`` returns the parameter vectors (float64, SI, dmipy order)
    of atoms ``start`` to ``stop - 1``; the same atom always gets the same parameters.
    """

    def __init__(self, space: ParameterSpace, spec: SamplingSpec, blocks: list[_Block],
                 grid_shape: tuple[int, ...] | None):
        self.space = space
        self.spec = spec
        self._blocks = blocks
        self._shapes = {b.shape.name for b in blocks if b.shape is not None}
        self.dims = sum(b.dims for b in blocks)
        self.grid_shape = grid_shape
        if spec.method == "grid":
            self.size = int(np.prod(grid_shape)) if grid_shape else 1
        else:
            self.size = spec.size

    # ----------------------------------------------------------------- description
    def to_dict(self) -> dict[str, Any]:
        """JSON-able, canonical description (stored in the dictionary; part of its key)."""
        params = []
        for b in self._blocks:
            entry: dict[str, Any] = {"name": b.name, "kind": b.kind}
            if b.kind == "scalar":
                entry["transform"] = list(b.transforms)
                entry["bounds"] = [[float(lo), float(hi)] for lo, hi in b.bounds]
            elif b.kind == "simplex":
                entry["names"] = self.space.partial_volume_names
                entry["lower"] = [float(lo) for lo, _ in b.bounds]
            elif b.kind == "mean_diameter":
                assert b.shape is not None  # set by resolve_sampling
                entry["mean_diameter"] = [float(v) for v in b.bounds[0]]
                entry["bounds"] = [float(v) for v in b.bounds[1]]
                entry["shape"] = b.shape.name
            params.append(entry)
        out: dict[str, Any] = {
            "method": self.spec.method,
            "size": int(self.size),
            "seed": int(self.spec.seed),
            "dimensions": int(self.dims),
            "canonical_orientation": bool(self.space.canonical_orientation),
            "parameters": params,
        }
        if self.grid_shape is not None:
            out["grid_shape"] = [int(n) for n in self.grid_shape]
        return out

    def canonical_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    # ----------------------------------------------------------------- sampling
    def unit_points(self, start: int, stop: int) -> np.ndarray:
        """Points ``start..stop-1`` of the unit cube (shape (stop - start, dims))."""
        if not 0 <= start <= stop <= self.size:
            raise ValueError(f"atom range [{start}, {stop}) outside [0, {self.size})")
        n = stop - start
        if self.dims == 0:
            return np.zeros((n, 0))
        if self.spec.method == "grid":
            assert self.grid_shape is not None  # a grid plan always has its shape
            idx = np.unravel_index(np.arange(start, stop), self.grid_shape)
            cols = []
            for i, k in zip(idx, self.grid_shape, strict=True):
                cols.append(np.full(n, 0.5) if k == 1 else i / (k - 1.0))
            return np.stack(cols, axis=1)
        return _sobol(self.dims, self.spec.seed, start, n)

    def sample(self, start: int, stop: int) -> np.ndarray:
        """Parameter vectors of atoms ``start..stop-1``: (n, vector_length) float64, SI."""
        u = self.unit_points(start, stop)
        out = np.zeros((u.shape[0], self.space.vector_length))
        d = 0
        first = {}
        for b in self._blocks:
            first[b.name] = d
            ub = u[:, d:d + b.dims]
            d += b.dims
            if b.kind == "mean_diameter":
                assert b.shape is not None  # set by resolve_sampling
                (mlo, mhi), (blo, bhi) = b.bounds
                (alo, ahi), = b.shape.bounds
                mean = mlo + ub[:, 0] * (mhi - mlo)
                # the shape's unit coordinate, read again over the shape range that keeps
                # the scale in bounds (its block may come before or after this one)
                ua = u[:, first[b.shape.name]] if b.shape.name in first else \
                    u[:, sum(x.dims for x in self._blocks[:self._blocks.index(b.shape)])]
                low = np.clip(np.maximum(alo, mean / (2.0 * bhi)), alo, ahi)
                high = np.clip(np.minimum(ahi, mean / (2.0 * blo)) if blo > 0 else ahi,
                               low, ahi)
                if b.shape.transforms[0] == "log":
                    alpha = np.exp(np.log(low) + ua * (np.log(high) - np.log(low)))
                else:
                    alpha = low + ua * (high - low)
                out[:, b.shape.column] = alpha
                out[:, b.column] = np.clip(mean / (2.0 * alpha), blo, bhi)
                continue
            if b.kind == "scalar" and b.name in self._shapes:
                continue  # written by its mean_diameter block
            if b.kind == "scalar":
                for j, (t, (lo, hi)) in enumerate(zip(b.transforms, b.bounds, strict=True)):
                    out[:, b.column + j] = _map_scalar(ub[:, j], t, lo, hi)
            elif b.kind == "canonical":
                out[:, b.column:b.column + 2] = 0.0
            elif b.kind == "sphere":
                out[:, b.column] = np.arccos(np.clip(1.0 - 2.0 * ub[:, 0], -1.0, 1.0))
                out[:, b.column + 1] = np.pi * (2.0 * ub[:, 1] - 1.0)
            elif b.kind == "simplex":
                lower = np.array([lo for lo, _ in b.bounds])
                v = _simplex(ub, len(b.columns))
                v = lower + (1.0 - lower.sum()) * v
                for j, c in enumerate(b.columns):
                    out[:, c] = v[:, j]
        return out

    def chunks(self, chunk_size: int):
        """Yield (start, stop) ranges covering all atoms."""
        for start in range(0, self.size, chunk_size):
            yield start, min(start + chunk_size, self.size)


def _sobol(dims: int, seed: int, start: int, n: int) -> np.ndarray:
    from scipy.stats import qmc  # lazy: keeps SciPy off import

    try:
        engine = qmc.Sobol(dims, scramble=True, rng=seed)
    except TypeError:  # scipy < 1.15
        engine = qmc.Sobol(dims, scramble=True, seed=seed)
    if start:
        engine.fast_forward(start)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*balance properties.*")
        return engine.random(n)


def _map_scalar(u: np.ndarray, transform: str, lo: float, hi: float) -> np.ndarray:
    if transform == "log":
        return np.exp(np.log(lo) + u * (np.log(hi) - np.log(lo)))
    return lo + u * (hi - lo)


def _simplex(u: np.ndarray, k: int) -> np.ndarray:
    """Map (n, k-1) unit points onto the k-simplex, uniformly (Dirichlet(1,...,1)).

    Stick-breaking: the i-th piece takes a Beta(1, k-1-i) share of what is left, drawn by
    its inverse CDF 1 - (1 - u)^(1/(k-1-i)).
    """
    n = u.shape[0]
    out = np.empty((n, k))
    remaining = np.ones(n)
    for i in range(k - 1):
        share = 1.0 - (1.0 - u[:, i]) ** (1.0 / (k - 1 - i))
        out[:, i] = remaining * share
        remaining = remaining - out[:, i]
    out[:, k - 1] = np.maximum(remaining, 0.0)
    return out


def resolve_sampling(space: ParameterSpace, spec: SamplingSpec) -> SamplingPlan:
    """Combine a model's free parameters with a sampling spec into a :class:`SamplingPlan`.

    Raises :class:`~fingerprint.errors.InputError` for unknown parameter names, ranges
    outside the model's bounds, log transforms of non-positive ranges, and unsupported
    partial-volume bounds.
    """
    transforms = {space.resolve(k): v for k, v in spec.transforms.items()}
    ranges = {space.resolve(k): tuple(float(x) for x in v) for k, v in spec.ranges.items()}
    points = {space.resolve(k): int(v) for k, v in spec.points.items()}
    offsets = space.offsets()
    by_name = {p.name: p for p in space.parameters}
    mean_diameter = {space.resolve(k): (float(v[0]), float(v[1]))
                     for k, v in spec.mean_diameter.items()}
    shape_of: dict[str, str] = {}
    for name in mean_diameter:
        if not name.endswith("_beta") or name[:-len("beta")] + "alpha" not in by_name:
            raise InputError(f"mean_diameter applies to a Gamma distribution's scale "
                             f"(beta) with a free shape (alpha), not {name!r}")
        shape_of[name] = name[:-len("beta")] + "alpha"

    for name in list(transforms) + list(ranges):
        if by_name[name].kind == "orientation":
            raise InputError(
                f"orientation parameter {name!r} takes no transform or range: orientations "
                "are canonical (one orientation) or uniform on the sphere")

    pv_free = space.partial_volume_names
    simplex = len(pv_free) >= 2 and len(pv_free) == space.n_partial_volumes
    simplex_block = _simplex_block(space, ranges, offsets) if simplex else None
    blocks: list[_Block] = []
    for p in space.parameters:
        col = offsets[p.name]
        if p.kind == "orientation":
            if space.canonical_orientation:
                blocks.append(_Block(p.name, "canonical", col, 0))
            else:
                blocks.append(_Block(p.name, "sphere", col, 2))
            continue
        if p.kind == "partial_volume" and simplex_block is not None:  # simplex
            if p.name == pv_free[0]:
                blocks.append(simplex_block)
            continue
        bounds = p.bounds
        if p.name in ranges:
            if p.cardinality != 1:
                raise InputError(f"range of {p.name!r} needs one pair per component")
            lo, hi = ranges[p.name]
            mlo, mhi = p.bounds[0]
            tol = 1e-12 * max(abs(mlo), abs(mhi), 1e-300)
            if lo < mlo - tol or hi > mhi + tol:
                raise InputError(
                    f"sampling range ({lo:g}, {hi:g}) of {p.name!r} lies outside the model's "
                    f"bounds ({mlo:g}, {mhi:g}) (SI units)")
            bounds = ((lo, hi),)
        t = transforms.get(p.name, default_transform(p.name))
        if t == "log":
            for lo, _ in bounds:
                if lo <= 0:
                    raise InputError(
                        f"log spacing of {p.name!r} needs a positive lower bound, got {lo:g}; "
                        "set a range or use transform 'uniform'")
        blocks.append(_Block(p.name, "scalar", col, p.cardinality, (t,) * p.cardinality, bounds))
    for name, mean_range in mean_diameter.items():
        i = [b.name for b in blocks].index(name)
        shape = next(b for b in blocks if b.name == shape_of[name])
        if shape.transforms[0] == "log" and shape.bounds[0][0] <= 0:
            raise InputError(f"log spacing of {shape.name!r} needs a positive lower bound")
        blocks[i] = _Block(name, "mean_diameter", blocks[i].column, 1,
                           bounds=(mean_range, blocks[i].bounds[0]), shape=shape)

    grid_shape: tuple[int, ...] | None = None
    if spec.method == "grid":
        dims = sum(b.dims for b in blocks)
        if dims == 0:
            grid_shape = ()
        else:
            default_n = max(2, int(math.floor(spec.size ** (1.0 / dims) + 1e-9)))
            grid_shape = tuple(points.get(b.name, default_n) for b in blocks
                               for _ in range(b.dims))
    return SamplingPlan(space, spec, blocks, grid_shape)


def _simplex_block(space: ParameterSpace, ranges: Mapping[str, tuple[float, ...]],
                   offsets: Mapping[str, int]) -> _Block:
    pv_free = space.partial_volume_names
    by_name = {p.name: p for p in space.parameters}
    lower, upper = [], []
    for name in pv_free:
        lo, hi = ranges.get(name, by_name[name].bounds[0])
        lower.append(max(lo, 0.0))
        upper.append(min(hi, 1.0))
    if len(pv_free) == 2:
        # an upper bound on one volume is a lower bound on the other
        lower = [max(lower[0], 1.0 - upper[1]), max(lower[1], 1.0 - upper[0])]
        upper = [1.0 - lower[1], 1.0 - lower[0]]
    if sum(lower) > 1.0 + 1e-12:
        bounds = dict(zip(pv_free, lower, strict=True))
        raise InputError(f"partial-volume lower bounds {bounds} sum to more than 1")
    if len(pv_free) > 2 and any(h < 1.0 - 1e-12 for h in upper):
        raise InputError(
            "upper bounds on partial volumes are only supported for two-compartment "
            f"models; got {dict(zip(pv_free, upper, strict=True))}")
    return _Block("partial_volumes", "simplex", offsets[pv_free[0]], len(pv_free) - 1,
                  bounds=tuple((lo, 1.0) for lo in lower),
                  columns=tuple(offsets[n] for n in pv_free))
