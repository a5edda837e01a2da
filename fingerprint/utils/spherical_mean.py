"""Spherical means of measured signals, estimated per shell with spherical harmonics.

On a shell the spherical mean is the ``l = 0`` part of the signal: the signal is fitted
by least squares in the real symmetric SH basis (order reduced when the shell has too few
directions) and the mean is ``c_00 Y_00 = c_00 / (2 sqrt(pi))``. b0 shells are averaged.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.errors import InputError
from fingerprint.utils.spherical_convolution import check_sh_order, real_sym_sh_mrtrix
from fingerprint.utils.utils import cart2mu

__all__ = ["estimate_spherical_mean_multi_shell", "estimate_spherical_mean_shell"]


def _fit_order(sh_order: int, n_directions: int) -> int:
    order = sh_order
    while order > 0 and (order + 1) * (order + 2) // 2 > n_directions:
        order -= 2
    return order


def estimate_spherical_mean_shell(E_shell: ArrayLike, bvecs_shell: ArrayLike,  # noqa: N803
                                  sh_order: int = 6, sh_mat: ArrayLike | None = None
                                  ) -> np.ndarray:
    """Spherical mean of the signal on one shell.

    ``E_shell`` (..., K) signals at the shell's unit gradient directions ``bvecs_shell``
    (K, 3); ``sh_mat`` an optional precomputed SH basis (K, n). Returns (...,).
    """
    signal = np.asarray(E_shell, dtype=float)
    dirs = np.asarray(bvecs_shell, dtype=float).reshape(-1, 3)
    if signal.shape[-1] != dirs.shape[0]:
        raise InputError(f"E_shell has {signal.shape[-1]} values but bvecs_shell "
                         f"{dirs.shape[0]} directions")
    if sh_mat is None:
        order = _fit_order(check_sh_order(sh_order), dirs.shape[0])
        mu = cart2mu(dirs)
        basis = real_sym_sh_mrtrix(order, mu[:, 0], mu[:, 1])[0]
    else:
        basis = np.asarray(sh_mat, dtype=float)
    coef0 = (signal @ np.linalg.pinv(basis).T)[..., 0]
    return coef0 / (2.0 * np.sqrt(np.pi))


def estimate_spherical_mean_multi_shell(E_attenuation: ArrayLike,  # noqa: N803
                                        acquisition_scheme: object, sh_order: int = 14
                                        ) -> np.ndarray:
    """Spherical mean (..., S) of signals (..., N) on every shell of the scheme (b0
    shells: the plain mean). Each shell is fitted at the highest even order up to
    ``sh_order`` that its number of directions supports (like dmipy, whose schemes carry
    one such order per shell)."""
    signal = np.asarray(E_attenuation, dtype=float)
    scheme = acquisition_scheme
    shells = np.asarray(scheme.shell_indices)  # type: ignore[attr-defined]
    if signal.shape[-1] != shells.shape[0]:
        raise InputError(f"E_attenuation has {signal.shape[-1]} values but the acquisition "
                         f"scheme {shells.shape[0]} measurements")
    b0 = np.asarray(scheme.shell_b0_mask)  # type: ignore[attr-defined]
    dirs = np.asarray(scheme.gradient_directions)  # type: ignore[attr-defined]
    out = np.ones(signal.shape[:-1] + (b0.shape[0],))
    for s in range(b0.shape[0]):
        members = shells == s
        if not np.any(members):
            continue
        if b0[s]:
            out[..., s] = signal[..., members].mean(axis=-1)
        else:
            out[..., s] = estimate_spherical_mean_shell(signal[..., members], dirs[members],
                                                        sh_order)
    return out
