"""Behaviour shared by all compartment models.

A compartment is an immutable description with dmipy's class attributes
(``parameter_names``, ``parameter_ranges``, ``parameter_scales``, ``parameter_types``,
``parameter_cardinality``, ``_required_acquisition_parameters``, ``_model_type``). It is
called like dmipy's compartments for one parameter set,
``compartment(acquisition_scheme, **parameters) -> (N,)`` and
``compartment.spherical_mean(acquisition_scheme, **parameters) -> (S,)``, and evaluated
for many parameter sets at once by the framework and the dictionary generator through

- ``signal_from_cosines(meas, cosines, **params) -> (n, M)``: ``meas`` a
  :class:`~fingerprint.core.acquisition_scheme.MeasurementSet` of M measurements,
  ``cosines`` the cosine between each measurement's gradient and each atom's compartment
  axis, ``(n, M)`` or shared by all atoms ``(M,)`` / ``(1, M)`` (None for isotropic
  compartments); every parameter an ``(n,)`` array (or a scalar) in SI units;
- ``spherical_mean_batch(meas, **params) -> (n, M)``: the orientation average of the
  signal for each row of ``meas``.

Parameter values given to the constructor are fixed defaults used whenever a call leaves
the parameter out (dmipy's behaviour). Non-fitted constants (for example
``diffusion_perpendicular`` of the restricted cylinders) are returned by :meth:`constants`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np

from fingerprint.errors import InputError
from fingerprint.kernels import compartments as kernels
from fingerprint.kernels import run_parallel

__all__ = [
    "CompartmentModel",
    "MeasurementArrays",
    "gauss_legendre_half",
    "unitsphere2cart",
]

#: Diffusivities are given to optimisers in units of 1e-9 m²/s (dmipy's scaling).
DIFFUSIVITY_SCALING = 1e-9
#: Diameters are given to optimisers in micrometres.
DIAMETER_SCALING = 1e-6
#: The temporal-zeppelin coefficient A is given in units of 1e-12 m².
A_SCALING = 1e-12
#: Orientation ranges (theta in [0, pi], phi in [-pi, pi]) like dmipy.
ORIENTATION_RANGE = ([0.0, math.pi], [-math.pi, math.pi])

#: Gauss-Legendre nodes on u in [0, 1] used for numerical spherical means of axially
#: symmetric compartments whose mean has no closed form.
SPHERICAL_MEAN_NODES = 64
#: Upper bound on n x M x nodes evaluated at once by the numerical spherical mean.
_SPHERICAL_MEAN_CHUNK = 1 << 22


class _ClassProperty:
    """Read-only attribute computed from the class (works on the class and instances)."""

    def __init__(self, getter: Callable[[type], Any]) -> None:
        self._getter = getter
        self.__doc__ = getter.__doc__

    def __get__(self, instance: Any, owner: type) -> Any:
        return self._getter(owner)


@lru_cache(maxsize=16)
def gauss_legendre_half(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights for integrals over [0, 1] (read-only arrays)."""
    x, w = np.polynomial.legendre.leggauss(int(n))
    nodes = 0.5 * (x + 1.0)
    weights = 0.5 * w
    nodes.setflags(write=False)
    weights.setflags(write=False)
    return nodes, weights


def unitsphere2cart(mu: Any) -> np.ndarray:
    """Unit vector(s) (..., 3) from angles (..., 2) = (theta, phi) in radians."""
    mu = np.asarray(mu, dtype=float)
    if mu.shape[-1:] != (2,):
        raise InputError(f"mu must hold the two angles (theta, phi) in radians; got shape "
                         f"{mu.shape}")
    theta = mu[..., 0]
    phi = mu[..., 1]
    sin_theta = np.sin(theta)
    return np.stack([sin_theta * np.cos(phi), sin_theta * np.sin(phi), np.cos(theta)],
                    axis=-1)


class MeasurementArrays:
    """Contiguous float64 arrays a kernel needs, derived from a MeasurementSet (SI).

    ``q`` is derived from ``b``, ``delta`` and ``Delta`` when absent, and
    ``gG = 2 pi q / delta`` (gyromagnetic ratio x gradient strength) from ``q`` so that the
    kernels depend on the same (b, q, delta, Delta) as the scheme, whatever gyromagnetic
    ratio produced its gradient strengths.
    """

    def __init__(self, meas: Any, owner: str) -> None:
        if not hasattr(meas, "b") and hasattr(meas, "measurements"):
            meas = meas.measurements
        if not hasattr(meas, "b"):
            raise InputError(f"{owner}: expected a MeasurementSet (with b, q, G, delta, "
                             f"Delta, directions), got {type(meas).__name__}")
        self.owner = owner
        self._meas = meas
        self.b = self._array("b", required=True)
        self.size = int(self.b.shape[0])
        self._q: np.ndarray | None = None

    def _array(self, name: str, required: bool = False) -> np.ndarray | None:
        value = getattr(self._meas, name, None)
        if value is None:
            if required:
                raise InputError(f"{self.owner} needs the measurements' {name}")
            return None
        arr = np.ascontiguousarray(value, dtype=np.float64).reshape(-1)
        if hasattr(self, "size") and arr.shape[0] != self.size:
            raise InputError(f"{self.owner}: measurement field {name} has {arr.shape[0]} "
                             f"values for {self.size} measurements")
        return arr

    def _timing(self, what: str) -> tuple[np.ndarray, np.ndarray]:
        delta = self._array("delta")
        Delta = self._array("Delta")
        if delta is None or Delta is None:
            raise InputError(f"{self.owner} needs the pulse timing (delta and Delta, in s) "
                             f"of the acquisition scheme to compute {what}; build the "
                             "scheme with delta= and Delta=")
        return delta, Delta

    @property
    def weighted(self) -> np.ndarray:
        """Measurements with diffusion weighting (b > 0)."""
        return self.b > 0.0

    @property
    def q(self) -> np.ndarray:
        """q-values (1/m): given, or derived from b, delta and Delta."""
        if self._q is None:
            q = self._array("q")
            if q is None:
                delta, Delta = self._timing("q-values")
                tau = Delta - delta / 3.0
                q = np.zeros(self.size)
                ok = self.weighted & (tau > 0.0)
                q[ok] = np.sqrt(self.b[ok] / tau[ok]) / (2.0 * math.pi)
            self._q = q
        return self._q

    @property
    def time_factor(self) -> np.ndarray:
        """(ln(Delta / delta) + 3/2) / (Delta - delta / 3) (1/s); zero where b = 0."""
        delta, Delta = self._timing("the time-dependent perpendicular diffusivity")
        out = np.zeros(self.size)
        ok = self.weighted
        if ok.any():
            d = delta[ok]
            dd = Delta[ok]
            if (d <= 0).any() or (dd - d / 3.0 <= 0).any():
                raise InputError(f"{self.owner}: delta must be positive and Delta > delta/3 "
                                 "for every diffusion-weighted measurement")
            out[ok] = (np.log(dd / d) + 1.5) / (dd - d / 3.0)
        return out

    def gamma_g(self) -> np.ndarray:
        """gyromagnetic ratio x gradient strength (rad s⁻¹ m⁻¹); zero where q = 0."""
        delta, _ = self._timing("the gradient strengths")
        q = self.q
        out = np.zeros(self.size)
        ok = q > 0.0
        if (delta[ok] <= 0.0).any():
            raise InputError(f"{self.owner}: delta must be positive for every "
                             "diffusion-weighted measurement")
        out[ok] = 2.0 * math.pi * q[ok] / delta[ok]
        return out

    def unique_timings(self, active: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct (delta, Delta) among ``active`` measurements.

        Returns ``(index (M,) int64, deltas (T,), Deltas (T,))``; inactive measurements
        point at timing 0 (their kernels must not depend on it).
        """
        delta, Delta = self._timing("restricted diffusion")
        index = np.zeros(self.size, dtype=np.int64)
        if not active.any():
            return index, np.array([1.0]), np.array([1.0])
        pairs = np.column_stack([delta[active], Delta[active]])
        uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
        index[active] = np.asarray(inverse).ravel()
        return (index, np.ascontiguousarray(uniq[:, 0]), np.ascontiguousarray(uniq[:, 1]))


class CompartmentModel:
    """Base class of compartment models (immutable; dmipy-compatible attributes)."""

    _parameter_ranges: ClassVar[Mapping[str, Any]] = {}
    _parameter_scales: ClassVar[Mapping[str, Any]] = {}
    _parameter_types: ClassVar[Mapping[str, str]] = {}
    _required_acquisition_parameters: ClassVar[list[str]] = []
    _model_type: ClassVar[str] = "CompartmentModel"
    #: Names of non-fitted constructor constants, reported by :meth:`constants`.
    _constant_names: ClassVar[tuple[str, ...]] = ()
    #: True for compartments whose signal does not depend on the gradient direction.
    is_isotropic: ClassVar[bool] = False
    S0_response: ClassVar[float] = 1.0

    # -------------------------------------------------------------- dmipy attributes
    @staticmethod
    def _names(cls: type) -> list[str]:
        """Names of the model parameters (dmipy order)."""
        return list(cls._parameter_ranges)

    @staticmethod
    def _ranges(cls: type) -> OrderedDict:
        """Parameter ranges in optimiser units (multiply by parameter_scales for SI)."""
        return OrderedDict((k, _copy_value(v)) for k, v in cls._parameter_ranges.items())

    @staticmethod
    def _scales(cls: type) -> OrderedDict:
        """Scales from optimiser units to SI units."""
        return OrderedDict((k, _copy_value(v)) for k, v in cls._parameter_scales.items())

    @staticmethod
    def _types(cls: type) -> OrderedDict:
        """Parameter types ('orientation', 'normal', 'cylinder', 'sphere')."""
        return OrderedDict(cls._parameter_types)

    @staticmethod
    def _cardinality(cls: type) -> OrderedDict:
        """Number of values of each parameter (2 for the orientation mu)."""
        return OrderedDict((k, len(np.atleast_2d(v))) for k, v in cls._parameter_ranges.items())

    parameter_names = _ClassProperty(_names)
    parameter_ranges = _ClassProperty(_ranges)
    parameter_scales = _ClassProperty(_scales)
    parameter_types = _ClassProperty(_types)
    parameter_cardinality = _ClassProperty(_cardinality)

    # -------------------------------------------------------------- construction
    def __init__(self, **values: Any) -> None:
        names = set(self._parameter_ranges) | set(self._constant_names)
        unknown = sorted(set(values) - names)
        if unknown:
            raise InputError(f"{type(self).__name__} has no parameter {', '.join(unknown)}; "
                             f"parameters: {', '.join(self.parameter_names) or 'none'}")
        for name in self._parameter_ranges:
            object.__setattr__(self, name, _frozen_value(values.get(name)))
        for name in self._constant_names:
            object.__setattr__(self, name, values.get(name))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable: cannot delete {name!r}")

    def __repr__(self) -> str:
        items = [f"{k}={getattr(self, k)!r}" for k in self._parameter_ranges
                 if getattr(self, k) is not None]
        items += [f"{k}={v!r}" for k, v in self.constants().items()]
        return f"{type(self).__name__}({', '.join(items)})"

    def __reduce__(self) -> tuple[Any, ...]:
        values = {k: getattr(self, k) for k in self._parameter_ranges}
        values.update(self.constants())
        return (_rebuild, (type(self), values))

    def constants(self) -> dict[str, Any]:
        """Non-fitted constructor constants (JSON-able), e.g. diffusion_perpendicular."""
        return {name: getattr(self, name) for name in self._constant_names}

    # -------------------------------------------------------------- single parameter set
    def _value(self, name: str, kwargs: Mapping[str, Any]) -> Any:
        value = kwargs.get(name)
        if value is None:
            value = getattr(self, name)
        if value is None:
            raise InputError(f"{type(self).__name__}: parameter {name!r} has no value; "
                             "give it as a keyword argument or to the constructor")
        return value

    def _check_kwargs(self, kwargs: Mapping[str, Any]) -> None:
        unknown = sorted(set(kwargs) - set(self._parameter_ranges))
        if unknown:
            raise InputError(f"{type(self).__name__} has no parameter {', '.join(unknown)}; "
                             f"parameters: {', '.join(self.parameter_names) or 'none'}")

    def __call__(self, acquisition_scheme: Any, **kwargs: Any) -> np.ndarray:
        """Signal attenuation (N,) for one parameter set (dmipy call style).

        Parameters are SI values named without prefix (``mu`` = [theta, phi] in radians,
        ``lambda_par`` in m²/s, ``diameter`` in m, ...); parameters left out take the value
        given to the constructor.
        """
        self._check_kwargs(kwargs)
        meas = acquisition_scheme.measurements if hasattr(acquisition_scheme, "measurements") \
            else acquisition_scheme
        params = self._single_params(kwargs)
        cosines = None
        if not self.is_isotropic:
            mu = np.asarray(self._value("mu", kwargs), dtype=float).reshape(-1)
            if mu.shape != (2,):
                raise InputError(f"{type(self).__name__}: mu must be [theta, phi] in radians,"
                                 f" got {mu.shape[0]} values")
            axis = unitsphere2cart(mu)
            directions = np.asarray(meas.directions, dtype=float).reshape(-1, 3)
            cosines = (directions @ axis)[None, :]
        return self.signal_from_cosines(meas, cosines, **params)[0]

    def spherical_mean(self, acquisition_scheme: Any, **kwargs: Any) -> np.ndarray:
        """Spherical mean (S,) of the signal on each shell of the scheme (dmipy style).

        b0 shells are 1 for anisotropic compartments, like dmipy.
        """
        self._check_kwargs(kwargs)
        if hasattr(acquisition_scheme, "shell_measurements"):
            shells = acquisition_scheme.shell_measurements()
        else:
            shells = acquisition_scheme
        params = self._single_params(kwargs)
        mean = self.spherical_mean_batch(shells, **params)[0]
        b0 = getattr(acquisition_scheme, "shell_b0_mask", None)
        if b0 is not None and not self.is_isotropic:
            mean = np.where(np.asarray(b0, dtype=bool), 1.0, mean)
        return mean

    def _single_params(self, kwargs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        params = {}
        for name in self._parameter_ranges:
            if name == "mu":
                continue
            value = np.asarray(self._value(name, kwargs), dtype=float).reshape(-1)
            if value.shape != (1,):
                raise InputError(f"{type(self).__name__}: parameter {name!r} must be a single "
                                 f"value for this call, got {value.shape[0]}; use "
                                 "signal_from_cosines for many parameter sets")
            params[name] = value
        return params

    # -------------------------------------------------------------- batched evaluation
    def _batch_params(self, params: Mapping[str, Any], cosines: np.ndarray | None,
                      ) -> tuple[int, dict[str, np.ndarray]]:
        """Validate batched parameters; returns (n, {name: contiguous (n,) float64})."""
        unknown = sorted(set(params) - set(self._parameter_ranges))
        if unknown:
            raise InputError(f"{type(self).__name__} has no parameter {', '.join(unknown)}; "
                             f"parameters: {', '.join(self.parameter_names) or 'none'}")
        arrays: dict[str, np.ndarray] = {}
        sizes = set()
        for name in self._parameter_ranges:
            if name == "mu":
                continue
            value = params.get(name)
            if value is None:
                value = getattr(self, name)
            if value is None:
                raise InputError(f"{type(self).__name__}: parameter {name!r} has no value; "
                                 "give it as a keyword argument or to the constructor")
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim > 1:
                raise InputError(f"{type(self).__name__}: parameter {name!r} must be a scalar "
                                 f"or an (n,) array, got shape {arr.shape}")
            arr = arr.reshape(-1)
            if arr.shape[0] != 1:
                sizes.add(arr.shape[0])
            arrays[name] = arr
        if cosines is not None and cosines.shape[0] != 1:
            sizes.add(cosines.shape[0])
        if len(sizes) > 1:
            raise InputError(f"{type(self).__name__}: inconsistent numbers of parameter sets "
                             f"{sorted(sizes)} (parameters and cosines must share n)")
        n = sizes.pop() if sizes else 1
        for name, arr in arrays.items():
            if arr.shape[0] != n:
                arr = np.full(n, arr[0])
            arrays[name] = np.ascontiguousarray(arr)
        return n, arrays

    def _cosines(self, cosines: Any, m: int) -> np.ndarray | None:
        if self.is_isotropic:
            return None
        if cosines is None:
            raise InputError(f"{type(self).__name__} is anisotropic: signal_from_cosines "
                             "needs the cosines between gradients and compartment axes")
        cos = np.asarray(cosines, dtype=np.float64)
        if cos.ndim == 1:
            cos = cos[None, :]
        if cos.ndim != 2 or cos.shape[1] != m:
            raise InputError(f"{type(self).__name__}: cosines must have shape (n, {m}) or "
                             f"({m},), got {np.shape(cosines)}")
        return np.ascontiguousarray(cos)

    def signal_from_cosines(self, meas: Any, cosines: Any = None,
                            **params: Any) -> np.ndarray:
        """Signals (n, M) of n parameter sets on the M measurements of ``meas``.

        ``cosines``: (n, M), or (M,) / (1, M) shared by all atoms, cosine between
        gradient and compartment axis; None for isotropic compartments. Parameters are
        (n,) arrays or scalars in SI units, named without prefix; ``mu`` is ignored.
        n comes from the parameters and cosines; when nothing gives it (the dot, or only
        scalars) one row is returned, which broadcasts.
        """
        params = {k: v for k, v in params.items() if k != "mu"}
        arrays = MeasurementArrays(meas, type(self).__name__)
        cos = self._cosines(cosines, arrays.size)
        n, values = self._batch_params(params, cos)
        out = np.empty((n, arrays.size))
        if not (n and arrays.size):
            return out
        if self.is_isotropic and arrays.size > 1:
            # isotropic signals depend on (b, q, G, delta, Delta) only: evaluate each
            # distinct row once and scatter (e.g. 4 instead of 288 on HCP)
            unique, inverse = _unique_rows(meas, arrays.size)
            if unique is not None:
                small = np.empty((n, unique.b.shape[0]))
                self._kernel(MeasurementArrays(unique, type(self).__name__), None, values,
                             small)
                run_parallel(kernels.gather_columns, small, inverse, out)
                return out
        self._kernel(arrays, cos, values, out)
        return out

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        raise NotImplementedError

    def spherical_mean_batch(self, meas: Any, **params: Any) -> np.ndarray:
        """Orientation-averaged signals (n, M), one value per row of ``meas``.

        Closed form for stick, zeppelins and isotropic compartments; Gauss-Legendre
        quadrature over the cosine otherwise.
        """
        params = {k: v for k, v in params.items() if k != "mu"}
        arrays = MeasurementArrays(meas, type(self).__name__)
        if self.is_isotropic:
            return self.signal_from_cosines(meas, None, **params)
        n, values = self._batch_params(params, None)
        out = np.empty((n, arrays.size))
        if n and arrays.size:
            self._spherical_mean_kernel(meas, arrays, values, out)
        return out

    def _spherical_mean_kernel(self, meas: Any, arrays: MeasurementArrays,
                               params: dict[str, np.ndarray], out: np.ndarray) -> None:
        """Numerical orientation average: sum_k w_k K(u_k) over Gauss-Legendre u in [0, 1]."""
        nodes, weights = gauss_legendre_half(SPHERICAL_MEAN_NODES)
        k = nodes.shape[0]
        m = arrays.size
        tiled = _TiledMeasurements(meas, arrays, k)
        cos = np.ascontiguousarray(np.tile(nodes, m)[None, :])
        n = out.shape[0]
        chunk = max(1, _SPHERICAL_MEAN_CHUNK // max(1, m * k))
        tiled_arrays = MeasurementArrays(tiled, type(self).__name__)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            sub = {name: value[start:stop] for name, value in params.items()}
            buf = np.empty((stop - start, m * k))
            self._kernel(tiled_arrays, cos, sub, buf)
            out[start:stop] = buf.reshape(stop - start, m, k) @ weights


_FIELDS = ("b", "q", "G", "delta", "Delta")


class _DerivedMeasurements:
    """Duck-typed MeasurementSet built from row selections of another one."""

    def __init__(self, meas: Any, rows: Callable[[np.ndarray], np.ndarray], size: int) -> None:
        if not hasattr(meas, "b") and hasattr(meas, "measurements"):
            meas = meas.measurements
        for name in _FIELDS:
            value = getattr(meas, name, None)
            setattr(self, name,
                    None if value is None else rows(np.asarray(value, dtype=float).reshape(-1)))
        self.directions = np.zeros((size, 3))


class _TiledMeasurements(_DerivedMeasurements):
    """Each measurement repeated ``k`` times (quadrature nodes)."""

    def __init__(self, meas: Any, arrays: MeasurementArrays, k: int) -> None:
        super().__init__(meas, lambda a: np.repeat(a, k), arrays.size * k)


def _unique_rows(meas: Any, size: int) -> tuple[_DerivedMeasurements | None, np.ndarray]:
    """Distinct (b, q, G, delta, Delta) rows and the inverse index (M,) int64.

    Returns (None, inverse) when every row is distinct.
    """
    source = meas.measurements if not hasattr(meas, "b") and hasattr(meas, "measurements") \
        else meas
    columns = [np.asarray(getattr(source, name), dtype=float).reshape(-1)
               for name in _FIELDS if getattr(source, name, None) is not None]
    table = np.column_stack(columns)
    _, first, inverse = np.unique(table, axis=0, return_index=True, return_inverse=True)
    inverse = np.ascontiguousarray(np.asarray(inverse).reshape(-1), dtype=np.int64)
    if first.shape[0] == size:
        return None, inverse
    return _DerivedMeasurements(source, lambda a: a[first], first.shape[0]), inverse


def _copy_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.copy()
    if isinstance(value, tuple):
        return tuple(_copy_value(v) for v in value)
    if isinstance(value, list):
        return [_copy_value(v) for v in value]
    return value


def _frozen_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = value.copy()
        value.setflags(write=False)
    elif isinstance(value, list):
        value = np.array(value, dtype=float)
        value.setflags(write=False)
    return value


def _rebuild(cls: type, values: dict[str, Any]) -> CompartmentModel:
    return cls(**values)
