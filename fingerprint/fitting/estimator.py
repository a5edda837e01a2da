"""FingerprintEstimator: fit voxels by matching them against a dictionary.

>>> est = FingerprintEstimator.from_model(get_model("noddi"), scheme)
>>> ve = est.estimate(data)            # data (n, N) raw signals
>>> ve.parameters                      # (n, P) dmipy parameter vectors, NaN where invalid

Per call of :meth:`FingerprintEstimator.estimate` (every step vectorised over voxels):

1. validity and S0: a voxel is valid when all its values are finite and the mean of its
   b0 measurements is positive (logged count of the others, which get NaN parameters);
2. fibre frame (models with one orientation; from the b0-normalised signals): tensor
   eigenvector (refined by the free zonal fit when ``frame_iterations`` > 0;
   :mod:`.frame`), or the orientation given in ``x0``;
3. noise: sigma per voxel from the spread of its b0s (>= 4 b0s) pooled with the
   residual of the zonal fit (by degrees of freedom); then a first-order Rician bias
   correction sqrt(max(S² - sigma², 0)) of the diffusion-weighted signals;
   with ``align_axis`` (default) the axis is then re-fitted to the signal with the
   profile of a quick match held fixed (:meth:`FingerprintEstimator._aligned_frames`);
4. features (:mod:`.features`), k-nearest atoms (:mod:`.matcher`);
5. posterior-weighted mean and spread of the neighbours (the weights' variance is the
   noise plus :data:`SPACING_FRACTION` of the dictionary's squared atom spacing, so that
   low-noise voxels interpolate between atoms instead of snapping to one), then one
   local-linear Gauss-Newton step (:mod:`.refine`);
6. goodness of fit (R², MSE on b0-normalised signals) from the signal the refined
   features describe, and the quality diagnostics (:mod:`.quality`).

The estimator holds only read-only arrays and a FAISS index, so one instance can serve
several threads at once; results do not depend on how voxels are batched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.parameter_layout import ParameterLayout
from fingerprint.errors import InputError
from fingerprint.stages import Laps, active_profile

from .features import FeatureMap
from .frame import FrameEstimator, angles_to_frames, frames_to_angles
from .initial import x0_matrix
from .matcher import DEFAULT_HNSW_THRESHOLD, HNSW_EF_SEARCH, Matcher, faiss_threads
from .quality import (
    SIGMA_FLOOR,
    SPACING_PERCENTILE,
    SPACING_SAMPLE,
    neighbour_cone_angle,
    profile_orientation_sd,
    quality_flags,
)
from .refine import local_linear_step, orientation_curvature, posterior_mean, weighted_atoms

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.initial_guess import X0Input
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties
    from fingerprint.dictionary.store import Dictionary

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_NEIGHBORS", "FingerprintEstimator", "VoxelEstimates"]

#: Neighbours per voxel when not given.
DEFAULT_NEIGHBORS = 32
#: Minimum number of b0 measurements for a per-voxel noise estimate from their spread.
MIN_B0_FOR_NOISE = 4
#: Share of the dictionary's squared atom spacing (per feature) added to the noise
#: variance of the posterior weights: matches of low-noise voxels interpolate between
#: neighbouring atoms instead of snapping to the nearest (no plateaus in the maps).
SPACING_FRACTION = 0.25
#: Neighbours of the quick match whose profile the fibre axis is aligned to (1 to 32
#: neighbours give the same accuracy: the profile is smooth), and its search: the
#: inverted file probing one list on HNSW-sized dictionaries (recall of the 4 nearest
#: 0.81, a quarter of the CPU time of the HNSW graph's beam of 8, recall 0.997; the NODDI
#: benchmark maps change by less than 1e-5 in MAE and 0.01 degrees), the exact search
#: on smaller ones; the beam is the graph's if one is asked for.
PROFILE_NEIGHBORS = 4
PROFILE_NPROBE = 1
PROFILE_EF_SEARCH = 8
#: Lists of the inverted file probed by the dictionary-spacing estimate (each sampled
#: atom's nearest other atom; with 2 or more the NODDI spacing equals the exact search's
#: to 7 digits): the search a fit makes once, on the index its other searches use, so no
#: HNSW graph is read for it.
SPACING_NPROBE = 8
#: Voxels per internal batch (bounds temporary memory).
BATCH_VOXELS = 16384


class _LocalTables:
    """The estimator's per-atom tables laid out in the matcher's atom order (see
    :attr:`~fingerprint.fitting.matcher.Matcher.atom_order`), made once and shared by the
    estimator's shallow copies (one per fitting thread). ``position`` maps atom indices to
    rows of the local tables, with ``position[-1] = -1`` so that missing neighbours (-1)
    stay missing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.order: np.ndarray | None = None
        self.tables: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None

    def get(self, order: np.ndarray, features: np.ndarray, parameters: np.ndarray,
            curvature: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(position, features, parameters, curvature) in ``order``."""
        if self.order is not order:
            with self._lock:
                if self.order is not order:
                    position = np.empty(order.size + 1, dtype=np.int64)
                    position[order] = np.arange(order.size)
                    position[-1] = -1
                    tables = (position, features[order], parameters[order],
                              curvature[order])
                    for arr in tables:
                        arr.setflags(write=False)
                    self.tables = tables
                    self.order = order
        assert self.tables is not None
        return self.tables


@dataclass
class VoxelEstimates:
    """Result of :meth:`FingerprintEstimator.estimate` for n voxels.

    Attributes
    ----------
    parameters: (n, P) dmipy parameter vectors (SI units, orientations as theta, phi in
        radians); NaN rows where ``valid`` is False.
    uncertainty: (n, P) posterior spread (standard deviation) of each parameter over the
        matched neighbours (NaN for orientation columns).
    s0: (n,) mean b0 signal (the normalisation), NaN where invalid.
    r2: (n,) coefficient of determination of the fitted signal (b0-normalised data).
    mse: (n,) mean squared error of the fitted signal (b0-normalised data).
    valid: (n,) bool.
    sigma: (n,) estimated noise standard deviation, in units of the raw data.
    match_chi2, fit_chi2, orientation_sd: (n,) quality diagnostics, or None when the
        solver does not give them (:mod:`fingerprint.fitting.quality`): reduced
        chi-square of the features against the matched prediction, reduced chi-square of
        the fitted signal's residual (both in units of the noise variance), and the
        orientation uncertainty in degrees (NaN without orientation).
    """

    parameters: np.ndarray
    uncertainty: np.ndarray
    s0: np.ndarray
    r2: np.ndarray
    mse: np.ndarray
    valid: np.ndarray
    sigma: np.ndarray
    match_chi2: np.ndarray | None = None
    fit_chi2: np.ndarray | None = None
    orientation_sd: np.ndarray | None = None

    #: the optional per-voxel diagnostics
    DIAGNOSTICS = ("match_chi2", "fit_chi2", "orientation_sd")

    def take(self, rows: np.ndarray, n: int) -> VoxelEstimates:
        """Estimates of ``n`` voxels with these at ``rows`` and NaN / invalid elsewhere."""
        def full(values: np.ndarray | None, fill: float | bool) -> np.ndarray | None:
            if values is None:
                return None
            out = np.full((n,) + np.shape(values)[1:], fill, dtype=np.asarray(values).dtype)
            out[rows] = values
            return out

        return VoxelEstimates(
            full(self.parameters, np.nan), full(self.uncertainty, np.nan),  # type: ignore[arg-type]
            full(self.s0, np.nan), full(self.r2, np.nan), full(self.mse, np.nan),  # type: ignore[arg-type]
            full(self.valid, False), full(self.sigma, np.nan),  # type: ignore[arg-type]
            *(full(getattr(self, d), np.nan) for d in self.DIAGNOSTICS))


@contextlib.contextmanager
def thread_limits(n_jobs: int | None):
    """Limit FAISS, BLAS (threadpoolctl when installed) and Numba (this thread) to
    ``n_jobs`` threads for the duration of the block."""
    if not n_jobs:
        yield
        return
    import numba  # lazy: keeps numba off import

    n = max(1, int(n_jobs))
    stack = contextlib.ExitStack()
    with stack:
        stack.enter_context(faiss_threads(n))
        try:
            from threadpoolctl import threadpool_limits  # lazy: optional dependency

            stack.enter_context(threadpool_limits(limits=n))
        except ImportError:  # pragma: no cover - threadpoolctl is optional
            # without threadpoolctl only BLAS libraries loaded from now on see the limit
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, str(n))
        previous = numba.get_num_threads()
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
        stack.callback(numba.set_num_threads, previous)
        yield


class FingerprintEstimator:
    """Dictionary-matching estimator of one model on one acquisition scheme.

    Build it with :meth:`from_dictionary` or :meth:`from_model`.

    Attributes
    ----------
    model, scheme, dictionary: what it fits, on what, with what.
    parameter_names, parameter_cardinality: dmipy parameter-vector layout.
    feature_map: the :class:`~fingerprint.fitting.features.FeatureMap`.
    matcher: the :class:`~fingerprint.fitting.matcher.Matcher` over the atoms.
    n_neighbors, refine, rician, n_jobs: options (see :meth:`from_dictionary`).
    """

    def __init__(self, *, model: MultiCompartmentModelProperties, scheme: AcquisitionScheme,
                 atom_parameters: np.ndarray, atom_features: np.ndarray,
                 dictionary: Dictionary | None = None, parameter_names: list[str] | None = None,
                 parameter_cardinality: Mapping[str, int] | None = None,
                 canonical_orientation: bool | None = None, simplex_names: list[str] | None = None,
                 n_neighbors: int | None = None, refine: bool = True, rician: bool = True,
                 n_jobs: int | None = None, matcher_method: str = "auto",
                 hnsw_threshold: int = DEFAULT_HNSW_THRESHOLD, ef_search: int = HNSW_EF_SEARCH,
                 frame_iterations: int | None = None, temperature: float = 1.0,
                 cache_index: bool = True, marginalise_orientation: float = 0.0,
                 refine_shrinkage: float = 1.0, align_axis: bool = True) -> None:
        self.model = model
        self.scheme = scheme
        self.dictionary = dictionary
        self.parameter_names = list(parameter_names if parameter_names is not None
                                    else model.parameter_names)
        card = parameter_cardinality if parameter_cardinality is not None else \
            model.parameter_cardinality
        self.parameter_cardinality = {k: int(card[k]) for k in self.parameter_names}
        self.n_neighbors = int(n_neighbors or DEFAULT_NEIGHBORS)
        if self.n_neighbors < 1:
            raise InputError(f"n_neighbors must be at least 1, got {n_neighbors}")
        self.refine = bool(refine)
        self.rician = bool(rician)
        self.n_jobs = n_jobs
        self.temperature = float(temperature)
        self.marginalise_orientation = float(marginalise_orientation)
        self.refine_shrinkage = float(refine_shrinkage)
        self.align_axis = bool(align_axis)
        self.feature_map = FeatureMap.from_model(model, scheme)
        self.atom_parameters = np.ascontiguousarray(atom_parameters, dtype=np.float64)
        self.atom_features = np.ascontiguousarray(atom_features, dtype=np.float64)
        self.atom_parameters.setflags(write=False)
        self.atom_features.setflags(write=False)
        if self.atom_features.shape[1] != self.feature_map.n_features:
            raise InputError(
                f"the dictionary's features have {self.atom_features.shape[1]} columns but "
                f"the model on this scheme needs {self.feature_map.n_features}")

        # parameter layout (the dictionary's, which is the model's)
        self.parameter_layout = ParameterLayout.from_cardinality(
            {k: self.parameter_cardinality[k] for k in self.parameter_names})
        offsets = self.parameter_layout.slices
        self._slices = offsets
        i = self.n_parameters = self.parameter_layout.size
        if self.atom_parameters.shape[1] != i:
            raise InputError(f"dictionary parameters have {self.atom_parameters.shape[1]} "
                             f"columns, the model's parameter vector {i}")
        orient = list(getattr(model, "orientation_parameter_names", []) or [])
        self.orientation_names = [n for n in orient if n in offsets]
        if canonical_orientation is None:
            canonical_orientation = len(self.orientation_names) == 1
        self.canonical_orientation = bool(canonical_orientation) and \
            self.feature_map.kind == "zonal" and len(self.orientation_names) == 1
        orient_cols = [c for n in self.orientation_names
                       for c in range(offsets[n].start, offsets[n].stop)]
        self._orientation_columns = np.asarray(orient_cols, dtype=np.int64)
        scalar_cols = [c for c in range(i) if c not in set(orient_cols)]
        self._scalar_columns = np.asarray(scalar_cols, dtype=np.int64)
        # simplex of top-level partial volumes: refine all but the last, which is 1 - sum
        simplex = [n for n in (simplex_names or []) if n in offsets]
        self._simplex_columns = np.asarray([offsets[n].start for n in simplex],
                                           dtype=np.int64)
        dependent = {int(self._simplex_columns[-1])} if len(simplex) >= 2 else set()
        self._refine_columns = np.asarray([c for c in scalar_cols if c not in dependent],
                                          dtype=np.int64)
        lo = self.atom_parameters.min(axis=0)
        hi = self.atom_parameters.max(axis=0)
        self._lower, self._upper = lo, hi

        self.matcher = Matcher.for_dictionary(
            dictionary, self.atom_features.astype(np.float32), method=matcher_method,
            hnsw_threshold=hnsw_threshold, ef_search=ef_search, cache=cache_index) \
            if dictionary is not None else Matcher(
                self.atom_features, method=matcher_method, hnsw_threshold=hnsw_threshold,
                ef_search=ef_search)
        if frame_iterations is None:
            # the alignment to the matched profile supersedes the free zonal refinement
            frame_iterations = 0 if self.align_axis else 1
        self.frame_estimator = (FrameEstimator.for_scheme(
            self.feature_map, refine_iterations=frame_iterations)
            if self.feature_map.kind == "zonal" else None)
        self._curvature = self.marginalise_orientation * orientation_curvature(
            self.feature_map, self.atom_features)
        self._curvature.setflags(write=False)
        self._b0 = np.asarray(scheme.b0_mask, dtype=bool)
        self._n_meas = int(self._b0.size)
        self._local_tables = _LocalTables()

    def _atoms(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The neighbours ``idx`` (n, k) of a search, and the atom features, parameters and
        orientation curvatures they index: in the matcher's atom order when it has one
        (the neighbours' rows then lie in a few memory regions: about 1.5 us per voxel
        less on the NODDI benchmark), else as stored. The same values either way, so
        the estimates do not depend on it."""
        order = self.matcher.atom_order
        if order is None or order.size != self.atom_features.shape[0]:
            return idx, self.atom_features, self.atom_parameters, self._curvature
        position, feats, params, curv = self._local_tables.get(
            order, self.atom_features, self.atom_parameters, self._curvature)
        return position[idx], feats, params, curv

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_dictionary(cls, dictionary: Dictionary, *, n_neighbors: int | None = None,
                        refine: bool = True, n_jobs: int | None = None,
                        **options: Any) -> FingerprintEstimator:
        """Estimator over a stored :class:`~fingerprint.dictionary.Dictionary`.

        Parameters
        ----------
        n_neighbors: atoms matched per voxel (default 32).
        refine: apply the local-linear Gauss-Newton step after the posterior mean.
        n_jobs: threads for FAISS, BLAS and Numba (default: all).
        options: ``rician`` (bias correction, default True), ``matcher_method``
            ('auto', 'exact', 'hnsw'), ``hnsw_threshold`` (atoms), ``ef_search``,
            ``frame_iterations`` (Gauss-Newton steps of the free zonal fit's axis before
            the match; default 0 with ``align_axis``, else 1), ``align_axis`` (align the
            axis to the profile of a quick match first, default True), ``temperature``,
            ``cache_index``.
        """
        meta = dictionary.metadata
        with thread_limits(n_jobs):
            params = dictionary.read_parameters()
            feats = dictionary.read_features()
            simplex = _simplex_names(meta.get("sampling") or {})
            return cls(model=dictionary.model, scheme=dictionary.scheme,
                       atom_parameters=params, atom_features=feats, dictionary=dictionary,
                       parameter_names=list(meta["parameter_names"]),
                       parameter_cardinality=meta["parameter_cardinality"],
                       canonical_orientation=bool(meta.get("canonical_orientation")),
                       simplex_names=simplex, n_neighbors=n_neighbors, refine=refine,
                       n_jobs=n_jobs, **options)

    @classmethod
    def from_model(cls, model: str | MultiCompartmentModelProperties, scheme: AcquisitionScheme, *,
                   dictionary_size: int | None = None,
                   dictionary_dir: str | os.PathLike | None = None,
                   progress: Callable[[float], Any] | None = None, n_jobs: int | None = None,
                   should_cancel: Callable[[], bool] | None = None, seed: int | None = 0,
                   n_neighbors: int | None = None, refine: bool = True,
                   **options: Any) -> FingerprintEstimator:
        """Estimator of ``model`` (a name such as ``'noddi'`` or a model object) on
        ``scheme``: finds the dictionary in ``dictionary_dir`` (default cache directory)
        or builds it (``dictionary_size`` atoms; default the recipe's size)."""
        from fingerprint.dictionary import get_or_build_dictionary  # lazy: keeps numba off import

        d = get_or_build_dictionary(model, scheme, size=dictionary_size, seed=seed,
                                    directory=dictionary_dir, progress=progress,
                                    n_jobs=n_jobs, should_cancel=should_cancel)
        return cls.from_dictionary(d, n_neighbors=n_neighbors, refine=refine, n_jobs=n_jobs,
                                   **options)

    # ------------------------------------------------------------------ helpers
    def __repr__(self) -> str:
        return (f"FingerprintEstimator({type(self.model).__name__}, atoms="
                f"{self.atom_parameters.shape[0]}, features={self.feature_map.kind}"
                f"[{self.feature_map.n_features}], k={self.n_neighbors}, "
                f"matcher={self.matcher.method})")

    # ------------------------------------------------------------------ estimation
    def estimate(self, data: ArrayLike, x0: X0Input | None = None) -> VoxelEstimates:
        """Fit voxels ``data`` (n, N) (raw signals, any positive scale) and return
        :class:`VoxelEstimates`. ``x0`` (parameter vectors (P,)/(n, P), or a dict of
        possibly short parameter names) seeds the fit: a given orientation replaces the
        estimated fibre frame; given scalar parameters start the refinement."""
        arr = np.asarray(data)
        if arr.dtype not in (np.float32, np.float64):
            arr = arr.astype(np.float64)
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2 or arr.shape[1] != self._n_meas:
            raise InputError(f"data must have shape (voxels, {self._n_meas}) for this "
                             f"acquisition scheme, got {np.shape(data)}")
        n = arr.shape[0]
        x0m = x0_matrix(self.model, x0, n, self.parameter_layout)
        prof = active_profile()
        if prof is not None:
            prof.count_voxels(n)
        with thread_limits(self.n_jobs):
            parts = [self._estimate_batch(arr[s:s + BATCH_VOXELS],
                                          None if x0m is None else x0m[s:s + BATCH_VOXELS])
                     for s in range(0, max(n, 1), BATCH_VOXELS)] if n else []
        if not parts:
            empty = np.zeros((0, self.n_parameters))
            return VoxelEstimates(empty, empty.copy(), np.zeros(0), np.zeros(0), np.zeros(0),
                                  np.zeros(0, dtype=bool), np.zeros(0))
        def joined(field: str) -> np.ndarray:
            return np.concatenate([getattr(p, field) for p in parts])

        out = VoxelEstimates(
            joined("parameters"), joined("uncertainty"), joined("s0"), joined("r2"),
            joined("mse"), joined("valid"), joined("sigma"),
            **{f: None if any(getattr(p, f) is None for p in parts) else joined(f)
               for f in VoxelEstimates.DIAGNOSTICS})
        n_bad = int(n - out.valid.sum())
        if n_bad:
            logger.warning("%d of %d voxels could not be fitted (non-finite values, no "
                           "positive b0 signal); their parameters are NaN", n_bad, n)
        return out

    def _estimate_batch(self, data: np.ndarray, x0: np.ndarray | None) -> VoxelEstimates:
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import (
            prepare_signals,
            rician_correct,
        )

        lap = Laps("fit/")
        n = data.shape[0]
        b0 = self._b0
        P = self.n_parameters
        fmap = self.feature_map
        params = np.full((n, P), np.nan)
        unc = np.full((n, P), np.nan)
        r2 = np.full(n, np.nan)
        mse = np.full(n, np.nan)
        # float32 (NIfTI slabs) or float64 raw signals, read once by prepare_signals, which
        # computes in float64 and writes the float64 normalised signals every later step
        # uses; other dtypes become float64 (two compiled versions of that one kernel)
        if data.dtype != np.float32:
            data = np.ascontiguousarray(data, dtype=np.float64)
        else:
            data = np.ascontiguousarray(data)
        no_sigma = np.full(n, np.nan)
        plain_all, _, s0, sigma_all, valid = run_parallel(
            prepare_signals, data, b0, no_sigma, MIN_B0_FOR_NOISE, False)
        rows = np.flatnonzero(valid)
        diag = {d: np.full(n, np.nan) for d in VoxelEstimates.DIAGNOSTICS}
        if rows.size == 0:
            return VoxelEstimates(params, unc, s0, r2, mse, valid, sigma_all, **diag)
        if rows.size == n:  # no copies when every voxel is valid (the usual case)
            plain, sigma_b0, s0v, x0v = plain_all, sigma_all.copy(), s0, x0
        else:
            plain = plain_all[rows]
            sigma_b0 = sigma_all[rows]
            s0v = s0[rows]
            x0v = None if x0 is None else x0[rows]
        lap("prepare")

        # orientation given in x0
        seeded = np.zeros(rows.size, dtype=bool)
        given = None
        if x0v is not None and self.orientation_names:
            ang = x0v[:, self._orientation_columns]
            seeded = np.isfinite(ang).all(axis=1)
            given = angles_to_frames(np.where(np.isfinite(ang), ang, 0.0))

        # starting frames from the uncorrected signals (the bias correction, floored at
        # zero, distorts the free zonal fit of low signals); the alignment below fits the
        # corrected signals, which are what the matched profile describes
        frames, rss_plain = self._frames(plain, seeded, given)
        lap("frames")
        plain_feats = None
        if fmap.kind == "zonal" and rss_plain is None:
            # the zonal fit of the uncorrected signals at the starting frames: its residual
            # estimates the noise, its features are the query of the profile match
            plain_feats, rss_plain = fmap.voxel_features(plain, frames, return_rss=True)
        sigma = self._noise(plain, frames, sigma_b0, s0v, rss_plain)
        sig2_feat = (sigma / s0v) ** 2
        ynorm = plain
        if self.rician:
            ynorm = run_parallel(rician_correct, plain, sigma / s0v, b0)
        lap("noise")
        if self.align_axis and frames is not None and not seeded.any():
            frames = self._aligned_frames(ynorm, frames, sig2_feat, plain_feats)
            lap("align")
        elif self.align_axis and frames is not None and not seeded.all():
            free = np.flatnonzero(~seeded)
            frames[free] = self._aligned_frames(
                ynorm[free], frames[free], sig2_feat[free],
                None if plain_feats is None else plain_feats[free])
            lap("align")
        fit = None
        if fmap.kind == "zonal":
            fit = fmap.voxel_features(ynorm, frames, return_rss=True, return_gram=True)
            feats = fit[0]
        else:
            feats = fmap.voxel_features(ynorm, frames)
        lap("features")
        dist, idx = self.matcher.search(feats, self.n_neighbors)
        idx, atom_feats, atom_params, curvature = self._atoms(idx)
        lap("search")
        marg = None
        if self.marginalise_orientation and fmap.kind == "zonal":
            marg = ~seeded
        # the dictionary's own spacing is part of what a match cannot explain: without it,
        # low-noise voxels put all weight on one atom and the maps step from atom to atom
        sig2_match = sig2_feat + SPACING_FRACTION * self.dictionary_spacing2 / max(
            int(feats.shape[1]), 1)
        mean, sd, weights = posterior_mean(dist, idx, atom_params, sig2_match,
                                           self.temperature, curvature, marg)
        # orientation: from the frame (canonical dictionaries) or the best atom
        if self.canonical_orientation and frames is not None:
            mean[:, self._orientation_columns] = frames_to_angles(frames)
        elif self._orientation_columns.size:
            best = idx[np.arange(idx.shape[0]), np.argmax(weights, axis=1)]
            mean[:, self._orientation_columns] = \
                atom_params[best][:, self._orientation_columns]
        sd[:, self._orientation_columns] = np.nan
        lap("posterior")
        start = mean
        if x0v is not None:
            seeded_scalars = x0v[:, self._scalar_columns]
            cols = self._scalar_columns
            start = mean.copy()
            start[:, cols] = np.where(np.isfinite(seeded_scalars), seeded_scalars,
                                      mean[:, cols])
        pred_feats = None
        if self.refine and self._refine_columns.size:
            rc = self._refine_columns
            span = (self._upper - self._lower)[rc]
            max_step = 3.0 * np.nan_to_num(sd[:, rc]) + 0.02 * span
            # the step matters when the posterior is narrower than the dictionary's
            # spacing (few effective neighbours); when many atoms share the weight the
            # posterior mean already interpolates, and the step only adds noise: it is
            # shrunk by min(1, refine_shrinkage / n_eff)
            est, pred_feats = local_linear_step(
                feats, idx, weights, atom_feats, atom_params, start, rc,
                self._lower[rc], self._upper[rc], max_step,
                shrinkage=self.refine_shrinkage)
            if len(self._simplex_columns) >= 2:
                others = self._simplex_columns[:-1]
                total = est[:, others].sum(axis=1)
                over = total > 1.0
                if over.any():
                    est[np.ix_(over, others)] /= total[over, None]
                    total = np.minimum(total, 1.0)
                est[:, self._simplex_columns[-1]] = 1.0 - total
        else:
            est = start
        if pred_feats is None:
            pred_feats = weighted_atoms(weights, idx, atom_feats)
        lap("refine")

        # goodness of fit on b0-normalised (bias-corrected) signals
        if fit is not None:
            res, tot = fmap.residuals(ynorm, fit, fmap.zonal_coefficients(pred_feats))
            width = ynorm.shape[1]
        else:
            pred = fmap.reconstruct(pred_feats, frames)
            if fmap.kind == "shell_means":
                obs, predicted = self._shell_means(ynorm), self._shell_means(pred)
            else:
                obs, predicted = ynorm, pred
            res = ((obs - predicted) ** 2).sum(axis=1)
            tot = ((obs - obs.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
            width = obs.shape[1]
        with np.errstate(divide="ignore", invalid="ignore"):
            r2v = np.where(tot > 0, 1.0 - res / tot, np.nan)
        params[rows] = est
        unc[rows] = sd
        r2[rows] = r2v
        mse[rows] = res / width
        sigma_all[rows] = sigma
        lap("goodness")
        self._diagnostics(diag, rows, feats, pred_feats, frames, sig2_feat, res, width,
                          weights, idx, (sigma_b0 / s0v) ** 2, atom_params)
        lap("quality")
        return VoxelEstimates(params, unc, s0, r2, mse, valid, sigma_all, **diag)

    @property
    def dictionary_spacing2(self) -> float:
        """Squared feature distance between neighbouring atoms (the 99th percentile of
        each of up to 512 sampled atoms' distance to its nearest other atom): what the
        dictionary's sampling alone leaves unexplained, added to the noise by the quality
        rules (:mod:`fingerprint.fitting.quality`). Computed once."""
        cached = getattr(self, "_spacing2", None)
        if cached is None:
            n_atoms = int(self.atom_features.shape[0])
            rng = np.random.default_rng(0)
            pick = np.sort(rng.choice(n_atoms, size=min(SPACING_SAMPLE, n_atoms),
                                      replace=False))
            if n_atoms < 2:
                cached = 0.0
            else:
                dist, _ = self.matcher.search(self.atom_features[pick], 2,
                                              nprobe=SPACING_NPROBE)
                d = np.asarray(dist, dtype=float)[:, 1]
                d = d[np.isfinite(d) & (d >= 0)]
                cached = float(np.percentile(d, SPACING_PERCENTILE)) if d.size else 0.0
            self._spacing2 = cached
        return float(cached)

    @property
    def noise_dof(self) -> int | None:
        """Degrees of freedom of the b=0 noise estimate (b0 count - 1), or None when there
        are fewer than MIN_B0_FOR_NOISE b0s (the pooled estimate is used then)."""
        n_b0 = int(self._b0.sum())
        return n_b0 - 1 if n_b0 >= MIN_B0_FOR_NOISE else None

    @property
    def n_fit_measurements(self) -> int:
        """Measurements (or shell means) the residual of ``fit_chi2`` is summed over."""
        fmap = self.feature_map
        if fmap.kind == "shell_means":
            return int(fmap.shell_columns.size)
        return int(self._n_meas) if fmap.kind == "zonal" else int(fmap.dwi_columns.size)

    def quality_flags(self, ve: VoxelEstimates) -> np.ndarray:
        """Quality bit map (n,) of estimates made by this estimator
        (:func:`fingerprint.fitting.quality.quality_flags`)."""
        return quality_flags(valid=ve.valid, parameters=ve.parameters,
                             uncertainty=ve.uncertainty, lower=self._lower,
                             upper=self._upper, scalar_columns=self._scalar_columns,
                             match_chi2=ve.match_chi2, n_features=self.feature_map.n_features,
                             fit_chi2=ve.fit_chi2, n_fit=self.n_fit_measurements,
                             noise_dof=self.noise_dof)

    def _diagnostics(self, diag: dict[str, np.ndarray], rows: np.ndarray, feats: np.ndarray,
                     pred_feats: np.ndarray, frames: np.ndarray | None,
                     sig2_feat: np.ndarray, res: np.ndarray, width: int,
                     weights: np.ndarray, idx: np.ndarray, sig2_b0: np.ndarray,
                     atom_params: np.ndarray) -> None:
        """Fill the quality diagnostics of the fitted ``rows`` (see VoxelEstimates). The
        residual is measured against the b=0 noise estimate when there is one (it does
        not absorb a poor fit as the pooled estimate does), else the pooled one."""
        fmap = self.feature_map
        sig2 = np.maximum(sig2_feat, SIGMA_FLOOR ** 2)
        k = max(int(feats.shape[1]), 1)
        spacing2 = self.dictionary_spacing2
        diag["match_chi2"][rows] = ((feats - pred_feats) ** 2).sum(axis=1) / (
            k * sig2 + spacing2)
        noise = sig2
        if self.noise_dof is not None:
            noise = np.where(np.isfinite(sig2_b0) & (sig2_b0 > 0),
                             np.maximum(sig2_b0, SIGMA_FLOOR ** 2), sig2)
        diag["fit_chi2"][rows] = res / (max(int(width), 1) * noise + spacing2)
        if fmap.kind == "zonal" and frames is not None:
            diag["orientation_sd"][rows] = profile_orientation_sd(
                fmap, pred_feats, frames, sig2, ~self._b0)
        elif self._orientation_columns.size >= 2:
            cols = self._orientation_columns[:2]
            atom_axes = angles_to_frames(atom_params[:, cols])
            best = idx[np.arange(idx.shape[0]), np.argmax(weights, axis=1)]
            diag["orientation_sd"][rows] = neighbour_cone_angle(weights, idx, atom_axes,
                                                                atom_axes[best])

    def _aligned_frames(self, ynorm: np.ndarray, frames: np.ndarray, sig2: np.ndarray,
                        query: np.ndarray | None = None) -> np.ndarray:
        """Frames (n, 3) moved to the axis that best fits the angular profile of each
        voxel's first match: a quick match in ``frames`` (:data:`PROFILE_NEIGHBORS` atoms)
        of ``query`` (features in ``frames``; default those of ``ynorm``; the uncorrected
        signals' serve as well), whose posterior-weighted features are held fixed while
        the axis is fitted to ``ynorm`` (:meth:`~fingerprint.fitting.frame.FrameEstimator.align`).

        The starting frame comes from a free zonal fit, whose profile bends towards the
        noise of the axis it is fitted around; the matched profile cannot, so the new
        axis is closer to the fibre's for dispersed voxels (docs/fitting.md)."""
        fmap = self.feature_map
        lap = Laps("fit/align/")
        if query is None:
            query = fmap.voxel_features(ynorm, frames)
        dist, idx = self.matcher.search(query, PROFILE_NEIGHBORS,
                                        ef_search=PROFILE_EF_SEARCH, nprobe=PROFILE_NPROBE)
        idx, atom_feats, atom_params, _ = self._atoms(idx)
        lap("search")
        _, _, weights = posterior_mean(dist, idx, atom_params, sig2, self.temperature)
        profile = weighted_atoms(weights, idx, atom_feats)
        fe = self.frame_estimator
        assert fe is not None  # zonal feature maps have a frame estimator
        out = fe.align(ynorm, frames, fmap.zonal_coefficients(profile))
        lap("frames")
        return out

    def _noise(self, plain: np.ndarray, frames: np.ndarray | None, sigma_b0: np.ndarray,
               s0: np.ndarray, rss: np.ndarray | None = None) -> np.ndarray:
        """Noise standard deviation (raw units) per voxel: the b0 spread pooled with the
        residual of the zonal fit (weighted by degrees of freedom; the residual's ~250
        degrees of freedom on HCP make it the more precise of the two); for other
        feature kinds the b0 spread alone, or the residual when there are too few b0s.
        ``rss``: the zonal residual sum of squares of ``plain`` when already known."""
        fmap = self.feature_map
        n_b0 = int(self._b0.sum())
        nu_b0 = max(n_b0 - 1, 0) if n_b0 >= MIN_B0_FOR_NOISE else 0
        has_b0 = np.isfinite(sigma_b0) & (nu_b0 > 0)
        if fmap.kind == "signal" or (fmap.kind == "shell_means" and has_b0.all()):
            return np.where(has_b0, sigma_b0, 0.0)
        if rss is None:
            _, rss = fmap.voxel_features(plain, frames, return_rss=True)
        nu_res = max(int(np.sum(fmap.shell_of >= 0)) - fmap.n_fitted_coefficients, 1)
        var_res = rss / nu_res * s0 ** 2
        if fmap.kind == "shell_means":  # within-shell spread is not only noise
            return np.where(has_b0, sigma_b0, np.sqrt(var_res))
        var_b0 = np.where(has_b0, sigma_b0, 0.0) ** 2
        w_b0 = np.where(has_b0, nu_b0, 0)
        return np.sqrt((w_b0 * var_b0 + nu_res * var_res) / (w_b0 + nu_res))

    def _frames(self, ynorm: np.ndarray, seeded: np.ndarray, given: np.ndarray | None
                ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Fibre frames (n, 3) of b0-normalised signals (None for non-zonal features):
        the orientation given in x0 where ``seeded``, else the tensor eigenvector refined
        by one bounded Gauss-Newton step of the zonal fit; plus, when the refinement ran,
        the zonal residual sum of squares at each voxel's starting frame (the tensor's,
        or the given one; a noise estimate that costs nothing more)."""
        if self.feature_map.kind != "zonal":
            return None, None
        if given is not None and seeded.all():
            return given, None
        fe = self.frame_estimator
        assert fe is not None  # zonal feature maps have a frame estimator
        tensor = fe.tensor_directions(ynorm)
        rss = None
        if fe.refine_iterations > 0:
            # checking that the bounded step lowers the residual costs a pass over the
            # data and changed no result in the benchmarks
            frames, rss = fe.refine_unchecked(ynorm, tensor)
        else:
            frames = tensor
        if given is not None and seeded.any():
            frames[seeded] = given[seeded]
            if rss is not None:  # each voxel's residual at its own starting frame
                rss[seeded] = self.feature_map.voxel_features(
                    ynorm[seeded], given[seeded], return_rss=True)[1]
        return frames, rss

    def _shell_means(self, signals: np.ndarray) -> np.ndarray:
        """Per-shell spherical means (n, shells): the feature map's weighted means for
        diffusion-weighted shells, plain means for b0 shells."""
        shells = np.asarray(self.scheme.shell_indices)
        n_shells = int(shells.max()) + 1
        weights = self.feature_map.mean_weights
        out = np.empty((signals.shape[0], n_shells))
        for s in range(n_shells):
            members = shells == s
            w = weights[members] if weights is not None else np.zeros(int(members.sum()))
            if w.sum() > 0:
                out[:, s] = signals[:, members] @ (w / w.sum())
            else:
                out[:, s] = signals[:, members].mean(axis=1)
        return out


def _simplex_names(sampling: Mapping[str, Any]) -> list[str]:
    for p in sampling.get("parameters", []) or []:
        if p.get("kind") == "simplex":
            return list(p.get("names") or [])
    return []
