"""Numba kernels of the Rician posterior over a voxel's neighbours
(:mod:`fingerprint.fitting.posterior`).

Nopython, cached and parallel over voxels (``prange``), with a serial twin for small
batches (:func:`fingerprint.kernels.run_parallel`); plain float64 arrays in and out, no
state.
"""

from __future__ import annotations

import math

import numpy as np

from fingerprint.kernels import njit, parallel_kernel, prange

#: Below this many voxels the kernels run their serial twins.
SERIAL_ROWS = 512

__all__ = ["log_i0e", "rician_neighbour_loglik"]


@njit(cache=True, nogil=True)
def log_i0e(x: float) -> float:
    """log(I0(x) exp(-x)) for x >= 0 (Abramowitz & Stegun 9.8.1-9.8.2: within 1e-6 of
    the exact value)."""
    if x <= 3.75:
        t = (x / 3.75) ** 2
        i0 = 1.0 + t * (3.5156229 + t * (3.0899424 + t * (1.2067492 + t * (
            0.2659732 + t * (0.0360768 + t * 0.0045813)))))
        return math.log(i0) - x
    t = 3.75 / x
    p = 0.39894228 + t * (0.01328592 + t * (0.00225319 + t * (-0.00157565 + t * (
        0.00916281 + t * (-0.02057706 + t * (0.02635537 + t * (-0.01647633
                                                                  + t * 0.00392377)))))))
    return math.log(p) - 0.5 * math.log(x)


@parallel_kernel(serial_rows=SERIAL_ROWS, nogil=True)
def rician_neighbour_loglik(measured: np.ndarray, indices: np.ndarray,
                            atom_features: np.ndarray, basis: np.ndarray,
                            sigma2: np.ndarray) -> np.ndarray:
    """Rician log-likelihood (n, K) (up to a constant per voxel; -inf where an index is
    -1) of each voxel's measured magnitudes ``measured`` (n, M) given each of its
    neighbours ``indices`` (n, K): the atom's signal at measurement m is
    sum_f atom_features[j, f] basis[i, f, m] (clipped at 0), the noise variance
    ``sigma2`` (n,), all b0-normalised."""
    n, k = indices.shape
    nf = atom_features.shape[1]
    m = measured.shape[1]
    out = np.empty((n, k))
    for i in prange(n):
        s2 = sigma2[i]
        pred = np.empty(m)
        for a in range(k):
            j = indices[i, a]
            if j < 0:
                out[i, a] = -np.inf
                continue
            for c in range(m):
                pred[c] = 0.0
            for f in range(nf):
                v = atom_features[j, f]
                for c in range(m):
                    pred[c] += v * basis[i, f, c]
            total = 0.0
            for c in range(m):
                p = max(pred[c], 0.0)
                z = abs(p * measured[i, c] / s2)
                total += log_i0e(z) + z - p * p / (2.0 * s2)
            out[i, a] = total
    return out
