"""Initial guesses from other fits (dmipy's cascades), shared by every solver.

``x0_vector`` is a parameter vector (P,) / (n, P), or a dict of (possibly short)
parameter names. A dict may also name a compartment's orientation that the model only
carries through a distribution: ``{'C1Stick_1_mu': ...}`` from a Ball-Stick fit given
to NODDI initialises the Watson axis of the bundle that holds the stick
(``SD1WatsonDistributed_1_SD1Watson_1_mu``); this is logged at INFO. Names that match
nothing are refused with the model's parameters listed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.errors import InputError

if TYPE_CHECKING:
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = ["resolve_x0_name", "x0_matrix"]


def _distributed_orientation(model: Any, key: str) -> list[str]:
    """Free orientations of distributed sub-models holding the compartment whose
    orientation ``key`` (``'<Compartment>_<i>_mu'``) names."""
    if not key.endswith("mu"):
        return []
    types = dict(model.parameter_types)
    out: list[str] = []
    for sub, prefix in zip(model.models, model.model_names, strict=True):
        inner = getattr(sub, "model_names", None)
        if not inner or not getattr(sub, "_is_distributed_model", False):
            continue
        for inner_prefix in inner:
            local = inner_prefix + "mu"
            if key in (local, prefix + local) or key.endswith("_" + local):
                out.extend(n for n in model.parameter_names
                           if n.startswith(prefix) and types.get(n) == "orientation")
    return sorted(set(out))


def resolve_x0_name(model: MultiCompartmentModelProperties, key: str) -> str:
    """The free parameter of ``model`` that the x0 entry ``key`` initialises."""
    try:
        return model.resolve_parameter_name(key, free_only=True)
    except InputError as exc:
        candidates = _distributed_orientation(model, str(key))
        if len(candidates) == 1:
            logger.info("x0 %r initialises %s (the orientation of the distribution "
                        "holding that compartment)", key, candidates[0])
            return candidates[0]
        if len(candidates) > 1:
            raise InputError(f"x0 {key!r} is ambiguous: it may initialise any of "
                             f"{candidates}; give the full name") from None
        raise InputError(f"x0 {key!r} is not a (unique) parameter of the model: {exc}; "
                         f"parameters: {list(model.parameter_names)}") from None


def x0_matrix(model: MultiCompartmentModelProperties, x0: Any, n: int) -> np.ndarray | None:
    """``x0`` (vector (P,) / (n, P), or dict of names) -> (n, P) with NaN where not
    given; None stays None."""
    if x0 is None:
        return None
    cards = model.parameter_cardinality
    P = int(sum(cards.values()))
    slices, pos = {}, 0
    for name, card in cards.items():
        slices[name] = slice(pos, pos + card)
        pos += card
    out = np.full((n, P), np.nan)
    if isinstance(x0, Mapping):
        for key, value in x0.items():
            name = resolve_x0_name(model, str(key))
            sl = slices[name]
            width = sl.stop - sl.start
            v = np.asarray(value, dtype=np.float64)
            try:
                v = np.broadcast_to(v.reshape(-1, width) if v.ndim >= 1 and
                                    v.size % width == 0 else v, (n, width))
            except ValueError:
                raise InputError(f"x0[{key!r}] has shape {np.shape(value)}; expected "
                                 f"({width},) or ({n}, {width})") from None
            out[:, sl] = v
        return out
    arr = np.asarray(x0, dtype=np.float64)
    if arr.ndim == 0 or arr.shape[-1] != P:
        raise InputError(f"x0_vector must end with the parameter-vector length {P} "
                         f"({', '.join(cards)}), got shape {arr.shape}")
    arr = arr.reshape(-1, P)
    if arr.shape[0] not in (1, n):
        raise InputError(f"x0_vector has {arr.shape[0]} rows for {n} voxels")
    out[:] = arr
    return out
