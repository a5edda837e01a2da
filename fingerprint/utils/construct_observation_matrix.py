"""The multi-shell CSD observation matrix from a kernel's rotational harmonics
(Jeurissen et al. 2014, eq. 2; dmipy's ``construct_model_based_A_matrix``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.errors import InputError
from fingerprint.utils.spherical_convolution import check_sh_order, real_sym_sh_mrtrix
from fingerprint.utils.utils import cart2mu

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme

__all__ = ["construct_model_based_A_matrix"]


def construct_model_based_A_matrix(acquisition_scheme: AcquisitionScheme, model_rh: ArrayLike,  # noqa: N802
                                   lmax: int) -> np.ndarray:
    """Matrix (N, n_coef) mapping FOD SH coefficients (dmipy's basis, order ``lmax``) to
    the signal of a kernel with rotational harmonics ``model_rh`` (N_dwi_shells, n_l),
    one row per diffusion-weighted shell of the scheme: ``A[i, lm] = sqrt(4 pi / (2l+1))
    rh_l(shell_i) Y_lm(n_i)``; b0 rows are ``2 sqrt(pi)`` on ``Y_00`` (a unit FOD gives 1).
    Kernels with fewer coefficients than ``lmax / 2 + 1`` (isotropic ones) have zeros
    beyond them."""
    order = check_sh_order(lmax)
    scheme = acquisition_scheme
    rh = np.atleast_2d(np.asarray(model_rh, dtype=float))
    b0_shells = np.asarray(scheme.shell_b0_mask, dtype=np.bool_)
    dwi_shells = np.nonzero(~b0_shells)[0]
    if rh.shape[0] != dwi_shells.size:
        raise InputError(f"model_rh has {rh.shape[0]} rows; the scheme has {dwi_shells.size} "
                         "diffusion-weighted shells")
    n_l = order // 2 + 1
    full = np.zeros((rh.shape[0], n_l))
    k = min(n_l, rh.shape[1])
    full[:, :k] = rh[:, :k]
    degrees = np.concatenate([np.full(2 * ell + 1, ell) for ell in range(0, order + 1, 2)])
    eig = full[:, degrees // 2] * np.sqrt(4.0 * np.pi / (2.0 * degrees + 1.0))
    mu = cart2mu(np.asarray(scheme.gradient_directions, dtype=float))
    basis = real_sym_sh_mrtrix(order, mu[:, 0], mu[:, 1])[0]
    shell_of = np.asarray(scheme.shell_indices)
    row = np.full(b0_shells.size, -1)
    row[dwi_shells] = np.arange(dwi_shells.size)
    out = np.zeros((shell_of.size, degrees.size))
    dwi = row[shell_of] >= 0
    out[dwi] = basis[dwi] * eig[row[shell_of[dwi]]]
    out[~dwi, 0] = 2.0 * np.sqrt(np.pi)
    return out
