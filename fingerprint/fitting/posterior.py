"""Posterior mean over many neighbours under the exact Rician likelihood.

Where the data barely determine a parameter (axon diameters at clinical and preclinical
SNR), the best estimate under absolute or squared error is a posterior average, and the
matcher's 32 nearest atoms, weighted by a Gaussian likelihood of bias-corrected
features, cover too little of the posterior and weigh it wrongly where signals are near
the noise floor (high b, restricted compartments). :func:`rician_posterior` re-weighs
many more atoms (a named model's recipe ``[fit] posterior_neighbors``, e.g. 512) with the
exact Rician likelihood of each voxel's measured magnitudes:

    log L_j = sum_m [ -A_jm² / (2 s²) + log I0(A_jm y_m / s²) ]   (+ const.)

with y the b0-normalised measurements, A_j the atom's signal in the voxel's fibre frame
(its zonal features evaluated at the measurements' directions) and s² the voxel's noise
variance (b0-normalised) plus :data:`~fingerprint.fitting.estimator.SPACING_FRACTION` of
the dictionary's squared atom spacing per feature, as in the matcher's weights (so that
noise-free voxels average a few close atoms instead of snapping to one). The scalar
parameters become the weighted means of the atoms' (the dictionary's sampling is the
prior; top-level fractions stay on the simplex: a convex combination) and their spread
the weighted standard deviation; the fibre axis is kept. A Gamma diameter distribution
(AxCaliber) reports the posterior-mean shape alpha and the scale beta that makes its mean
diameter 2 alpha beta the posterior mean of the atoms' mean diameters (the product of
the separate means is not: shape and scale are strongly anti-correlated). The goodness of fit is
recomputed from the posterior-mean signal.

Measured on the restricted-model phantoms (docs/benchmarks.md, "Restricted models"): the
ActiveAx diameter error at SNR 30 falls from the 32-neighbour match's towards the Bayes
bound of an oracle that knows S0, the noise and the axis.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from .estimator import SPACING_FRACTION
from .frame import angles_to_frames
from .refine import local_linear_step

if TYPE_CHECKING:
    from .estimator import FingerprintEstimator, VoxelEstimates

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_VALUES", "rician_posterior"]

#: Doubles a block of voxels may hold in temporary arrays (voxels x neighbours x
#: features): about 32 MB.
BLOCK_VALUES = 4_000_000


def _zonal_basis(est: FingerprintEstimator, frames: np.ndarray) -> np.ndarray:
    """(n, F, N) signal of a unit whitened feature at every measurement in each frame (0
    at b0s): the atoms' signals in frame i are their features times basis[i]."""
    fmap = est.feature_map
    nf = fmap.n_features
    n = frames.shape[0]
    unit = np.tile(np.eye(nf), (n, 1))
    basis = fmap.reconstruct(unit, np.repeat(frames, nf, axis=0)).reshape(n, nf, -1)
    basis[:, :, est._b0] = 0.0
    return basis


def _gamma_columns(est: FingerprintEstimator) -> tuple[int, int] | None:
    """Positions of a Gamma distribution's shape and scale among the scalar columns, or
    None when the model has none."""
    names = list(est.parameter_names)
    alpha = [n for n in names if n.endswith("DD1Gamma_1_alpha")]
    beta = [n for n in names if n.endswith("DD1Gamma_1_beta")]
    if not (alpha and beta):
        return None
    scalars = list(est._scalar_columns)
    return (scalars.index(est._slices[alpha[0]].start),
            scalars.index(est._slices[beta[0]].start))


def rician_posterior(est: FingerprintEstimator, data: np.ndarray, ve: VoxelEstimates,
                     neighbors: int, skip: np.ndarray | None = None) -> None:
    """Replace the scalar parameters, their uncertainty and the goodness of fit of the
    valid voxels of ``ve`` (estimated by ``est`` from raw signals ``data`` (n, N)) in
    place by the Rician posterior over their ``neighbors`` nearest atoms (module
    docstring). Voxels in ``skip`` (n,) bool (e.g. started from given values), without
    a positive noise estimate, or of models not matched on zonal features are left as
    they are."""
    fmap = est.feature_map
    if fmap.kind != "zonal" or not est.canonical_orientation or neighbors < 1:
        return
    ok = ve.valid & np.isfinite(ve.sigma) & (ve.sigma > 0) & np.isfinite(ve.s0)
    if skip is not None:
        ok &= ~np.asarray(skip, dtype=bool)
    rows = np.flatnonzero(ok)
    if rows.size == 0:
        return
    # lazy: keeps numba off import
    from fingerprint.kernels import run_parallel
    from fingerprint.kernels.features import rician_correct
    from fingerprint.kernels.posterior import rician_neighbour_loglik

    b0 = est._b0
    dw = ~b0
    scalars = est._scalar_columns
    frames = angles_to_frames(ve.parameters[rows][:, est._orientation_columns])
    y = np.asarray(data[rows], dtype=np.float64) / ve.s0[rows, None]
    sig = ve.sigma[rows] / ve.s0[rows]
    ynorm = run_parallel(rician_correct, y, sig, b0) if est.rician else y
    feats = fmap.voxel_features(ynorm, frames)
    k = min(int(neighbors), int(est.atom_parameters.shape[0]))
    _, idx = est.matcher.search(np.ascontiguousarray(feats, dtype=np.float32), k)
    sig2 = sig ** 2 + SPACING_FRACTION * est.dictionary_spacing2 / max(fmap.n_features, 1)
    atoms = est.atom_parameters
    gamma = _gamma_columns(est)
    block = max(1, BLOCK_VALUES // (k * max(fmap.n_features, atoms.shape[1])))
    for s in range(0, rows.size, block):
        sl = slice(s, s + block)
        ii = idx[sl]
        basis = np.ascontiguousarray(_zonal_basis(est, frames[sl])[:, :, dw])  # (b, F, M)
        ll = run_parallel(rician_neighbour_loglik, np.ascontiguousarray(y[sl][:, dw]),
                          np.ascontiguousarray(ii, dtype=np.int64), est.atom_features,
                          basis, np.ascontiguousarray(sig2[sl]))
        w = np.exp(ll - ll.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        safe = np.maximum(ii, 0)
        vals = atoms[safe][:, :, scalars]                           # (b, K, S)
        mean = np.einsum("bk,bks->bs", w, vals)
        var = np.einsum("bk,bks->bs", w, (vals - mean[:, None, :]) ** 2)
        if gamma is not None:  # the scale that gives the posterior-mean mean diameter
            ia, ib = gamma
            mean[:, ib] = np.einsum("bk,bk->b", w, vals[:, :, ia] * vals[:, :, ib]) / \
                mean[:, ia]
        r = rows[sl]
        if est.refine and est._refine_columns.size:
            # the matcher's local-linear step around the new mean, with the new weights:
            # shrunk to nothing when many atoms share the weight (noisy voxels), it moves
            # low-noise voxels off the dictionary's grid
            rc = est._refine_columns
            start = ve.parameters[r].copy()
            start[:, scalars] = mean
            sd = np.full_like(start, np.nan)
            sd[:, scalars] = np.sqrt(var)
            span = (est._upper - est._lower)[rc]
            max_step = 3.0 * np.nan_to_num(sd[:, rc]) + 0.02 * span
            stepped, _ = local_linear_step(feats[sl], ii, w, est.atom_features, atoms, start, rc,
                                           est._lower[rc], est._upper[rc], max_step,
                                           shrinkage=est.refine_shrinkage)
            simplex = est._simplex_columns
            if len(simplex) >= 2:
                total = stepped[:, simplex[:-1]].sum(axis=1)
                over = total > 1.0
                stepped[np.ix_(over, simplex[:-1])] /= total[over, None]
                stepped[:, simplex[-1]] = 1.0 - np.minimum(total, 1.0)
            mean = stepped[:, scalars]
        ve.parameters[np.ix_(r, scalars)] = mean
        ve.uncertainty[np.ix_(r, scalars)] = np.sqrt(var)
        fitted = np.einsum("bf,bfm->bm", np.einsum("bk,bkf->bf", w, est.atom_features[safe]),
                           basis)
        obs = ynorm[sl][:, dw]
        res = ((obs - fitted) ** 2).sum(axis=1) + ((ynorm[sl][:, b0] - 1.0) ** 2).sum(axis=1)
        tot = ((ynorm[sl] - ynorm[sl].mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            ve.r2[r] = np.where(tot > 0, 1.0 - res / tot, np.nan)
        ve.mse[r] = res / ynorm.shape[1]
    logger.debug("Rician posterior over %d neighbours of %d voxels", k, rows.size)
