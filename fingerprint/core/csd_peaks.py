"""Maxima of FODs given in real symmetric spherical harmonics: one vectorised peak search
(:func:`fod_peaks_batched`, MRtrix3's basis) for the volume CSD, the fascicle directions
and the spherical-harmonics model (:func:`fod_peaks`, dmipy's basis)."""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.core.orientations import fibonacci_hemisphere
from fingerprint.errors import InputError
from fingerprint.utils.spherical_convolution import (
    check_sh_order,
    mrtrix3_sh_basis,
    sh_order_from_coefficients,
    sh_to_mrtrix3,
)

__all__ = ["fod_peaks", "fod_peaks_batched", "fod_to_peak_array"]

#: hemisphere points of the peak search grid
PEAK_GRID_POINTS = 2000
#: neighbours compared on the peak search grid
PEAK_NEIGHBOURS = 8
#: Newton steps refining each peak
PEAK_REFINE_STEPS = 3
#: candidates per voxel refined before the peak selection
PEAK_CANDIDATES = 6


_PEAK_GRIDS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _peak_grid(sh_order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if sh_order not in _PEAK_GRIDS:
        pts = fibonacci_hemisphere(PEAK_GRID_POINTS)
        cos = np.abs(pts @ pts.T)
        np.fill_diagonal(cos, -1.0)
        neighbours = np.argpartition(-cos, PEAK_NEIGHBOURS, axis=1)[:, :PEAK_NEIGHBOURS]
        _PEAK_GRIDS[sh_order] = (pts, neighbours, mrtrix3_sh_basis(sh_order, pts))
    return _PEAK_GRIDS[sh_order]


def _refine(sh: np.ndarray, sh_order: int, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Newton steps on the sphere for peaks d (P, 3) of FODs sh (P, n_coef): refined unit
    vectors and FOD values (P,)."""
    eps = 1e-3
    value = np.zeros(d.shape[0])
    for _ in range(PEAK_REFINE_STEPS):
        helper = np.where(np.abs(d[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        e1 = np.cross(d, helper)
        e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
        e2 = np.cross(d, e1)
        pts = np.stack([d, d + eps * e1, d - eps * e1, d + eps * e2, d - eps * e2,
                        d + eps * (e1 + e2) / math.sqrt(2), d - eps * (e1 + e2) / math.sqrt(2)],
                       axis=1)
        pts /= np.linalg.norm(pts, axis=2, keepdims=True)
        f = np.einsum("pkc,pc->pk", mrtrix3_sh_basis(sh_order, pts.reshape(-1, 3))
                      .reshape(d.shape[0], 7, -1), sh)
        value = f[:, 0]
        g = np.stack([(f[:, 1] - f[:, 2]), (f[:, 3] - f[:, 4])], axis=1) / (2 * eps)
        h11 = (f[:, 1] - 2 * f[:, 0] + f[:, 2]) / eps ** 2
        h22 = (f[:, 3] - 2 * f[:, 0] + f[:, 4]) / eps ** 2
        hdd = (f[:, 5] - 2 * f[:, 0] + f[:, 6]) / eps ** 2
        h12 = hdd - 0.5 * (h11 + h22)
        det = h11 * h22 - h12 ** 2
        ok = (h11 < 0) & (det > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s1 = np.where(ok, -(h22 * g[:, 0] - h12 * g[:, 1]) / det, 0.0)
            s2 = np.where(ok, -(-h12 * g[:, 0] + h11 * g[:, 1]) / det, 0.0)
        step = s1[:, None] * e1 + s2[:, None] * e2
        size = np.linalg.norm(step, axis=1, keepdims=True)
        step = np.where(size > 0.1, step * 0.1 / np.maximum(size, 1e-30), step)  # trust
        d = d + step
        d /= np.linalg.norm(d, axis=1, keepdims=True)
    final = np.einsum("pc,pc->p", mrtrix3_sh_basis(sh_order, d), sh)
    better = final >= value
    return d, np.where(better, final, value)


def fod_peaks_batched(sh: ArrayLike, sh_order: int, max_peaks: int = 3,
                      relative_peak_threshold: float = 0.1,
                      absolute_peak_threshold: float = 0.0,
                      min_separation_angle: float = 25.0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maxima of FODs ``sh`` (V, n_coef) in MRtrix3's basis, vectorised over voxels.

    Local maxima of the FOD on a 2000-direction hemisphere grid (antipodes merged) are
    refined by Newton steps on the sphere; a maximum is a peak when its amplitude is at
    least ``absolute_peak_threshold`` and at least ``relative_peak_threshold`` times the
    voxel's largest peak, and it lies more than ``min_separation_angle`` degrees from
    every larger peak. Returns unit vectors (V, max_peaks, 3) with z >= 0, amplitudes
    (V, max_peaks) (FOD values, 1/sr in the FOD's units) largest first, and the count of
    peaks (V,); rows past the count are zero.
    """
    coef = np.atleast_2d(np.asarray(sh, dtype=float))
    order = check_sh_order(sh_order)
    if isinstance(max_peaks, bool) or int(max_peaks) < 1:
        raise InputError(f"max_peaks must be a positive integer, got {max_peaks!r}")
    if not 0.0 <= relative_peak_threshold <= 1.0:
        raise InputError("relative_peak_threshold must be in [0, 1], got "
                         f"{relative_peak_threshold!r}")
    if not 0.0 <= min_separation_angle < 90.0:
        raise InputError("min_separation_angle must be in [0, 90) degrees, got "
                         f"{min_separation_angle!r}")
    max_peaks = int(max_peaks)
    pts, neighbours, basis = _peak_grid(order)
    n_vox = coef.shape[0]
    dirs = np.zeros((n_vox, max_peaks, 3))
    amps = np.zeros((n_vox, max_peaks))
    count = np.zeros(n_vox, dtype=np.int64)
    n_cand = PEAK_CANDIDATES
    cos_sep = math.cos(math.radians(min_separation_angle))
    for start in range(0, n_vox, 512):
        sub = coef[start:start + 512]
        n = sub.shape[0]
        v = sub @ basis.T
        is_max = np.all(v[:, :, None] >= v[:, neighbours], axis=2) & (v > 0)
        cand_v = np.where(is_max, v, -np.inf)
        k = min(n_cand, cand_v.shape[1])
        top = np.argpartition(-cand_v, k - 1, axis=1)[:, :k]
        top_v = np.take_along_axis(cand_v, top, axis=1)
        # only maxima that may pass the thresholds after refinement are refined
        floor = np.maximum(0.8 * relative_peak_threshold * top_v.max(axis=1, keepdims=True),
                           0.8 * absolute_peak_threshold)
        valid = np.isfinite(top_v) & (top_v >= floor)
        rows, cols = np.nonzero(valid)
        d_ref, v_ref = _refine(sub[rows], order, pts[top[rows, cols]])
        cand_d = np.zeros((n, k, 3))
        cand_a = np.full((n, k), -np.inf)
        cand_d[rows, cols] = d_ref
        cand_a[rows, cols] = v_ref
        srt = np.argsort(-cand_a, axis=1)
        cand_a = np.take_along_axis(cand_a, srt, axis=1)
        cand_d = np.take_along_axis(cand_d, srt[:, :, None], axis=1)
        largest = cand_a[:, 0]
        out_d = np.zeros((n, max_peaks, 3))
        out_a = np.zeros((n, max_peaks))
        cnt = np.zeros(n, dtype=np.int64)
        for j in range(k):
            a = cand_a[:, j]
            d = cand_d[:, j]
            keep = np.isfinite(a) & (a >= absolute_peak_threshold) & (a > 0) \
                & (a >= relative_peak_threshold * largest) & (cnt < max_peaks)
            if j:
                close = np.abs(np.einsum("npc,nc->np", out_d, d)) > cos_sep
                close &= np.arange(max_peaks)[None, :] < cnt[:, None]
                keep &= ~close.any(axis=1)
            idx = np.nonzero(keep)[0]
            out_d[idx, cnt[idx]] = np.where(d[idx, 2:3] < 0, -d[idx], d[idx])
            out_a[idx, cnt[idx]] = a[idx]
            cnt[idx] += 1
        dirs[start:start + n] = out_d
        amps[start:start + n] = out_a
        count[start:start + n] = cnt
    return dirs, amps, count


def fod_to_peak_array(directions: np.ndarray, amplitudes: np.ndarray,
                      count: np.ndarray) -> np.ndarray:
    """MRtrix ``sh2peaks`` layout (..., 3 * max_peaks): each peak's unit vector times its
    amplitude, NaN where a voxel has fewer peaks."""
    d = np.asarray(directions, dtype=float)
    a = np.asarray(amplitudes, dtype=float)
    out = d * a[..., None]
    absent = np.arange(d.shape[-2]) >= np.asarray(count)[..., None]
    out[absent] = np.nan
    return out.reshape(d.shape[:-2] + (3 * d.shape[-2],))


def fod_peaks(sh: np.ndarray, sh_order: int, max_peaks: int = 3,
              relative_peak_threshold: float = 0.1, min_separation_angle: float = 25.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of FODs ``sh`` (n, n_coef) in dmipy's basis
    (:mod:`fingerprint.utils.spherical_convolution`): unit vectors (n, max_peaks, 3) and
    values (n, max_peaks), largest first; zero where a voxel has fewer peaks above
    ``relative_peak_threshold`` times its largest, or within ``min_separation_angle``
    (degrees) of a larger one. The search of :func:`fod_peaks_batched` (FOD values do
    not depend on the basis)."""
    coef = np.atleast_2d(np.asarray(sh, dtype=float))
    if sh_order_from_coefficients(coef.shape[-1]) != check_sh_order(sh_order):
        raise InputError(f"{coef.shape[-1]} SH coefficients do not make order {sh_order}")
    dirs, heights, _ = fod_peaks_batched(sh_to_mrtrix3(coef), sh_order, max_peaks,
                                         relative_peak_threshold,
                                         min_separation_angle=min_separation_angle)
    return dirs, heights
