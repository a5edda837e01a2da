"""Real symmetric spherical harmonics and spherical convolution (dmipy's conventions).

The basis is dmipy's (MRtrix 0.2 / Tournier 2007, as dipy's ``real_sym_sh_mrtrix``): for
even ``l`` and ``-l <= m <= l``, ordered by ``l`` then ``m``,
``Y_lm = Re(Y_l^|m|)`` for ``m > 0``, ``Y_l0`` for ``m = 0`` and ``Im(Y_l^|m|)`` for
``m < 0``, with ``Y_l^m`` the complex orthonormal harmonics (Condon-Shortley phase).
The ``m != 0`` functions have norm ``1 / sqrt(2)``. Angles are in radians: ``theta``
polar, ``phi`` azimuth.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.errors import InputError

__all__ = [
    "check_sh_order",
    "mrtrix3_sh_basis",
    "real_sym_rh_basis",
    "real_sym_sh_mrtrix",
    "sh_convolution",
    "sh_degrees_orders",
    "sh_from_mrtrix3",
    "sh_order_from_coefficients",
    "sh_to_mrtrix3",
]


def check_sh_order(sh_order: int) -> int:
    """``sh_order`` as an int, checked to be even and non-negative."""
    if isinstance(sh_order, bool) or int(sh_order) != sh_order or sh_order < 0 \
            or sh_order % 2:
        raise InputError(f"sh_order must be an even non-negative integer, got {sh_order!r}")
    return int(sh_order)


def sh_order_from_coefficients(n_coefficients: int) -> int:
    """The even SH order of a symmetric basis of ``n_coefficients`` functions."""
    order = int(round((np.sqrt(8 * n_coefficients + 1) - 3) / 2))
    if (order + 1) * (order + 2) // 2 != n_coefficients or order % 2:
        raise InputError(f"{n_coefficients} is not the size of an even-order symmetric SH "
                         "basis (1, 6, 15, 28, 45, ...)")
    return order


def sh_degrees_orders(sh_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Degree ``l`` and order ``m`` (n_coefficients,) of every coefficient, ordered by
    ``l`` then ``m`` (both bases)."""
    order = check_sh_order(sh_order)
    degrees = np.concatenate([np.full(2 * ell + 1, ell) for ell in range(0, order + 1, 2)])
    orders = np.concatenate([np.arange(-ell, ell + 1) for ell in range(0, order + 1, 2)])
    return degrees, orders


def mrtrix3_sh_basis(sh_order: int, vectors: ArrayLike) -> np.ndarray:
    """MRtrix3's real orthonormal even SH basis (K, n_coefficients) at directions
    ``vectors`` (K, 3) (need not be unit length; zero vectors give the basis at +z): the
    ``m != 0`` functions of this module's basis times sqrt(2).

    Evaluated by the three-term recurrences of the normalised associated Legendre
    functions (Condon-Shortley phase included) and of ``cos(m phi)``, ``sin(m phi)``
    from the vector's components, without angles: vectorised over directions. The one
    evaluation of both bases (:func:`real_sym_sh_mrtrix` scales it)."""
    order = check_sh_order(sh_order)
    v = np.asarray(vectors, dtype=float).reshape(-1, 3)
    norm = np.linalg.norm(v, axis=1)
    z = np.where(norm > 0, v[:, 2] / np.where(norm > 0, norm, 1.0), 1.0)
    z = np.clip(z, -1.0, 1.0)
    rxy = np.hypot(v[:, 0], v[:, 1])
    cp = np.where(rxy > 0, v[:, 0] / np.where(rxy > 0, rxy, 1.0), 1.0)
    sp = np.where(rxy > 0, v[:, 1] / np.where(rxy > 0, rxy, 1.0), 0.0)
    sin_theta = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    out = np.zeros((v.shape[0], (order + 1) * (order + 2) // 2))
    p_mm = np.full(v.shape[0], 0.5 / np.sqrt(np.pi))  # P_00
    cos_m, sin_m = np.ones(v.shape[0]), np.zeros(v.shape[0])
    for m in range(0, order + 1):
        if m:
            p_mm = -np.sqrt((2.0 * m + 1.0) / (2.0 * m)) * sin_theta * p_mm
            cos_m, sin_m = cos_m * cp - sin_m * sp, sin_m * cp + cos_m * sp
        prev2, prev1 = np.zeros_like(p_mm), p_mm  # P_{m-1, m} = 0, P_{m, m}
        for ell in range(m, order + 1):
            if ell == m:
                p_lm = p_mm
            else:
                a = np.sqrt((4.0 * ell * ell - 1.0) / (ell * ell - m * m))
                a_prev = np.sqrt((4.0 * (ell - 1) ** 2 - 1.0) / ((ell - 1) ** 2 - m * m)) \
                    if ell - 1 > m else np.inf
                p_lm = a * (z * prev1 - prev2 / a_prev)
                prev2, prev1 = prev1, p_lm
            if ell % 2:
                continue
            base = ell * (ell + 1) // 2
            if m == 0:
                out[:, base] = p_lm
            else:
                out[:, base + m] = np.sqrt(2.0) * p_lm * cos_m
                out[:, base - m] = np.sqrt(2.0) * p_lm * sin_m
    return out


def real_sym_sh_mrtrix(sh_order: int, theta: ArrayLike, phi: ArrayLike
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real symmetric SH basis (K, n_coefficients) at angles ``theta``, ``phi`` (K,)
    (radians), with the order ``m`` and degree ``l`` of each column (NaN rows where an
    angle is not finite)."""
    degrees, orders = sh_degrees_orders(sh_order)
    theta = np.asarray(theta, dtype=float).reshape(-1)
    phi = np.asarray(phi, dtype=float).reshape(-1)
    theta, phi = np.broadcast_arrays(theta, phi)
    sin_theta = np.sin(theta)
    vectors = np.stack([sin_theta * np.cos(phi), sin_theta * np.sin(phi), np.cos(theta)],
                       axis=1)
    basis = mrtrix3_sh_basis(int(sh_order), np.where(np.isfinite(vectors), vectors, 0.0))
    basis *= np.where(orders == 0, 1.0, 1.0 / np.sqrt(2.0))[None, :]
    basis[~(np.isfinite(theta) & np.isfinite(phi))] = np.nan
    return basis, orders, degrees


def real_sym_rh_basis(sh_order: int, theta: ArrayLike, phi: ArrayLike) -> np.ndarray:
    """The zonal (m = 0) harmonics (K, sh_order / 2 + 1) at angles ``theta``, ``phi``
    (radians): the rotational-harmonics basis of axially symmetric kernels."""
    basis, orders, _ = real_sym_sh_mrtrix(sh_order, theta, phi)
    return basis[:, orders == 0]


def sh_convolution(f_distribution_sh: ArrayLike, kernel_rh: ArrayLike) -> np.ndarray:
    """Spherical convolution of a distribution (SH coefficients, (..., n_coefficients))
    with an axially symmetric kernel (its zonal coefficients, (..., n_l)): by Funk-Hecke,
    ``c_lm * k_l * sqrt(4 pi / (2 l + 1))``."""
    f_sh = np.asarray(f_distribution_sh, dtype=float)
    k_rh = np.asarray(kernel_rh, dtype=float)
    order = sh_order_from_coefficients(f_sh.shape[-1])
    if k_rh.shape[-1] < order // 2 + 1:
        raise InputError(f"kernel_rh has {k_rh.shape[-1]} zonal coefficients; order {order} "
                         f"needs {order // 2 + 1}")
    degrees = np.concatenate([np.full(2 * ell + 1, ell) for ell in range(0, order + 1, 2)])
    factor = k_rh[..., degrees // 2] * np.sqrt(4.0 * np.pi / (2.0 * degrees + 1.0))
    return f_sh * factor


def sh_to_mrtrix3(sh_coefficients: ArrayLike) -> np.ndarray:
    """Coefficients (..., n) in this basis to MRtrix3's orthonormal basis (``m != 0``
    functions scaled by sqrt(2), same ordering and signs)."""
    sh = np.asarray(sh_coefficients, dtype=float)
    order = sh_order_from_coefficients(sh.shape[-1])
    orders = np.concatenate([np.arange(-ell, ell + 1) for ell in range(0, order + 1, 2)])
    return sh * np.where(orders == 0, 1.0, 1.0 / np.sqrt(2.0))


def sh_from_mrtrix3(sh_coefficients: ArrayLike) -> np.ndarray:
    """Coefficients (..., n) in MRtrix3's orthonormal basis to this basis (the inverse of
    :func:`sh_to_mrtrix3`: ``m != 0`` coefficients times sqrt(2))."""
    sh = np.asarray(sh_coefficients, dtype=float)
    order = sh_order_from_coefficients(sh.shape[-1])
    orders = np.concatenate([np.arange(-ell, ell + 1) for ell in range(0, order + 1, 2)])
    return sh * np.where(orders == 0, 1.0, np.sqrt(2.0))
