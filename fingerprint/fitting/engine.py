"""The one fitting core: what ``model.fit``, ``fit_volume``, ``fingerprint fit`` and the lab
server run.

* :func:`prepare_fitter` turns a model, a scheme and
  :class:`~fingerprint.fitting.options.FitOptions` into a
  :class:`~fingerprint.fitting.registry.VoxelFitter` of the registered solver named by
  ``options.solver`` (the built-in ``'fingerprint'``: dictionary matching through an
  estimator from the process's one :data:`ESTIMATORS` cache, then the non-linear polish
  for models with more than one orientation or ``refine='nonlinear'``);
* :func:`fit_voxels` fits voxels (n, N) with it, leaving out the unusable ones
  (:mod:`fingerprint.fitting.validity`);
* :func:`fit_model` (``model.fit``) is arrays in, fitted model out around those two;
  :func:`fingerprint.fitting.pipeline.fit_volume` is the chunked NIfTI adapter around the
  same two.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping

import numpy as np

import fingerprint.fitting.solvers  # noqa: F401  (registers brute2fine, mix, amico's refusal)
from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.backends import register_backend
from fingerprint.core.fitted_model import FittedMultiCompartmentModel
from fingerprint.core.modeling_framework import MultiCompartmentModelProperties as Model
from fingerprint.core.scheme_checks import prepare_scheme
from fingerprint.dictionary import open_dictionary
from fingerprint.errors import InputError
from fingerprint.fitting import dti as _dti  # noqa: F401  (registers the 'dti' solver)
from fingerprint.fitting.estimator import FingerprintEstimator, VoxelEstimates
from fingerprint.fitting.initial import voxel_fixed_matrix, x0_matrix
from fingerprint.fitting.multifascicle import (
    MultiFascicleFitter,
    MultiFascicleSettings,
    is_multifascicle,
)
from fingerprint.fitting.nonlinear import DEFAULT_MAX_NFEV, goodness_of_fit, refine_nonlinear
from fingerprint.fitting.options import (
    CLASSICAL_OPTION_NAMES,
    DMIPY_IGNORED_OPTIONS,
    DMIPY_SOLVERS,
    FitOptions,
    PolishSettings,
)
from fingerprint.fitting.posterior import rician_posterior
from fingerprint.fitting.registry import (
    BUILTIN_SOLVER,
    SolverRequest,
    VoxelFitter,
    get_solver,
    register_solver,
)
from fingerprint.fitting.validity import default_mask, report_unusable, usable_voxels
from fingerprint.models import (
    get_model,
    model_count_penalty,
    model_posterior_neighbors,
    model_refine,
    model_solver,
)
from fingerprint.stages import stage
from fingerprint.volume_models import is_volume_model

logger = logging.getLogger(__name__)

__all__ = ["DMIPY_IGNORED_OPTIONS", "DMIPY_SOLVERS", "ESTIMATORS", "EstimatorCache",
           "FingerprintFitter", "clear_estimator_cache", "dictionary_cache_key", "effective_solver",
           "estimator_for_dictionary", "fitter_for_estimator",
           "fit_model", "fit_voxels", "get_estimator", "prepare_fitter", "runs_per_voxel_fit"]

ProgressCallback = Callable[[float], object]

_NO_VOXEL_FIXED = ("per-voxel fixed parameters (fixed_parameters) need solver='brute2fine' "
                   "or 'mix' (they fit voxel by voxel); a dictionary holds one value of each "
                   "fixed parameter, so dictionary matching cannot hold a different value "
                   "in every voxel")
CancelCheck = Callable[[], bool]

#: Estimators kept per process (dictionary and FAISS index loaded once).
_MAX_CACHED = 4
#: Best atoms added to the estimate as starts of the non-linear refinement.
NONLINEAR_STARTS = PolishSettings().starts


class EstimatorCache:
    """The process's one cache of loaded estimators (least recently used evicted),
    keyed by model spec + scheme + dictionary + options, or by a stored dictionary's path
    + options (executor workers). Building one key happens once even when several threads
    ask for it at the same time."""

    def __init__(self, size: int = _MAX_CACHED) -> None:
        self.size = int(size)
        self._items: OrderedDict[Hashable, FingerprintEstimator] = OrderedDict()
        self._lock = threading.Lock()
        self._building: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, build: Callable[[], FingerprintEstimator]
            ) -> FingerprintEstimator:
        """The estimator of ``key``, built by ``build()`` when missing."""
        with self._lock:
            est = self._items.get(key)
            if est is not None:
                self._items.move_to_end(key)
                return est
            lock = self._building.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                est = self._items.get(key)
            if est is None:
                est = build()
                self.put(key, est)
        with self._lock:
            self._building.pop(key, None)
        return est

    def put(self, key: Hashable, est: FingerprintEstimator) -> None:
        """Keep ``est`` under ``key``."""
        with self._lock:
            self._items[key] = est
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def pop(self, key: Hashable) -> None:
        """Forget ``key``."""
        with self._lock:
            self._items.pop(key, None)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def clear(self) -> None:
        """Forget every estimator."""
        with self._lock:
            self._items.clear()
            self._building.clear()


#: The estimator cache of this process (``model.fit``, ``fit_volume`` and their workers).
ESTIMATORS = EstimatorCache()


def clear_estimator_cache() -> None:
    """Forget the estimators kept by :func:`get_estimator`."""
    ESTIMATORS.clear()


def _options_key(options: Mapping[str, object]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def get_estimator(model: Model | str, scheme: AcquisitionScheme, *,
                  dictionary_size: int | None = None,
                  dictionary_dir: str | os.PathLike[str] | None = None,
                  n_jobs: int | None = None, progress: ProgressCallback | None = None,
                  should_cancel: CancelCheck | None = None, seed: int = 0,
                  **options: object) -> FingerprintEstimator:
    """The :class:`~fingerprint.fitting.estimator.FingerprintEstimator` of ``model`` on
    ``scheme`` (cached per model spec, scheme, dictionary and options; a model name such
    as ``'noddi'`` works too)."""
    spec_hash = getattr(model, "spec_hash", None) if not isinstance(model, str) else model
    key = ("model", str(spec_hash), str(scheme.hash), dictionary_size, seed,
           None if dictionary_dir is None else os.fspath(dictionary_dir), n_jobs,
           _options_key(options))
    return ESTIMATORS.get(key, lambda: FingerprintEstimator.from_model(
        model, scheme, dictionary_size=dictionary_size, dictionary_dir=dictionary_dir,
        n_jobs=n_jobs, progress=progress, should_cancel=should_cancel, seed=seed,
        **options))  # type: ignore[arg-type]


def dictionary_cache_key(path: str, options: Mapping[str, object]) -> Hashable:
    """The :data:`ESTIMATORS` key of the estimator over the stored dictionary ``path``."""
    return ("dictionary", str(path), _options_key(options))


def estimator_for_dictionary(path: str, options: Mapping[str, object]
                             ) -> FingerprintEstimator:
    """The estimator over the stored dictionary at ``path`` with estimator ``options``
    (cached; what executor workers use)."""
    key = dictionary_cache_key(path, options)
    return ESTIMATORS.get(key, lambda: FingerprintEstimator.from_dictionary(
        open_dictionary(path), **options))  # type: ignore[arg-type]


def _x0_flat(x0_vector: object, spatial: tuple[int, ...], use: np.ndarray
             ) -> np.ndarray | dict[str, np.ndarray] | None:
    """Select the masked voxels of an x0 given per voxel; pass broadcast ones through."""
    if x0_vector is None:
        return None
    if isinstance(x0_vector, Mapping):
        out = {}
        for k, v in x0_vector.items():
            arr = np.asarray(v, dtype=np.float64)
            if spatial and arr.shape[:len(spatial)] == spatial:
                out[str(k)] = arr[use]
            else:
                out[str(k)] = arr
        return out
    arr = np.asarray(x0_vector, dtype=np.float64)
    if spatial and arr.shape[:-1] == spatial:
        return arr[use]
    if arr.ndim == 1:
        return arr
    raise InputError(f"x0_vector has shape {arr.shape}; expected (P,) or the data's "
                     f"spatial shape {spatial} + (P,)")


def _polish(est: FingerprintEstimator, data: np.ndarray, ve: VoxelEstimates,
            polish: PolishSettings) -> None:
    """Polish the valid voxels of ``ve`` in place by non-linear least squares, started
    from the estimate and (signal features) the ``polish.starts`` best atoms."""
    rows = np.flatnonzero(ve.valid)
    if rows.size == 0:
        return
    t0 = time.perf_counter()
    model, scheme = est.model, est.scheme
    y = data[rows] / ve.s0[rows, None]
    x0 = ve.parameters[rows][:, None, :]
    fmap = est.feature_map
    if polish.starts > 1 and fmap.kind == "signal":
        _, idx = est.matcher.search(fmap.voxel_features(y), polish.starts)
        atoms = est.atom_parameters[np.maximum(idx, 0)].astype(np.float64)
        atoms[idx < 0] = np.nan
        x0 = np.concatenate([x0, atoms], axis=1)
    polished = refine_nonlinear(model, scheme, y, x0, n_jobs=est.n_jobs,
                                max_nfev=int(polish.max_nfev or DEFAULT_MAX_NFEV),
                                method=polish.method)
    ve.parameters[rows] = polished
    ve.r2[rows], ve.mse[rows] = goodness_of_fit(model, scheme, y, polished)
    logger.info("non-linear refinement of %d voxels from %d start(s) each: %.3g s",
                rows.size, x0.shape[1], time.perf_counter() - t0)


class FingerprintFitter:
    """The built-in solver's :class:`~fingerprint.fitting.registry.VoxelFitter`:
    dictionary matching (:class:`FingerprintEstimator`); for a named model whose recipe
    sets ``[fit] posterior_neighbors`` (the restricted models), with refinement on, the
    Rician posterior over that many atoms (:mod:`fingerprint.fitting.posterior`); then,
    when ``polish`` is given, the non-linear polish. Pickles to its dictionary's path
    and options, so executor workers rebuild it from the shared dictionary once per
    process."""

    def __init__(self, estimator: FingerprintEstimator, options: Mapping[str, object],
                 polish: PolishSettings | None) -> None:
        self.estimator = estimator
        self.model = estimator.model
        self.scheme = estimator.scheme
        self.options = dict(options)
        self.polish = polish
        self.posterior_neighbors = model_posterior_neighbors(self.model) \
            if getattr(estimator, "refine", True) else None

    @property
    def dictionary_path(self) -> str | None:
        """Path of the stored dictionary, or None for an in-memory one."""
        path = getattr(self.estimator.dictionary, "path", None)
        return None if path is None else os.fspath(path)

    def __reduce__(self) -> tuple[Callable[..., FingerprintFitter], tuple[object, ...]]:
        path = self.dictionary_path
        if path is None:
            raise InputError("an executor needs an estimator backed by a stored dictionary")
        return _fitter_from_dictionary, (path, tuple(sorted(self.options.items())),
                                         self.polish)

    def fit_voxels(self, data: np.ndarray,
                   x0: np.ndarray | Mapping[str, np.ndarray] | None = None
                   ) -> VoxelEstimates:
        ve = self.estimator.estimate(data, x0=x0)
        if self.posterior_neighbors:
            with stage("fit/posterior"):
                rician_posterior(self.estimator, data, ve, self.posterior_neighbors,
                                 skip=_seeded_scalars(self.estimator, x0, data.shape[0]))
        if self.polish is not None:
            with stage("fit/polish"):
                _polish(self.estimator, data, ve, self.polish)
        return ve


def _seeded_scalars(est: FingerprintEstimator,
                    x0: np.ndarray | Mapping[str, np.ndarray] | None, n: int
                    ) -> np.ndarray | None:
    """(n,) bool: voxels whose start ``x0`` gives any scalar parameter (None: no x0)."""
    if x0 is None:
        return None
    x0m = x0_matrix(est.model, x0, n, est.parameter_layout)
    if x0m is None:
        return None
    return np.isfinite(x0m[:, est._scalar_columns]).any(axis=1)


def _fitter_from_dictionary(path: str, options: tuple[tuple[str, object], ...],
                            polish: PolishSettings | None) -> FingerprintFitter:
    opts = dict(options)
    return FingerprintFitter(estimator_for_dictionary(path, opts), opts, polish)


def fitter_for_estimator(est: FingerprintEstimator, options: FitOptions) -> FingerprintFitter:
    """The fitter of a ready estimator with ``options``' polish rule (``refine`` unset:
    the model's default, :func:`fingerprint.models.model_refine`)."""
    options = options.with_model_refine(model_refine(est.model))
    polish = options.polish if options.nonlinear_for(_frame_angles(est.model)) else None
    est_options = {k: v for k, v in options.estimator_options().items()
                   if k not in ("n_neighbors", "refine", "n_jobs")}
    est_options.update(n_neighbors=est.n_neighbors, refine=est.refine, n_jobs=est.n_jobs)
    return FingerprintFitter(est, est_options, polish)


def _frame_angles(model: Model) -> int:
    """Orientations the polish rule counts: the model's orientation parameters, plus one
    for a Bingham distribution's psi (a frame without axial symmetry: matched on zonal
    features, which average over psi, it needs the polish like a second orientation)."""
    n = len(getattr(model, "orientation_parameter_names", []) or [])
    types = dict(getattr(model, "parameter_types", {}) or {})
    return n + (1 if any(t == "circular" for t in types.values()) else 0)


def _prepare_fingerprint(request: SolverRequest) -> VoxelFitter:
    options = request.options
    if options.refine != "nonlinear" and is_multifascicle(request.model):
        # several copies of one single-fascicle compartment plus isotropic ones: rotated
        # single-fascicle atoms (refine='nonlinear' keeps matching + non-linear polish)
        penalty = model_count_penalty(request.model)
        settings = MultiFascicleSettings(penalty=penalty) if options.refine else \
            MultiFascicleSettings(polish_iterations=0, penalty=penalty)
        return MultiFascicleFitter(request.model, request.scheme, settings,
                                   n_jobs=options.threads)
    est_options = options.estimator_options()
    n_jobs = est_options.pop("n_jobs")
    est = get_estimator(request.model, request.scheme,
                        dictionary_size=options.dictionary_size,
                        dictionary_dir=request.dictionary_dir, n_jobs=n_jobs,  # type: ignore[arg-type]
                        progress=request.progress, should_cancel=request.should_cancel,
                        seed=options.seed, **est_options)
    polish = options.polish if options.nonlinear_for(_frame_angles(request.model)) else None
    return FingerprintFitter(est, {**est_options, "n_jobs": n_jobs}, polish)


def _matching_polishes(model: Model, options: FitOptions) -> bool:
    """Whether dictionary matching of ``model`` with ``options`` ends with the
    non-linear polish (what :func:`_prepare_fingerprint` decides; ``refine`` unset: the
    model's default)."""
    options = options.with_model_refine(model_refine(model))
    if options.refine != "nonlinear" and is_multifascicle(model):
        return False  # multi-fascicle fingerprinting: its own joint fit, no polish
    return options.nonlinear_for(_frame_angles(model))


def runs_per_voxel_fit(model: Model | str, options: FitOptions) -> bool:
    """Whether fitting ``model`` (a model or a named model) with ``options`` runs a
    non-linear least-squares fit per voxel, which costs about a second per voxel instead
    of the microseconds of matching (what servers limit): a classical solver
    (``brute2fine``, ``mix``; the solver a named model's recipe prescribes counts), or
    dictionary matching followed by the non-linear polish (``refine='nonlinear'``, a named
    model's default refinement such as ``sandi``'s, or the default polish of models with
    several orientations or a Bingham distribution).
    Multi-fascicle models fitted by multi-fascicle fingerprinting do not, unless
    ``refine='nonlinear'``; volume models (``mc_csd``) and the linear tensor fit do not."""
    if isinstance(model, str):
        if is_volume_model(model):
            return False
        model = get_model(model)
    options = options.with_model_refine(model_refine(model))  # a recipe's default, as fitted
    info = get_solver(effective_solver(model, options.solver))
    if info.name == BUILTIN_SOLVER:
        return _matching_polishes(model, options)
    return info.per_voxel_fit


register_solver(BUILTIN_SOLVER, _prepare_fingerprint, uses_dictionary=True,
                per_voxel_fit=False,
                description="dictionary matching with a local-linear refinement (and a "
                            "non-linear polish for several orientations; multi-fascicle "
                            "models: rotated single-fascicle atoms)", replace=True)


def effective_solver(model: Model | str, requested: str) -> str:
    """The solver that fits ``model`` when ``requested`` is asked for: the one a named
    model's recipe prescribes (``dti``: the linear tensor fit), else ``requested``."""
    forced = model_solver(model)
    return forced or requested


def prepare_fitter(model: Model, scheme: AcquisitionScheme, options: FitOptions, *,
                   dictionary_dir: str | os.PathLike[str] | None = None,
                   progress: ProgressCallback | None = None,
                   should_cancel: CancelCheck | None = None) -> VoxelFitter:
    """The fitter of ``options.solver`` for ``model`` on ``scheme`` (builds or loads what
    it needs, e.g. the dictionary). ``options.refine`` unset (None) takes the model's
    default refinement (a named model's recipe ``[fit] refine``, else True)."""
    options = options.with_model_refine(model_refine(model))
    info = get_solver(effective_solver(model, options.solver))
    if info.name != get_solver(options.solver).name:
        logger.info("model fitted by solver %r (its recipe's), not %r", info.name,
                    options.solver)
        options = options.replace(solver=info.name)
    if options.solver in DMIPY_SOLVERS and info.name == BUILTIN_SOLVER:
        logger.info("solver %r: fitting by dictionary matching instead", options.solver)
    return info.prepare(SolverRequest(model, scheme, options, dictionary_dir, progress,
                                      should_cancel))


def fit_voxels(fitter: VoxelFitter, data: np.ndarray,
               x0: np.ndarray | Mapping[str, np.ndarray] | None = None,
               fixed: np.ndarray | None = None) -> VoxelEstimates:
    """The one fitting core: fit ``data`` (n, N) raw signals with ``fitter``.

    Voxels that are not usable (:func:`~fingerprint.fitting.validity.usable_voxels`) are
    left out and get NaN estimates and ``valid`` False; the others are fitted in float64
    whatever the input's precision, so that every entry point gives the same numbers.
    ``x0`` (P,) / (n, P) / dict: starts (see :func:`fit_model`). ``fixed`` (n, P):
    per-voxel fixed values, NaN where estimated
    (:func:`~fingerprint.fitting.initial.voxel_fixed_matrix`); only solvers whose
    fitter has ``supports_voxel_fixed`` (brute2fine, mix) take them, the others refuse
    with an InputError."""
    arr = np.asarray(data)
    if arr.ndim != 2:
        raise InputError(f"data must have shape (voxels, measurements), got {arr.shape}")
    n = arr.shape[0]
    with stage("fit/select"):
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
        usable = usable_voxels(arr, fitter.scheme.b0_mask)
        rows = np.flatnonzero(usable)
        # float32 (NIfTI slabs) and float64 signals go in as they are, without a copy when
        # every voxel is usable: the estimator normalises them to float64 in one pass
        sub = np.ascontiguousarray(arr if rows.size == n else arr[rows])
        x0_rows = _x0_rows(x0, rows, n)
    if fixed is not None:
        if not getattr(fitter, "supports_voxel_fixed", False):
            raise InputError(_NO_VOXEL_FIXED)
        ve = fitter.fit_voxels(sub, x0_rows, fixed=np.asarray(fixed)[rows])  # type: ignore[call-arg]
    else:
        ve = fitter.fit_voxels(sub, x0_rows)
    if rows.size == n:
        return ve
    return ve.take(rows, n)


def _x0_rows(x0: np.ndarray | Mapping[str, np.ndarray] | None, rows: np.ndarray, n: int
             ) -> np.ndarray | Mapping[str, np.ndarray] | None:
    """The rows of a per-voxel x0 (n, ...) that are fitted; broadcast ones unchanged."""
    if x0 is None or rows.size == n:
        return x0
    if isinstance(x0, Mapping):
        return {k: (np.asarray(v)[rows] if np.ndim(v) >= 1 and np.shape(v)[0] == n else
                    np.asarray(v)) for k, v in x0.items()}
    arr = np.asarray(x0)
    return arr[rows] if arr.ndim == 2 and arr.shape[0] == n else arr


def fit_model(model: Model, acquisition_scheme: AcquisitionScheme, data: np.ndarray,
              mask: np.ndarray | None = None, solver: str = "fingerprint",
              x0_vector: np.ndarray | Mapping[str, np.ndarray] | None = None,
              n_jobs: int | None = None, dictionary_size: int | None = None,
              dictionary_dir: str | os.PathLike[str] | None = None,
              refine: bool | str | None = None, n_neighbors: int | None = None,
              progress: ProgressCallback | None = None,
              options: FitOptions | None = None,
              fixed_parameters: Mapping[str, object] | None = None,
              **kwargs: object) -> FittedMultiCompartmentModel:
    """Fit ``model`` to ``data`` (..., N) measured with ``acquisition_scheme``.

    Parameters
    ----------
    model: a MultiCompartmentModel / MultiCompartmentSphericalMeanModel.
    acquisition_scheme: the AcquisitionScheme of the last axis of ``data``.
    data: raw signals, any shape ending in N measurements.
    mask: bool array of data.shape[:-1]; voxels to fit (default: every voxel whose mean b0
        signal is positive; ``mask_rule='all'``: every voxel). Voxels of the mask with
        NaN, infinite or negative signals or no positive b=0 signal are left out, reported
        in one warning and NaN in the result (:mod:`fingerprint.fitting.validity`).
    solver: a registered solver: ``'fingerprint'`` (dictionary matching, default),
        ``'brute2fine'`` (brute-force grid then bounded non-linear least squares) or
        ``'mix'`` (differential evolution with the fractions by NNLS, then the same
        refinement), see :mod:`fingerprint.fitting.solvers`; dmipy's ``'amico'`` is
        refused. The solver that ran is recorded as ``fitted.solver``.
    x0_vector: initial guess: parameter vectors (P,) or data.shape[:-1] + (P,), or a dict
        of (possibly short) parameter names; NaN entries are estimated. A given
        orientation fixes the fibre frame (e.g. from a Ball-Stick fit); a compartment's
        orientation the model carries through a distribution (``'C1Stick_1_mu'`` given
        to NODDI) initialises that distribution's axis (see
        :mod:`fingerprint.fitting.initial`).
    fixed_parameters: parameters fixed voxel by voxel (what dmipy's
        ``set_fixed_parameter`` does with an array): a dict of (possibly short) free
        parameter names, each one value or one per voxel (data.shape[:-1], + (2,) for an
        orientation [theta, phi] in rad), SI units. They stay in the parameter vector,
        are held at the given values by ``'brute2fine'`` and ``'mix'`` and returned as
        given; dictionary matching refuses them (InputError).
    n_jobs: threads for FAISS, BLAS and Numba.
    dictionary_size, dictionary_dir: dictionary atoms and directory (default: the
        recipe's size, the user cache directory).
    refine: local-linear refinement after matching; ``'nonlinear'`` adds a bounded
        non-linear least-squares polish of the matched parameters on the signals
        (:func:`~fingerprint.fitting.nonlinear.refine_nonlinear`), which models with
        more than one orientation get by default (``False`` turns both off).
        Default None: the model's own default (a named model's recipe may set it in its
        ``[fit]`` table, e.g. ``sandi``'s polish), else True.
        It starts from the estimate and, for models matched on the signal itself, the
        ``nonlinear_starts`` (default 3) best atoms; ``nonlinear_max_nfev`` limits the
        residual evaluations per start; ``nonlinear_method`` is ``'batched'`` (default:
        all voxels advance together) or ``'scipy'`` (voxel by voxel, the reference).
    n_neighbors: atoms matched per voxel.
    progress: called with a fraction in [0, 1] while a dictionary is built.
    options: a :class:`~fingerprint.fitting.options.FitOptions` (the keywords above and
        ``kwargs`` override its fields).
    kwargs: further :class:`~fingerprint.fitting.options.FitOptions` fields
        (``b0_threshold`` in s/m²: the b=0 reference, checked with the scheme first by
        :mod:`fingerprint.core.scheme_checks`; ``rician``,
        ``matcher_method``, ``frame_iterations``, ``seed``, ``mask_rule``, ...). dmipy's
        ``number_of_processors`` / ``use_parallel_processing`` set ``n_jobs``; its
        optimiser settings (``Ns``, ``N_sphere_samples``, ``maxiter``) set
        :class:`~fingerprint.fitting.options.ClassicalSettings` (used by the classical
        solvers, ignored by dictionary matching).

    Returns
    -------
    FittedMultiCompartmentModel
    """
    given: dict[str, object] = dict(options.to_dict()) if options is not None else {}
    explicit = {"solver": solver, "n_jobs": n_jobs, "dictionary_size": dictionary_size,
                "refine": refine, "n_neighbors": n_neighbors}
    defaults: dict[str, object] = {"solver": "fingerprint"}
    for key, value in explicit.items():
        if options is None or (value is not None and value != defaults.get(key)):
            given[key] = value
    if n_jobs is not None or "number_of_processors" in kwargs or \
            kwargs.get("use_parallel_processing") is False:
        given.pop("threads", None)
    given.update(kwargs)
    opts = FitOptions.from_mapping(given, dmipy=True)
    if opts.multi_tissue is not None:
        raise InputError("option 'multi_tissue' is for volume fits (fit_volume, fingerprint "
                         "fit, server jobs); with model.fit build the model with its "
                         "responses (get_model(name, S0_tissue_responses=[...])) and read "
                         "fitted_multi_tissue_fractions")
    solver_name = get_solver(effective_solver(model, opts.solver)).name
    for name in DMIPY_IGNORED_OPTIONS + CLASSICAL_OPTION_NAMES:
        if name in kwargs and (solver_name == BUILTIN_SOLVER
                               or name in DMIPY_IGNORED_OPTIONS):
            logger.info("fit option %r is for dmipy's optimisers; ignored by solver %r",
                        name, solver_name)
    if not (hasattr(acquisition_scheme, "number_of_measurements")
            and hasattr(acquisition_scheme, "b0_mask")):
        raise InputError(f"acquisition_scheme must be an AcquisitionScheme (see "
                         f"acquisition_scheme_from_bvalues or read_bvals_bvecs), got "
                         f"{type(acquisition_scheme).__name__}")

    # the scheme checks every entry point runs: refusals name the problem, warnings logged
    acquisition_scheme, _ = prepare_scheme(acquisition_scheme, model,
                                           b0_threshold=opts.b0_threshold, who="model.fit",
                                           log=logger)
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
        if opts.mask_rule == "all":
            use = np.ones(spatial, dtype=bool)
        else:
            with np.errstate(invalid="ignore"):
                s0 = arr[..., b0].mean(axis=-1) if b0.any() else np.ones(spatial)
            use = default_mask(s0)
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
    if fixed_parameters is not None and solver_name == BUILTIN_SOLVER:
        raise InputError(_NO_VOXEL_FIXED)
    fitter = prepare_fitter(model, acquisition_scheme, opts, dictionary_dir=dictionary_dir,
                            progress=progress)
    selected = arr[use]
    x0m = x0_matrix(model, _x0_flat(x0_vector, spatial, use), int(selected.shape[0]))
    fixed_m = voxel_fixed_matrix(model, _x0_flat(fixed_parameters, spatial, use),
                                 int(selected.shape[0]))
    ve = fit_voxels(fitter, selected, x0m, fixed=fixed_m)
    usable = usable_voxels(selected, b0)
    if not usable.all():
        coords = np.argwhere(use)[~usable] if spatial else np.zeros((1, 0), dtype=int)
        report_unusable(coords, int(selected.shape[0]))
    P = ve.parameters.shape[1]
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
                                       estimator=getattr(fitter, "estimator", fitter),
                                       solver=solver_name)


register_backend("fit", fit_model)  # what model.fit runs (core does not import fitting)
