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
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme, MeasurementSet
from fingerprint.core.orientations import mu_to_vectors
from fingerprint.errors import InputError
from fingerprint.kernels import compartments as kernels
from fingerprint.kernels import gauss_legendre_unit, run_kernel

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

#: What a compartment evaluates on: a MeasurementSet, or an AcquisitionScheme (its
#: measurements).
Measurements = MeasurementSet | AcquisitionScheme

__all__ = [
    "CompartmentModel",
    "MeasurementArrays",
    "Measurements",
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


def unitsphere2cart(mu: ArrayLike) -> np.ndarray:
    """Unit vector(s) (..., 3) from angles (..., 2) = (theta, phi) in radians (dmipy name
    of :func:`fingerprint.core.orientations.mu_to_vectors`)."""
    return mu_to_vectors(mu)


_FIELDS = ("b", "q", "G", "delta", "Delta")


def _source(meas: Any) -> Any:
    """The MeasurementSet behind ``meas`` (a MeasurementSet or an AcquisitionScheme)."""
    if not hasattr(meas, "b") and hasattr(meas, "measurements"):
        return meas.measurements
    return meas


class MeasurementArrays:
    """Contiguous float64 arrays a kernel needs, derived from a MeasurementSet (SI).

    ``q`` is derived from ``b``, ``delta`` and ``Delta`` when absent, and
    ``gG = 2 pi q / delta`` (gyromagnetic ratio x gradient strength) from ``q`` so that the
    kernels depend on the same (b, q, delta, Delta) as the scheme, whatever gyromagnetic
    ratio produced its gradient strengths. Derived arrays are computed once (read-only);
    methods that can fail take the name of the calling compartment for the message.
    Use :meth:`of` to share one instance per (immutable) MeasurementSet.
    """

    def __init__(self, meas: Measurements | _DerivedMeasurements, owner: str) -> None:
        source = _source(meas)
        if not hasattr(source, "b"):
            raise InputError(f"{owner}: expected a MeasurementSet (with b, q, G, delta, "
                             f"Delta, directions), got {type(source).__name__}")
        self._meas = source
        self._cache: dict[Any, Any] = {}
        b = np.asarray(source.b, dtype=np.float64).reshape(-1)
        self.size = int(b.shape[0])
        self.fields: dict[str, np.ndarray | None] = {}
        for name in _FIELDS:
            value = getattr(source, name, None)
            if value is None:
                if name == "b":
                    raise InputError(f"{owner} needs the measurements' b-values")
                self.fields[name] = None
                continue
            arr = _readonly(np.ascontiguousarray(value, dtype=np.float64).reshape(-1))
            if arr.shape[0] != self.size:
                raise InputError(f"{owner}: measurement field {name} has {arr.shape[0]} "
                                 f"values for {self.size} measurements")
            self.fields[name] = arr
        b_field = self.fields["b"]
        assert b_field is not None  # a missing b raised above
        self.b: np.ndarray = b_field

    # ------------------------------------------------------------------ sharing
    @classmethod
    def of(cls, meas: Measurements, owner: str) -> MeasurementArrays:
        """The shared instance for an immutable MeasurementSet (a fresh one otherwise)."""
        source = _source(meas)
        if not isinstance(source, MeasurementSet):
            return cls(source, owner)
        key = id(source)
        entry = _PREPARED.get(key)
        if entry is not None and entry[0] is source:
            return entry[1]
        arrays = cls(source, owner)
        if arrays.size > _PREPARED_MAX_ROWS:
            return arrays
        with _PREPARED_LOCK:
            rows = sum(e[1].size for e in _PREPARED.values())
            while _PREPARED and (len(_PREPARED) >= _PREPARED_MAX
                                 or rows + arrays.size > _PREPARED_MAX_ROWS):
                rows -= _PREPARED.pop(next(iter(_PREPARED)))[1].size
            _PREPARED[key] = (source, arrays)
        return arrays

    def _cached(self, key: Any, compute: Callable[[], Any]) -> Any:
        value = self._cache.get(key)
        if value is None:
            value = compute()
            self._cache[key] = value
        return value

    # ------------------------------------------------------------------ derived arrays
    def _timing(self, owner: str, what: str) -> tuple[np.ndarray, np.ndarray]:
        delta, Delta = self.fields["delta"], self.fields["Delta"]
        if delta is None or Delta is None:
            raise InputError(f"{owner} needs the pulse timing (delta and Delta, in s) of the "
                             f"acquisition scheme to compute {what}; build the scheme with "
                             "delta= and Delta=")
        return delta, Delta

    def q(self, owner: str) -> np.ndarray:
        """q-values (1/m): given, or derived from b, delta and Delta."""
        q = self.fields["q"]
        if q is not None:
            return q

        def compute() -> np.ndarray:
            delta, Delta = self._timing(owner, "q-values")
            tau = Delta - delta / 3.0
            out = np.zeros(self.size)
            ok = (self.b > 0.0) & (tau > 0.0)
            out[ok] = np.sqrt(self.b[ok] / tau[ok]) / (2.0 * math.pi)
            return _readonly(out)

        return self._cached("q", compute)

    def time_factor(self, owner: str) -> np.ndarray:
        """(ln(Delta / delta) + 3/2) / (Delta - delta / 3) (1/s); zero where b = 0."""

        def compute() -> np.ndarray:
            delta, Delta = self._timing(owner, "the time-dependent perpendicular diffusivity")
            out = np.zeros(self.size)
            ok = self.b > 0.0
            if ok.any():
                d, dd = delta[ok], Delta[ok]
                if (d <= 0).any() or (dd - d / 3.0 <= 0).any():
                    raise InputError(f"{owner}: delta must be positive and Delta > delta/3 "
                                     "for every diffusion-weighted measurement")
                out[ok] = (np.log(dd / d) + 1.5) / (dd - d / 3.0)
            return _readonly(out)

        return self._cached("time_factor", compute)

    def gamma_g(self, owner: str) -> np.ndarray:
        """gyromagnetic ratio x gradient strength (rad s⁻¹ m⁻¹); zero where q = 0."""

        def compute() -> np.ndarray:
            delta, _ = self._timing(owner, "the gradient strengths")
            q = self.q(owner)
            out = np.zeros(self.size)
            ok = q > 0.0
            if (delta[ok] <= 0.0).any():
                raise InputError(f"{owner}: delta must be positive for every "
                                 "diffusion-weighted measurement")
            out[ok] = 2.0 * math.pi * q[ok] / delta[ok]
            return _readonly(out)

        return self._cached("gamma_g", compute)

    def timings(self, owner: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct (delta, Delta) among the measurements with q > 0.

        Returns ``(index (M,) int64, deltas (T,), Deltas (T,))``; measurements with q = 0
        point at timing 0 (their kernels do not depend on it).
        """

        def compute() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            delta, Delta = self._timing(owner, "restricted diffusion")
            active = self.q(owner) > 0.0
            index = np.zeros(self.size, dtype=np.int64)
            if not active.any():
                return (_readonly(index), _readonly(np.array([1.0])),
                        _readonly(np.array([1.0])))
            pairs = np.column_stack([delta[active], Delta[active]])
            uniq, inverse = np.unique(pairs, axis=0, return_inverse=True)
            index[active] = np.asarray(inverse).ravel()
            return (_readonly(index), _readonly(np.ascontiguousarray(uniq[:, 0])),
                    _readonly(np.ascontiguousarray(uniq[:, 1])))

        return self._cached("timings", compute)

    # ------------------------------------------------------------------ derived sets
    def _derived(self, rows: Callable[[np.ndarray], np.ndarray], size: int,
                 owner: str) -> MeasurementArrays:
        derived = _DerivedMeasurements(
            {name: None if arr is None else rows(arr) for name, arr in self.fields.items()},
            size)
        return MeasurementArrays(derived, owner)

    def unique_rows(self, owner: str) -> tuple[MeasurementArrays | None, np.ndarray]:
        """Distinct (b, q, G, delta, Delta) rows and the inverse index (M,) int64.

        Returns (None, inverse) when every row is distinct.
        """

        def compute() -> tuple[MeasurementArrays | None, np.ndarray]:
            table = np.column_stack([arr for arr in self.fields.values() if arr is not None])
            _, first, inverse = np.unique(table, axis=0, return_index=True,
                                          return_inverse=True)
            inverse = _readonly(np.ascontiguousarray(np.asarray(inverse).reshape(-1),
                                                     dtype=np.int64))
            if first.shape[0] == self.size:
                return None, inverse
            return self._derived(lambda a: a[first], int(first.shape[0]), owner), inverse

        return self._cached("unique_rows", compute)

    def tiled(self, k: int, owner: str) -> MeasurementArrays:
        """Each measurement repeated ``k`` times (quadrature nodes); kept when small."""

        def compute() -> MeasurementArrays:
            return self._derived(lambda a: np.repeat(a, k), self.size * k, owner)

        if self.size * k > _PREPARED_MAX_ROWS // 16:
            return compute()
        return self._cached(("tiled", k), compute)


class _DerivedMeasurements:
    """Duck-typed MeasurementSet from already selected arrays (zero directions)."""

    def __init__(self, fields: Mapping[str, np.ndarray | None], size: int) -> None:
        for name in _FIELDS:
            setattr(self, name, fields.get(name))
        self.directions = np.zeros((size, 3))


#: Shared MeasurementArrays per MeasurementSet (by identity; bounded in count and rows,
#: oldest dropped first). Entries keep their MeasurementSet alive, so ids are not reused.
_PREPARED: dict[int, tuple[Any, MeasurementArrays]] = {}
_PREPARED_LOCK = threading.Lock()
_PREPARED_MAX = 64
_PREPARED_MAX_ROWS = 1 << 18


def _readonly(arr: np.ndarray) -> np.ndarray:
    arr.setflags(write=False)
    return arr


class CompartmentModel:
    """Base class of compartment models (immutable; dmipy-compatible attributes)."""

    _parameter_ranges: ClassVar[Mapping[str, Any]] = {}
    #: unit of each parameter in SI (``fingerprint.core.units``), declared with the ranges
    _parameter_units: ClassVar[Mapping[str, str]] = {}
    _parameter_scales: ClassVar[Mapping[str, Any]] = {}
    _parameter_types: ClassVar[Mapping[str, str]] = {}
    _required_acquisition_parameters: ClassVar[list[str]] = []
    _model_type: ClassVar[str] = "CompartmentModel"
    #: Names of non-fitted constructor constants, reported by :meth:`constants`.
    _constant_names: ClassVar[tuple[str, ...]] = ()
    #: True for compartments whose signal does not depend on the gradient direction.
    is_isotropic: ClassVar[bool] = False
    S0_response: ClassVar[float] = 1.0
    #: Rough cost of one signal value (in exponentials), to choose serial or parallel runs.
    _work_per_value: ClassVar[float] = 1.0

    # -------------------------------------------------------------- dmipy attributes
    @staticmethod
    def _names(cls: Any) -> list[str]:
        """Names of the model parameters (dmipy order)."""
        return list(cls._parameter_ranges)

    @staticmethod
    def _ranges(cls: Any) -> OrderedDict:
        """Parameter ranges in optimiser units (multiply by parameter_scales for SI)."""
        return OrderedDict((k, _copy_value(v)) for k, v in cls._parameter_ranges.items())

    @staticmethod
    def _scales(cls: Any) -> OrderedDict:
        """Scales from optimiser units to SI units."""
        return OrderedDict((k, _copy_value(v)) for k, v in cls._parameter_scales.items())

    @staticmethod
    def _types(cls: Any) -> OrderedDict:
        """Parameter types ('orientation', 'normal', 'cylinder', 'sphere')."""
        return OrderedDict(cls._parameter_types)

    @staticmethod
    def _cardinality(cls: Any) -> OrderedDict:
        """Number of values of each parameter (2 for the orientation mu)."""
        return OrderedDict((k, len(np.atleast_2d(v))) for k, v in cls._parameter_ranges.items())

    @staticmethod
    def _units(cls: Any) -> OrderedDict:
        """SI unit of each parameter (``fingerprint.core.units``), as declared."""
        missing = [k for k in cls._parameter_ranges if k not in cls._parameter_units]
        if missing:
            raise TypeError(f"{cls.__name__} declares no unit for {missing}")
        return OrderedDict((k, cls._parameter_units[k]) for k in cls._parameter_ranges)

    parameter_names = _ClassProperty(_names)
    parameter_units = _ClassProperty(_units)
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

    def __call__(self, acquisition_scheme: AcquisitionScheme | MeasurementSet,
                 **kwargs: Any) -> np.ndarray:
        """Signal attenuation (N,) for one parameter set (dmipy call style).

        Parameters are SI values named without prefix (``mu`` = [theta, phi] in radians,
        ``lambda_par`` in m²/s, ``diameter`` in m, ...); parameters left out take the value
        given to the constructor.
        """
        self._check_kwargs(kwargs)
        source: Any = acquisition_scheme  # a scheme, or measurements (also duck-typed)
        meas = source.measurements if hasattr(source, "measurements") else source
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

    def spherical_mean(self, acquisition_scheme: AcquisitionScheme, **kwargs: Any) -> np.ndarray:
        """Spherical mean (S,) of the signal on each shell of the scheme (dmipy style).

        Exact at every b-value: a shell's value is the average of its members' spherical
        means, each at the member's own b-value and timing
        (``AcquisitionScheme.spherical_mean_groups``), so shells whose b-values jitter or
        mix stay exact and a b=0 shell holding b = 5 s/mm² measurements is not forced
        to 1. Given a MeasurementSet instead of a scheme: one value per row.
        """
        self._check_kwargs(kwargs)
        params = self._single_params(kwargs)
        if hasattr(acquisition_scheme, "spherical_mean_groups"):
            groups, weights = acquisition_scheme.spherical_mean_groups()
            return weights @ self.spherical_mean_batch(groups, **params)[0]
        return self.spherical_mean_batch(acquisition_scheme, **params)[0]

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

    def signal_from_cosines(self, meas: Measurements, cosines: ArrayLike | None = None,
                            **params: Any) -> np.ndarray:
        """Signals (n, M) of n parameter sets on the M measurements of ``meas``.

        ``cosines``: (n, M), or (M,) / (1, M) shared by all atoms, cosine between
        gradient and compartment axis; None for isotropic compartments. Parameters are
        (n,) arrays or scalars in SI units, named without prefix; ``mu`` is ignored.
        n comes from the parameters and cosines; when nothing gives it (the dot, or only
        scalars) one row is returned, which broadcasts.
        """
        params = {k: v for k, v in params.items() if k != "mu"}
        arrays = MeasurementArrays.of(meas, type(self).__name__)
        cos = self._cosines(cosines, arrays.size)
        n, values = self._batch_params(params, cos)
        out = np.empty((n, arrays.size))
        if not (n and arrays.size):
            return out
        if self.is_isotropic and arrays.size > 1:
            # isotropic signals depend on (b, q, G, delta, Delta) only: evaluate each
            # distinct row once and scatter (e.g. 4 instead of 288 on HCP)
            unique, inverse = arrays.unique_rows(type(self).__name__)
            if unique is not None:
                small = np.empty((n, unique.size))
                self._kernel(unique, None, values, small)
                run_kernel(kernels.gather_columns, 0.25 * out.size, small, inverse, out)
                return out
        self._kernel(arrays, cos, values, out)
        return out

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        raise NotImplementedError

    def rotational_harmonics_representation(self, acquisition_scheme: AcquisitionScheme,
                                            sh_order: int = 14, **kwargs: Any) -> np.ndarray:
        """Rotational harmonics (N_dwi_shells, sh_order / 2 + 1) of the compartment with
        its axis along z, one row per diffusion-weighted shell: the coefficients of
        ``Y_l0`` (exact Legendre projection; dmipy's convolution-kernel representation);
        isotropic compartments have only ``Y_00`` (one column).
        Parameters other than ``mu`` come from ``kwargs`` or the constructor."""
        # lazy: keeps SciPy off import
        from fingerprint.core.spherical_harmonics_model import zonal_kernel_coefficients

        self._check_kwargs(kwargs)
        params = {k: self._value(k, kwargs) for k in self._parameter_ranges if k != "mu"}
        shells = acquisition_scheme.shell_measurements()

        dwi = ~np.asarray(acquisition_scheme.shell_b0_mask, dtype=bool)
        rows = AcquisitionScheme(
            shells.b[dwi], np.tile([0.0, 0.0, 1.0], (int(dwi.sum()), 1)),
            qvalues=None if shells.q is None else shells.q[dwi],
            delta=None if shells.delta is None else shells.delta[dwi],
            Delta=None if shells.Delta is None else shells.Delta[dwi], b0_threshold=0.0,
            min_b_shell_distance=0.0)
        kappa = zonal_kernel_coefficients(self, params, rows, sh_order)
        degrees = np.arange(0, sh_order + 1, 2)
        rh = kappa / np.sqrt(4.0 * math.pi / (2.0 * degrees + 1.0))
        return rh[:, :1] if self.is_isotropic else rh

    def _work(self, out: np.ndarray) -> float:
        return out.size * self._work_per_value

    @property
    def _name(self) -> str:
        return type(self).__name__

    def spherical_mean_batch(self, meas: Measurements, **params: Any) -> np.ndarray:
        """Orientation-averaged signals (n, M), one value per row of ``meas``.

        Closed form for stick, zeppelins and isotropic compartments; Gauss-Legendre
        quadrature over the cosine otherwise.
        """
        params = {k: v for k, v in params.items() if k != "mu"}
        arrays = MeasurementArrays.of(meas, type(self).__name__)
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
        nodes, weights = gauss_legendre_unit(SPHERICAL_MEAN_NODES)
        k = nodes.shape[0]
        m = arrays.size
        cos = np.ascontiguousarray(np.tile(nodes, m)[None, :])
        n = out.shape[0]
        chunk = max(1, _SPHERICAL_MEAN_CHUNK // max(1, m * k))
        tiled_arrays = arrays.tiled(k, type(self).__name__)
        for start in range(0, n, chunk):
            stop = min(n, start + chunk)
            sub = {name: value[start:stop] for name, value in params.items()}
            buf = np.empty((stop - start, m * k))
            self._kernel(tiled_arrays, cos, sub, buf)
            out[start:stop] = buf.reshape(stop - start, m, k) @ weights


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
