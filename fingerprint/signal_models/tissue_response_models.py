"""Non-parametric tissue responses: convolution kernels estimated from data (dmipy's
TR1IsotropicTissueResponseModel and TR2AnisotropicTissueResponseModel).

A response is stored as rotational-harmonic (zonal SH) coefficients per b-value shell,
``E(b, t) = sum_l rh_l(b) Y_l0(t)`` with ``Y_l0(t) = sqrt((2l + 1) / 4 pi) P_l(t)`` and
``t`` the cosine between gradient and response axis (isotropic responses keep only
``l = 0``). The models behave like compartments (usable in every framework, orientation
``mu`` for TR2) but only on the b-values they were estimated on: other b-values raise.
b-values are matched to the stored shells within 5 % (b0: ``b <= 10e6`` s/m², E = 1).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.errors import InputError
from fingerprint.kernels.dispersion import legendre_even_matrix
from fingerprint.signal_models.base import ORIENTATION_RANGE, CompartmentModel, MeasurementArrays
from fingerprint.utils.spherical_convolution import real_sym_rh_basis

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme

__all__ = [
    "TR1IsotropicTissueResponseModel",
    "TR2AnisotropicTissueResponseModel",
    "estimate_TR1_isotropic_tissue_response_model",
    "estimate_TR2_anisotropic_tissue_response_model",
    "diffusion_tensor_eigen",
    "fractional_anisotropy",
    "principal_diffusion_directions",
]

#: relative b-value tolerance when matching measurements to the response's shells
B_TOLERANCE = 0.05
#: b-values at or below this (s/m²) are b0 measurements (E = 1)
B0_THRESHOLD = 10e6
#: default even order of the anisotropic responses' rotational harmonics
RESPONSE_ORDER = 14


def _shell_of(b: np.ndarray, shell_b: np.ndarray, owner: str) -> np.ndarray:
    """Index of the stored shell of each b-value, -1 for b0s; raises for unknown ones."""
    idx = np.full(b.shape, -1, dtype=int)
    dwi = b > B0_THRESHOLD
    if np.any(dwi):
        dist = np.abs(b[dwi, None] - shell_b[None, :])
        best = np.argmin(dist, axis=1)
        ok = dist[np.arange(best.size), best] <= B_TOLERANCE * shell_b[best]
        if not np.all(ok):
            bad = np.unique(b[dwi][~ok])[:3] / 1e6
            raise InputError(f"{owner}: b-value(s) {bad.tolist()} s/mm² are not among the "
                             f"response's shells {np.round(shell_b / 1e6).tolist()} s/mm²")
        idx[dwi] = best
    return idx


def _zonal_values(rh: np.ndarray, t: np.ndarray) -> np.ndarray:
    """sum_l rh_l Y_l0(t) for rh (..., n_l) and cosines t (...,) of the same leading
    shape."""
    n_l = rh.shape[-1]
    leg = legendre_even_matrix(np.ascontiguousarray(t.reshape(-1)), 2 * (n_l - 1))
    norm = np.sqrt((4.0 * np.arange(n_l) + 1.0) / (4.0 * math.pi))
    return np.sum(rh.reshape(-1, n_l) * leg * norm, axis=1).reshape(t.shape)


class _TissueResponse(CompartmentModel):
    _model_type = "TissueResponseModel"
    _required_acquisition_parameters = ["bvalues"]
    _constant_names = ("shell_bvalues", "rotational_harmonics")
    shell_bvalues: tuple[float, ...]
    rotational_harmonics: tuple[tuple[float, ...], ...]

    def __init__(self, shell_bvalues: ArrayLike, rotational_harmonics: ArrayLike,
                 **values: Any) -> None:
        shell_b = np.asarray(shell_bvalues, dtype=float).reshape(-1)
        rh = np.asarray(rotational_harmonics, dtype=float)
        rh = rh.reshape(shell_b.size, -1) if rh.size else rh
        if rh.shape[0] != shell_b.size or not np.all(np.isfinite(rh)):
            raise InputError(f"{type(self).__name__}: rotational_harmonics must be finite, "
                             f"one row per shell ({shell_b.size}), got shape {rh.shape}")
        if np.any(shell_b <= B0_THRESHOLD):
            raise InputError(f"{type(self).__name__}: shell_bvalues must be diffusion "
                             "weighted (> 10e6 s/m²)")
        super().__init__(shell_bvalues=tuple(shell_b.tolist()),
                         rotational_harmonics=tuple(tuple(r) for r in rh.tolist()),
                         **values)

    @property
    def _rh(self) -> np.ndarray:
        return np.asarray(self.rotational_harmonics, dtype=float)

    def rotational_harmonics_representation(self, acquisition_scheme: Any,
                                            sh_order: int | None = None,
                                            **kwargs: Any) -> np.ndarray:
        """The stored coefficients (N_dwi_shells, n_l) of the scheme's diffusion-weighted
        shells (raises for b-values the response does not have)."""
        b = np.asarray(acquisition_scheme.shell_bvalues, dtype=float)
        dwi = ~np.asarray(acquisition_scheme.shell_b0_mask, dtype=bool)
        idx = _shell_of(b[dwi], np.asarray(self.shell_bvalues), type(self).__name__)
        rh = self._rh[idx]
        if sh_order is not None:
            out = np.zeros((rh.shape[0], sh_order // 2 + 1))
            k = min(out.shape[1], rh.shape[1])
            out[:, :k] = rh[:, :k]
            return out
        return rh


class TR1IsotropicTissueResponseModel(_TissueResponse):
    """Isotropic response (e.g. grey matter, CSF): ``E(b) = rh_0(b) Y_00`` per shell.

    Parameters
    ----------
    shell_bvalues : (S,) b-values of the shells it was estimated on, s/m².
    rotational_harmonics : (S, 1) the ``Y_00`` coefficient of each shell.
    """

    _parameter_ranges = {}
    _parameter_scales = {}
    _parameter_types = {}
    _parameter_units = {}
    is_isotropic = True

    def __init__(self, shell_bvalues: ArrayLike, rotational_harmonics: ArrayLike) -> None:
        super().__init__(shell_bvalues, np.asarray(rotational_harmonics, dtype=float)
                         .reshape(-1, 1))

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        idx = _shell_of(meas.b, np.asarray(self.shell_bvalues), self._name)
        values = np.where(idx >= 0, self._rh[np.maximum(idx, 0), 0] / (2.0 * math.sqrt(math.pi)),
                          1.0)
        out[:] = values[None, :]


class TR2AnisotropicTissueResponseModel(_TissueResponse):
    """Axially symmetric response (e.g. single-fibre white matter) with axis ``mu``.

    Parameters
    ----------
    shell_bvalues : (S,) b-values of the shells it was estimated on, s/m².
    rotational_harmonics : (S, n_l) zonal coefficients ``rh_0, rh_2, ...`` per shell.
    mu : [theta, phi], optional
        Axis orientation in radians.
    """

    _parameter_ranges = {"mu": ORIENTATION_RANGE}
    _parameter_scales = {"mu": np.r_[1.0, 1.0]}
    _parameter_types = {"mu": "orientation"}
    _parameter_units = {"mu": "rad"}

    def __init__(self, shell_bvalues: ArrayLike, rotational_harmonics: ArrayLike,
                 mu: ArrayLike | None = None) -> None:
        super().__init__(shell_bvalues, rotational_harmonics, mu=mu)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        idx = _shell_of(meas.b, np.asarray(self.shell_bvalues), self._name)
        assert cos is not None
        t = np.broadcast_to(cos, out.shape)
        rh = self._rh[np.maximum(idx, 0)]  # (M, n_l)
        values = _zonal_values(np.broadcast_to(rh[None], out.shape + rh.shape[1:]), t)
        out[:] = np.where(idx[None, :] >= 0, values, 1.0)


def _check_data(acquisition_scheme: Any, data: ArrayLike) -> np.ndarray:
    arr = np.atleast_2d(np.asarray(data, dtype=float))
    n = acquisition_scheme.number_of_measurements
    if arr.shape[-1] != n:
        raise InputError(f"data has shape {arr.shape}; expected (voxels, {n} measurements)")
    te = getattr(acquisition_scheme, "TE", None)
    if te is not None and np.unique(te).size > 1:
        raise InputError("tissue responses of schemes with several echo times are not "
                         "supported")
    if not np.any(acquisition_scheme.b0_mask):
        raise InputError("the acquisition scheme has no b0 measurement")
    return arr.reshape(-1, n)


def _dwi_shells(acquisition_scheme: Any) -> list[int]:
    b0 = np.asarray(acquisition_scheme.shell_b0_mask, dtype=bool)
    return [s for s in range(b0.size) if not b0[s]]


def estimate_TR1_isotropic_tissue_response_model(  # noqa: N802 - dmipy's name
        acquisition_scheme: AcquisitionScheme, data: ArrayLike
) -> tuple[float, TR1IsotropicTissueResponseModel]:
    """Isotropic response from candidate voxels ``data`` (voxels, N): per shell the
    ``Y_00`` coefficient of the mean signal, divided by the mean b0 signal.

    Returns ``(S0_response, model)`` (S0 in the data's units)."""
    arr = _check_data(acquisition_scheme, data)
    s0 = float(np.mean(arr[:, acquisition_scheme.b0_mask]))
    if not s0 > 0:
        raise InputError("the candidate voxels' mean b0 signal must be positive")
    shells = _dwi_shells(acquisition_scheme)
    idx = np.asarray(acquisition_scheme.shell_indices)
    rh = np.array([[np.mean(arr[:, idx == s]) * 2.0 * math.sqrt(math.pi) / s0]
                   for s in shells])
    b = np.asarray(acquisition_scheme.shell_bvalues)[shells]
    return s0, TR1IsotropicTissueResponseModel(b, rh)


def principal_diffusion_directions(acquisition_scheme: AcquisitionScheme,
                                   data: ArrayLike) -> np.ndarray:
    """Principal eigenvectors (voxels, 3) of log-linear diffusion tensor fits."""
    return diffusion_tensor_eigen(acquisition_scheme, data)[1][:, :, -1]


def fractional_anisotropy(eigenvalues: np.ndarray) -> np.ndarray:
    """Fractional anisotropy (voxels,) from tensor eigenvalues (voxels, 3)."""
    ev = np.asarray(eigenvalues, dtype=float)
    mean = ev.mean(axis=-1, keepdims=True)
    num = np.sqrt(np.sum((ev - mean) ** 2, axis=-1))
    den = np.sqrt(np.sum(ev ** 2, axis=-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.sqrt(1.5) * num / den, 0.0)


def diffusion_tensor_eigen(acquisition_scheme: AcquisitionScheme, data: ArrayLike
                           ) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (voxels, 3) in m²/s, ascending, and eigenvectors (voxels, 3, 3) (as
    columns) of log-linear diffusion tensor fits."""
    arr = _check_data(acquisition_scheme, data)
    b0 = np.asarray(acquisition_scheme.b0_mask, dtype=bool)
    s0 = np.mean(arr[:, b0], axis=1)
    g = np.asarray(acquisition_scheme.gradient_directions, dtype=float)[~b0]
    b = np.asarray(acquisition_scheme.bvalues, dtype=float)[~b0]
    design = -b[:, None] * np.stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2,
                                     2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2],
                                     2 * g[:, 1] * g[:, 2]], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.log(np.clip(arr[:, ~b0], 1e-12, None) / np.clip(s0, 1e-12, None)[:, None])
    coef = np.linalg.lstsq(design, y.T, rcond=None)[0].T
    tensors = np.empty((arr.shape[0], 3, 3))
    for (i, j), k in (((0, 0), 0), ((1, 1), 1), ((2, 2), 2), ((0, 1), 3), ((0, 2), 4),
                      ((1, 2), 5)):
        tensors[:, i, j] = coef[:, k]
        tensors[:, j, i] = coef[:, k]
    return np.linalg.eigh(tensors)


def estimate_TR2_anisotropic_tissue_response_model(  # noqa: N802 - dmipy's name
        acquisition_scheme: AcquisitionScheme, data: ArrayLike, sh_order: int = RESPONSE_ORDER
) -> tuple[float, TR2AnisotropicTissueResponseModel]:
    """Axially symmetric response from candidate single-fibre voxels ``data``
    (voxels, N): each voxel's gradients are expressed in the frame of its principal
    diffusion direction (log-linear DTI), the zonal coefficients up to ``sh_order`` are
    fitted per shell by least squares, averaged over voxels and divided by the mean b0.

    Returns ``(S0_response, model)``."""
    arr = _check_data(acquisition_scheme, data)
    s0 = float(np.mean(arr[:, acquisition_scheme.b0_mask]))
    if not s0 > 0:
        raise InputError("the candidate voxels' mean b0 signal must be positive")
    axes = principal_diffusion_directions(acquisition_scheme, arr)
    shells = _dwi_shells(acquisition_scheme)
    idx = np.asarray(acquisition_scheme.shell_indices)
    g = np.asarray(acquisition_scheme.gradient_directions, dtype=float)
    rh = np.zeros((len(shells), sh_order // 2 + 1))
    for j, s in enumerate(shells):
        members = idx == s
        order = sh_order
        while order > 0 and order // 2 + 1 > members.sum():
            order -= 2
        for v in range(arr.shape[0]):
            t = np.clip(g[members] @ axes[v], -1.0, 1.0)
            basis = real_sym_rh_basis(order, np.arccos(t), np.zeros_like(t))
            rh[j, :order // 2 + 1] += np.linalg.lstsq(basis, arr[v, members], rcond=None)[0]
    rh /= arr.shape[0] * s0
    b = np.asarray(acquisition_scheme.shell_bvalues)[shells]
    return s0, TR2AnisotropicTissueResponseModel(b, rh)
