"""``fit_model``: what ``MultiCompartmentModel.fit`` runs.

It finds (or builds, once) the model's dictionary for the scheme, gets the matching
estimator (kept in a small in-process cache, so fitting the same model again -- from any
thread -- reuses the loaded dictionary and FAISS index), fits the voxels in ``mask`` and
wraps the result in a :class:`~fingerprint.core.fitted_model.FittedMultiCompartmentModel`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np

from fingerprint.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["DMIPY_IGNORED_OPTIONS", "DMIPY_SOLVERS", "clear_estimator_cache", "fit_model",
           "get_estimator"]

#: dmipy's solver names: accepted (and answered by dictionary matching) so that ported
#: scripts run unchanged.
DMIPY_SOLVERS = ("brute2fine", "mix", "amico")
#: dmipy ``fit`` keywords of its optimisers, meaningless for dictionary matching: accepted
#: and ignored (``number_of_processors`` and ``use_parallel_processing`` set ``n_jobs``).
DMIPY_IGNORED_OPTIONS = ("Ns", "N_sphere_samples", "maxiter", "hard_constraints",
                         "lambda_inf", "lambda_1")

_CACHE: OrderedDict[tuple, Any] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_BUILD_LOCKS: dict[tuple, threading.Lock] = {}
_MAX_CACHED = 4
#: Best atoms added to the estimate as starts of the non-linear refinement.
NONLINEAR_STARTS = 3


def clear_estimator_cache() -> None:
    """Forget the estimators kept by :func:`get_estimator`."""
    with _CACHE_LOCK:
        _CACHE.clear()
        _BUILD_LOCKS.clear()


def get_estimator(model: Any, scheme: Any, *, dictionary_size: int | None = None,
                  dictionary_dir: str | os.PathLike | None = None, n_jobs: int | None = None,
                  progress: Any = None, should_cancel: Any = None,
                  **options: Any) -> Any:
    """The :class:`~fingerprint.fitting.estimator.FingerprintEstimator` of ``model`` on
    ``scheme`` (cached per model spec, scheme, dictionary and options)."""
    from fingerprint.fitting.estimator import FingerprintEstimator

    spec_hash = getattr(model, "spec_hash", None) if not isinstance(model, str) else model
    key = (str(spec_hash), str(scheme.hash), dictionary_size,
           None if dictionary_dir is None else os.fspath(dictionary_dir), n_jobs,
           tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _CACHE_LOCK:
        est = _CACHE.get(key)
        if est is not None:
            _CACHE.move_to_end(key)
            return est
        lock = _BUILD_LOCKS.setdefault(key, threading.Lock())
    with lock:
        with _CACHE_LOCK:
            est = _CACHE.get(key)
        if est is None:
            est = FingerprintEstimator.from_model(
                model, scheme, dictionary_size=dictionary_size,
                dictionary_dir=dictionary_dir, n_jobs=n_jobs, progress=progress,
                should_cancel=should_cancel, **options)
            with _CACHE_LOCK:
                _CACHE[key] = est
                while len(_CACHE) > _MAX_CACHED:
                    _CACHE.popitem(last=False)
    return est


def _check_options(options: Mapping[str, Any]) -> None:
    import inspect

    from fingerprint.fitting.estimator import FingerprintEstimator

    known = set(inspect.signature(FingerprintEstimator.__init__).parameters) - {
        "self", "model", "scheme", "atom_parameters", "atom_features", "dictionary",
        "parameter_names", "parameter_cardinality", "canonical_orientation",
        "simplex_names"}
    known |= {"seed", "should_cancel"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise InputError(f"unknown fit option(s) {unknown}; fingerprint options: "
                         f"{sorted(known)}")


def _x0_flat(x0_vector: Any, spatial: tuple[int, ...], use: np.ndarray) -> Any:
    """Select the masked voxels of an x0 given per voxel; pass broadcast ones through."""
    if x0_vector is None:
        return None
    if isinstance(x0_vector, Mapping):
        out = {}
        for k, v in x0_vector.items():
            arr = np.asarray(v, dtype=np.float64)
            if spatial and arr.shape[:len(spatial)] == spatial:
                out[k] = arr[use]
            else:
                out[k] = arr
        return out
    arr = np.asarray(x0_vector, dtype=np.float64)
    if spatial and arr.shape[:-1] == spatial:
        return arr[use]
    if arr.ndim == 1:
        return arr
    raise InputError(f"x0_vector has shape {arr.shape}; expected (P,) or the data's "
                     f"spatial shape {spatial} + (P,)")


def _polish(est: Any, model: Any, scheme: Any, data: np.ndarray, ve: Any, starts: int,
            max_nfev: Any, n_jobs: int | None, method: str = "batched") -> None:
    """Polish the valid voxels of ``ve`` in place by non-linear least squares, started
    from the estimate and (signal features) the ``starts`` best atoms."""
    import time

    from fingerprint.fitting.nonlinear import (
        DEFAULT_MAX_NFEV,
        goodness_of_fit,
        refine_nonlinear,
    )

    rows = np.flatnonzero(ve.valid)
    if rows.size == 0:
        return
    t0 = time.perf_counter()
    y = data[rows] / ve.s0[rows, None]
    x0 = ve.parameters[rows][:, None, :]
    fmap = est.feature_map
    if starts > 1 and fmap.kind == "signal":
        _, idx = est.matcher.search(fmap.voxel_features(y), starts)
        atoms = est.atom_parameters[np.maximum(idx, 0)].astype(np.float64)
        atoms[idx < 0] = np.nan
        x0 = np.concatenate([x0, atoms], axis=1)
    polished = refine_nonlinear(model, scheme, y, x0, n_jobs=n_jobs,
                                max_nfev=int(max_nfev or DEFAULT_MAX_NFEV), method=method)
    ve.parameters[rows] = polished
    ve.r2[rows], ve.mse[rows] = goodness_of_fit(model, scheme, y, polished)
    logger.info("non-linear refinement of %d voxels from %d start(s) each: %.3g s",
                rows.size, x0.shape[1], time.perf_counter() - t0)


def fit_model(model: Any, acquisition_scheme: Any, data: Any, mask: Any = None,
              solver: str = "fingerprint", x0_vector: Any = None, n_jobs: int | None = None,
              dictionary_size: int | None = None,
              dictionary_dir: str | os.PathLike | None = None, refine: bool | str = True,
              n_neighbors: int | None = None, progress: Any = None,
              **options: Any) -> Any:
    """Fit ``model`` to ``data`` (..., N) measured with ``acquisition_scheme``.

    Parameters
    ----------
    model: a MultiCompartmentModel / MultiCompartmentSphericalMeanModel.
    acquisition_scheme: the AcquisitionScheme of the last axis of ``data``.
    data: raw signals, any shape ending in N measurements.
    mask: bool array of data.shape[:-1]; voxels to fit (default: every voxel whose mean b0
        signal is positive).
    solver: ``'fingerprint'`` (dmipy's ``'brute2fine'``, ``'mix'`` and ``'amico'`` are
        accepted and also answered by dictionary matching).
    x0_vector: initial guess: parameter vectors (P,) or data.shape[:-1] + (P,), or a dict
        of (possibly short) parameter names; NaN entries are estimated. A given
        orientation fixes the fibre frame (e.g. from a Ball-Stick fit).
    n_jobs: threads for FAISS, BLAS and Numba.
    dictionary_size, dictionary_dir: dictionary atoms and directory (default: the
        recipe's size, the user cache directory).
    refine: local-linear refinement after matching; ``'nonlinear'`` adds a bounded
        non-linear least-squares polish of the matched parameters on the signals
        (:func:`~fingerprint.fitting.nonlinear.refine_nonlinear`), which models with
        more than one orientation get by default (``False`` turns both off).
        It starts from the estimate and, for models matched on the signal itself, the
        ``nonlinear_starts`` (default 3) best atoms; ``nonlinear_max_nfev`` limits the
        residual evaluations per start; ``nonlinear_method`` is ``'batched'`` (default:
        all voxels advance together) or ``'scipy'`` (voxel by voxel, the reference).
    n_neighbors: atoms matched per voxel.
    options: further :class:`~fingerprint.fitting.estimator.FingerprintEstimator`
        options (``rician``, ``matcher_method``, ``frame_iterations``, ...). dmipy's
        ``number_of_processors`` / ``use_parallel_processing`` set ``n_jobs``; its
        optimiser settings (``Ns``, ``N_sphere_samples``, ``maxiter``, ...) are ignored.

    Returns
    -------
    FittedMultiCompartmentModel
    """
    from fingerprint.core.fitted_model import FittedMultiCompartmentModel

    processors = options.pop("number_of_processors", None)
    if processors is not None and n_jobs is None:
        n_jobs = int(processors)
    if options.pop("use_parallel_processing", True) is False and n_jobs is None:
        n_jobs = 1
    for name in DMIPY_IGNORED_OPTIONS:
        if name in options:
            logger.info("fit option %r is for dmipy's optimisers; ignored", name)
            options.pop(name)
    starts = int(options.pop("nonlinear_starts", NONLINEAR_STARTS))
    max_nfev = options.pop("nonlinear_max_nfev", None)
    method = str(options.pop("nonlinear_method", "batched"))
    _check_options(options)
    nonlinear = isinstance(refine, str) and refine.lower() == "nonlinear"
    if isinstance(refine, str) and not nonlinear:
        raise InputError(f"refine must be True, False or 'nonlinear', got {refine!r}")
    if refine is not False and len(model.orientation_parameter_names) > 1:
        nonlinear = True
    solver_name = str(solver).lower()
    if solver_name in DMIPY_SOLVERS:
        logger.info("solver %r: fitting by dictionary matching instead", solver)
    elif solver_name != "fingerprint":
        raise InputError(f"unknown solver {solver!r}; use 'fingerprint' (dmipy's "
                         f"{', '.join(DMIPY_SOLVERS)} are accepted as aliases)")
    if not (hasattr(acquisition_scheme, "number_of_measurements")
            and hasattr(acquisition_scheme, "b0_mask")):
        raise InputError(f"acquisition_scheme must be an AcquisitionScheme (see "
                         f"acquisition_scheme_from_bvalues or read_bvals_bvecs), got "
                         f"{type(acquisition_scheme).__name__}")
    if n_jobs is not None and (isinstance(n_jobs, bool) or int(n_jobs) < 1):
        raise InputError(f"n_jobs must be a positive number of threads or None (all "
                         f"cores), got {n_jobs!r}")
    raw = np.asarray(data)
    if raw.dtype.kind not in "biuf":
        raise InputError(f"data must be real-valued signal magnitudes (a numeric array), "
                         f"got dtype {raw.dtype}")
    arr = raw.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):
        top = np.max(np.abs(arr), initial=0.0, where=np.isfinite(arr))
    if top > np.finfo(np.float32).max:
        raise InputError(f"data holds values up to {top:.3g}, beyond the float32 range "
                         f"signals are matched in; rescale the data (the fit only depends "
                         f"on signal ratios)")
    n_meas = int(acquisition_scheme.number_of_measurements)
    if arr.ndim == 0 or arr.shape[-1] != n_meas:
        raise InputError(f"data has shape {arr.shape}; its last axis must hold the "
                         f"{n_meas} measurements of the acquisition scheme")
    spatial = arr.shape[:-1]
    b0 = np.asarray(acquisition_scheme.b0_mask, dtype=bool)
    if mask is None:
        with np.errstate(invalid="ignore"):
            s0 = arr[..., b0].mean(axis=-1) if b0.any() else np.ones(spatial)
        use = np.isfinite(s0) & (s0 > 0)
        if use.size and not use.any():
            raise InputError("no voxel of data has a positive mean b=0 signal (all zero, "
                             "negative or NaN?); nothing to fit")
    else:
        mask_arr = np.asarray(mask)
        if mask_arr.dtype.kind == "f" and not np.all(np.isfinite(mask_arr)):
            raise InputError("mask contains NaN or infinite values; expected a boolean array")
        use = mask_arr.astype(bool)
        if use.shape != spatial:
            raise InputError(f"mask has shape {use.shape}; expected the data's spatial "
                             f"shape {spatial}")
        if use.size and not use.any():
            raise InputError("mask is empty (no voxel selected)")
    est = get_estimator(model, acquisition_scheme, dictionary_size=dictionary_size,
                        dictionary_dir=dictionary_dir, n_jobs=n_jobs, progress=progress,
                        refine=bool(refine), n_neighbors=n_neighbors, **options)
    ve = est.estimate(arr[use], x0=_x0_flat(x0_vector, spatial, use))
    if nonlinear:
        _polish(est, model, acquisition_scheme, arr[use], ve, starts, max_nfev, n_jobs,
                method)
    P = est.n_parameters
    params = np.zeros(spatial + (P,))
    unc = np.zeros(spatial + (P,))
    s0_map = np.zeros(spatial)
    valid = np.zeros(spatial, dtype=bool)
    r2 = np.zeros(spatial)
    mse = np.zeros(spatial)
    params[use] = ve.parameters
    unc[use] = ve.uncertainty
    s0_map[use] = ve.s0
    valid[use] = ve.valid
    r2[use] = ve.r2
    mse[use] = ve.mse
    return FittedMultiCompartmentModel(model, acquisition_scheme, params, mask=use, S0=s0_map,
                                       uncertainty=unc, valid=valid, r2=r2, mse=mse,
                                       estimator=est)
