"""Distributed models: orientation (Watson, Bingham) and size (Gamma) distributions.

Each class wraps one or more compartments and can be used like a compartment inside a
:class:`~fingerprint.core.modeling_framework.MultiCompartmentModel`. Parameter names are
dmipy's: the compartments' parameters prefixed ``<Class>_<k>_`` without the distributed
one (``mu`` or ``diameter``), then the distribution's (``SD1Watson_1_mu``,
``SD1Watson_1_odi``; ``SD2Bingham_1_mu``, ``_psi``, ``_odi``, ``_beta_fraction``;
``DD1Gamma_1_alpha``, ``DD1Gamma_1_beta``), then the nested volume fractions
``partial_volume_i`` (i < number of compartments - 1): the first compartment has
``partial_volume_0``, the second ``(1 - partial_volume_0) * partial_volume_1``, ...

Numerics (SI units):

* Watson: exact on any scheme. For each unique (b, q, delta, Delta) of the scheme the
  axially symmetric kernel is evaluated at Gauss-Legendre nodes of ``u = cos`` (angle to
  the fibre axis), projected on even Legendre polynomials and multiplied by the Watson
  Legendre coefficients (Funk-Hecke); the sum is evaluated at each measurement's own
  cosine with the distribution axis. The Legendre order adapts to the largest
  concentration in the batch (``kappa = 1 / tan(odi pi / 2)``); per atom and unique
  measurement, trailing terms are dropped only while their absolute sum stays below
  1e-13. Compartments whose parameters are the same for every atom are evaluated once per
  batch. See :mod:`fingerprint.kernels.dispersion`.
* Bingham: 2-D quadrature over the hemisphere in the distribution's frame
  (Gauss-Legendre in ``cos theta``, trapezoid in ``phi``), normalised numerically.
* Gamma: distribution of the *radius* with shape ``alpha`` and scale ``beta`` (m),
  weighted by the cross-section area ``pi r^2`` for cylinders (volume ``r^3`` for
  spheres, separation ``2 r`` for planes) like dmipy; the weighted density is again a
  Gamma density (shape ``alpha + 2``, resp. ``alpha + 3``, ``alpha + 1``) and is
  integrated by generalised Gauss-Laguerre quadrature for that density (no truncation
  of the tails).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.acquisition_scheme import MeasurementSet
from fingerprint.core.modeling_framework import (
    ParameterInfo,
    _ParameterNamespace,
    _prefixes,
    _required_of_all,
    _SchemeContext,
    _State,
    axis_cosines,
    check_scheme,
    compartment_info,
    compartment_spec,
    compartment_spherical_mean,
    is_isotropic,
    mu_to_axes,
    replay_calls,
    submodel_from_spec,
)
from fingerprint.core.units import ANGLE, DIMENSIONLESS, LENGTH
from fingerprint.errors import IncompatibleModelsError, InputError
from fingerprint.kernels.dispersion import (
    cosines_to_axes,
    gauss_legendre_unit,
    legendre_even_matrix,
    watson_dispersed_sum,
    watson_order,
    watson_quadrature_size,
    weighted_node_sum,
)

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.signal_models.base import CompartmentModel

__all__ = [
    "DD1GammaDistributed",
    "DistributedModel",
    "SD1WatsonDistributed",
    "SD2BinghamDistributed",
    "kappa2odi",
    "odi2kappa",
]

#: kernel values computed at once (bounds temporary memory)
_BLOCK_VALUES = 4_000_000
#: Legendre truncation tolerance of the Watson coefficients ((2l+1) a_l below this)
_WATSON_TOLERANCE = 1e-7
#: per atom and unique measurement, trailing terms of the dispersed Legendre series are
#: dropped while their absolute sum (a bound on their contribution) stays below this
_SUM_TOLERANCE = 1e-13
#: kernel projection nodes: max(MIN, l_max / 2 + EXTRA) (EXTRA resolves the kernel itself)
_KERNEL_NODES_MIN = 24
_KERNEL_NODES_EXTRA = 16
#: Gauss-Laguerre nodes of the Gamma size quadrature
_GAMMA_NODES = 24
#: Bingham quadrature: Gauss-Legendre nodes in cos(theta) on [0, 1], trapezoid in phi
_BINGHAM_THETA = 32
_BINGHAM_PHI = 48


def odi2kappa(odi: ArrayLike) -> np.ndarray:
    """Watson concentration from the orientation dispersion index: 1 / tan(odi pi / 2)."""
    return 1.0 / np.tan(np.asarray(odi, dtype=float) * (np.pi / 2.0))


def kappa2odi(kappa: ArrayLike) -> np.ndarray:
    """Orientation dispersion index from the Watson concentration: 2/pi arctan(1/kappa)."""
    return (2.0 / np.pi) * np.arctan(1.0 / np.asarray(kappa, dtype=float))


@lru_cache(maxsize=256)
def _order_for(kappa_bucket: float) -> int:
    return watson_order(kappa_bucket, tolerance=_WATSON_TOLERANCE)


def watson_order_for(kappa_max: float) -> int:
    """Even Legendre order that resolves Watson densities up to ``kappa_max`` (cached on
    a geometric grid of concentrations)."""
    k = max(float(kappa_max), 1.0)
    bucket = 2.0 ** (math.ceil(8.0 * math.log2(k)) / 8.0)
    return _order_for(bucket)


def gauss_laguerre(shape: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Generalised Gauss-Laguerre rules for the weights ``x^(shape-1) exp(-x)``, one per
    row of ``shape`` (n,): nodes (n, k) and normalised weights (n, k) (Golub-Welsch)."""
    shape = np.asarray(shape, dtype=float).reshape(-1)
    a = shape - 1.0
    i = np.arange(k)
    jac = np.zeros((shape.size, k, k))
    jac[:, i, i] = 2.0 * i + 1.0 + a[:, None]
    j = np.arange(1, k)
    off = np.sqrt(j[None, :] * (j[None, :] + a[:, None]))
    jac[:, j, j - 1] = off
    jac[:, j - 1, j] = off
    nodes, vectors = np.linalg.eigh(jac)
    weights = vectors[:, 0, :] ** 2
    return nodes, weights / weights.sum(axis=1, keepdims=True)


def _kernel_nodes(l_max: int) -> int:
    """Gauss-Legendre nodes on [0, 1] for projecting kernels onto P_0 ... P_l_max."""
    return max(_KERNEL_NODES_MIN, l_max // 2 + _KERNEL_NODES_EXTRA)


def _tile_measurements(meas: Any, repeats: int, *, interleave: bool) -> Any:
    """A MeasurementSet with every row repeated: ``interleave`` -> row r repeated
    ``repeats`` times in a row (r*repeats + k); else the whole set tiled (k*M + r)."""
    def rep_b(arr: np.ndarray) -> np.ndarray:
        return np.repeat(arr, repeats, axis=0) if interleave else np.tile(arr, repeats)

    def rep(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else rep_b(arr)

    dirs = (np.repeat(meas.directions, repeats, axis=0) if interleave
            else np.tile(meas.directions, (repeats, 1)))
    return MeasurementSet(b=rep_b(meas.b), q=rep(meas.q), G=rep(meas.G), delta=rep(meas.delta),
                          Delta=rep(meas.Delta), directions=dirs)


def _kernel(model: Any, meas: Any, cosines: np.ndarray | None,
            params: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    kwargs = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in params.items()
              if k != "mu"}
    cos = None if is_isotropic(model) else np.ascontiguousarray(cosines, dtype=np.float64)
    out = np.asarray(model.signal_from_cosines(meas, cos, **kwargs), dtype=float)
    return np.broadcast_to(out, (n, meas.number_of_measurements))


def _rows(params: Mapping[str, np.ndarray], sl: slice | np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[sl] for k, v in params.items()}


class DistributedModel(_ParameterNamespace):
    """Common behaviour of the distributed models (naming, links, specs)."""

    _is_distributed_model = True
    _kind_label = "distributed model"
    _spherical_mean = False
    _model_type = "DistributedModel"
    distribution_name = ""
    target_parameter = ""
    #: (name, cardinality, range, scale, type) of the distribution's parameters
    _distribution_parameters: tuple[tuple[str, int, Any, Any, str], ...] = ()
    #: SI unit of each distribution parameter (``fingerprint.core.units``)
    _distribution_units: dict[str, str] = {}

    def __init__(self, models: Sequence[CompartmentModel],
                 parameter_links: Sequence[object] | None = None,
                 target_parameter: str | None = None) -> None:
        cls = type(self).__name__
        if parameter_links:
            raise InputError(f"{cls}: parameter_links is not supported; use "
                             "set_fixed_parameter / set_equal_parameter / "
                             "set_tortuous_parameter")
        nested = isinstance(models, Sequence) and any(_is_nested(m) for m in models)
        if target_parameter is not None and target_parameter != self.target_parameter and \
                not (nested and str(target_parameter).endswith("_" + self.target_parameter)):
            raise InputError(f"{cls} distributes {self.target_parameter!r}, not "
                             f"{target_parameter!r}")
        if isinstance(models, (str, bytes)) or not isinstance(models, Sequence) or not models:
            raise InputError(f"{cls}: models must be a non-empty list of compartments")
        subs = []
        for i, model in enumerate(models):
            if _is_nested(model):
                self._check_nested(i, model)
                subs.append(model.copy())  # type: ignore[attr-defined]  # nested distribution; snapshot: later edits of the input do not leak
            elif getattr(model, "_is_distributed_model", False) or not hasattr(
                    model, "signal_from_cosines"):
                raise InputError(f"{cls}: models[{i}] ({type(model).__name__}) is not a "
                                 "compartment")
            else:
                subs.append(model)
        self.models = subs
        self._nested_target = target_parameter
        self._check_models()
        self.model_names = _prefixes(self.models)
        dist_prefix = f"{self.distribution_name}_1_"
        params: list[ParameterInfo] = []
        self._targets: list[tuple[str, ...]] = []
        for k, (model, prefix) in enumerate(zip(self.models, self.model_names, strict=True)):
            units = dict(model.parameter_units)
            targets = self._targets_of(k, model)
            self._targets.append(targets)
            for name, card, rng, scale, ptype in compartment_info(model):
                if name in targets:
                    continue
                params.append(ParameterInfo(prefix + name, card, rng, scale, ptype, k, name,
                                            units[name]))
        for name, card, rng, scale, ptype in self._distribution_parameters:
            params.append(ParameterInfo(dist_prefix + name, card, rng, scale, ptype, -1, name,
                                        self._distribution_units[name]))
        for i in range(len(self.models) - 1):
            params.append(ParameterInfo(f"partial_volume_{i}", 1, (0.01, 0.99), 1.0, "normal",
                                        None, f"partial_volume_{i}"))
        self._state = _State(params=tuple(params))

    def _check_models(self) -> None:
        pass

    # ------------------------------------------------------------------ nesting
    #: distributed models this one may hold (dmipy's nested distributions)
    _nestable: tuple[str, ...] = ()

    def _check_nested(self, i: int, model: Any) -> None:
        """A distributed sub-model: of a kind this distribution may hold, itself made of
        compartments only (one level of nesting)."""
        if model._model_type not in self._nestable:
            raise InputError(f"{type(self).__name__}: models[{i}] ({type(model).__name__}) "
                             f"cannot be distributed by it (a size distribution may hold "
                             f"orientation-distributed models and vice versa)")
        if any(_is_nested(m) for m in model.models):
            raise InputError(f"{type(self).__name__}: models[{i}] ({type(model).__name__}) "
                             f"holds distributed models itself; one level of nesting only")

    def _targets_of(self, k: int, model: Any) -> tuple[str, ...]:
        """Local names of sub-model ``k`` that this distribution replaces."""
        if not _is_nested(model):
            return (self.target_parameter,)
        return self._nested_targets(k, model)

    def _nested_targets(self, k: int, model: Any) -> tuple[str, ...]:  # pragma: no cover
        raise NotImplementedError

    # ------------------------------------------------------------------ dmipy API
    @property
    def partial_volume_names(self) -> list[str]:
        """Nested volume fractions ``partial_volume_i`` of this distributed model."""
        return [f"partial_volume_{i}" for i in range(len(self.models) - 1)]

    @property
    def _required_acquisition_parameters(self) -> list[str]:
        return _required_of_all(self.models)

    def set_tortuous_parameter(self, lambda_perp: str, lambda_par: str,
                               volume_fraction_intra: str,
                               volume_fraction_extra: str | None = None) -> None:
        """Tortuosity inside the bundle: ``lambda_perp = (1 - vf_intra) * lambda_par`` with
        the nested intra fraction (dmipy); lambda_perp leaves the free parameters."""
        self._tortuous(lambda_perp, lambda_par, volume_fraction_intra, volume_fraction_extra)

    def copy(self) -> DistributedModel:
        """An independent distributed model with the same configuration."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.models = [m.copy() if _is_nested(m) else m for m in self.models]
        return new

    def to_spec(self) -> dict[str, Any]:
        """JSON-able description (compartments or nested distributed models, and set_*
        calls)."""
        spec: dict[str, Any] = {"type": "distributed", "class": type(self).__name__,
                                "models": [m.to_spec() if _is_nested(m) else
                                           compartment_spec(m) for m in self.models],
                                "calls": [list(c) for c in self._state.calls]}
        if self._nested_target not in (None, self.target_parameter):
            spec["target_parameter"] = self._nested_target
        return spec

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> DistributedModel:
        """Rebuild from :meth:`to_spec` output."""
        # a distribution may hold a distribution (dmipy's nested distributions)
        models: list[Any] = [submodel_from_spec(m) for m in spec.get("models", [])]
        target = spec.get("target_parameter")
        obj = cls(models=models) if target is None else cls(models=models,
                                                            target_parameter=str(target))
        replay_calls(obj, spec.get("calls", []), f"{cls.__name__} spec")
        return obj

    def __repr__(self) -> str:
        parts = ", ".join(type(m).__name__ for m in self.models)
        return f"{type(self).__name__}(models=[{parts}])"

    # ------------------------------------------------------------------ evaluation
    def _split(self, local: Mapping[str, np.ndarray], n: int
               ) -> tuple[list[dict[str, np.ndarray]], dict[str, np.ndarray], np.ndarray]:
        """Per-model parameters, distribution parameters and volume fractions (n, K)."""
        state = self._state
        values = self._parameters_with_links(local, n, state)
        per_model: list[dict[str, np.ndarray]] = [{} for _ in self.models]
        dist: dict[str, np.ndarray] = {}
        for p in state.params:
            if p.owner is None or p.name not in values:
                continue  # (orientations are absent from spherical-mean evaluations)
            if p.owner == -1:
                dist[p.local] = np.asarray(values[p.name], dtype=float)
            else:
                per_model[p.owner][p.local] = np.asarray(values[p.name], dtype=float)
        fractions = np.empty((n, len(self.models)))
        remaining = np.ones(n)
        for i in range(len(self.models)):
            if i < len(self.models) - 1:
                f = remaining * values[f"partial_volume_{i}"]
                remaining = remaining - f
            else:
                f = remaining
            fractions[:, i] = f
        return per_model, dist, fractions

    def _signal_batch(self, ctx: _SchemeContext, local: Mapping[str, np.ndarray],
                      n: int) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def _spherical_mean_batch(self, ctx: _SchemeContext, local: Mapping[str, np.ndarray],
                              n: int) -> np.ndarray:
        """Per-shell spherical mean (n, S): orientation distributions do not change it."""
        per_model, _, fractions = self._split(local, n)
        total = np.zeros((n, ctx.shells.number_of_measurements))
        for k, model in enumerate(self.models):
            total += fractions[:, k:k + 1] * compartment_spherical_mean(
                model, ctx.shells, per_model[k], n)
        return total

    def __call__(self, acquisition_scheme: AcquisitionScheme, **kwargs: Any) -> np.ndarray:
        """Signal (N,) for one set of named parameters (dmipy call style; names without
        this model's prefix, e.g. ``SD1Watson_1_odi``; mu as [theta, phi])."""
        return self._signal_batch(_SchemeContext(acquisition_scheme),
                                  self._call_parameters(acquisition_scheme, kwargs), 1)[0]

    def spherical_mean(self, acquisition_scheme: AcquisitionScheme, **kwargs: Any) -> np.ndarray:
        """Per-shell spherical mean (S,) of the signal for one set of named parameters
        (dmipy's call style; orientations may be given and are ignored): the exact mean
        over directions of each shell's b-value and timing."""
        kwargs = {k: v for k, v in kwargs.items()
                  if self._state.by_name().get(self.resolve_parameter_name(k),
                                               None) is None
                  or self._state.by_name()[self.resolve_parameter_name(k)].type
                  != "orientation"}
        local = self._call_parameters(acquisition_scheme, kwargs, skip_orientation=True)
        return self._spherical_mean_batch(_SchemeContext(acquisition_scheme), local, 1)[0]

    def _call_parameters(self, acquisition_scheme: Any, kwargs: Mapping[str, Any],
                         skip_orientation: bool = False) -> dict[str, np.ndarray]:
        check_scheme(acquisition_scheme, self._required_acquisition_parameters,
                     type(self).__name__)
        local = {}
        for key, value in kwargs.items():
            full = self.resolve_parameter_name(key, free_only=True)
            arr = np.asarray(value, dtype=float)
            card = self._state.by_name()[full].cardinality
            local[full] = arr.reshape(1) if card == 1 else arr.reshape(1, card)
        types = self.parameter_types
        missing = [p for p in self.parameter_names if p not in local
                   and not (skip_orientation and types[p] == "orientation")]
        if missing:
            raise InputError(f"missing parameter(s): {', '.join(missing)}")
        return local


def _is_nested(model: Any) -> bool:
    """Whether ``model`` is a distributed model (held by another distribution)."""
    return bool(getattr(model, "_is_distributed_model", False))


def _check_orientation(value: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(value)):
        raise InputError(f"{name} must be finite")


class _SphericalDistributed(DistributedModel):
    """Orientation distributions: the compartments' ``mu`` is replaced by the
    distribution's."""

    target_parameter = "mu"
    _model_type = "SphericalDistributedModel"

    _nestable = ("SpatialDistributedModel",)

    def _nested_targets(self, k: int, model: Any) -> tuple[str, ...]:
        return tuple(n for n, t in model.parameter_types.items() if t == "orientation")

    def _check_models(self) -> None:
        for i, model in enumerate(self.models):
            if _is_nested(model):
                if not self._nested_targets(i, model):
                    raise InputError(f"{type(self).__name__}: models[{i}] "
                                     f"({type(model).__name__}) has no orientation to disperse")
                continue
            names = [p[0] for p in compartment_info(model)]
            if "mu" not in names and not is_isotropic(model):
                raise InputError(f"{type(self).__name__}: models[{i}] "
                                 f"({type(model).__name__}) has no orientation to disperse")
        if all(not _is_nested(m) and is_isotropic(m) for m in self.models):
            raise InputError(f"{type(self).__name__}: its models are all isotropic "
                             f"({', '.join(type(m).__name__ for m in self.models)}); an "
                             f"orientation distribution needs at least one oriented model")

    def fod(self, vertices: Any, **kwargs: Any) -> np.ndarray:
        """Orientation density (1/sr, integrates to 1 over the sphere) at unit vectors
        ``vertices`` (K, 3) for one set of distribution parameters (names as in
        :attr:`parameter_names`, e.g. ``SD1Watson_1_mu``/``mu`` and ``odi``)."""
        vertices = np.asarray(vertices, dtype=float).reshape(-1, 3)
        dist: dict[str, Any] = {}
        for key, value in kwargs.items():
            full = self.resolve_parameter_name(key)
            info = self._state.by_name()[full]
            if info.owner == -1:
                dist[info.local] = np.asarray(value, dtype=float)
        for link in self._state.links:  # distribution parameters fixed in this model
            info = self._state.by_name()[link.target]
            if info.owner == -1 and link.kind == "fixed" and info.local not in dist:
                dist[info.local] = np.asarray(link.value, dtype=float)
        missing = [name for name, *_ in self._distribution_parameters if name not in dist]
        if missing:
            raise InputError(f"fod needs {', '.join(missing)} of {self.distribution_name}")
        return self._density(vertices, dist)

    def _density(self, vertices: np.ndarray, dist: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError  # pragma: no cover

    @staticmethod
    def _kappa(odi: np.ndarray, name: str) -> np.ndarray:
        odi = np.asarray(odi, dtype=float)
        if not np.all((odi > 0) & (odi <= 1)):
            bad = odi[~((odi > 0) & (odi <= 1))][:3]
            raise InputError(f"{name} must be in (0, 1], got {bad.tolist()}")
        return np.maximum(odi2kappa(odi), 0.0)


class SD1WatsonDistributed(_SphericalDistributed):
    """Watson-dispersed compartments (e.g. stick and zeppelin for NODDI).

    Parameters: the compartments' (without ``mu``), ``SD1Watson_1_mu`` ([theta, phi],
    rad), ``SD1Watson_1_odi`` (orientation dispersion index, 0-1; concentration
    ``kappa = 1 / tan(odi pi / 2)``) and nested ``partial_volume_i``. Dispersion is exact
    (Legendre/Funk-Hecke per unique measurement, see the module docstring).
    """

    distribution_name = "SD1Watson"
    _distribution_parameters = (
        ("mu", 2, ((0.0, np.pi), (-np.pi, np.pi)), np.array([1.0, 1.0]), "orientation"),
        ("odi", 1, (0.02, 0.99), 1.0, "normal"),
    )
    _distribution_units = {"mu": ANGLE, "odi": DIMENSIONLESS}

    def __init__(self, models: Sequence[CompartmentModel],
                 parameter_links: Sequence[object] | None = None,
                 target_parameter: str = "mu") -> None:
        super().__init__(models, parameter_links, target_parameter)

    def _density(self, vertices: np.ndarray, dist: Mapping[str, np.ndarray]) -> np.ndarray:
        mu = np.asarray(dist["mu"], dtype=float).reshape(1, 2)
        kappa = float(self._kappa(np.atleast_1d(dist["odi"]), "SD1Watson_1_odi")[0])
        nodes, weights = gauss_legendre_unit(watson_quadrature_size(0, kappa))
        # integral over the sphere of exp(kappa (t^2 - 1)) = 4 pi int_0^1 exp(...) dt
        norm = 4.0 * np.pi * float(weights @ np.exp(kappa * (nodes * nodes - 1.0)))
        t = vertices @ mu_to_axes(mu)[0]
        return np.exp(kappa * (t * t - 1.0)) / norm

    def _signal_batch(self, ctx: _SchemeContext, local: Mapping[str, np.ndarray],
                      n: int) -> np.ndarray:
        per_model, dist, fractions = self._split(local, n)
        mu = dist["mu"].reshape(n, 2)
        _check_orientation(mu, "SD1Watson_1_mu")
        kappa = self._kappa(dist["odi"], "SD1Watson_1_odi")
        kmax = float(np.max(kappa)) if n else 1.0
        l_max = watson_order_for(kmax)
        n_even = l_max // 2 + 1
        q_half = _kernel_nodes(l_max)
        nodes, weights = gauss_legendre_unit(q_half)
        proj = legendre_even_matrix(nodes, l_max) * (weights[:, None]
                                                     * (4.0 * np.arange(n_even) + 1.0))
        uniq, inverse = ctx.unique
        n_unique = uniq.number_of_measurements
        meas_t = _tile_measurements(uniq, q_half, interleave=True)
        cos_t = np.tile(nodes, n_unique)[None, :]  # shared by every atom
        # compartments whose parameters are the same for every atom (e.g. NODDI's stick:
        # lambda_par fixed) have one set of kernel coefficients for the whole batch; the
        # others are projected atom by atom inside the fused kernel
        shared_k: list[int] = []
        shared_coef = []
        varying_k: list[int] = []
        for k, model in enumerate(self.models):
            params = per_model[k]
            if n > 1 and all(np.all(v == v[:1]) for v in params.values()):
                kern = _kernel(model, meas_t, cos_t, _rows(params, slice(0, 1)), 1)
                shared_k.append(k)
                shared_coef.append(np.asarray(kern).reshape(n_unique, q_half) @ proj)
            else:
                varying_k.append(k)
        scoef = np.stack(shared_coef) if shared_coef else None
        axes = mu_to_axes(mu)
        out = np.empty((n, ctx.meas.number_of_measurements))
        step = max(1, _BLOCK_VALUES // (n_unique * q_half))
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            nc = sl.stop - sl.start
            values = weights_v = None
            if len(varying_k) == 1:
                k = varying_k[0]
                values = _kernel(self.models[k], meas_t, cos_t, _rows(per_model[k], sl), nc)
                weights_v = fractions[sl, k]
            elif varying_k:
                values = np.zeros((nc, n_unique * q_half))
                for k in varying_k:
                    values += fractions[sl, k:k + 1] * _kernel(
                        self.models[k], meas_t, cos_t, _rows(per_model[k], sl), nc)
            watson_dispersed_sum(kappa[sl], axes[sl], ctx.directions, inverse, proj,
                                 kernel_values=values, kernel_weights=weights_v,
                                 shared_coefficients=scoef,
                                 shared_weights=fractions[sl][:, shared_k] if shared_k else None,
                                 tolerance=_SUM_TOLERANCE, out=out[sl])
        return out


def bingham_frame(mu: np.ndarray, psi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Main axis (n, 3) and second axis (n, 3) of Bingham distributions (dmipy's
    convention: the minimal rotation taking x to mu, applied to (0, cos psi, sin psi))."""
    axis1 = mu_to_axes(mu)
    x, y, z = axis1[:, 0], axis1[:, 1], axis1[:, 2]
    c, s = np.cos(psi), np.sin(psi)
    yz2 = y * y + z * z
    safe = yz2 > 1e-15
    d = np.where(safe, yz2, 1.0)
    # columns 2 and 3 of the rotation taking e_x to (x, y, z) about e_x x (x, y, z)
    col1 = np.stack([-y, (x * y * y + z * z) / d, (x - 1.0) * y * z / d], axis=1)
    col2 = np.stack([-z, (x - 1.0) * y * z / d, (y * y + x * z * z) / d], axis=1)
    # mu along +x: identity; along -x: rotation by pi about z
    sign = np.where(x > 0, 1.0, -1.0)
    col1 = np.where(safe[:, None], col1, np.stack([0 * x, sign, 0 * x], axis=1))
    col2 = np.where(safe[:, None], col2, np.stack([0 * x, 0 * x, 1.0 + 0 * x], axis=1))
    axis2 = c[:, None] * col1 + s[:, None] * col2
    return axis1, axis2


class SD2BinghamDistributed(_SphericalDistributed):
    """Bingham-dispersed compartments.

    Parameters: the compartments' (without ``mu``), ``SD2Bingham_1_mu`` ([theta, phi],
    rad), ``SD2Bingham_1_psi`` (rotation of the second axis about mu, rad),
    ``SD2Bingham_1_odi`` (0-1, ``kappa = 1 / tan(odi pi / 2)``),
    ``SD2Bingham_1_beta_fraction`` (``beta = beta_fraction * kappa``) and nested
    ``partial_volume_i``. Density ``exp(kappa (n.mu)^2 + beta (n.mu2)^2)`` integrated by
    2-D quadrature (normalisation computed numerically).
    """

    distribution_name = "SD2Bingham"
    _distribution_parameters = (
        ("mu", 2, ((0.0, np.pi), (-np.pi, np.pi)), np.array([1.0, 1.0]), "orientation"),
        ("psi", 1, (0.0, np.pi), 1.0, "circular"),
        ("odi", 1, (0.02, 0.99), 1.0, "normal"),
        ("beta_fraction", 1, (0.0, 1.0), 1.0, "normal"),
    )
    _distribution_units = {"mu": ANGLE, "psi": ANGLE, "odi": DIMENSIONLESS,
                           "beta_fraction": DIMENSIONLESS}

    def __init__(self, models: Sequence[CompartmentModel],
                 parameter_links: Sequence[object] | None = None,
                 target_parameter: str = "mu") -> None:
        super().__init__(models, parameter_links, target_parameter)

    def _density(self, vertices: np.ndarray, dist: Mapping[str, np.ndarray]) -> np.ndarray:
        mu = np.asarray(dist["mu"], dtype=float).reshape(1, 2)
        kappa = float(self._kappa(np.atleast_1d(dist["odi"]), "SD2Bingham_1_odi")[0])
        beta = float(np.asarray(dist["beta_fraction"], dtype=float).reshape(-1)[0]) * kappa
        e1, e2 = bingham_frame(mu, np.atleast_1d(np.asarray(dist["psi"], dtype=float)))
        # normalisation over the sphere: 2 x hemisphere product quadrature (frame coords)
        n_theta = 2 * (_BINGHAM_THETA + 2 * int(math.sqrt(kappa)))
        u, wu = gauss_legendre_unit(n_theta)
        phi = 2.0 * np.pi * np.arange(2 * _BINGHAM_PHI) / (2 * _BINGHAM_PHI)
        s2 = 1.0 - u[:, None] ** 2
        vals = np.exp(kappa * (u[:, None] ** 2 - 1.0) + beta * s2 * np.cos(phi)[None, :] ** 2)
        norm = 2.0 * float(wu @ vals.sum(axis=1)) * (2.0 * np.pi / phi.size)
        t1 = vertices @ e1[0]
        t2 = vertices @ e2[0]
        return np.exp(kappa * (t1 * t1 - 1.0) + beta * t2 * t2) / norm

    def _signal_batch(self, ctx: _SchemeContext, local: Mapping[str, np.ndarray],
                      n: int) -> np.ndarray:
        per_model, dist, fractions = self._split(local, n)
        mu = dist["mu"].reshape(n, 2)
        _check_orientation(mu, "SD2Bingham_1_mu")
        kappa = self._kappa(dist["odi"], "SD2Bingham_1_odi")
        bf = np.asarray(dist["beta_fraction"], dtype=float)
        if not np.all((bf >= 0) & (bf <= 1)):
            raise InputError("SD2Bingham_1_beta_fraction must be in [0, 1]")
        beta = bf * kappa
        e1, e2 = bingham_frame(mu, np.asarray(dist["psi"], dtype=float))
        e3 = np.cross(e1, e2)
        out = np.empty((n, ctx.meas.number_of_measurements))
        # each voxel's own quadrature order (from its own kappa), so a voxel's signal does
        # not depend on the other voxels evaluated with it
        orders = _BINGHAM_THETA + 2 * np.sqrt(np.maximum(kappa, 0.0)).astype(int)
        for n_theta in np.unique(orders):
            rows = np.flatnonzero(orders == n_theta)
            self._bingham_rows(ctx, per_model, fractions, kappa, beta, (e1, e2, e3), rows,
                               int(n_theta), out)
        return out

    def _bingham_rows(self, ctx: _SchemeContext, per_model: list[dict[str, np.ndarray]],
                      fractions: np.ndarray, kappa: np.ndarray, beta: np.ndarray,
                      frames: tuple[np.ndarray, np.ndarray, np.ndarray], rows: np.ndarray,
                      n_theta: int, out: np.ndarray) -> None:
        """Signals of the voxels ``rows`` (written into ``out``) with ``n_theta``
        Gauss-Legendre nodes in cos(theta) and :data:`_BINGHAM_PHI` in phi."""
        e1, e2, e3 = frames
        u, wu = gauss_legendre_unit(n_theta)
        phi = 2.0 * np.pi * np.arange(_BINGHAM_PHI) / _BINGHAM_PHI
        uu = np.repeat(u, _BINGHAM_PHI)
        pp = np.tile(phi, n_theta)
        ww = np.repeat(wu, _BINGHAM_PHI) * (2.0 * np.pi / _BINGHAM_PHI)
        ss = np.sqrt(np.clip(1.0 - uu * uu, 0.0, None))
        n_nodes = uu.size
        meas = ctx.meas
        n_meas = meas.number_of_measurements
        meas_t = _tile_measurements(meas, n_nodes, interleave=False)
        step = max(1, _BLOCK_VALUES // (n_nodes * n_meas))
        local_dirs = np.stack([uu, ss * np.cos(pp), ss * np.sin(pp)], axis=1)  # (K, 3)
        for start in range(0, rows.size, step):
            sl = rows[start:start + step]
            nc = sl.size
            frame = np.stack([e1[sl], e2[sl], e3[sl]], axis=1)  # (nc, 3 axes, 3)
            # (nc, K, 3) node directions and their cosines with the gradients (nc, K*N),
            # element by element (a row's values do not depend on the batch): several
            # times faster than einsum
            node_dirs = (local_dirs[None, :, 0, None] * frame[:, None, 0, :]
                         + local_dirs[None, :, 1, None] * frame[:, None, 1, :]
                         + local_dirs[None, :, 2, None] * frame[:, None, 2, :])
            logd = (kappa[sl, None] * uu[None, :] ** 2
                    + beta[sl, None] * (ss[None, :] * np.cos(pp)[None, :]) ** 2)
            logd -= logd.max(axis=1, keepdims=True)
            w = ww[None, :] * np.exp(logd)
            w /= w.sum(axis=1, keepdims=True)
            cos = cosines_to_axes(ctx.directions, node_dirs.reshape(-1, 3)).reshape(nc, -1)
            kern = np.zeros((nc, n_nodes * n_meas))
            for k, model in enumerate(self.models):
                kern += fractions[sl, k:k + 1] * _kernel(model, meas_t, cos,
                                                         _rows(per_model[k], sl), nc)
            out[sl] = weighted_node_sum(kern, np.ascontiguousarray(w), n_nodes)


class DD1GammaDistributed(DistributedModel):
    """Gamma-distributed cylinder (sphere, plane) sizes (AxCaliber-like).

    Parameters: the compartments' (without ``diameter``), ``DD1Gamma_1_alpha`` (shape,
    dimensionless), ``DD1Gamma_1_beta`` (scale of the *radius* distribution, m; scale
    1e-6 like dmipy) and nested ``partial_volume_i``. The radius density is weighted by
    the cross-section area (cylinders), volume (spheres) or separation (planes) as in
    dmipy, so the signal is the Gamma(alpha + 2, beta) (resp. alpha + 3, alpha + 1)
    average of the compartment signal with ``diameter = 2 r``.
    """

    distribution_name = "DD1Gamma"
    target_parameter = "diameter"
    _model_type = "SpatialDistributedModel"
    _distribution_parameters = (
        ("alpha", 1, (0.1, 30.0), 1.0, "normal"),
        ("beta", 1, (1e-3, 2.0), 1e-6, "normal"),
    )
    _distribution_units = {"alpha": DIMENSIONLESS, "beta": LENGTH}

    def __init__(self, models: Sequence[CompartmentModel],
                 parameter_links: Sequence[object] | None = None,
                 target_parameter: str = "diameter") -> None:
        super().__init__(models, parameter_links, target_parameter)

    _nestable = ("SphericalDistributedModel",)

    def _nested_targets(self, k: int, model: Any) -> tuple[str, ...]:
        names = [n for n in model.parameter_names if n.endswith("_diameter")]
        target = self._nested_target
        if target is not None and target != self.target_parameter:
            if target not in names:
                raise InputError(f"DD1GammaDistributed: target_parameter {target!r} is not a "
                                 f"free diameter of models[{k}] ({type(model).__name__}); "
                                 f"its diameters: {names}")
            return (str(target),)
        if len(names) != 1:
            raise InputError(f"DD1GammaDistributed: models[{k}] ({type(model).__name__}) has "
                             f"{len(names)} free diameters {names}; name the one to "
                             f"distribute with target_parameter")
        return (names[0],)

    def _check_models(self) -> None:
        kinds = set()
        for i, model in enumerate(self.models):
            names = {p[0]: p[4] for p in compartment_info(model)}
            if _is_nested(model):
                target = self._nested_targets(i, model)[0]
                inner = model.models[model.model_names.index(target[:-len("diameter")])] \
                    if target[:-len("diameter")] in model.model_names else None
                ptype = names[target] if inner is None else \
                    dict((p[0], p[4]) for p in compartment_info(inner)).get("diameter", "")
                kinds.add(self._kind(inner if inner is not None else model, ptype))
                continue
            if "diameter" not in names:
                raise InputError(f"DD1GammaDistributed: models[{i}] ({type(model).__name__}) "
                                 "has no diameter to distribute")
            kinds.add(self._kind(model, names["diameter"]))
        if len(kinds) > 1:
            raise IncompatibleModelsError("DD1GammaDistributed cannot mix planes, cylinders "
                                          "and spheres")
        self.normalization = kinds.pop()

    @staticmethod
    def _kind(model: Any, ptype: str) -> str:
        if ptype in ("sphere", "cylinder", "plane"):
            return ptype
        return "sphere" if is_isotropic(model) else "cylinder"

    def _shape(self, dist: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        alpha = np.asarray(dist["alpha"], dtype=float)
        beta = np.asarray(dist["beta"], dtype=float)
        if not np.all((alpha > 0) & np.isfinite(alpha)):
            raise InputError("DD1Gamma_1_alpha must be positive")
        if not np.all((beta > 0) & np.isfinite(beta)):
            raise InputError("DD1Gamma_1_beta must be positive (m)")
        power = {"sphere": 3.0, "cylinder": 2.0, "plane": 1.0}[self.normalization]
        return alpha + power, beta

    def _integrate(self, n: int, n_out: int, local: Mapping[str, np.ndarray],
                   evaluate: Any) -> np.ndarray:
        per_model, dist, fractions = self._split(local, n)
        shape, beta = self._shape(dist)
        k_nodes = _GAMMA_NODES
        out = np.zeros((n, n_out))
        step = max(1, _BLOCK_VALUES // (k_nodes * max(n_out, 1)))
        for start in range(0, n, step):
            sl = slice(start, min(n, start + step))
            nc = sl.stop - sl.start
            x, w = gauss_laguerre(shape[sl], k_nodes)
            radii = beta[sl, None] * x
            for k, model in enumerate(self.models):
                params = {name: np.repeat(v[sl], k_nodes, axis=0)
                          for name, v in per_model[k].items()}
                params[self._targets[k][0]] = 2.0 * radii.ravel()
                sig = evaluate(model, params, nc, k_nodes, sl)
                avg = np.einsum("nkj,nk->nj", sig.reshape(nc, k_nodes, n_out), w)
                out[sl] += fractions[sl, k:k + 1] * avg
        return out

    def _signal_batch(self, ctx: _SchemeContext, local: Mapping[str, np.ndarray],
                      n: int) -> np.ndarray:
        n_meas = ctx.meas.number_of_measurements

        def evaluate(model: Any, params: dict, nc: int, k_nodes: int, sl: slice
                     ) -> np.ndarray:
            if _is_nested(model):
                return np.asarray(model._signal_batch(ctx, params, nc * k_nodes))
            cos = None
            if not is_isotropic(model):
                mu = params["mu"].reshape(nc, k_nodes, 2)[:, 0]
                cos = np.repeat(axis_cosines(ctx.directions, mu), k_nodes, axis=0)
            return _kernel(model, ctx.meas, cos, params, nc * k_nodes)

        return self._integrate(n, n_meas, local, evaluate)

    def _spherical_mean_batch(self, ctx: _SchemeContext, local: Mapping[str, np.ndarray],
                              n: int) -> np.ndarray:
        shells = ctx.shells

        def evaluate(model: Any, params: dict, nc: int, k_nodes: int, sl: slice
                     ) -> np.ndarray:
            if _is_nested(model):
                return np.asarray(model._spherical_mean_batch(ctx, params, nc * k_nodes))
            return compartment_spherical_mean(model, shells, params, nc * k_nodes)

        return self._integrate(n, shells.number_of_measurements, local, evaluate)

    # ------------------------------------------------------------------ as a compartment
    def signal_from_cosines(self, meas: MeasurementSet, cosines: np.ndarray | None,
                            **local: np.ndarray) -> np.ndarray:
        """Signal (n, M) of measurements ``meas`` at the cosines (n, M) (or (1, M)) between
        each measurement's direction and the fibre axis, for parameters ``local`` (this
        model's names without its orientations): what an orientation distribution that
        holds this model integrates (dmipy's nested distributions)."""
        n = max((len(np.atleast_1d(v)) for v in local.values()), default=1)
        values = {k: np.broadcast_to(np.asarray(v, dtype=float),
                                     (n,) + np.shape(v)[1:] if np.ndim(v) else (n,))
                  for k, v in local.items()}
        n_meas = meas.number_of_measurements

        def evaluate(model: Any, params: dict, nc: int, k_nodes: int, sl: slice
                     ) -> np.ndarray:
            cos = None
            if not is_isotropic(model):
                c = np.asarray(cosines, dtype=float)
                c = c[sl] if c.shape[0] == n else np.broadcast_to(c, (nc, n_meas))
                cos = np.repeat(c, k_nodes, axis=0)
            return _kernel(model, meas, cos, params, nc * k_nodes)

        return self._integrate(n, n_meas, values, evaluate)

    def spherical_mean_batch(self, shells: MeasurementSet, **local: np.ndarray) -> np.ndarray:
        """Per-shell spherical mean (n, S) for parameters ``local`` (as a compartment of
        an orientation distribution, which leaves it unchanged)."""
        n = max((len(np.atleast_1d(v)) for v in local.values()), default=1)
        values = {k: np.broadcast_to(np.asarray(v, dtype=float), (n,)) for k, v in
                  local.items()}

        def evaluate(model: Any, params: dict, nc: int, k_nodes: int, sl: slice
                     ) -> np.ndarray:
            return compartment_spherical_mean(model, shells, params, nc * k_nodes)

        return self._integrate(n, shells.number_of_measurements, values, evaluate)
