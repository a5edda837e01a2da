"""Which voxels can be fitted: one rule for ``model.fit``, ``fit_volume``, the CLI and the
server.

A voxel is fitted when it is in the mask (the given one, or by default every voxel whose
mean b=0 signal is finite and positive: :func:`default_mask`) and its signals are usable
(:func:`usable_voxels`): every value finite, none negative, and a positive mean b=0
signal. Voxels of the mask that are not usable are left out of the fit, counted and
reported once per fit (:func:`report_unusable`, a warning with the count and the first
few coordinates), and hold NaN in every map; they never stop a fit.
"""

from __future__ import annotations

import logging

import numpy as np

from fingerprint.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["REPORTED_COORDINATES", "default_mask", "report_unusable", "usable_voxels"]

#: Coordinates of unusable voxels listed in the warning.
REPORTED_COORDINATES = 5


def usable_voxels(data: np.ndarray, b0_mask: np.ndarray) -> np.ndarray:
    """(...,) bool: voxels of ``data`` (..., N) whose signals can be fitted: all values
    finite, none negative, and the mean of the b=0 measurements (``b0_mask`` (N,)) positive.
    """
    arr = np.asarray(data)
    b0 = np.asarray(b0_mask, dtype=bool)
    if arr.ndim == 2 and arr.dtype in (np.float32, np.float64) and \
            arr.flags.c_contiguous and arr.shape[1] == b0.size:
        # one pass of a compiled kernel instead of four array-sized temporaries
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import usable_rows

        return run_parallel(usable_rows, arr, b0)
    with np.errstate(invalid="ignore"):
        ok = np.all(np.isfinite(arr), axis=-1) & ~np.any(arr < 0, axis=-1)
        if b0.any():
            ok &= arr[..., b0].mean(axis=-1) > 0
    return ok


def default_mask(mean_b0: np.ndarray, *, source: str = "data") -> np.ndarray:
    """The default mask: voxels whose mean b=0 signal ``mean_b0`` is finite and positive.
    InputError naming ``source`` when there is none."""
    arr = np.asarray(mean_b0)
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(arr) & (arr > 0)
    if mask.size and not mask.any():
        raise InputError(f"no voxel of {source} has a positive mean b=0 signal (all zero, "
                         f"negative or NaN?); nothing to fit")
    return mask


def report_unusable(coordinates: np.ndarray, n_fitted: int, *, source: str = "data") -> None:
    """Log one warning for the unusable voxels at ``coordinates`` (n, d) among
    ``n_fitted`` voxels of the mask (nothing when there are none)."""
    coords = np.asarray(coordinates)
    n_bad = int(coords.shape[0]) if coords.ndim else 0
    if n_bad == 0:
        return
    first = ", ".join(str(tuple(int(c) for c in row))
                      for row in coords[:REPORTED_COORDINATES])
    more = ", ..." if n_bad > REPORTED_COORDINATES else ""
    logger.warning("%d of %d voxels of %s have NaN, infinite or negative signals or no "
                   "positive b=0 signal: left out (NaN in the maps); first at %s%s",
                   n_bad, n_fitted, source, first, more)
