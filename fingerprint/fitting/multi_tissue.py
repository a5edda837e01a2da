"""Multi-tissue fits: volume fractions next to signal fractions.

A compartment's fitted fraction is a *signal* fraction: its share of the voxel's b=0
signal. Tissues differ in proton density and T2, so each has its own b=0 signal per unit
volume, its S0 response (white matter, grey matter, CSF). Dividing each signal fraction
by its tissue's response and renormalising gives *volume* fractions, as dmipy's
multi-tissue models report (:func:`fingerprint.core.fitted_model.multi_tissue_fractions`,
the same computation as ``FittedMultiCompartmentModel.fitted_multi_tissue_fractions``).

The responses are given (one per top-level compartment, or one per tissue for a named
model whose recipe says which tissue each compartment is: ``tissues = ["csf", "wm"]``),
or estimated from the data's own single-tissue voxels (``'auto'``: white matter, grey
matter and CSF voxels chosen by fractional anisotropy and signal decay, Dhollander et
al. 2016, :mod:`fingerprint.tissue_response.three_tissue_response`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.fitted_model import multi_tissue_fractions
from fingerprint.core.modeling_framework import MultiCompartmentModelProperties as Model
from fingerprint.errors import InputError
from fingerprint.fitting.options import parse_responses
from fingerprint.models import recipe_for_model
from fingerprint.recipes import TISSUES
from fingerprint.tissue_response.three_tissue_response import (
    three_tissue_response_dhollander16,
)

logger = logging.getLogger(__name__)

__all__ = ["AUTO", "check_responses", "compartment_responses", "estimate_tissue_responses",
           "parse_responses", "volume_fraction_maps"]

#: Responses estimated from the data.
AUTO = "auto"
#: Voxels at most used to estimate the responses (a random subset beyond).
MAX_ESTIMATION_VOXELS = 200_000

Responses = Sequence[float] | Mapping[str, float] | str


def estimate_tissue_responses(scheme: AcquisitionScheme, data: np.ndarray,
                              seed: int = 0) -> dict[str, float]:
    """S0 responses {'wm', 'gm', 'csf'} (units of the data) of the single-tissue voxels
    of ``data`` (n, N), by Dhollander et al. (2016)'s selection."""
    arr = np.asarray(data, dtype=np.float64).reshape(-1, scheme.number_of_measurements)
    arr = arr[np.all(np.isfinite(arr), axis=1)]
    if arr.shape[0] > MAX_ESTIMATION_VOXELS:
        rng = np.random.default_rng(seed)
        arr = arr[rng.choice(arr.shape[0], MAX_ESTIMATION_VOXELS, replace=False)]
    try:
        s0, _, _ = three_tissue_response_dhollander16(scheme, arr)
    except InputError as exc:
        raise InputError(f"multi-tissue responses cannot be estimated from the data: {exc}; "
                         f"give them instead (wm=..,gm=..,csf=..)") from None
    out = {t: float(v) for t, v in zip(TISSUES, s0, strict=True)}
    logger.info("tissue S0 responses estimated from the data: %s",
                ", ".join(f"{k} {v:.4g}" for k, v in out.items()))
    return out


def compartment_responses(model: Model | str, responses: Responses, *,
                          scheme: AcquisitionScheme | None = None,
                          data: np.ndarray | None = None) -> tuple[float, ...]:
    """One S0 response per top-level compartment of ``model``: ``responses`` given per
    compartment, per tissue (``{'wm': .., 'csf': ..}``: needs the recipe's ``tissues``)
    or ``'auto'`` (estimated from ``data`` (n, N) measured with ``scheme``)."""
    recipe = recipe_for_model(model)
    obj = recipe.build_model() if isinstance(model, str) and recipe else model
    n = int(getattr(obj, "N_models", 0) or len(getattr(obj, "models", []) or []))
    if n < 2:
        raise InputError("multi-tissue fits need a model with at least two compartments")
    if isinstance(responses, str):
        if responses.lower() != AUTO:
            raise InputError(f"multi-tissue responses must be 'auto' or numbers, got "
                             f"{responses!r}")
        if scheme is None or data is None:
            raise InputError("estimating multi-tissue responses needs the data")
        responses = estimate_tissue_responses(scheme, data)
    if isinstance(responses, Mapping):
        tissues = recipe.tissues if recipe is not None else ()
        if not tissues:
            raise InputError("responses by tissue need a named model whose recipe lists its "
                             "compartments' tissues; give one response per compartment")
        missing = sorted(set(tissues) - set(responses))
        if missing:
            raise InputError(f"multi-tissue responses miss tissue(s) {missing} of the "
                             f"model's compartments {list(tissues)}")
        values = [float(responses[t]) for t in tissues]
    else:
        values = [float(v) for v in responses]
    if len(values) != n or not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"multi-tissue responses must be {n} positive numbers (one per "
                         f"top-level compartment), got {values}")
    return tuple(values)


def check_responses(model: Model | str, responses: Responses) -> None:
    """InputError when ``responses`` cannot apply to ``model`` (before any data are read):
    a model with fewer than two compartments, responses by tissue (or ``'auto'``, which
    estimates them by tissue) for a model whose recipe does not list its compartments'
    tissues, or a wrong count of per-compartment values. Text is parsed first
    (:func:`parse_responses`)."""
    if isinstance(responses, str):
        responses = parse_responses(responses)
    if isinstance(responses, str):  # 'auto
        recipe = recipe_for_model(model)
        obj = recipe.build_model() if isinstance(model, str) and recipe else model
        n = int(getattr(obj, "N_models", 0) or len(getattr(obj, "models", []) or []))
        if n < 2:
            raise InputError("multi-tissue fits need a model with at least two compartments")
        if recipe is None or not recipe.tissues:
            raise InputError("responses estimated from the data ('auto') are per tissue and "
                             "need a named model whose recipe lists its compartments' "
                             "tissues; give one response per compartment")
        return
    compartment_responses(model, responses)


def volume_fraction_maps(model: Model | str, parameters: Mapping[str, np.ndarray],
                         responses: Sequence[float]) -> dict[str, np.ndarray]:
    """Volume-fraction maps (label -> (n,) values adding to one) from fitted parameters
    (name -> values): ``<tissue>_vf`` per tissue when the recipe lists its compartments'
    tissues (compartments of one tissue summed), else ``partial_volume_<i>_vf``."""
    vf = multi_tissue_fractions(parameters, responses, normalized=True)
    recipe = recipe_for_model(model)
    tissues = recipe.tissues if recipe is not None else ()
    if not tissues:
        return {f"{name}_vf": values for name, values in vf.items()}
    out: dict[str, np.ndarray] = {}
    for name, values in vf.items():
        label = f"{tissues[int(name.rsplit('_', 1)[1])]}_vf"
        out[label] = out[label] + values if label in out else values
    return out
