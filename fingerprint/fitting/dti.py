"""The ``dti`` solver: the diffusion tensor by weighted linear least squares.

DTI is not fitted by dictionary matching: ln S = ln S0 - b g^T D g is linear in
(ln S0, D), so each voxel is solved in closed form, first by ordinary least squares and
then once more with each measurement weighted by its predicted squared signal (weighted
linear least squares, Veraart et al. 2013), which undoes the noise amplification of the
log at low signals. The solver is registered in :mod:`fingerprint.fitting.registry` as
``'dti'``; the named model ``dti`` (recipe ``solver = "dti"``) is fitted with it by every
entry point (``model.fit``, ``fingerprint fit``, server jobs), whatever solver is asked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.modeling_framework import MultiCompartmentModelProperties as Model
from fingerprint.errors import InputError
from fingerprint.fitting.estimator import VoxelEstimates
from fingerprint.fitting.registry import SolverRequest, register_solver
from fingerprint.signal_models.tensor_models import TENSOR_ELEMENTS

logger = logging.getLogger(__name__)

__all__ = ["DTI_SOLVER", "DTIFitter", "fit_tensor"]

#: Name of the solver in the registry.
DTI_SOLVER = "dti"
#: Column scaling of the design (b in ms/µm²) so the normal equations are well conditioned.
_COLUMN_SCALE = np.array([1.0] + [1e-9] * 6)
#: Smallest signal (fraction of the voxel's largest) entering the log.
_FLOOR = 1e-6


def _design(scheme: AcquisitionScheme) -> np.ndarray:
    """(N, 7) design of ln S = X @ [ln S0, Dxx, Dyy, Dzz, Dxy, Dxz, Dyz]."""
    b = np.asarray(scheme.bvalues, dtype=np.float64)
    g = np.asarray(scheme.gradient_directions, dtype=np.float64).reshape(-1, 3)
    g = np.where(np.isfinite(g), g, 0.0)
    return np.column_stack([np.ones_like(b), -b * g[:, 0] ** 2, -b * g[:, 1] ** 2,
                            -b * g[:, 2] ** 2, -2 * b * g[:, 0] * g[:, 1],
                            -2 * b * g[:, 0] * g[:, 2], -2 * b * g[:, 1] * g[:, 2]])


def fit_tensor(scheme: AcquisitionScheme, data: np.ndarray, *, weighted: bool = True
               ) -> tuple[np.ndarray, np.ndarray]:
    """Tensor elements (n, 6) in :data:`TENSOR_ELEMENTS` order (m²/s) and S0 (n,) of
    raw signals ``data`` (n, N) by (weighted) linear least squares on ln S."""
    X = _design(scheme) * _COLUMN_SCALE  # b in ms/µm², D in µm²/ms: a well-scaled system
    y = np.asarray(data, dtype=np.float64).reshape(-1, X.shape[0])
    top = np.max(np.where(np.isfinite(y), y, 0.0), axis=1, keepdims=True)
    floor = np.maximum(top, 1e-300) * _FLOOR
    logs = np.log(np.maximum(np.where(np.isfinite(y), y, floor), floor))
    beta = np.linalg.lstsq(X, logs.T, rcond=None)[0].T  # (n, 7)
    if weighted:
        w = np.exp(2.0 * np.clip(beta @ X.T, -700, 700))  # predicted S², (n, N)
        w /= np.maximum(w.max(axis=1, keepdims=True), 1e-300)
        xtwx = np.einsum("ni,ij,ik->njk", w, X, X)
        xtwy = np.einsum("ni,ij,ni->nj", w, X, logs)
        ridge = 1e-14 * np.trace(xtwx, axis1=1, axis2=2)[:, None, None] * np.eye(7)
        try:
            beta = np.linalg.solve(xtwx + ridge, xtwy[..., None])[..., 0]
        except np.linalg.LinAlgError:  # pragma: no cover - ridge keeps it regular
            logger.warning("weighted tensor fit singular; keeping the ordinary fit")
    return beta[:, 1:] * _COLUMN_SCALE[1:], np.exp(np.clip(beta[:, 0], -700, 700))


class DTIFitter:
    """:class:`~fingerprint.fitting.registry.VoxelFitter` of the linear tensor fit
    (picklable: holds the model and the scheme only)."""

    solver_name = DTI_SOLVER

    def __init__(self, model: Model, scheme: AcquisitionScheme) -> None:
        names = [n.rsplit("_", 2)[-2] + "_" + n.rsplit("_", 1)[-1]
                 for n in model.parameter_names]
        if len(names) != 6 or tuple(names) != TENSOR_ELEMENTS:
            raise InputError(f"solver 'dti' fits the diffusion tensor model (DT1DiffusionTensor "
                             f"alone, e.g. the named model 'dti'); this model's parameters are "
                             f"{list(model.parameter_names)}")
        self.model = model
        self.scheme = scheme

    def fit_voxels(self, data: np.ndarray,
                   x0: np.ndarray | Mapping[str, np.ndarray] | None = None
                   ) -> VoxelEstimates:
        """Tensor elements of raw signals ``data`` (n, N); ``x0`` is not needed and
        ignored (the fit is closed-form)."""
        arr = np.asarray(data, dtype=np.float64)
        n = arr.shape[0]
        params, s0 = fit_tensor(self.scheme, arr)
        pred = s0[:, None] * np.exp(-(params @ -_design(self.scheme)[:, 1:].T))
        res = ((arr - pred) ** 2).sum(axis=1)
        tot = ((arr - arr.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(tot > 0, 1.0 - res / tot, np.nan)
            mse = res / arr.shape[1] / np.maximum(s0, 1e-300) ** 2
        valid = np.all(np.isfinite(params), axis=1) & np.isfinite(s0) & (s0 > 0)
        params[~valid] = np.nan
        dof = max(arr.shape[1] - 7, 1)
        sigma = np.sqrt(res / dof)
        return VoxelEstimates(params, np.full((n, 6), np.nan), s0, r2, mse, valid, sigma)


def _prepare(request: SolverRequest) -> DTIFitter:
    return DTIFitter(request.model, request.scheme)


register_solver(DTI_SOLVER, _prepare, replace=True, per_voxel_fit=False,
                description="diffusion tensor by weighted linear least squares (the 'dti' "
                            "model; closed form, no dictionary)")
