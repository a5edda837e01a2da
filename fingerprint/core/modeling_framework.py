"""Multi-compartment models with dmipy's API, batched and thread-safe.

:class:`MultiCompartmentModel` combines compartments (``fingerprint.signal_models``) and
distributed models (``fingerprint.distributions``) with volume fractions
``partial_volume_i``; :class:`MultiCompartmentSphericalMeanModel` does the same for the
per-shell spherical means. Parameter names follow dmipy exactly (``G1Ball_1_lambda_iso``,
``SD1WatsonDistributed_1_SD1Watson_1_odi``, ``partial_volume_0``); a parameter that is
fixed or linked (``set_fixed_parameter``, ``set_tortuous_parameter``,
``set_equal_parameter``) leaves ``parameter_names``. Wherever a parameter name is taken, a
unique suffix (``"odi"``, ``"lambda_iso"``) is accepted too.

A model is an immutable description in practice: the ``set_*`` methods (which return
None, like dmipy's) swap in a new internal state instead of editing it, and simulation
reads one state snapshot, so models may be shared between threads. Models serialise to
JSON-able specs (:meth:`MultiCompartmentModelProperties.to_spec`) and are rebuilt exactly
by :func:`model_from_spec`::

    {"format": "fingerprint.model/1", "class": "MultiCompartmentModel",
     "models": [{"type": "compartment", "class": "G1Ball",
                 "module": "fingerprint.signal_models.gaussian_models", "constants": {}},
                {"type": "distributed", "class": "SD1WatsonDistributed",
                 "models": [...], "calls": [...]}],
     "calls": [["set_fixed_parameter", "G1Ball_1_lambda_iso", 3e-09], ...]}

``calls`` replays the set_* calls in order with full parameter names and SI values;
``spec_hash`` is the SHA-256 of the spec as compact JSON with sorted keys.

>>> from fingerprint.signal_models.gaussian_models import G1Ball
>>> from fingerprint.signal_models.cylinder_models import C1Stick
>>> model = MultiCompartmentModel(models=[G1Ball(), C1Stick()])
>>> model.parameter_names[:3]
['G1Ball_1_lambda_iso', 'C1Stick_1_mu', 'C1Stick_1_lambda_par']
>>> model.set_fixed_parameter("lambda_iso", 3e-9)   # unique suffix of G1Ball_1_lambda_iso
>>> model.parameter_names
['C1Stick_1_mu', 'C1Stick_1_lambda_par', 'partial_volume_0', 'partial_volume_1']
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.initial_guess import fit_with_guesses
from fingerprint.core.orientations import mu_to_vectors
from fingerprint.core.parameter_layout import ParameterLayout
from fingerprint.core.units import DIMENSIONLESS
from fingerprint.errors import InputError
from fingerprint.utils.utils import T1_tortuosity, parameter_equality, tortuosity

if TYPE_CHECKING:
    from numpy.typing import ArrayLike
    from typing_extensions import TypeIs

    from fingerprint.core.acquisition_scheme import AcquisitionScheme, MeasurementSet
    from fingerprint.core.fitted_model import FittedModel
    from fingerprint.distributions.distribute_models import DistributedModel
    from fingerprint.signal_models.base import CompartmentModel

logger = logging.getLogger(__name__)

#: One parameter's range in optimiser units (SI = range x scale): ``(low, high)``, or one
#: ``(low, high)`` per element of a multi-valued parameter (orientations).
ParameterRange = tuple[float, float] | Sequence[Sequence[float]] | np.ndarray
#: One parameter's scale (SI value of one optimiser unit): one number, or one per element.
ParameterScale = float | np.ndarray

__all__ = [
    "MultiCompartmentModel",
    "MultiCompartmentSphericalMeanModel",
    "SPEC_FORMAT",
    "model_from_spec",
]

#: Version tag of model specs (:meth:`to_spec`).
SPEC_FORMAT = "fingerprint.model/1"

_COMPARTMENT_MODULE_PREFIX = "fingerprint.signal_models."
_DISTRIBUTED_MODULE = "fingerprint.distributions.distribute_models"
_TIMING_PARAMETERS = ("delta", "Delta", "qvalues", "gradient_strengths", "TE")
#: atoms simulated together (bounds the temporary memory of one call)
_CHUNK = 8192


# =========================================================================== parameters
@dataclass(frozen=True)
class ParameterInfo:
    """One parameter of a model (any level of nesting).

    ``range`` is in scaled units (SI = range * scale) like dmipy's ``parameter_ranges``;
    ``owner`` is the index of the sub-model it belongs to (None for volume fractions);
    ``local`` its name inside that sub-model.
    """

    name: str
    cardinality: int
    range: Any
    scale: Any
    type: str
    owner: int | None
    local: str
    #: SI unit (``fingerprint.core.units``), declared where the parameter is
    unit: str = DIMENSIONLESS


@dataclass(frozen=True)
class Link:
    """A parameter computed from others: ``kind`` in fixed / equal / tortuous.

    ``value``: the fixed value, or for tortuous links the (S0_intra, S0_extra) responses
    of a multi-tissue correction (None: no correction). Indexing gives dmipy's
    ``[model, parameter_name, function, arguments]`` view (model is None).
    """

    kind: str
    target: str
    sources: tuple[str, ...] = ()
    value: Any = None

    def __getitem__(self, index: int) -> Any:
        if self.kind == "tortuous":
            function: Any = T1_tortuosity(*(self.value or (1.0, 1.0)))
        elif self.kind == "equal":
            function = parameter_equality
        else:
            value = self.value

            def function() -> Any:
                return value
        return [None, self.target, function, list(self.sources)][index]


@dataclass(frozen=True)
class _State:
    """Everything a model's set_* methods change (replaced, never edited)."""

    params: tuple[ParameterInfo, ...]
    links: tuple[Link, ...] = ()
    calls: tuple[tuple[Any, ...], ...] = ()  # replayable set_* calls (for specs)
    #: initial guesses (name, read-only SI array), dmipy's ``set_initial_guess_parameter``
    guesses: tuple[tuple[str, np.ndarray], ...] = ()
    #: parameters fixed voxel by voxel (name, read-only SI array of the voxels' shape)
    voxel_fixed: tuple[tuple[str, np.ndarray], ...] = ()

    @property
    def linked(self) -> frozenset[str]:
        return frozenset(link.target for link in self.links)

    def free(self) -> list[ParameterInfo]:
        linked = self.linked
        return [p for p in self.params if p.name not in linked]

    def by_name(self) -> dict[str, ParameterInfo]:
        return {p.name: p for p in self.params}


def _cardinality_of(range_: Any) -> int:
    return int(len(np.atleast_2d(np.asarray(range_, dtype=float))))


def _jsonable(value: Any) -> Any:
    """Plain JSON-able Python value (floats kept exact)."""
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value)
    if isinstance(value, (np.integer, int)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, (np.bool_, bool)):
        return bool(value)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    raise InputError(f"cannot serialise value {value!r} of type {type(value).__name__}")


class _ParameterNamespace:
    """Parameter bookkeeping shared by multi-compartment and distributed models."""

    _state: _State
    _kind_label = "model"

    # ------------------------------------------------------------------ dmipy properties
    @property
    def parameter_names(self) -> list[str]:
        """Free parameter names in parameter-vector order (dmipy order)."""
        return [p.name for p in self._visible_free()]

    def _visible_free(self) -> list[ParameterInfo]:
        return self._state.free()

    @property
    def parameter_ranges(self) -> OrderedDict:
        """Name -> range in scaled units (SI = range * scale), free parameters."""
        return OrderedDict((p.name, p.range) for p in self._visible_free())

    @property
    def parameter_scales(self) -> OrderedDict:
        """Name -> scale (SI value of one scaled unit), free parameters."""
        return OrderedDict((p.name, p.scale) for p in self._visible_free())

    @property
    def parameter_types(self) -> OrderedDict:
        """Name -> type ('orientation', 'normal', 'circular', ...), free parameters."""
        return OrderedDict((p.name, p.type) for p in self._visible_free())

    @property
    def parameter_cardinality(self) -> OrderedDict:
        """Name -> number of values (2 for orientations mu = [theta, phi])."""
        return OrderedDict((p.name, p.cardinality) for p in self._visible_free())

    @property
    def parameter_layout(self) -> ParameterLayout:
        """Names, cardinalities, column slices and units of the parameter vector."""
        return ParameterLayout.from_cardinality(self.parameter_cardinality,
                                                self.parameter_units)

    @property
    def parameter_units(self) -> OrderedDict:
        """Name -> SI unit of every parameter (free, fixed or linked; ``'m^2/s'``, ``'m'``,
        ``'rad'``, ``'n/a'``...), as declared by the compartments and distributions."""
        return OrderedDict((p.name, p.unit) for p in self._state.params)

    @property
    def parameter_links(self) -> list[Link]:
        """The fixed / equal / tortuous links, in the order they were set."""
        return list(self._state.links)

    @property
    def all_parameter_names(self) -> list[str]:
        """Every parameter name, free or linked."""
        return [p.name for p in self._state.params]

    # ------------------------------------------------------------------ names
    def resolve_parameter_name(self, name: str, *, free_only: bool = False) -> str:
        """Full parameter name for ``name`` (a full name or a unique ``_``-suffix).

        Raises InputError listing the candidates when ``name`` is ambiguous or unknown.
        """
        if not isinstance(name, str):
            raise InputError(f"parameter name must be a string, got {type(name).__name__}")
        pool = self.parameter_names if free_only else self.all_parameter_names
        if name in pool:
            return name
        matches = [p for p in pool if p.endswith("_" + name)]
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise InputError(f"parameter name {name!r} is ambiguous in this {self._kind_label}; "
                             f"candidates: {', '.join(matches)}")
        all_names = self.all_parameter_names
        if free_only and (name in all_names
                          or any(p.endswith("_" + name) for p in all_names)):
            raise InputError(f"parameter {name!r} is fixed or linked already (free parameters: "
                             f"{', '.join(pool) or 'none'})")
        raise InputError(f"unknown parameter {name!r}; parameters of this {self._kind_label}: "
                         f"{', '.join(pool) or 'none'}")

    def _free_info(self, name: str) -> ParameterInfo:
        return self._state.by_name()[self.resolve_parameter_name(name, free_only=True)]

    # ------------------------------------------------------------------ links (dmipy API)
    def _add_link(self, link: Link, call: tuple[Any, ...]) -> None:
        state = self._state
        if any(name == link.target for name, _ in state.voxel_fixed):
            raise InputError(f"{link.target} is fixed voxel by voxel already; it cannot be "
                             f"fixed or linked again")
        self._state = replace(state, links=state.links + (link,), calls=state.calls + (call,))

    def set_fixed_parameter(self, parameter_name: str, value: ArrayLike) -> None:
        """Fix a parameter to ``value`` (SI units; a list of ``cardinality`` values for
        orientations); it leaves the free parameters."""
        info = self._free_info(parameter_name)
        _refuse_list_for_scalar(info, value)
        arr = _as_float_array(value, f"fixed value of {info.name}")
        if info.cardinality == 1:
            if arr.ndim != 0 and arr.shape != (1,):
                raise InputError(f"{info.name} can only be fixed to one number, got shape "
                                 f"{arr.shape} (per-voxel fixed maps are not supported by "
                                 f"any solver; give per-voxel values as x0_vector starts, "
                                 f"or fit groups of voxels with their own fixed value)")
            fixed: Any = float(arr.reshape(()))
        else:
            if arr.shape != (info.cardinality,):
                raise InputError(f"{info.name} must be fixed to {info.cardinality} values, "
                                 f"got shape {arr.shape}")
            fixed = tuple(float(v) for v in arr)
        if not np.all(np.isfinite(np.asarray(fixed, dtype=float))):
            raise InputError(f"fixed value of {info.name} must be finite, got {value!r}")
        _check_fixed_range(info, fixed)
        self._add_link(Link("fixed", info.name, (), fixed),
                       ("set_fixed_parameter", info.name, _jsonable(fixed)))

    def set_equal_parameter(self, parameter_name_in: str, parameter_name_out: str) -> None:
        """Make ``parameter_name_out`` equal to ``parameter_name_in``; the former leaves the
        free parameters (dmipy argument order)."""
        if self._same_equal_link(parameter_name_in, parameter_name_out):
            return
        src = self._free_info(parameter_name_in)
        dst = self._free_info(parameter_name_out)
        if src.name == dst.name:
            raise InputError(f"cannot set {src.name} equal to itself")
        if src.cardinality != dst.cardinality:
            raise InputError(f"cannot set {dst.name} (cardinality {dst.cardinality}) equal to "
                             f"{src.name} (cardinality {src.cardinality})")
        self._add_link(Link("equal", dst.name, (src.name,)),
                       ("set_equal_parameter", src.name, dst.name))

    def _same_equal_link(self, name_in: str, name_out: str) -> bool:
        """Whether ``name_out`` is set equal to ``name_in`` already (repeating that call
        is a no-op, as in dmipy; it is logged)."""
        try:
            src = self.resolve_parameter_name(name_in)
            dst = self.resolve_parameter_name(name_out)
        except InputError:
            return False
        if any(link.kind == "equal" and link.target == dst and link.sources == (src,)
               for link in self._state.links):
            logger.info("%s is equal to %s already", dst, src)
            return True
        return False

    def _tortuous(self, lambda_perp: str, lambda_par: str, vf_intra: str,
                  vf_extra: str | None, s0: tuple[float, float] | None = None) -> None:
        infos = [self._free_info(lambda_perp), self._free_info(lambda_par),
                 self._free_info(vf_intra)]
        if vf_extra is not None:
            infos.append(self._free_info(vf_extra))
        names = [info.name for info in infos]
        if len(set(names)) != len(names):
            raise InputError(f"set_tortuous_parameter needs distinct parameters, got {names}")
        for info in infos:
            if info.cardinality != 1:
                raise InputError(f"set_tortuous_parameter: {info.name} is not a scalar")
        call: tuple[Any, ...] = ("set_tortuous_parameter", *names)
        if s0 is not None:
            call = ("set_tortuous_parameter", *names[:3], vf_extra and names[3], True)
        self._add_link(Link("tortuous", names[0], tuple(names[1:]), s0), call)

    def set_parameter_optimization_bounds(self, parameter_name: str, bounds: Any) -> None:
        """Set the bounds (SI units, shape (cardinality, 2)) of a free parameter.

        Like dmipy, the parameter's scale becomes ``max(bounds)`` and its range
        ``bounds / scale``.
        """
        info = self._free_info(parameter_name)
        arr = np.atleast_2d(np.asarray(bounds, dtype=float))
        if arr.ndim != 2 or arr.shape != (info.cardinality, 2):
            raise InputError(f"{info.name} bounds must be of shape ({info.cardinality}, 2), "
                             f"got {np.shape(bounds)}")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"{info.name} bounds must be finite, got {bounds!r}")
        for lower, upper in arr:
            if upper < lower:
                raise InputError(f"{info.name} bounds invalid: lower {lower} > upper {upper}")
        scale = float(np.max(arr))
        if scale == 0.0:
            raise InputError(f"{info.name} bounds must not all be zero")
        scaled = arr / scale
        if info.cardinality == 1:
            new_range: Any = (float(scaled[0, 0]), float(scaled[0, 1]))
        else:
            new_range = tuple((float(lo), float(hi)) for lo, hi in scaled)
        params = tuple(replace(p, range=new_range, scale=scale) if p.name == info.name else p
                       for p in self._state.params)
        state = self._state
        self._state = replace(state, params=params, calls=state.calls + (
            ("set_parameter_optimization_bounds", info.name, _jsonable(arr)),))

    # ------------------------------------------------------------------ parameter vectors
    def parameter_vector_to_parameters(self, parameter_vector: Any) -> dict[str, np.ndarray]:
        """Split a parameter vector (..., P) into a dict of free parameters; scalars come
        back as (...) arrays, orientations as (..., 2)."""
        vec = np.asarray(parameter_vector, dtype=float)
        return ParameterLayout.from_cardinality(self.parameter_cardinality).split(vec)

    def parameters_to_parameter_vector(self, **parameters: Any) -> np.ndarray:
        """Parameter vector (..., P) from named parameters (full names or unique suffixes).

        Values given as single numbers (or one orientation) are broadcast over the shape of
        the others, like dmipy.
        """
        cards = self.parameter_cardinality
        given: dict[str, np.ndarray] = {}
        dropped = getattr(self, "dropped_orientations", ())
        for key, value in parameters.items():
            if key in dropped:
                # dmipy passes the same parameters to a model and its spherical-mean
                # sibling: the orientation the spherical mean drops is ignored
                logger.debug("%s is not a parameter of a spherical-mean model; ignored", key)
                continue
            full = self.resolve_parameter_name(key, free_only=True)
            if full in given:
                raise InputError(f"parameter {full} given twice (as {key!r})")
            given[full] = np.asarray(value, dtype=float)
        missing = [n for n in cards if n not in given]
        if missing:
            raise InputError(f"missing parameter(s): {', '.join(missing)}")
        shapes = set()
        for name, card in cards.items():
            v = given[name]
            if card == 1:
                if v.ndim > 0 and v.shape != (1,):
                    shapes.add(v.shape)
            else:
                if v.shape[-1:] != (card,):
                    raise InputError(f"{name} must have last dimension {card}, got {v.shape}")
                if v.ndim > 1:
                    shapes.add(v.shape[:-1])
        if len(shapes) > 1:
            raise InputError(f"parameter shapes are inconsistent: {sorted(shapes)}")
        shape = shapes.pop() if shapes else ()
        parts = []
        for name, card in cards.items():
            v = given[name]
            if card == 1:
                v = v.reshape(()) if v.shape == (1,) else v
                parts.append(np.broadcast_to(v, shape)[..., None])
            else:
                parts.append(np.broadcast_to(v, (*shape, card)))
        return np.concatenate(parts, axis=-1).astype(float)

    def parameter_initial_guess_to_parameter_vector(self, **parameters: Any) -> np.ndarray:
        """Parameter vector with the given parameters and NaN for the others (dmipy's
        initial-guess helper; NaN entries are left to the solver)."""
        cards = self.parameter_cardinality
        given = {self.resolve_parameter_name(k, free_only=True): v
                 for k, v in parameters.items()}
        full = {name: given.get(name, np.full(card, np.nan) if card > 1 else np.nan)
                for name, card in cards.items()}
        return self.parameters_to_parameter_vector(**full)

    # ------------------------------------------------------------------ evaluation
    def _parameters_with_links(self, free: Mapping[str, np.ndarray], n: int,
                               state: _State | None = None) -> dict[str, np.ndarray]:
        """Free parameters (n,) / (n, card) plus every linked parameter."""
        state = state or self._state
        values = dict(free)
        cards = {p.name: p.cardinality for p in state.params}
        # a link's sources were free when it was set, so evaluating the links in reverse
        # order always finds its sources computed already
        for link in reversed(state.links):
            card = cards[link.target]
            if link.kind == "fixed":
                v = np.asarray(link.value, dtype=float)
                values[link.target] = (np.full(n, float(v)) if card == 1
                                       else np.broadcast_to(v, (n, card)).copy())
            elif link.kind == "equal":
                values[link.target] = values[link.sources[0]]
            elif link.kind == "tortuous":
                lambda_par, vf_intra, *vf_extra = (values[s] for s in link.sources)
                s0_intra, s0_extra = link.value or (1.0, 1.0)
                values[link.target] = tortuosity(lambda_par, vf_intra,
                                                 vf_extra[0] if vf_extra else None,
                                                 s0_intra, s0_extra)
            else:  # pragma: no cover - constructed internally only
                raise InputError(f"unknown link kind {link.kind!r}")
        return values


# =========================================================================== sub-models
_UNIQUE_CACHE: dict[int, tuple[Any, tuple[Any, np.ndarray]]] = {}
_UNIQUE_LOCK = threading.Lock()


class _SchemeContext:
    """What the sub-models need of a scheme, computed once per simulation."""

    def __init__(self, scheme: Any) -> None:
        self.scheme = scheme
        self.meas = scheme.measurements
        self.directions = np.ascontiguousarray(self.meas.directions, dtype=np.float64)
        self._unique: tuple[Any, np.ndarray] | None = None
        self._shells: Any = None
        self._shell_weights: np.ndarray | None = None

    @property
    def unique(self) -> tuple[Any, np.ndarray]:
        if self._unique is None:
            # keyed by object identity (the cache holds the scheme, so ids are not reused)
            key = id(self.scheme)
            entry = _UNIQUE_CACHE.get(key)
            if entry is None or entry[0] is not self.scheme:
                entry = (self.scheme, self.scheme.unique_measurements())
                with _UNIQUE_LOCK:
                    if len(_UNIQUE_CACHE) >= 16:
                        _UNIQUE_CACHE.pop(next(iter(_UNIQUE_CACHE)), None)
                    _UNIQUE_CACHE[key] = entry
            self._unique = entry[1]
        return self._unique

    @property
    def shells(self) -> Any:
        """The distinct (b, timing) groups whose spherical means make the shells' (see
        ``AcquisitionScheme.spherical_mean_groups``); ``shell_weights`` averages them."""
        if self._shells is None:
            self._shells, self._shell_weights = _spherical_mean_groups(self.scheme)
        return self._shells

    @property
    def shell_weights(self) -> np.ndarray:
        """(S, G) weights: shell spherical means = group spherical means @ weights.T."""
        if self._shell_weights is None:
            self._shells, self._shell_weights = _spherical_mean_groups(self.scheme)
        return self._shell_weights

    @property
    def n_shells(self) -> int:
        return int(self.shell_weights.shape[0])


def _spherical_mean_groups(scheme: Any) -> tuple[Any, np.ndarray]:
    """(groups, weights) of a scheme; a scheme without groups averages nothing."""
    if hasattr(scheme, "spherical_mean_groups"):
        return scheme.spherical_mean_groups()
    shells = scheme.shell_measurements()
    return shells, np.eye(shells.number_of_measurements)


def mu_to_axes(mu: np.ndarray) -> np.ndarray:
    """Unit vectors (n, 3) from orientations mu (n, 2) = [theta, phi] (radians)."""
    return np.ascontiguousarray(mu_to_vectors(np.asarray(mu, dtype=float).reshape(-1, 2)))


def axis_cosines(directions: np.ndarray, mu: np.ndarray) -> np.ndarray:
    """Cosines (n, N) between measurement directions (N, 3) and orientations mu (n, 2)."""
    from fingerprint.kernels.dispersion import cosines_to_axes  # lazy: keeps numba off import

    return cosines_to_axes(np.ascontiguousarray(directions, dtype=np.float64), mu_to_axes(mu))


def compartment_info(compartment: CompartmentModel | DistributedModel
                     ) -> list[tuple[str, int, ParameterRange, ParameterScale, str]]:
    """(name, cardinality, range, scale, type) of a compartment's parameters, in order."""
    ranges = dict(compartment.parameter_ranges)
    names = list(getattr(compartment, "parameter_names", None) or ranges)
    scales = dict(compartment.parameter_scales)
    types = dict(getattr(compartment, "parameter_types", {}) or {})
    cards = dict(getattr(compartment, "parameter_cardinality", {}) or {})
    out = []
    for name in names:
        card = int(cards.get(name, _cardinality_of(ranges[name])))
        out.append((name, card, ranges[name], scales[name], types.get(name, "normal")))
    return out


def is_isotropic(compartment: CompartmentModel | DistributedModel) -> bool:
    """Whether a compartment has no orientation."""
    flag = getattr(compartment, "is_isotropic", None)
    if flag is not None:
        return bool(flag)
    return not any(t == "orientation" for *_, t in compartment_info(compartment))


def compartment_signal(compartment: CompartmentModel, ctx_meas: MeasurementSet,
                       directions: np.ndarray | None,
                       params: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Batched signal (n, M) of a plain compartment for its own parameters ``params``."""
    kwargs = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in params.items()
              if k != "mu"}
    if is_isotropic(compartment) or not getattr(compartment, "has_axis", True):
        cos = None  # isotropic, or a full tensor that reads the directions itself
    else:
        if directions is None:
            raise InputError(f"{type(compartment).__name__} needs gradient directions")
        cos = axis_cosines(directions, params["mu"])
    out = np.asarray(compartment.signal_from_cosines(ctx_meas, cos, **kwargs), dtype=float)
    if out.shape != (n, ctx_meas.number_of_measurements):
        out = np.broadcast_to(out, (n, ctx_meas.number_of_measurements))
    return out


def compartment_spherical_mean(compartment: CompartmentModel, shells: MeasurementSet,
                               params: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    """Batched per-shell spherical mean (n, S) of a plain compartment."""
    kwargs = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in params.items()
              if k != "mu"}
    out = np.asarray(compartment.spherical_mean_batch(shells, **kwargs), dtype=float)
    return np.broadcast_to(out, (n, shells.number_of_measurements))


def compartment_spec(compartment: CompartmentModel) -> dict[str, Any]:
    """JSON-able description of a compartment (class and non-fitted constants)."""
    cls = type(compartment)
    constants = {}
    getter = getattr(compartment, "constants", None)
    if callable(getter):
        constants = dict(getter())
    return {"type": "compartment", "class": cls.__name__, "module": cls.__module__,
            "constants": _jsonable(constants)}


def _is_distributed(model: object) -> TypeIs[DistributedModel]:
    return bool(getattr(model, "_is_distributed_model", False))


def submodel_spec(model: CompartmentModel | DistributedModel) -> dict[str, Any]:
    """Spec of a sub-model (compartment or distributed model)."""
    if _is_distributed(model):
        return model.to_spec()
    return compartment_spec(model)


def submodel_from_spec(spec: Mapping[str, Any]) -> CompartmentModel | DistributedModel:
    """Rebuild a compartment or distributed model from its spec."""
    if not isinstance(spec, Mapping) or "class" not in spec:
        raise InputError(f"model spec entry must be a mapping with a 'class', got {spec!r}")
    kind = spec.get("type", "compartment")
    if kind == "distributed":
        module = importlib.import_module(_DISTRIBUTED_MODULE)
        cls = getattr(module, str(spec["class"]), None)
        if not isinstance(cls, type) or not hasattr(cls, "from_spec"):
            raise InputError(f"unknown distributed model class {spec['class']!r}")
        built: Any = cls.from_spec(spec)
        return built
    if kind != "compartment":
        raise InputError(f"unknown model spec type {kind!r}")
    module_name = str(spec.get("module", ""))
    if not module_name.startswith(_COMPARTMENT_MODULE_PREFIX):
        raise InputError(f"compartment module must be under {_COMPARTMENT_MODULE_PREFIX}, "
                         f"got {module_name!r}")
    module = importlib.import_module(module_name)
    cls = getattr(module, str(spec["class"]), None)
    if not isinstance(cls, type):
        raise InputError(f"unknown compartment class {spec['class']!r} in {module_name}")
    return cls(**dict(spec.get("constants", {})))


def _prefixes(models: Sequence[Any], extra: Sequence[Any] = ()) -> list[str]:
    """dmipy's ``<Class>_<k>_`` prefix of each model (k counts per class)."""
    counts: dict[str, int] = {}
    out = []
    for model in list(models) + list(extra):
        cls = type(model).__name__
        counts[cls] = counts.get(cls, 0) + 1
        out.append(f"{cls}_{counts[cls]}_")
    return out


def submodel_units(model: CompartmentModel | DistributedModel) -> dict[str, str]:
    """Local parameter name -> SI unit of a compartment or distributed model (declared by
    the compartment / distribution; TypeError when one is missing)."""
    return dict(model.parameter_units)


def _submodel_parameters(model: Any) -> list[tuple[str, int, Any, Any, str]]:
    if _is_distributed(model):
        return [(n, model.parameter_cardinality[n], model.parameter_ranges[n],
                 model.parameter_scales[n], model.parameter_types[n])
                for n in model.parameter_names]
    return compartment_info(model)


def _required_of(model: Any) -> list[str]:
    if _is_distributed(model):
        return list(model._required_acquisition_parameters)
    return list(getattr(model, "_required_acquisition_parameters", []) or [])


def _required_of_all(models: Any) -> list[str]:
    """The acquisition parameters any of ``models`` needs, in first-seen order."""
    out: list[str] = []
    for model in models:
        for name in _required_of(model):
            if name not in out:
                out.append(name)
    return out


def _s0_responses(value: Any, n_models: int) -> tuple[float, ...] | None:
    """Validated S0 responses of a multi-tissue model (one positive number per model)."""
    if value is None:
        return None
    arr = _as_float_array(value, "S0_tissue_responses").reshape(-1)
    if arr.shape != (n_models,) or not np.all(np.isfinite(arr) & (arr > 0)):
        raise InputError(f"S0_tissue_responses must be {n_models} positive numbers (one per "
                         f"model), got {value!r}")
    return tuple(float(v) for v in arr)


def _refuse_list_for_scalar(info: ParameterInfo, value: Any) -> None:
    """dmipy's rule: a scalar parameter is fixed to a number (or a numpy array, one value
    per voxel), not to a list."""
    if info.cardinality == 1 and isinstance(value, (list, tuple)):
        raise InputError(f"{info.name} can only be fixed to one number (or a numpy array "
                         f"with one value per voxel), got a {type(value).__name__}: "
                         f"{value!r}")


def _as_float_array(value: Any, what: str) -> np.ndarray:
    """``value`` as a float array; InputError naming ``what`` when it is not numeric."""
    try:
        arr = np.asarray(value, dtype=float)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{what} must be numeric, got {type(value).__name__}: {exc}") from None
    return arr


def _check_fixed_range(info: ParameterInfo, fixed: Any) -> None:
    """Volume fractions must lie in [0, 1]; other values outside the parameter's range
    (SI = range * scale) are allowed but logged, as they usually mean a unit mistake."""
    if "partial_volume_" in info.name:
        if not 0.0 <= float(fixed) <= 1.0:
            raise InputError(f"fixed value of {info.name} must be a volume fraction in "
                             f"[0, 1], got {fixed!r}")
        return
    if info.cardinality != 1 or info.range is None or info.scale is None:
        return
    try:
        lo, hi = (float(v) * float(info.scale) for v in np.ravel(info.range)[:2])
    except (TypeError, ValueError):
        return
    if not lo <= float(fixed) <= hi:
        logger.warning("%s fixed to %g, outside its range [%g, %g] (SI units)", info.name,
                       float(fixed), lo, hi)


def check_scheme(scheme: object, required: Sequence[str], who: str) -> None:
    """InputError when ``scheme`` is not an acquisition scheme or lacks timing a model
    needs."""
    if not (hasattr(scheme, "measurements") and hasattr(scheme, "b0_mask")):
        raise InputError(f"{who}: acquisition_scheme must be an AcquisitionScheme (see "
                         f"acquisition_scheme_from_bvalues or read_bvals_bvecs), got "
                         f"{type(scheme).__name__}")
    for name in required:
        if name in _TIMING_PARAMETERS and getattr(scheme, name, None) is None:
            raise InputError(f"{who} needs the acquisition's {name}, which this scheme does "
                             "not have (give delta/Delta when building the scheme)")


# =========================================================================== framework
class MultiCompartmentModelProperties(_ParameterNamespace):
    """Behaviour shared by :class:`MultiCompartmentModel` and
    :class:`MultiCompartmentSphericalMeanModel`."""

    _spherical_mean = False
    _kind_label = "model"

    def __init__(self, models: Sequence[CompartmentModel | DistributedModel],
                 S0_tissue_responses: Sequence[float] | np.ndarray | None = None,
                 parameter_links: Sequence[object] | None = None) -> None:
        if parameter_links:
            raise InputError("parameter_links is not supported; use set_fixed_parameter / "
                             "set_equal_parameter / set_tortuous_parameter")
        if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or not models:
            raise InputError("models must be a non-empty list of compartments or distributed "
                             "models")
        subs: list[CompartmentModel | DistributedModel] = []
        for i, model in enumerate(models):
            if _is_distributed(model):
                subs.append(model.copy())  # snapshot: later edits of the input do not leak
            elif hasattr(model, "parameter_ranges") and hasattr(model, "signal_from_cosines"):
                subs.append(model)
            else:
                raise InputError(f"models[{i}] ({type(model).__name__}) is not a compartment or "
                                 "distributed model")
        nmr = [type(m).__name__ for m in subs if getattr(m, "_model_type", "") == "NMRModel"]
        if nmr and (len(nmr) < len(subs) or self._spherical_mean):
            raise InputError(f"{', '.join(nmr)}: one-dimensional NMR models cannot be combined "
                             "with other compartments or used in spherical-mean models")
        self.models = subs
        self.N_models = len(subs)
        self.S0_tissue_responses = _s0_responses(S0_tissue_responses, len(subs))
        self.model_names = _prefixes(subs)
        params: list[ParameterInfo] = []
        #: orientations of the sub-models that a spherical-mean model drops
        self.dropped_orientations: tuple[str, ...] = ()
        for k, (model, prefix) in enumerate(zip(subs, self.model_names, strict=True)):
            units = submodel_units(model)
            for name, card, rng, scale, ptype in _submodel_parameters(model):
                if self._spherical_mean and ptype == "orientation":
                    self.dropped_orientations += (prefix + name,)
                    continue
                params.append(ParameterInfo(prefix + name, card, rng, scale, ptype, k, name,
                                            units[name]))
        if len(subs) > 1:
            for i in range(len(subs)):
                params.append(ParameterInfo(f"partial_volume_{i}", 1, (0.01, 0.99), 1.0,
                                            "normal", None, f"partial_volume_{i}"))
        self._state = _State(params=tuple(params))

    # ------------------------------------------------------------------ introspection
    @property
    def is_spherical_mean(self) -> bool:
        """Whether the model predicts per-shell spherical means."""
        return self._spherical_mean

    @property
    def partial_volume_names(self) -> list[str]:
        """Top-level volume fractions ``partial_volume_i`` (free or not)."""
        return [f"partial_volume_{i}" for i in range(self.N_models)] if self.N_models > 1 \
            else []

    @property
    def orientation_parameter_names(self) -> list[str]:
        """Free parameters of type 'orientation' (mu = [theta, phi])."""
        return [n for n, t in self.parameter_types.items() if t == "orientation"]

    @property
    def _required_acquisition_parameters(self) -> list[str]:
        return _required_of_all(self.models)

    @property
    def bounds_for_optimization(self) -> list[tuple[float, float]]:
        """Flat (lower, upper) bounds in scaled units, one per vector entry (dmipy)."""
        out: list[tuple[float, float]] = []
        for name, card in self.parameter_cardinality.items():
            rng = np.atleast_2d(np.asarray(self.parameter_ranges[name], dtype=float))
            out.extend((float(lo), float(hi)) for lo, hi in rng[:card])
        return out

    @property
    def scales_for_optimization(self) -> np.ndarray:
        """Flat scales, one per vector entry (dmipy)."""
        return np.hstack([np.broadcast_to(np.asarray(self.parameter_scales[n], dtype=float),
                                          (c,)) for n, c in self.parameter_cardinality.items()])

    def set_tortuous_parameter(self, lambda_perp_parameter_name: str,
                               lambda_par_parameter_name: str,
                               volume_fraction_intra_parameter_name: str,
                               volume_fraction_extra_parameter_name: str | None = None,
                               S0_correction: bool = False) -> None:  # noqa: N803
        """Tortuosity: lambda_perp from lambda_par and the intra (and extra) volume
        fractions (dmipy's ``T1_tortuosity``, see :func:`tortuosity`); lambda_perp leaves
        the free parameters. With ``S0_correction`` and ``S0_tissue_responses``, the
        fractions (top-level ``partial_volume_i``) are corrected by their tissues' S0
        responses first (dmipy's multi-tissue tortuosity)."""
        s0 = None
        if S0_correction and self.S0_tissue_responses is not None:
            names = [volume_fraction_intra_parameter_name,
                     volume_fraction_extra_parameter_name]
            if volume_fraction_extra_parameter_name is None or not all(
                    re.fullmatch(r"partial_volume_\d+", str(n)) for n in names):
                raise InputError("S0_correction needs the top-level partial_volume_i of the "
                                 "intra- and extra-axonal compartments")
            idx = [int(str(n).rsplit("_", 1)[1]) for n in names]
            s0 = (self.S0_tissue_responses[idx[0]], self.S0_tissue_responses[idx[1]])
        self._tortuous(lambda_perp_parameter_name, lambda_par_parameter_name,
                       volume_fraction_intra_parameter_name,
                       volume_fraction_extra_parameter_name, s0)

    # ------------------------------------------------------------------ initial guesses
    @property
    def x0_parameters(self) -> dict[str, np.ndarray]:
        """dmipy's ``x0_parameters``: the initial guesses and the per-voxel fixed maps by
        parameter name (SI units; read-only arrays)."""
        state = self._state
        return dict(state.guesses) | dict(state.voxel_fixed)

    @property
    def parameter_optimization_flags(self) -> OrderedDict:
        """Name -> whether the fit estimates the free parameter (False for parameters
        fixed voxel by voxel, which stay in the parameter vector like in dmipy)."""
        fixed = {name for name, _ in self._state.voxel_fixed}
        return OrderedDict((n, n not in fixed) for n in self.parameter_names)

    def _voxel_value(self, info: ParameterInfo, value: Any, what: str,
                     allow_nan: bool) -> np.ndarray:
        """``value`` as one value (shape () / (card,)) or one per voxel (shape voxels /
        voxels + (card,)), validated; a read-only float copy."""
        arr = np.array(_as_float_array(value, f"{what} of {info.name}"), dtype=float)
        if info.cardinality > 1 and (arr.ndim == 0 or arr.shape[-1] != info.cardinality):
            raise InputError(f"{what} of {info.name} must end in {info.cardinality} values "
                             f"({info.name} is an orientation [theta, phi] in rad), got "
                             f"shape {arr.shape}")
        bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
        if bad.any():
            raise InputError(f"{what} of {info.name} must be finite"
                             f"{' (NaN: no value for that voxel)' if allow_nan else ''}, "
                             f"got {int(bad.sum())} bad value(s)")
        if info.type != "orientation" and info.range is not None:
            rng = np.atleast_2d(np.asarray(info.range, dtype=float))[0]
            lo, hi = float(rng[0]) * float(info.scale), float(rng[1]) * float(info.scale)
            if "partial_volume_" in info.name:
                lo, hi = 0.0, 1.0
            with np.errstate(invalid="ignore"):
                outside = (arr < lo) | (arr > hi)
            if outside.any():
                raise InputError(f"{what} of {info.name} must lie in [{lo:g}, {hi:g}] (SI "
                                 f"units), got values from {np.nanmin(arr):g} to "
                                 f"{np.nanmax(arr):g}")
        shape = arr.shape if info.cardinality == 1 else arr.shape[:-1]
        others = self._state.guesses + self._state.voxel_fixed
        for name, other in others:
            if name == info.name:
                continue
            card = self.parameter_cardinality.get(name, 1)
            other_shape = other.shape if card == 1 else other.shape[:-1]
            if shape and other_shape and shape != other_shape:
                raise InputError(f"{what} of {info.name} has one value per voxel of shape "
                                 f"{shape}, but {name} was given for voxels of shape "
                                 f"{other_shape}")
        arr.setflags(write=False)
        return arr

    def set_initial_guess_parameter(self, parameter_name: str, value: ArrayLike) -> None:
        """Start the fit of a free parameter at ``value`` (SI units; one value, or one
        per voxel of the data's spatial shape, NaN where there is none; orientations end
        in [theta, phi], rad). dmipy's method; see :mod:`fingerprint.core.initial_guess`
        for what each solver does with it (classical solvers start from it; every fit
        keeps the guess where it fits the signal at least as well). Setting a parameter
        again replaces its guess."""
        info = self._free_info(parameter_name)
        if any(name == info.name for name, _ in self._state.voxel_fixed):
            raise InputError(f"{info.name} is fixed voxel by voxel; it takes no initial "
                             f"guess")
        arr = self._voxel_value(info, value, "initial guess", allow_nan=True)
        state = self._state
        guesses = tuple((n, v) for n, v in state.guesses if n != info.name)
        self._state = replace(state, guesses=guesses + ((info.name, arr),))

    def set_fixed_parameter(self, parameter_name: str, value: ArrayLike) -> None:
        """Fix a parameter to ``value`` (SI units; ``cardinality`` values for
        orientations); it leaves the free parameters. With one value per voxel (an array
        of the data's spatial shape, ending in ``cardinality`` values for orientations)
        the parameter is fixed voxel by voxel instead: it stays in the parameter vector
        (dmipy's layout) with ``parameter_optimization_flags`` False, and the fit
        returns the given values; voxels whose value is NaN are not fitted (see
        :mod:`fingerprint.core.initial_guess`)."""
        info = self._free_info(parameter_name)
        _refuse_list_for_scalar(info, value)
        arr = _as_float_array(value, f"fixed value of {info.name}")
        per_voxel = (arr.ndim >= 1 and arr.shape != (1,)) if info.cardinality == 1 \
            else arr.ndim > 1
        if not per_voxel:
            super().set_fixed_parameter(parameter_name, value)
            return
        if type(self).fit is not MultiCompartmentModelProperties.fit:
            raise InputError(f"{info.name}: {type(self).__name__} takes one fixed value "
                             f"per parameter, not a map")
        if any(name == info.name for name, _ in self._state.voxel_fixed):
            raise InputError(f"{info.name} is fixed voxel by voxel already")
        if any(link.sources and info.name in link.sources for link in self._state.links):
            logger.info("%s is fixed voxel by voxel and feeds a link", info.name)
        fixed = self._voxel_value(info, arr, "fixed map", allow_nan=True)
        if np.isnan(fixed).all():
            raise InputError(f"fixed map of {info.name} has no value (all NaN)")
        state = self._state
        self._state = replace(
            state, guesses=tuple((n, v) for n, v in state.guesses if n != info.name),
            voxel_fixed=state.voxel_fixed + ((info.name, fixed),))

    def add_linked_parameters_to_parameters(self, parameters: Mapping[str, Any]) -> dict:
        """All parameters (free and linked) from a dict of the free ones (dmipy)."""
        vec = self.parameters_to_parameter_vector(**parameters)
        flat = vec.reshape(-1, vec.shape[-1])
        free = self.parameter_vector_to_parameters(flat)
        values = self._parameters_with_links(free, flat.shape[0])
        shape = vec.shape[:-1]
        return {k: np.asarray(v).reshape(shape + np.asarray(v).shape[1:])
                for k, v in values.items()}

    # ------------------------------------------------------------------ specs
    def to_spec(self) -> dict[str, Any]:
        """JSON-able description rebuilt exactly by :func:`model_from_spec`."""
        spec = {"format": SPEC_FORMAT, "class": type(self).__name__,
                "models": [submodel_spec(m) for m in self.models],
                "calls": [_jsonable(list(c)) for c in self._state.calls]}
        if self.S0_tissue_responses is not None:
            spec["S0_tissue_responses"] = list(self.S0_tissue_responses)
        return spec

    @property
    def spec_hash(self) -> str:
        """Stable hex digest of :meth:`to_spec`."""
        text = json.dumps(self.to_spec(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def copy(self) -> MultiCompartmentModelProperties:
        """An independent model with the same configuration."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.models = [m.copy() if _is_distributed(m) else m for m in self.models]
        return new

    def __repr__(self) -> str:
        parts = ", ".join(type(m).__name__ for m in self.models)
        return f"{type(self).__name__}(models=[{parts}]; {len(self.parameter_names)} free)"

    # ------------------------------------------------------------------ simulation
    def _check_vector(self, vector: Any) -> np.ndarray:
        if isinstance(vector, Mapping):
            vector = self.parameters_to_parameter_vector(**vector)
        vec = _as_float_array(vector, "parameter vector")
        total = sum(self.parameter_cardinality.values())
        if vec.ndim == 0 or vec.shape[-1] != total:
            raise InputError(f"parameter vector must have last dimension {total} "
                             f"({', '.join(self.parameter_names)}), got shape {vec.shape}")
        return vec

    def simulate_signal(self, acquisition_scheme: AcquisitionScheme,
                        parameters_array_or_dict: ArrayLike | Mapping[str, ArrayLike]
                        ) -> np.ndarray:
        """Signal attenuation for parameter vectors (P,), (n, P) or (..., P) (or a dict
        of named parameters): (..., N) measurements, or (..., S) shells for spherical-mean
        models. Batched: whole arrays, no Python loop per parameter set."""
        vec = self._check_vector(parameters_array_or_dict)
        state = self._state  # one snapshot for the whole call (thread safety)
        models = list(self.models)
        check_scheme(acquisition_scheme, self._required_acquisition_parameters,
                     type(self).__name__)
        ctx = _SchemeContext(acquisition_scheme)
        flat = vec.reshape(-1, vec.shape[-1])
        n_out = ctx.n_shells if self._spherical_mean else ctx.meas.number_of_measurements
        out = np.empty((flat.shape[0], n_out))
        for start in range(0, flat.shape[0], _CHUNK):
            block = flat[start:start + _CHUNK]
            out[start:start + block.shape[0]] = self._simulate_block(ctx, block, state, models)
        return out.reshape(vec.shape[:-1] + (n_out,))

    def simulate_compartment_signals(self, acquisition_scheme: AcquisitionScheme,
                                     parameters_array: ArrayLike, which: ArrayLike | None = None
                                     ) -> np.ndarray:
        """Signals of each top-level sub-model at unit volume fraction.

        ``parameters_array`` (n, P) parameter vectors; returns (n, K, N) ((n, K, S) shells
        for spherical-mean models), K the number of sub-models, the model's signal being
        ``sum_k partial_volume_k * out[:, k]`` when no link involves the top-level
        fractions. With ``which`` (n,) sub-model indices, only that sub-model's signal
        is simulated for each row: (n, N). Each sub-model is simulated once per row
        (unlike a full simulation per one-hot fraction vector)."""
        vec = self._check_vector(parameters_array)
        flat = vec.reshape(-1, vec.shape[-1])
        state = self._state
        models = list(self.models)
        check_scheme(acquisition_scheme, self._required_acquisition_parameters,
                     type(self).__name__)
        ctx = _SchemeContext(acquisition_scheme)
        n = flat.shape[0]
        values = self._parameters_with_links(self._free_dict(flat, state), n, state)
        n_out = ctx.n_shells if self._spherical_mean else ctx.meas.number_of_measurements
        pick = None if which is None else np.asarray(which, dtype=int).reshape(-1)
        if pick is not None and pick.shape[0] != n:
            raise InputError(f"which must give one sub-model per row ({n}), got "
                             f"{pick.shape[0]}")
        out = np.empty((n, n_out)) if pick is not None else np.empty((n, len(models), n_out))
        for k, model in enumerate(models):
            if pick is None:
                local = {p.local: values[p.name] for p in state.params if p.owner == k}
                out[:, k] = self._submodel_signal(ctx, model, local, n)
                continue
            rows = np.flatnonzero(pick == k)
            if rows.size == 0:
                continue
            local = {p.local: np.ascontiguousarray(np.asarray(values[p.name])[rows])
                     for p in state.params if p.owner == k}
            sig = self._submodel_signal(ctx, model, local, rows.size)
            out[rows] = sig
        return out

    def _submodel_signal(self, ctx: _SchemeContext, model: Any,
                         local: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """Signal (n, N) (or shell means (n, S)) of one sub-model at unit fraction."""
        if self._spherical_mean:
            if _is_distributed(model):
                sig = model._spherical_mean_batch(ctx, local, n)
            else:
                sig = compartment_spherical_mean(model, ctx.shells, local, n)
            # each shell: the average of its members' spherical means at their own b-value
            # and timing (exact on jittered or mixed shells; 1 at b = 0 by the kernels)
            return np.asarray(sig, dtype=float) @ ctx.shell_weights.T
        if _is_distributed(model):
            return model._signal_batch(ctx, local, n)
        return compartment_signal(model, ctx.meas, ctx.directions, local, n)

    def _free_dict(self, block: np.ndarray, state: _State) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        pos = 0
        for p in state.free():
            chunk = block[:, pos:pos + p.cardinality]
            out[p.name] = np.ascontiguousarray(chunk[:, 0] if p.cardinality == 1 else chunk)
            pos += p.cardinality
        return out

    def _simulate_block(self, ctx: _SchemeContext, block: np.ndarray, state: _State,
                        models: list[Any]) -> np.ndarray:
        n = block.shape[0]
        values = self._parameters_with_links(self._free_dict(block, state), n, state)
        total = None
        for k, model in enumerate(models):
            local = {p.local: values[p.name] for p in state.params if p.owner == k}
            sig = self._submodel_signal(ctx, model, local, n)
            weight = values[f"partial_volume_{k}"][:, None] if len(models) > 1 else 1.0
            total = weight * sig if total is None else total + weight * sig
        assert total is not None
        return total

    def fod(self, vertices: ArrayLike, **kwargs: Any) -> np.ndarray:
        """Fibre orientation density at unit vectors ``vertices`` (K, 3): the orientation
        distributions of the dispersed sub-models weighted by their volume fractions, for
        one set of named parameters (dmipy's ``fod``)."""
        vec = self.parameters_to_parameter_vector(**kwargs).reshape(1, -1)
        values = self._parameters_with_links(self._free_dict(vec, self._state), 1)
        vertices = np.asarray(vertices, dtype=float).reshape(-1, 3)
        total = np.zeros(vertices.shape[0])
        found = False
        for k, model in enumerate(self.models):
            fod = getattr(model, "fod", None)  # spherical distributed models only
            if fod is None:
                continue
            found = True
            local = {p.local: values[p.name][0] for p in self._state.params if p.owner == k}
            weight = float(values[f"partial_volume_{k}"][0]) if self.N_models > 1 else 1.0
            prefix = getattr(model, "distribution_name", "")
            dist = {n: v for n, v in local.items() if n.startswith(prefix)}
            total += weight * fod(vertices, **dist)
        if not found:
            raise InputError(f"{type(self).__name__} has no orientation distribution "
                             "(SD1WatsonDistributed / SD2BinghamDistributed) to give an FOD")
        return total

    def __call__(self, acquisition_scheme: AcquisitionScheme, **kwargs: Any) -> np.ndarray:
        """Signal for one set of named parameters (dmipy call style)."""
        return self.simulate_signal(acquisition_scheme,
                                    self.parameters_to_parameter_vector(**kwargs))

    # ------------------------------------------------------------------ fitting
    def fit(self, acquisition_scheme: AcquisitionScheme, data: ArrayLike,
            mask: ArrayLike | None = None, solver: str = "fingerprint", **kwargs: Any
            ) -> FittedModel:
        """Fit the model to ``data`` (..., N) by dictionary matching; returns a
        FittedMultiCompartmentModel (see :func:`fingerprint.fitting.engine.fit_model`,
        reached through :func:`fingerprint.core.backends.backend` so that ``core`` does
        not import ``fitting``). Initial guesses and per-voxel fixed maps are applied as
        :mod:`fingerprint.core.initial_guess` describes."""
        return fit_with_guesses(self, acquisition_scheme, data, mask, solver, dict(kwargs))


class MultiCompartmentModel(MultiCompartmentModelProperties):
    """Combination of compartments and distributed models with volume fractions.

    Parameters
    ----------
    models : list of compartments (``fingerprint.signal_models``) and distributed models
        (``fingerprint.distributions``). The same instance may be given more than once:
        each occurrence is a separate compartment (``C1Stick_1_``, ``C1Stick_2_``).
    """

    _spherical_mean = False


class MultiCompartmentSphericalMeanModel(MultiCompartmentModelProperties):
    """Multi-compartment model of the per-shell spherical means (orientation parameters
    are dropped); :meth:`simulate_signal` returns (..., S) shells, b0 shells included."""

    _spherical_mean = True


_FRAMEWORK_CLASSES = {"MultiCompartmentModel": MultiCompartmentModel,
                      "MultiCompartmentSphericalMeanModel": MultiCompartmentSphericalMeanModel}


def replay_calls(model: _ParameterNamespace, calls: Sequence[object], where: str) -> None:
    """Apply recorded set_* calls to a model."""
    allowed = ("set_fixed_parameter", "set_equal_parameter", "set_tortuous_parameter",
               "set_parameter_optimization_bounds")
    for call in calls:
        if not isinstance(call, (list, tuple)) or not call or call[0] not in allowed:
            raise InputError(f"{where}: invalid call {call!r}; expected [method, *args] with "
                             f"method one of {allowed}")
        getattr(model, call[0])(*call[1:])


def model_from_spec(spec: Mapping[str, Any]) -> MultiCompartmentModelProperties:
    """Rebuild a model from :meth:`~MultiCompartmentModelProperties.to_spec` output
    (also accepts its JSON text)."""
    if isinstance(spec, (str, bytes)):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise InputError(f"model spec is not valid JSON: {exc}") from None
    if not isinstance(spec, Mapping):
        raise InputError(f"model spec must be a mapping, got {type(spec).__name__}")
    if spec.get("format") != SPEC_FORMAT:
        raise InputError(f"model spec format must be {SPEC_FORMAT!r}, got "
                         f"{spec.get('format')!r}")
    cls = _FRAMEWORK_CLASSES.get(str(spec.get("class")))
    if cls is None:
        raise InputError(f"model spec class must be one of {sorted(_FRAMEWORK_CLASSES)}, got "
                         f"{spec.get('class')!r}")
    models = [submodel_from_spec(m) for m in spec.get("models", [])]
    model = cls(models=models, S0_tissue_responses=spec.get("S0_tissue_responses"))
    replay_calls(model, spec.get("calls", []), "model spec")
    return model


_SPHERICAL_HARMONICS_NAMES = ("MultiCompartmentSphericalHarmonicsModel",
                              "FittedMultiCompartmentSphericalHarmonicsModel")


def __getattr__(name: str) -> Any:
    """dmipy's third framework lives in :mod:`fingerprint.core.spherical_harmonics_model`
    (imported lazily: it builds on this module)."""
    if name in _SPHERICAL_HARMONICS_NAMES:
        # lazy: re-export on attribute access (that module builds on this one)
        from fingerprint.core import spherical_harmonics_model

        return getattr(spherical_harmonics_model, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
