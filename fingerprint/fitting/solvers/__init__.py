"""Classical per-voxel solvers (dmipy's ``brute2fine`` and ``mix``), cascades and model
selection.

- :mod:`.brute2fine`: brute-force grid, then bounded non-linear least squares;
- :mod:`.mix`: differential evolution with the volume fractions by NNLS, then the same
  refinement;
- initial guesses (``x0_vector``, cascades) are parsed by :mod:`fingerprint.fitting.initial`;
- :mod:`.selection`: free-parameter counts, AIC / BIC / AICc, comparing fitted models.

:func:`fit_classical` is what ``model.fit(..., solver='brute2fine' | 'mix')`` runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import numpy as np

from fingerprint.errors import InputError
from fingerprint.fitting.estimator import VoxelEstimates
from fingerprint.fitting.solvers.common import ClassicalOptions

if TYPE_CHECKING:  # type names only
    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties as Model
    from fingerprint.fitting.estimator import VoxelEstimates
from fingerprint.fitting.initial import voxel_fixed_matrix, x0_matrix
from fingerprint.fitting.registry import REFUSED_SOLVERS, SolverRequest, register_solver

logger = logging.getLogger(__name__)

__all__ = ["CLASSICAL_SOLVERS", "REFUSED_SOLVERS", "ClassicalFitter"]

#: Solvers of this package, registered in :mod:`fingerprint.fitting.registry`.
CLASSICAL_SOLVERS = ("brute2fine", "mix")
# dmipy solvers refused (REFUSED_SOLVERS): refused by the registry's check_solver, so
# by FitOptions, before any work starts


def _runner(solver: str) -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    if solver == "brute2fine":
        # lazy: keeps SciPy's optimisers off import
        from fingerprint.fitting.solvers.brute2fine import fit_brute2fine
        return fit_brute2fine
    from fingerprint.fitting.solvers.mix import fit_mix  # lazy: keeps SciPy off import
    return fit_mix


class ClassicalFitter:
    """:class:`~fingerprint.fitting.registry.VoxelFitter` of a classical solver: holds
    the model, the scheme and the settings (picklable: executor workers get a copy)."""

    model: Model
    scheme: AcquisitionScheme

    def __init__(self, model: Model, scheme: AcquisitionScheme, solver: str,
                 options: object) -> None:
        if solver not in CLASSICAL_SOLVERS:
            raise InputError(f"unknown classical solver {solver!r}; one of "
                             f"{CLASSICAL_SOLVERS}")
        self.model = model
        self.scheme = scheme
        self.solver = solver
        self.options = options

    #: per-voxel fixed parameters are supported (``fit_voxels(..., fixed=...)``)
    supports_voxel_fixed = True

    def fit_voxels(self, data: np.ndarray,
                   x0: np.ndarray | Mapping[str, np.ndarray] | None = None,
                   fixed: np.ndarray | Mapping[str, np.ndarray] | None = None
                   ) -> VoxelEstimates:
        """Estimates (:class:`~fingerprint.fitting.estimator.VoxelEstimates`) of raw
        signals ``data`` (n, N), every voxel usable; ``x0`` starts (see
        :mod:`fingerprint.fitting.initial`). ``fixed``: per-voxel fixed values, parsed
        like ``x0`` (an (n, P) matrix with NaN where estimated, or a dict of parameter
        names, one value or one per voxel, SI units): held throughout and returned as
        given. ``uncertainty`` is NaN (not estimated); ``sigma`` is the RMS residual in
        the data's units."""
        from fingerprint.fitting.nonlinear import goodness_of_fit  # lazy: keeps numba off import

        arr = np.asarray(data, dtype=np.float64)
        n = arr.shape[0]
        model, scheme = self.model, self.scheme
        P = int(sum(model.parameter_cardinality.values()))
        b0 = np.asarray(scheme.b0_mask, dtype=bool)
        with np.errstate(invalid="ignore"):
            s0 = arr[:, b0].mean(axis=1) if b0.any() else np.ones(n)
        valid = np.isfinite(s0) & (s0 > 0) & np.all(np.isfinite(arr), axis=1)
        params = np.full((n, P), np.nan)
        r2 = np.full(n, np.nan)
        mse = np.full(n, np.nan)
        x0m = x0_matrix(model, x0, n)
        fixed_m = voxel_fixed_matrix(model, fixed, n)
        if valid.any():
            y = arr[valid] / s0[valid, None]
            fitted, _ = _runner(self.solver)(model, scheme, y,
                                             None if x0m is None else x0m[valid],
                                             self.options,
                                             None if fixed_m is None else fixed_m[valid])
            params[valid] = fitted
            r2[valid], mse[valid] = goodness_of_fit(model, scheme, y, fitted)
        valid &= np.all(np.isfinite(params), axis=1)
        s0_out = np.where(valid, s0, np.nan)
        return VoxelEstimates(params, np.full((n, P), np.nan), s0_out, r2, mse, valid,
                              np.sqrt(mse) * s0_out)


def _prepare(solver: str) -> Callable[[SolverRequest], ClassicalFitter]:
    def prepare(request: SolverRequest) -> ClassicalFitter:
        return ClassicalFitter(request.model, request.scheme, solver,
                               ClassicalOptions.from_fit_options(request.options))
    return prepare


register_solver("brute2fine", _prepare("brute2fine"), replace=True,
                description="dmipy's brute2fine: a grid over the parameters (Ns, "
                            "N_sphere_samples), then bounded non-linear least squares")
register_solver("mix", _prepare("mix"), replace=True,
                description="dmipy's MIX: differential evolution with the volume "
                            "fractions by NNLS, then bounded non-linear least squares")
