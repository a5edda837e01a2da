"""Initial guesses (``x0_vector``, dmipy's cascades): one parser for every solver.

``x0_vector`` is a parameter vector (P,) / (n, P), or a dict of (possibly short)
parameter names, each value one vector (broadcast) or one per voxel. A dict may also
name a compartment's orientation that the model only carries through a distribution:
``{'C1Stick_1_mu': ...}`` from a Ball-Stick fit given to NODDI initialises the Watson
axis of the bundle that holds the stick (``SD1WatsonDistributed_1_SD1Watson_1_mu``);
this is logged at INFO. Names that match nothing are refused with the model's
parameters listed.

Used by ``model.fit`` for every registered solver (dictionary matching, brute2fine, mix)
and by :meth:`fingerprint.fitting.estimator.FingerprintEstimator.estimate`, whose
parameter layout is its dictionary's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.initial_guess import X0Input
from fingerprint.core.parameter_layout import ParameterLayout
from fingerprint.errors import InputError

if TYPE_CHECKING:
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = ["X0Input", "resolve_x0_name", "voxel_fixed_matrix", "x0_matrix"]


def _distributed_orientation(model: Any, key: str, names: Sequence[str]) -> list[str]:
    """Orientations (among ``names``) of distributed sub-models holding the compartment
    whose orientation ``key`` (``'<Compartment>_<i>_mu'``) names."""
    if not key.endswith("mu"):
        return []
    types = dict(getattr(model, "parameter_types", {}) or {})
    out: list[str] = []
    for sub, prefix in zip(getattr(model, "models", ()), getattr(model, "model_names", ()),
                           strict=False):
        inner = getattr(sub, "model_names", None)
        if not inner or not getattr(sub, "_is_distributed_model", False):
            continue
        for inner_prefix in inner:
            local = inner_prefix + "mu"
            if key in (local, prefix + local) or key.endswith("_" + local):
                out.extend(n for n in names
                           if n.startswith(prefix) and types.get(n) == "orientation")
    return sorted(set(out))


def resolve_x0_name(model: MultiCompartmentModelProperties, key: str,
                    names: Sequence[str] | None = None, *,
                    what: str = "x0") -> str:
    """The free parameter (one of ``names``, default the model's free parameters) that
    the x0 entry ``key`` initialises: a full name, a unique ``_``-suffix, or a
    compartment's orientation carried by a distribution (see the module docstring).
    InputError when it names nothing or several parameters (``what`` names the input in
    messages)."""
    pool = list(model.parameter_names if names is None else names)
    key = str(key)
    reason = ""
    resolver = getattr(model, "resolve_parameter_name", None)
    if key in pool:
        return key
    if resolver is not None:
        try:
            full = resolver(key, free_only=True)
            if full in pool:
                return full
        except InputError as exc:
            reason = f": {exc}"
    else:
        matches = [p for p in pool if p.endswith("_" + key)]
        if len(matches) == 1:
            return matches[0]
    candidates = _distributed_orientation(model, key, pool)
    if len(candidates) == 1:
        logger.info("%s %r is taken for %s (the orientation of the distribution holding "
                    "that compartment)", what, key, candidates[0])
        return candidates[0]
    if len(candidates) > 1:
        raise InputError(f"{what} {key!r} is ambiguous: it may stand for any of "
                         f"{candidates}; give the full name")
    raise InputError(f"{what} {key!r} is not a (unique) parameter of the model{reason}; "
                     f"parameters: {pool}")


def x0_matrix(model: MultiCompartmentModelProperties, x0: X0Input | None, n: int,
              layout: ParameterLayout | None = None, *, what: str = "x0") -> np.ndarray | None:
    """``x0`` (vector (P,) / (n, P), or dict of names) -> (n, P) with NaN where not
    given; None stays None. ``layout`` is the parameter vector's layout (default: the
    model's free parameters in order, ``model.parameter_cardinality``). Also parses
    per-voxel fixed values (``what='fixed_parameters'`` in messages)."""
    if x0 is None:
        return None
    if layout is None:
        layout = ParameterLayout.from_cardinality(dict(model.parameter_cardinality))
    slices = layout.slices
    P = layout.size
    out = np.full((n, P), np.nan)
    if isinstance(x0, Mapping):
        for key, value in x0.items():
            name = resolve_x0_name(model, str(key), list(layout.names), what=what)
            sl = slices[name]
            width = sl.stop - sl.start
            try:
                v = np.asarray(value, dtype=np.float64)
                v = np.broadcast_to(v.reshape(-1, width) if v.ndim >= 1 and
                                    v.size % width == 0 else v, (n, width))
            except (TypeError, ValueError):
                raise InputError(f"{what}[{key!r}] has shape {np.shape(value)}; expected "
                                 f"({width},) or ({n}, {width}) numbers") from None
            out[:, sl] = v
        return out
    label = "x0_vector" if what == "x0" else what
    try:
        arr = np.asarray(x0, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(f"{label} must be numbers or a dict of parameter names, got "
                         f"{type(x0).__name__}") from None
    if arr.ndim == 0 or arr.shape[-1] != P:
        raise InputError(f"{label} must end with the parameter-vector length {P} "
                         f"({', '.join(layout.names)}), got shape {arr.shape}")
    arr = arr.reshape(-1, P)
    if arr.shape[0] not in (1, n):
        raise InputError(f"{label} has {arr.shape[0]} rows for {n} voxels")
    out[:] = arr
    return out


def voxel_fixed_matrix(model: MultiCompartmentModelProperties, fixed: X0Input | None,
                       n: int) -> np.ndarray | None:
    """Per-voxel fixed parameters (``fit(..., fixed_parameters=...)``: a dict of
    parameter names, each one value or one per voxel, or an (n, P) matrix with NaN
    where estimated) -> (n, P) with NaN in the estimated columns; None stays None.

    A fixed column needs a finite value in every voxel, within the parameter's bounds
    (fractions within [0, 1]); orientations are [theta, phi] in rad. InputError naming
    the parameter otherwise."""
    m = x0_matrix(model, fixed, n, what="fixed_parameters")
    if m is None:
        return None
    layout = ParameterLayout.from_cardinality(dict(model.parameter_cardinality))
    scales = np.asarray(model.scales_for_optimization, dtype=float)
    bounds = np.asarray(model.bounds_for_optimization, dtype=float).reshape(-1, 2) * \
        scales[:, None]
    types = dict(getattr(model, "parameter_types", {}) or {})
    pv = set(getattr(model, "partial_volume_names", []) or [])
    for name, sl in layout.slices.items():
        block = m[:, sl]
        if not np.isfinite(block).any():
            continue
        if not np.isfinite(block).all():
            raise InputError(f"fixed_parameters[{name!r}] must be finite in every voxel, got "
                             f"{int((~np.isfinite(block)).any(axis=1).sum())} voxel(s) "
                             f"without a value")
        if types.get(name) == "orientation":
            continue
        lo, hi = bounds[sl.start]
        if name in pv or "partial_volume_" in name:
            lo, hi = 0.0, 1.0
        if (block < lo).any() or (block > hi).any():
            raise InputError(f"fixed_parameters[{name!r}] must lie within [{lo:g}, {hi:g}] "
                             f"(SI units), got values from {block.min():g} to "
                             f"{block.max():g}")
    return m
