"""From the k nearest atoms of a voxel to its parameter estimate.

Two cheap steps, both vectorised over voxels (Numba kernels in
:mod:`fingerprint.kernels.features`):

1. **Posterior-weighted neighbours** (:func:`posterior_mean`). Features are whitened, so
   the squared feature distance d_j between the voxel and atom j is the squared signal
   residual of that atom (b0-normalised units) up to a voxel constant. Under Gaussian
   noise of variance sigma² the likelihood of atom j is proportional to
   exp(-d_j / (2 sigma²)); with the dictionary's sampling as the prior, the posterior
   mean of the parameters is the likelihood-weighted mean over atoms, and the
   neighbours carry almost all the weight. sigma is estimated per voxel (spread of the
   b0s, or the residual of the feature fit). The weighted standard deviation is the
   reported uncertainty.
2. **Local-linear Gauss-Newton** (:func:`local_linear_step`). Around the posterior mean,
   the features of the k neighbours are regressed (weighted least squares) on their
   parameters: f ~ f0 + J (theta - theta0). This *learns the Jacobian from the
   dictionary*, with no forward-model evaluation, and one Gauss-Newton step
   theta0 + (J^T J)^-1 J^T (q - f0) moves the estimate off the dictionary grid towards
   the voxel. Steps are limited to a few neighbourhood widths and clipped to the
   dictionary's bounds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from fingerprint.fitting.features import FeatureMap

__all__ = ["local_linear_step", "orientation_curvature", "posterior_mean",
           "weighted_atoms"]


def posterior_mean(distances: np.ndarray, indices: np.ndarray, atom_parameters: np.ndarray,
                   sigma2: np.ndarray, temperature: float = 1.0,
                   orientation_curvature: np.ndarray | None = None,
                   marginalise: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior mean (n, P), standard deviation (n, P) and normalised weights (n, k) of
    the neighbours' parameters, from squared feature distances (n, k), atom indices
    (n, k) (-1: none), the atoms' parameters (atoms, P) and the noise variance (n,) in
    feature units. ``temperature`` > 1 flattens the weights.

    ``orientation_curvature`` (atoms,) with ``marginalise`` (n,) bool adds the Laplace
    factor 1 / (1 + J_j / sigma²) of integrating each atom's likelihood over the fibre
    orientation (see :func:`orientation_curvature`) for voxels whose frame was estimated
    from their own data."""
    # lazy: keeps numba off import
    from fingerprint.kernels import run_parallel
    from fingerprint.kernels.features import posterior_average

    n = np.shape(distances)[0]
    if orientation_curvature is None:
        orientation_curvature = np.zeros(np.shape(atom_parameters)[0])
    if marginalise is None:
        marginalise = np.zeros(n, dtype=np.bool_)
    # always a read-only view: writable and read-only arrays are distinct Numba types, and
    # each would compile the kernel once more
    curvature = np.ascontiguousarray(orientation_curvature, dtype=np.float64).view()
    curvature.setflags(write=False)
    return run_parallel(posterior_average, np.ascontiguousarray(distances, dtype=np.float64),
                             np.ascontiguousarray(indices, dtype=np.int64),
                             np.ascontiguousarray(atom_parameters, dtype=np.float64),
                             np.ascontiguousarray(sigma2, dtype=np.float64),
                             float(temperature),
                             curvature,
                             np.ascontiguousarray(marginalise, dtype=np.bool_))


def weighted_atoms(weights: np.ndarray, indices: np.ndarray, table: np.ndarray) -> np.ndarray:
    """Posterior-weighted average (n, columns) of rows of ``table`` (atoms, columns), e.g.
    the atoms' features, over each voxel's neighbours ``indices`` (n, k) (-1: none) with
    normalised ``weights`` (n, k)."""
    # lazy: keeps numba off import
    from fingerprint.kernels import run_parallel
    from fingerprint.kernels.features import weighted_rows

    return run_parallel(weighted_rows, np.ascontiguousarray(weights, dtype=np.float64),
                        np.ascontiguousarray(indices, dtype=np.int64),
                        np.ascontiguousarray(table, dtype=np.float64))


def orientation_curvature(feature_map: FeatureMap, atom_features: np.ndarray) -> np.ndarray:
    """Curvature J (atoms,) of each atom's squared residual with respect to a small tilt
    of its axis, from its whitened zonal features f_l:
    J = 1/2 sum_shells sum_l l (l + 1) f_l² (from the orthogonality of the associated
    Legendre functions, directions spread over each shell). Zero for non-zonal maps."""
    feats = np.asarray(atom_features, dtype=np.float64)
    if getattr(feature_map, "kind", None) != "zonal":
        return np.zeros(feats.shape[0])
    ell = np.concatenate([2.0 * np.arange(int(nc)) for nc in feature_map.n_coefficients])
    return 0.5 * (feats ** 2 * (ell * (ell + 1.0))).sum(axis=1)


def local_linear_step(queries: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                      atom_features: np.ndarray, atom_parameters: np.ndarray,
                      start: np.ndarray, columns: np.ndarray, lower: np.ndarray,
                      upper: np.ndarray, max_step: np.ndarray, *,
                      floor_weight: float = 0.05, damping: float = 0.0,
                      shrinkage: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One dictionary-Jacobian Gauss-Newton step per voxel (see the module docstring).

    ``columns`` (m,) are the parameter columns refined, ``lower``/``upper`` (m,) their
    bounds, ``max_step`` (n, m) the largest move per voxel and column; neighbour weights
    are floored at ``floor_weight`` times the largest so that the regression sees the
    whole neighbourhood. ``shrinkage`` > 0 scales each step (and the change of the
    predicted features from the neighbours' weighted mean) by min(1, shrinkage / n_eff),
    with n_eff = 1 / sum(weights²) the effective number of neighbours. Returns
    (parameters (n, P), predicted features (n, k))."""
    # lazy: keeps numba off import
    from fingerprint.kernels import run_parallel
    from fingerprint.kernels.features import local_linear_refine

    return run_parallel(
        local_linear_refine,
        np.ascontiguousarray(queries, dtype=np.float64),
        np.ascontiguousarray(indices, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float64),
        np.ascontiguousarray(atom_features, dtype=np.float64),
        np.ascontiguousarray(atom_parameters, dtype=np.float64),
        np.ascontiguousarray(start, dtype=np.float64),
        np.ascontiguousarray(lower, dtype=np.float64),
        np.ascontiguousarray(upper, dtype=np.float64),
        np.ascontiguousarray(columns, dtype=np.int64), float(floor_weight), float(damping),
        np.ascontiguousarray(max_step, dtype=np.float64), float(shrinkage))
