"""Matching features: what a dictionary atom and a voxel are compared on.

Three kinds, chosen from the model by :meth:`FeatureMap.from_model`:

``zonal`` (models with exactly one orientation parameter, e.g. NODDI, Ball-Stick)
    Such a model's signal on a shell depends only on u = g . mu, the cosine between
    the gradient and the fibre axis mu. In a frame aligned with mu, every shell's signal
    is fitted by least squares with even Legendre polynomials,
    S(g) ~ sum_l c_l P_l(g . mu), l = 0, 2, 4, 6 (fewer on shells with few directions).
    Dictionary atoms are stored with mu along z; voxels use their own fibre frame
    (:mod:`fingerprint.fitting.frame`). The coefficients are *whitened*: c_l is
    multiplied by sqrt(N_s / (2l + 1)) (N_s: measurements of the shell), because for
    directions spread over the sphere the Gram matrix of P_l(u) is N_s / (2l + 1) on
    the diagonal; the squared Euclidean distance between two feature vectors is then
    the squared signal residual (b0-normalised units) between the two zonal fits, so
    feature distances are noise-calibrated log-likelihoods.
``shell_means`` (spherical-mean models)
    The spherical mean of the b0-normalised signal of every non-b0 shell, times
    sqrt(N_s) (same whitening). It is the l = 0 coefficient of a regularised even
    spherical-harmonic fit of the shell (as dmipy estimates it), which is a fixed
    weighted mean of the shell's measurements: the plain mean when the directions cover
    the sphere evenly, and unbiased when they do not.
``signal`` (anything else: no or several orientations)
    The b0-normalised signal of every diffusion-weighted measurement.

Changing what features mean changes :data:`FEATURES_VERSION`, which invalidates stored
dictionaries (they are rebuilt).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import numpy as np

from fingerprint.errors import InputError

from .frame import FrameEstimator

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = ["FEATURES_VERSION", "MAX_LEGENDRE_COEFFICIENTS", "FeatureMap"]

#: Version of the feature definition (stored in every dictionary).
FEATURES_VERSION = 1
#: Even Legendre orders per shell at most (4: l = 0, 2, 4, 6).
MAX_LEGENDRE_COEFFICIENTS = 4
#: Directions per Legendre coefficient a shell needs for that many coefficients.
_DIRECTIONS_PER_COEFFICIENT = 5
_RIDGE = 1e-10


def _n_orientations(model: Any) -> int:
    names = getattr(model, "orientation_parameter_names", None)
    if names is None:
        types = getattr(model, "parameter_types", {}) or {}
        names = [n for n in model.parameter_names if types.get(n) == "orientation"]
    return len(list(names))


@dataclass(frozen=True, eq=False)
class FeatureMap:
    """How signals become matching features for one model on one acquisition scheme.

    Immutable and stateless: safe to share between threads.

    Attributes
    ----------
    kind: ``'zonal'``, ``'shell_means'`` or ``'signal'`` (see the module docstring).
    shell_of: (N,) feature shell of each measurement, -1 for b0s / unused ones.
    n_coefficients: (S,) Legendre coefficients per feature shell (zonal).
    offsets: (S,) first feature column of each shell (zonal).
    weights: (k,) whitening factor of every feature.
    shell_columns: (S,) for ``shell_means``: column of each feature shell in the per-shell
        signal layout of spherical-mean dictionaries.
    dwi_columns: indices of the measurements that enter the features.
    bvalues: (N,) b-values of the scheme, s/m².
    mean_weights: (N,) for ``shell_means``: weight of each measurement in its shell's
        spherical mean (each shell's weights sum to 1; 0 for b0s, unused measurements and
        other feature kinds).
    """

    kind: str
    directions: np.ndarray
    b0_mask: np.ndarray
    shell_of: np.ndarray
    n_coefficients: np.ndarray
    offsets: np.ndarray
    weights: np.ndarray
    shell_columns: np.ndarray
    dwi_columns: np.ndarray
    n_measurements: int
    bvalues: np.ndarray | None = None
    feature_names: tuple[str, ...] = field(default=())
    mean_weights: np.ndarray | None = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, model: MultiCompartmentModelProperties, scheme: AcquisitionScheme
                   ) -> FeatureMap:
        """Feature map of ``model`` on ``scheme`` (an AcquisitionScheme)."""
        if bool(getattr(model, "is_spherical_mean", False)):
            kind = "shell_means"
        elif _n_orientations(model) == 1:
            kind = "zonal"
        else:
            kind = "signal"
        return cls.for_scheme(scheme, kind)

    @classmethod
    def for_scheme(cls, scheme: AcquisitionScheme, kind: str = "zonal") -> FeatureMap:
        """Feature map of the given ``kind`` on ``scheme``."""
        b0 = np.asarray(scheme.b0_mask, dtype=bool)
        n = int(b0.size)
        if b0.all():
            raise InputError("the acquisition scheme has no diffusion-weighted measurements")
        shells = np.asarray(scheme.shell_indices, dtype=np.int64)
        shell_b0 = np.asarray(scheme.shell_b0_mask, dtype=bool)
        dirs = np.ascontiguousarray(np.asarray(scheme.gradient_directions, dtype=np.float64))
        dwi_shells = [s for s in range(shell_b0.size) if not shell_b0[s]
                      and np.any((shells == s) & ~b0)]
        shell_of = np.full(n, -1, dtype=np.int64)
        for i, s in enumerate(dwi_shells):
            shell_of[(shells == s) & ~b0] = i
        counts = np.array([int(np.sum(shell_of == i)) for i in range(len(dwi_shells))])
        names: list[str] = []
        if kind == "zonal":
            ncoef = np.clip(counts // _DIRECTIONS_PER_COEFFICIENT, 1,
                            MAX_LEGENDRE_COEFFICIENTS).astype(np.int64)
            offsets = np.concatenate([[0], np.cumsum(ncoef)[:-1]]).astype(np.int64)
            weights = []
            for i, (c, nc) in enumerate(zip(counts, ncoef, strict=True)):
                for j in range(int(nc)):
                    weights.append(np.sqrt(c / (4.0 * j + 1.0)))
                    names.append(f"shell{i}_l{2 * j}")
            weights_arr = np.asarray(weights, dtype=np.float64)
            shell_columns = np.asarray(dwi_shells, dtype=np.int64)
        elif kind == "shell_means":
            ncoef = np.ones(len(dwi_shells), dtype=np.int64)
            offsets = np.arange(len(dwi_shells), dtype=np.int64)
            weights_arr = np.sqrt(counts.astype(np.float64))
            shell_columns = np.asarray(dwi_shells, dtype=np.int64)
            names = [f"shell{i}_mean" for i in range(len(dwi_shells))]
        elif kind == "signal":
            ncoef = np.zeros(0, dtype=np.int64)
            offsets = np.zeros(0, dtype=np.int64)
            weights_arr = np.ones(int(np.sum(~b0)), dtype=np.float64)
            shell_columns = np.zeros(0, dtype=np.int64)
            names = [f"measurement{i}" for i in np.flatnonzero(~b0)]
        else:
            raise InputError(f"unknown feature kind {kind!r}; use 'zonal', 'shell_means' "
                             "or 'signal'")
        mean_weights = np.zeros(n)
        if kind == "shell_means":
            for i in range(len(dwi_shells)):
                members = np.flatnonzero(shell_of == i)
                mean_weights[members] = spherical_mean_weights(dirs[members])
        arrays = dict(directions=dirs, b0_mask=b0, shell_of=shell_of, n_coefficients=ncoef,
                      offsets=offsets, weights=weights_arr, shell_columns=shell_columns,
                      dwi_columns=np.flatnonzero(~b0).astype(np.int64),
                      bvalues=np.array(scheme.bvalues, dtype=np.float64),
                      mean_weights=mean_weights)
        for a in arrays.values():
            a.setflags(write=False)
        return cls(kind=kind, n_measurements=n, feature_names=tuple(names), **arrays)

    # ---------------------------------------------------------------- properties
    @property
    def n_features(self) -> int:
        """k, the length of a feature vector."""
        return int(self.weights.size)

    @property
    def needs_frame(self) -> bool:
        """True when voxel features depend on a per-voxel fibre frame."""
        return self.kind == "zonal"

    @property
    def n_fitted_coefficients(self) -> int:
        """Number of linear coefficients fitted to a voxel's DWIs (for residual dof)."""
        return self.n_features if self.kind != "signal" else 0

    # ---------------------------------------------------------------- atoms
    def atom_features(self, signals: np.ndarray) -> np.ndarray:
        """Features (n, k) float32 of dictionary atoms ``signals`` (n, N) -- or (n, shells)
        for spherical-mean models -- simulated with S0 = 1 and, for orientation models,
        the fibre along z (canonical frame)."""
        signals = np.asarray(signals)
        if signals.ndim != 2:
            raise InputError(f"atom signals must be 2-D (atoms, measurements), got shape "
                             f"{signals.shape}")
        if self.kind == "shell_means":
            if signals.shape[1] <= int(self.shell_columns.max(initial=0)):
                raise InputError(f"spherical-mean atom signals have {signals.shape[1]} "
                                 "columns; expected one per shell")
            out = signals[:, self.shell_columns].astype(np.float64) * self.weights
            return np.ascontiguousarray(out, dtype=np.float32)
        self._check_width(signals)
        if self.kind == "signal":
            return np.ascontiguousarray(signals[:, self.dwi_columns], dtype=np.float32)
        frames = np.zeros((signals.shape[0], 3))
        frames[:, 2] = 1.0
        feats, _ = self._zonal(signals, frames)
        return feats

    # ---------------------------------------------------------------- voxels
    @overload
    def voxel_features(self, signals: np.ndarray, frames: np.ndarray | None = None, *,
                       return_rss: Literal[False] = False,
                       return_gram: Literal[False] = False) -> np.ndarray: ...

    @overload
    def voxel_features(self, signals: np.ndarray, frames: np.ndarray | None = None, *,
                       return_rss: Literal[True], return_gram: Literal[True]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]: ...

    @overload
    def voxel_features(self, signals: np.ndarray, frames: np.ndarray | None = None, *,
                       return_rss: Literal[True], return_gram: Literal[False] = False
                       ) -> tuple[np.ndarray, np.ndarray]: ...

    @overload
    def voxel_features(self, signals: np.ndarray, frames: np.ndarray | None = None, *,
                       return_rss: Literal[False] = False, return_gram: Literal[True]
                       ) -> tuple[np.ndarray, np.ndarray]: ...

    def voxel_features(self, signals: np.ndarray, frames: np.ndarray | None = None, *,
                       return_rss: bool = False, return_gram: bool = False
                       ) -> np.ndarray | tuple[np.ndarray, ...]:
        """Features (n, k) float32 of voxels ``signals`` (n, N), already divided by their
        b0 (S0 = 1), in the voxels' own fibre ``frames`` (n, 3) unit vectors (needed by
        the zonal kind; computed by a DTI fit when None).

        With ``return_rss`` also returns the residual sum of squares (n,) of the fit
        behind the features (zonal / shell means; zeros for the signal kind), from which
        the noise level can be estimated; with ``return_gram`` (zonal kind) also each
        voxel's per-shell Gram matrices (n, shells, L, L) of the fit, from which
        :meth:`residuals` computes the residual of any other coefficients."""
        signals = np.asarray(signals)
        self._check_width(signals)
        n = signals.shape[0]
        if self.kind == "signal":
            feats = np.ascontiguousarray(signals[:, self.dwi_columns], dtype=np.float32)
            rss = np.zeros(n)
        elif self.kind == "shell_means":
            # lazy: keeps numba off import
            from fingerprint.kernels import run_parallel
            from fingerprint.kernels.features import shell_means

            feats, rss = run_parallel(shell_means,
                                      np.ascontiguousarray(signals, dtype=np.float64),
                                      self.shell_of, int(self.shell_columns.size),
                                      self.weights, self.mean_weights)
        else:
            if frames is None:
                frames = FrameEstimator.for_scheme(self).estimate(signals)
            frames = np.asarray(frames, dtype=np.float64)
            if frames.shape != (n, 3):
                raise InputError(f"frames must have shape ({n}, 3), got {frames.shape}")
            if return_gram:
                feats, rss, gram = self._zonal(signals, frames, gram=True)
                return (feats, rss, gram) if return_rss else (feats, gram)
            feats, rss = self._zonal(signals, frames)
        if return_gram:
            raise InputError(f"Gram matrices exist only for zonal features, not {self.kind!r}")
        return (feats, rss) if return_rss else feats

    def zonal_coefficients(self, features: np.ndarray) -> np.ndarray:
        """Undo the whitening: Legendre coefficients (n, k) from features (zonal kind)."""
        return np.asarray(features, dtype=np.float64) / self.weights

    def reconstruct(self, features: np.ndarray, frames: np.ndarray | None) -> np.ndarray:
        """Signals (n, N) (S0 = 1) described by ``features`` (n, k) in ``frames`` (n, 3):
        the per-shell Legendre series (zonal), the shell mean (shell means) or the signal
        itself; b0 measurements are 1."""
        features = np.asarray(features, dtype=np.float64)
        n = features.shape[0]
        out = np.ones((n, self.n_measurements))
        if self.kind == "signal":
            out[:, self.dwi_columns] = features
            return out
        coef = features / self.weights
        if self.kind == "shell_means":
            for j in self.dwi_columns:
                out[:, j] = coef[:, self.shell_of[j]]
            return out
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import reconstruct_zonal

        return run_parallel(reconstruct_zonal, coef,
                            np.ascontiguousarray(frames, dtype=np.float64), self.directions,
                            self.shell_of, self.n_coefficients, self.offsets, out)

    # ---------------------------------------------------------------- helpers
    def _check_width(self, signals: np.ndarray) -> None:
        if signals.ndim != 2 or signals.shape[1] != self.n_measurements:
            raise InputError(
                f"signals must have shape (n, {self.n_measurements}) for this acquisition "
                f"scheme, got {signals.shape}")

    def _zonal(self, signals: np.ndarray, frames: np.ndarray, gram: bool = False
               ) -> tuple[np.ndarray, ...]:
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import zonal_features

        n = signals.shape[0]
        width = max(int(self.n_coefficients.max(initial=1)), 1)
        out = np.zeros((n, self.n_coefficients.size, width, width) if gram else (0, 1, 1, 1))
        feats, rss = run_parallel(zonal_features,
                                  np.ascontiguousarray(signals, dtype=np.float64),
                                  np.ascontiguousarray(frames, dtype=np.float64),
                                  self.directions, self.shell_of, self.n_coefficients,
                                  self.offsets, self.weights, _RIDGE, out)
        return (feats, rss, out) if gram else (feats, rss)

    def residuals(self, signals: np.ndarray, fit: tuple[np.ndarray, np.ndarray, np.ndarray],
                  coefficients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Residual and total sums of squares (n,) of b0-normalised ``signals`` (n, N)
        against the Legendre ``coefficients`` (n, k) (unwhitened; b0s predicted as 1),
        in the frames of ``fit`` = :meth:`voxel_features` (features, rss, gram) of the
        same signals with ``return_rss`` and ``return_gram`` (zonal kind)."""
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import zonal_fit_residuals

        feats, rss, gram = fit
        return run_parallel(zonal_fit_residuals,
                            np.ascontiguousarray(signals, dtype=np.float64),
                            np.ascontiguousarray(feats, dtype=np.float64),
                            np.ascontiguousarray(rss, dtype=np.float64), gram,
                            np.ascontiguousarray(coefficients, dtype=np.float64),
                            self.weights, self.shell_of, self.n_coefficients, self.offsets)


#: Laplace-Beltrami regularisation of the per-shell spherical-harmonic fit behind the
#: spherical means (the value DIPY and dmipy use for their shell fits).
SPHERICAL_MEAN_REGULARISATION = 0.006


def spherical_mean_weights(directions: np.ndarray,
                           regularisation: float = SPHERICAL_MEAN_REGULARISATION
                           ) -> np.ndarray:
    """Weights (n,) summing to 1 such that ``weights @ signal`` is the spherical mean of an
    antipodally symmetric signal measured along ``directions`` (n, 3) unit vectors.

    The spherical mean is Y_00 times the l = 0 coefficient of a regularised least-squares
    fit of even real spherical harmonics, of the highest order the directions support
    (at most 8, at least two measurements per coefficient); for evenly spread directions
    the weights are ~1/n, for uneven ones they undo the uneven coverage.
    """
    from scipy.special import sph_harm_y  # lazy: keeps SciPy off import

    dirs = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
    n = dirs.shape[0]
    if n < 6:
        return np.full(n, 1.0 / max(n, 1))
    lmax = 0
    while lmax < 8 and (lmax + 3) * (lmax + 4) // 2 * 2 <= n:
        lmax += 2
    if lmax == 0:
        return np.full(n, 1.0 / n)
    theta = np.arccos(np.clip(dirs[:, 2], -1.0, 1.0))
    phi = np.arctan2(dirs[:, 1], dirs[:, 0])
    columns, penalty = [], []
    for l_ in range(0, lmax + 1, 2):
        for m in range(-l_, l_ + 1):
            y = sph_harm_y(l_, abs(m), theta, phi)
            if m < 0:
                col = np.sqrt(2.0) * y.imag
            elif m == 0:
                col = y.real
            else:
                col = np.sqrt(2.0) * y.real
            columns.append(col)
            penalty.append(float(l_ * l_ * (l_ + 1) ** 2))
    basis = np.stack(columns, axis=1)
    gram = basis.T @ basis + regularisation * np.diag(penalty)
    first_row = np.linalg.solve(gram, basis.T)[0]
    weights = first_row / np.sqrt(4.0 * np.pi)
    return weights / weights.sum()
