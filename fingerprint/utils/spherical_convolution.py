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
from scipy.special import sph_harm_y

from fingerprint.errors import InputError

__all__ = [
    "check_sh_order",
    "real_sym_rh_basis",
    "real_sym_sh_mrtrix",
    "sh_convolution",
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


def real_sym_sh_mrtrix(sh_order: int, theta: ArrayLike, phi: ArrayLike
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The real symmetric SH basis (K, n_coefficients) at angles ``theta``, ``phi`` (K,)
    (radians), with the order ``m`` and degree ``l`` of each column."""
    order = check_sh_order(sh_order)
    theta = np.asarray(theta, dtype=float).reshape(-1, 1)
    phi = np.asarray(phi, dtype=float).reshape(-1, 1)
    degrees = np.concatenate([np.full(2 * ell + 1, ell) for ell in range(0, order + 1, 2)])
    orders = np.concatenate([np.arange(-ell, ell + 1) for ell in range(0, order + 1, 2)])
    complex_sh = sph_harm_y(degrees[None, :], np.abs(orders)[None, :], theta, phi)
    basis = np.where(orders[None, :] < 0, complex_sh.imag, complex_sh.real)
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
