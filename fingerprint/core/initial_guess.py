"""Initial guesses and per-voxel fixed maps of multi-compartment models (dmipy's
``set_initial_guess_parameter`` and ``set_fixed_parameter`` with an array).

* **Initial guesses** (``model.set_initial_guess_parameter(name, value)``, SI units; one
  value, or one per voxel with the data's spatial shape) are starts:

  - the classical solvers (``'brute2fine'``, ``'mix'``) receive them as ``x0_vector``
    (a parameter given for every voxel replaces its brute-force grid axis and starts the
    refinement, as in dmipy); an ``x0_vector`` given to ``fit`` wins where both name a
    parameter;
  - dictionary matching needs no start, and a wrong one would bias it, so it ignores
    them while matching;
  - with every solver, the guess (completed by the fitted values where it names no
    value) is then compared with the fitted parameters voxel by voxel on the
    b0-normalised signal, and kept where its mean squared error is not larger: a fit
    never returns something that explains the data worse than the start it was given
    (dmipy's local optimisers never leave a start that is already optimal).

* **Per-voxel fixed maps** (``set_fixed_parameter(name, array)`` with one value per
  voxel): the parameter stays in ``parameter_names`` (dmipy's layout, so the fitted
  vector holds the fixed values) but is not estimated. The voxels are fitted in groups
  sharing one combination of fixed values, each group by a copy of the model with those
  values fixed (one dictionary per group for dictionary matching, hence a limit on the
  number of distinct combinations: :data:`MAX_FIXED_GROUPS`). Voxels whose fixed value
  is NaN are not fitted (a map taken from another fit that has no value there).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.backends import backend
from fingerprint.errors import InputError

if TYPE_CHECKING:  # type names only (the fitted model's module builds on this one)
    from numpy.typing import ArrayLike

    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.fitted_model import FittedMultiCompartmentModel
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = ["GUESS_START_SOLVERS", "MAX_FIXED_GROUPS", "X0Input", "fit_with_guesses",
           "merge_x0"]

#: What ``x0_vector`` may be: an array of parameter vectors or a dict name -> values.
X0Input = np.ndarray | Sequence[float] | Mapping[str, Any]

#: Solvers that take the initial guesses as starts (``x0_vector``).
GUESS_START_SOLVERS = ("brute2fine", "mix")
#: Distinct combinations of per-voxel fixed values fitted (one fit each; one dictionary
#: each for dictionary matching).
MAX_FIXED_GROUPS = 32


def _voxel_shape(card: int, arr: np.ndarray) -> tuple[int, ...]:
    """Spatial shape of a per-voxel guess / fixed map (() for a single value)."""
    return tuple(arr.shape) if card == 1 else tuple(arr.shape[:-1])


def guess_on_voxels(card: int, value: np.ndarray, spatial: tuple[int, ...], what: str
                    ) -> np.ndarray:
    """``value`` (one value or one per voxel) as spatial + (card,); InputError naming
    ``what`` when its voxel shape is not the data's."""
    shape = _voxel_shape(card, value)
    if shape not in ((), spatial):
        raise InputError(f"{what} has one value per voxel of shape {shape}, but the data's "
                         f"voxels have shape {spatial}")
    col = value[..., None] if card == 1 else value
    return np.broadcast_to(col, spatial + (card,))


def merge_x0(model: MultiCompartmentModelProperties, guesses: Mapping[str, np.ndarray],
             x0_vector: X0Input | None) -> X0Input | None:
    """The ``x0_vector`` a solver receives: the model's initial guesses, overridden by
    the entries of an explicit ``x0_vector`` (a dict of names, or parameter vectors whose
    NaN entries the guesses fill)."""
    if not guesses:
        return x0_vector
    if x0_vector is None:
        return dict(guesses)
    if isinstance(x0_vector, Mapping):
        out = dict(guesses)
        for key, value in x0_vector.items():
            try:
                full = model.resolve_parameter_name(str(key), free_only=True)
            except InputError:
                full = str(key)  # resolved (or refused) by the solver's x0 parser
            out[full] = value
        return out
    arr = np.asarray(x0_vector, dtype=float)
    given = model.parameter_initial_guess_to_parameter_vector(**guesses)
    try:
        return np.where(np.isnan(arr), given, arr)
    except ValueError:
        raise InputError(f"x0_vector of shape {arr.shape} does not broadcast with the "
                         f"model's initial guesses ({given.shape})") from None


def _normalised_error(model: Any, scheme: Any, data: np.ndarray, vectors: np.ndarray
                      ) -> np.ndarray:
    """Mean squared error (n,) of parameter vectors (n, P) on b0-normalised signals
    (n, N) (shell means for spherical-mean models); inf where not finite."""
    b0 = np.asarray(scheme.b0_mask, dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        s0 = data[:, b0].mean(axis=1) if b0.any() else np.ones(data.shape[0])
        y = data / s0[:, None]
    pred = np.asarray(model.simulate_signal(scheme, vectors))
    if bool(getattr(model, "is_spherical_mean", False)):
        shells = np.asarray(scheme.shell_indices)
        y = np.stack([y[:, shells == s].mean(axis=1) for s in range(int(shells.max()) + 1)],
                     axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.mean((y - pred) ** 2, axis=1)
    return np.where(np.isfinite(err), err, np.inf)


def keep_better_guesses(model: MultiCompartmentModelProperties,
                        fitted: FittedMultiCompartmentModel, data: ArrayLike,
                        guesses: Mapping[str, np.ndarray]) -> int:
    """Replace, in ``fitted`` (in place), the parameters of the valid voxels where the
    initial guess (completed by the fitted values) fits the b0-normalised signal at least
    as well; returns the number of voxels changed."""
    arr = np.asarray(data, dtype=np.float64)
    spatial = fitted.mask.shape
    use = fitted.mask & fitted.valid
    if not use.any():
        return 0
    layout = model.parameter_layout
    candidate = np.array(fitted.fitted_parameters_vector[use], dtype=float)
    named = 0
    for name, value in guesses.items():
        sl = layout.slices[name]
        full = guess_on_voxels(sl.stop - sl.start, np.asarray(value, dtype=float), spatial,
                               f"initial guess of {name}")[use]
        candidate[:, sl] = np.where(np.isfinite(full), full, candidate[:, sl])
        named += 1
    if not named:
        return 0
    scheme = fitted.acquisition_scheme
    signals = arr[use]
    err_guess = _normalised_error(model, scheme, signals, candidate)
    err_fit = _normalised_error(model, scheme, signals, fitted.fitted_parameters_vector[use])
    keep = np.isfinite(err_guess) & (err_guess <= err_fit)
    if keep.any():
        rows = np.flatnonzero(use.ravel())[keep]
        vec = fitted.fitted_parameters_vector.reshape(-1, candidate.shape[1])
        vec[rows] = candidate[keep]
        for estimate in (fitted.mse_estimate,):
            if estimate is not None and np.shape(estimate) == spatial:
                np.asarray(estimate).reshape(-1)[rows] = err_guess[keep]
        logger.info("initial guess kept in %d of %d voxels (it fits the signal at least as "
                    "well as the %s fit)", int(keep.sum()), int(use.sum()), fitted.solver)
    return int(keep.sum())


def fit_with_guesses(model: MultiCompartmentModelProperties,
                     acquisition_scheme: AcquisitionScheme, data: ArrayLike,
                     mask: ArrayLike | None,
                     solver: str, kwargs: dict[str, Any]) -> FittedMultiCompartmentModel:
    """``model.fit`` with the model's initial guesses and per-voxel fixed maps (see the
    module docstring); plain models go straight to the fitting core."""
    state = model._state
    if state.voxel_fixed:
        return _fit_voxel_fixed(model, acquisition_scheme, data, mask, solver, kwargs)
    guesses = dict(state.guesses)
    x0 = kwargs.pop("x0_vector", None)
    if guesses and str(solver) in GUESS_START_SOLVERS:
        x0 = merge_x0(model, guesses, x0)
    if guesses:
        spatial = np.shape(data)[:-1]
        cards = model.parameter_cardinality
        for name, value in guesses.items():  # refuse a wrong voxel shape before fitting
            guess_on_voxels(int(cards[name]), value, tuple(spatial),
                            f"initial guess of {name}")
    if x0 is not None:
        kwargs = {**kwargs, "x0_vector": x0}
    fitted: FittedMultiCompartmentModel = backend("fit")(
        model, acquisition_scheme, data, mask=mask, solver=solver, **kwargs)
    if guesses:
        keep_better_guesses(model, fitted, data, guesses)
    return fitted


def _fit_voxel_fixed(model: Any, acquisition_scheme: Any, data: Any, mask: Any,
                     solver: str, kwargs: dict[str, Any]) -> FittedMultiCompartmentModel:
    """Fit a model with per-voxel fixed maps, one group of voxels per distinct
    combination of fixed values."""
    state = model._state
    arr = np.asarray(data)
    if arr.ndim == 0:
        raise InputError(f"data must end in the measurements axis, got shape {arr.shape}")
    spatial = tuple(arr.shape[:-1])
    cards = model.parameter_cardinality
    layout = model.parameter_layout
    maps = {name: guess_on_voxels(int(cards[name]), value, spatial, f"fixed map of {name}")
            for name, value in state.voxel_fixed}
    if mask is None:
        b0 = np.asarray(acquisition_scheme.b0_mask, dtype=bool)
        with np.errstate(invalid="ignore"):
            s0 = arr[..., b0].mean(axis=-1) if b0.any() else np.ones(spatial)
            use = np.isfinite(s0) & (s0 > 0)
    else:
        use = np.asarray(mask, dtype=bool)
        if use.shape != spatial:
            raise InputError(f"mask has shape {use.shape}; expected the data's spatial "
                             f"shape {spatial}")
    if not use.any():
        raise InputError("no voxel to fit (empty mask, or no voxel with a positive mean "
                         "b=0 signal)")
    stacked = np.concatenate([maps[n] for n in maps], axis=-1)  # spatial + (k,)
    missing = use & np.isnan(stacked).any(axis=-1)
    if missing.any():
        logger.warning("%d voxel(s) of the mask have no value (NaN) in a per-voxel fixed "
                       "map: not fitted", int(missing.sum()))
        use = use & ~missing
        if not use.any():
            raise InputError("no voxel to fit: every voxel of the mask has NaN in a "
                             "per-voxel fixed map")
    combos, inverse = np.unique(stacked[use], axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    if combos.shape[0] > MAX_FIXED_GROUPS:
        raise InputError(f"the per-voxel fixed maps of {', '.join(maps)} take "
                         f"{combos.shape[0]} distinct combinations in the mask; each needs "
                         f"its own fit (and dictionary), at most {MAX_FIXED_GROUPS} are "
                         f"fitted: use fewer distinct values")
    x0 = kwargs.pop("x0_vector", None)
    if x0 is not None and not isinstance(x0, Mapping):
        x0 = {k: v for k, v in model.parameter_vector_to_parameters(
            np.asarray(x0, dtype=float)).items() if k not in maps}
    elif isinstance(x0, Mapping):
        x0 = {k: v for k, v in x0.items() if k not in maps}
    P = int(sum(cards.values()))
    params = np.zeros(spatial + (P,))
    unc = np.zeros(spatial + (P,))
    s0_map = np.zeros(spatial)
    valid = np.zeros(spatial, dtype=bool)
    r2 = np.zeros(spatial)
    mse = np.zeros(spatial)
    positions = np.argwhere(use)
    fitted_scheme, solver_name = acquisition_scheme, str(solver)
    fitted_type: Any = None
    for g, combo in enumerate(combos):
        sub = model.copy()
        sub._state = replace(state, voxel_fixed=())
        pos = 0
        for name in maps:
            card = int(cards[name])
            value = combo[pos:pos + card]
            pos += card
            sub.set_fixed_parameter(name, float(value[0]) if card == 1 else value)
        group = np.zeros(spatial, dtype=bool)
        group[tuple(positions[inverse == g].T)] = True
        kw = dict(kwargs)
        if x0:
            kw["x0_vector"] = x0
        part = sub.fit(acquisition_scheme, data, mask=group, solver=solver, **kw)
        fitted_scheme, solver_name = part.acquisition_scheme, part.solver
        fitted_type = type(part)
        sub_params = part.fitted_parameters
        sub_unc = part.uncertainty_parameters
        for name, sl in layout.slices.items():
            if name in maps:
                params[group, sl] = maps[name][group]
                continue
            params[group, sl] = np.asarray(sub_params[name])[group].reshape(
                -1, sl.stop - sl.start)
            if sub_unc is not None:
                unc[group, sl] = np.asarray(sub_unc[name])[group].reshape(
                    -1, sl.stop - sl.start)
        s0_map[group] = part.S0[group]
        valid[group] = part.valid[group]
        if part.r2_estimate is not None:
            r2[group] = np.asarray(part.r2_estimate)[group]
        if part.mse_estimate is not None:
            mse[group] = np.asarray(part.mse_estimate)[group]
    params[use & ~valid] = np.nan
    logger.info("per-voxel fixed %s: %d group(s) of voxels fitted", ", ".join(maps),
                combos.shape[0])
    out: FittedMultiCompartmentModel = fitted_type(
        model, fitted_scheme, params, mask=use, S0=s0_map, uncertainty=unc, valid=valid,
        r2=r2, mse=mse, solver=solver_name)
    return out
