"""Maxima of FODs given in real symmetric spherical harmonics (dmipy's basis)."""

from __future__ import annotations

import numpy as np

from fingerprint.core.orientations import fibonacci_hemisphere
from fingerprint.utils.spherical_convolution import real_sym_sh_mrtrix

__all__ = ["fod_peaks"]

#: points of the hemisphere search grid
GRID_POINTS = 4000
#: Newton/gradient refinement steps per peak
REFINE_STEPS = 6


def _grid() -> tuple[np.ndarray, np.ndarray]:
    pts = fibonacci_hemisphere(GRID_POINTS)
    # neighbours: the 8 nearest points (antipodal symmetry included)
    cos = np.abs(pts @ pts.T)
    np.fill_diagonal(cos, -1.0)
    neighbours = np.argsort(-cos, axis=1)[:, :8]
    return pts, neighbours


_GRID: tuple[np.ndarray, np.ndarray] | None = None


def _values_and_gradient(sh: np.ndarray, order: int, v: np.ndarray
                         ) -> tuple[float, np.ndarray]:
    """FOD value at unit vector v and its tangent gradient (finite differences)."""
    eps = 1e-4
    e1 = np.cross(v, [1.0, 0.0, 0.0] if abs(v[0]) < 0.9 else [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(v, e1)
    pts = np.stack([v, v + eps * e1, v - eps * e1, v + eps * e2, v - eps * e2])
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    theta = np.arccos(np.clip(pts[:, 2], -1, 1))
    phi = np.arctan2(pts[:, 1], pts[:, 0])
    f = real_sym_sh_mrtrix(order, theta, phi)[0] @ sh
    g1 = (f[1] - f[2]) / (2 * eps)
    g2 = (f[3] - f[4]) / (2 * eps)
    h1 = (f[1] - 2 * f[0] + f[2]) / eps ** 2
    h2 = (f[3] - 2 * f[0] + f[4]) / eps ** 2
    step = np.zeros(3)
    for g, h, e in ((g1, h1, e1), (g2, h2, e2)):
        step += (-g / h if h < 0 else 0.0) * e
    return float(f[0]), step


def fod_peaks(sh: np.ndarray, sh_order: int, max_peaks: int = 3,
              relative_peak_threshold: float = 0.1, min_separation_angle: float = 25.0
              ) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of FODs ``sh`` (n, n_coef): unit vectors (n, max_peaks, 3) and values
    (n, max_peaks), largest first; zero where a voxel has fewer peaks above
    ``relative_peak_threshold`` times its largest, or within ``min_separation_angle``
    (degrees) of a larger one."""
    global _GRID
    if _GRID is None:
        _GRID = _grid()
    pts, neighbours = _GRID
    theta = np.arccos(np.clip(pts[:, 2], -1, 1))
    phi = np.arctan2(pts[:, 1], pts[:, 0])
    basis = real_sym_sh_mrtrix(sh_order, theta, phi)[0]
    values = np.atleast_2d(sh) @ basis.T
    n = values.shape[0]
    dirs = np.zeros((n, max_peaks, 3))
    heights = np.zeros((n, max_peaks))
    cos_sep = np.cos(np.deg2rad(min_separation_angle))
    for i in range(n):
        v = values[i]
        is_max = np.all(v[:, None] >= v[neighbours], axis=1) & (v > 0)
        cand = np.nonzero(is_max)[0]
        cand = cand[np.argsort(-v[cand])]
        found: list[np.ndarray] = []
        found_h: list[float] = []
        for c in cand:
            d = pts[c].copy()
            h = float(v[c])
            for _ in range(REFINE_STEPS):
                h_new, step = _values_and_gradient(sh[i], sh_order, d)
                if np.linalg.norm(step) < 1e-9:
                    h = h_new
                    break
                d = d + step
                d /= np.linalg.norm(d)
                h = h_new
            if found_h and h < relative_peak_threshold * found_h[0]:
                break
            if any(abs(d @ f) > cos_sep for f in found):
                continue
            found.append(d if d[2] >= 0 else -d)
            found_h.append(h)
            if len(found) == max_peaks:
                break
        for k, (d, h) in enumerate(zip(found, found_h, strict=True)):
            dirs[i, k] = d
            heights[i, k] = h
    return dirs, heights
