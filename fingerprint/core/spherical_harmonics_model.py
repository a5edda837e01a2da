"""Multi-compartment constrained spherical deconvolution (dmipy's
``MultiCompartmentSphericalHarmonicsModel``, MC-CSD / MT-CSD).

The signal is a sum of convolution kernels (compartments or distributed models oriented
along z, every parameter other than the volume fractions fixed) with one fibre
orientation distribution (FOD) in real symmetric spherical harmonics (dmipy's basis,
:mod:`fingerprint.utils.spherical_convolution`)::

    E(b, n) = sum_k f_k S0_k sum_lm kappa_l^k(b) c_lm Y_lm(n)

with ``kappa_l^k`` the Funk-Hecke (rotational-harmonic) coefficients of kernel k,
``kappa_l = 2 pi int_{-1}^{1} K(t) P_l(t) dt``. They are computed exactly for each
distinct (b, q, delta, Delta) of the scheme: the kernel is evaluated at Gauss-Legendre
nodes of the cosine to its axis and projected on the Legendre polynomials (isotropic
kernels only have ``kappa_0``). dmipy evaluates them per shell.

Fitting solves, voxel by voxel, the convex quadratic programme of Jeurissen et al. (2014)
with Laplace-Beltrami regularisation ``lambda_lb sum l^2 (l + 1)^2 c_lm^2`` (Descoteaux
et al. 2007): least squares subject to a non-negative FOD on a hemisphere grid,
non-negative volume fractions and, optionally, fractions summing to one. ``'csd'``,
``'csd_cvxpy'`` and ``'csd_tournier07'`` all name this problem (the Tournier 2007
iteration approximates it). With fixed volume fractions (one FOD, the usual CSD) it is a
least-distance programme solved exactly by Lawson and Hanson's NNLS (``scipy``; finite
active-set method, no tolerance); with fitted fractions it is solved by Clarabel
(interior point).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.csd_peaks import fod_peaks
from fingerprint.core.modeling_framework import (
    MultiCompartmentModelProperties,
    ParameterInfo,
    _is_distributed,
    _SchemeContext,
    check_scheme,
    compartment_signal,
    is_isotropic,
)
from fingerprint.core.orientations import fibonacci_hemisphere
from fingerprint.errors import InputError
from fingerprint.kernels import gauss_legendre_unit
from fingerprint.kernels.dispersion import legendre_even_matrix
from fingerprint.utils.spherical_convolution import (
    check_sh_order,
    real_sym_sh_mrtrix,
    sh_degrees_orders,
)

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.distributions.distribute_models import DistributedModel
    from fingerprint.signal_models.base import CompartmentModel

__all__ = [
    "FittedMultiCompartmentSphericalHarmonicsModel",
    "MultiCompartmentSphericalHarmonicsModel",
    "hemisphere_grid",
    "zonal_kernel_coefficients",
]

logger = logging.getLogger(__name__)

#: Y_00 = 1 / (2 sqrt(pi)): an FOD integrating to one has c_00 = Y_00
Y00 = 0.5 / np.sqrt(np.pi)
#: points of the hemisphere grid on which the FOD is constrained non-negative
POSITIVITY_POINTS = 362
#: Gauss-Legendre nodes (on [0, 1] of the cosine) projecting kernels on Legendre terms
KERNEL_NODES = 96
_SOLVERS = ("csd", "csd_cvxpy", "csd_tournier07")


def hemisphere_grid(n_points: int = POSITIVITY_POINTS) -> np.ndarray:
    """Quasi-uniform unit vectors (n_points, 3) on the upper hemisphere (Fibonacci
    lattice)."""
    return fibonacci_hemisphere(n_points)


def _angles(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vectors, dtype=float).reshape(-1, 3)
    norm = np.linalg.norm(v, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    theta = np.arccos(np.clip(v[:, 2] / safe, -1.0, 1.0))
    return theta, np.arctan2(v[:, 1], v[:, 0])


def sh_basis(sh_order: int, vectors: np.ndarray) -> np.ndarray:
    """dmipy's real symmetric SH basis (K, n_coef) at unit vectors (K, 3)."""
    theta, phi = _angles(vectors)
    return real_sym_sh_mrtrix(sh_order, theta, phi)[0]


def _degrees(sh_order: int) -> np.ndarray:
    return sh_degrees_orders(sh_order)[0]


def zonal_kernel_coefficients(model: CompartmentModel | DistributedModel,
                              parameters: Mapping[str, Any], scheme: AcquisitionScheme,
                              sh_order: int) -> np.ndarray:
    """Funk-Hecke coefficients ``kappa_l`` (N, sh_order / 2 + 1) of a kernel (compartment
    or distributed model, axis along z) for every measurement of ``scheme``.

    ``parameters`` are the kernel's own (local) parameters in SI units, orientation
    excluded. ``kappa_l = 2 pi int K(t) P_l(t) dt`` so that convolving an FOD with SH
    coefficients ``c_lm`` gives ``sum kappa_l c_lm Y_lm(n)``.
    """
    uniq, inverse = scheme.unique_measurements()
    n_unique = uniq.number_of_measurements
    nodes, weights = gauss_legendre_unit(max(KERNEL_NODES, sh_order + 32))
    n_nodes = nodes.size
    if is_isotropic(model) and not _is_distributed(model):
        signal = _evaluate(model, parameters, uniq, np.zeros((n_unique, 3)), None)
        out = np.zeros((n_unique, sh_order // 2 + 1))
        out[:, 0] = 4.0 * np.pi * signal
        return out[inverse]
    node_dirs = np.stack([np.sqrt(1.0 - nodes * nodes), np.zeros(n_nodes), nodes], axis=1)

    def rep(arr: np.ndarray | None) -> np.ndarray | None:
        return None if arr is None else np.repeat(arr, n_nodes)

    tiled = AcquisitionScheme(
        np.maximum(np.repeat(uniq.b, n_nodes), 0.0), np.tile(node_dirs, (n_unique, 1)),
        qvalues=rep(uniq.q),
        gradient_strengths=rep(uniq.G), delta=rep(uniq.delta), Delta=rep(uniq.Delta),
        b0_threshold=0.0, min_b_shell_distance=scheme.min_b_shell_distance)
    signal = _evaluate(model, parameters, tiled.measurements,
                       np.tile(node_dirs, (n_unique, 1)), tiled)
    proj = legendre_even_matrix(nodes, sh_order) * (4.0 * np.pi * weights)[:, None]
    coefficients = signal.reshape(n_unique, n_nodes) @ proj
    return coefficients[inverse]


def _evaluate(model: Any, parameters: Mapping[str, Any], meas: Any, directions: np.ndarray,
              scheme: Any) -> np.ndarray:
    local = {k: np.atleast_1d(np.asarray(v, dtype=float))[None, ...]
             if np.ndim(v) > 0 else np.array([float(v)]) for k, v in parameters.items()}
    if _is_distributed(model):
        for p in model._state.params:  # the distribution's axis along z
            if p.type == "orientation":
                local[p.name] = np.zeros((1, 2))
        return np.asarray(model._signal_batch(_SchemeContext(scheme), local, 1))[0]
    if not is_isotropic(model):
        local["mu"] = np.zeros((1, 2))
    return np.asarray(compartment_signal(model, meas, directions, local, 1))[0]


class MultiCompartmentSphericalHarmonicsModel(MultiCompartmentModelProperties):
    """Multi-compartment (multi-tissue) constrained spherical deconvolution.

    Parameters
    ----------
    models : compartments and distributed models used as convolution kernels (at least
        one anisotropic). Every kernel parameter must be fixed (``set_fixed_parameter``)
        before fitting; orientations are dropped (the FOD replaces them).
    S0_tissue_responses : optional S0 of each kernel's tissue (same units as the data):
        with them the data are not normalised by their b0 and the fitted
        ``partial_volume_i`` are volume fractions (multi-tissue CSD).
    sh_order : even SH order of the FOD (default 8: 45 coefficients).

    Free parameters: ``partial_volume_i`` (with more than one model) and ``sh_coeff``.
    """

    _spherical_mean = False
    _kind_label = "spherical harmonics model"

    def __init__(self, models: Sequence[CompartmentModel | DistributedModel],
                 S0_tissue_responses: Sequence[float] | np.ndarray | None = None,  # noqa: N803
                 sh_order: int = 8) -> None:
        super().__init__(models, S0_tissue_responses=S0_tissue_responses)
        self.sh_order = check_sh_order(sh_order)
        anisotropic = [k for k, m in enumerate(self.models) if not _all_isotropic(m)]
        if not anisotropic:
            raise InputError("MultiCompartmentSphericalHarmonicsModel needs at least one "
                             "anisotropic kernel among its models")
        self.multiple_anisotropic_kernels = len(anisotropic) > 1
        self.fit_S0_response = self.S0_tissue_responses is not None
        n_coef = (self.sh_order + 1) * (self.sh_order + 2) // 2
        self._orientation_params = tuple(p for p in self._state.params
                                         if p.type == "orientation")
        kept = tuple(p for p in self._state.params if p.type != "orientation")
        sh = ParameterInfo("sh_coeff", n_coef, [[-1e3, 1e3]] * n_coef, np.ones(n_coef),
                           "sh_coefficients", None, "sh_coeff")
        self._state = replace(self._state, params=kept + (sh,))

    # ------------------------------------------------------------------ kernels
    def _kernel_parameters(self) -> dict[str, np.ndarray]:
        """Every parameter except sh_coeff and the volume fractions, from the links."""
        free = [p.name for p in self._state.free()
                if p.name != "sh_coeff" and not p.name.startswith("partial_volume_")]
        if free:
            raise InputError(f"kernel parameter(s) {', '.join(free)} are not fixed: fix them "
                             "with set_fixed_parameter before using the model")
        dummy = {p.name: np.full((1, p.cardinality), np.nan) if p.cardinality > 1
                 else np.full(1, np.nan) for p in self._state.free()}
        return self._parameters_with_links(dummy, 1)

    def _kernel_coefficients(self, scheme: Any) -> list[np.ndarray]:
        """kappa_l (N, n_l) of every model for ``scheme``."""
        values = self._kernel_parameters()
        out = []
        for k, model in enumerate(self.models):
            local = {p.local: np.asarray(values[p.name])[0] for p in self._state.params
                     if p.owner == k}
            out.append(zonal_kernel_coefficients(model, local, scheme, self.sh_order))
        return out

    def _design(self, scheme: Any) -> tuple[list[np.ndarray], np.ndarray]:
        """Per-model convolution matrices A_k (N, n_coef) and the basis at the scheme's
        directions."""
        basis = sh_basis(self.sh_order, scheme.gradient_directions)
        degrees = _degrees(self.sh_order)
        kappas = self._kernel_coefficients(scheme)
        return [kappa[:, degrees // 2] * basis for kappa in kappas], basis

    def _volume_fractions(self, values: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        if self.N_models == 1:
            return np.ones((n, 1))
        return np.stack([np.broadcast_to(np.asarray(values[f"partial_volume_{k}"], dtype=float),
                                         (n,)) for k in range(self.N_models)], axis=1)

    # ------------------------------------------------------------------ simulation
    def simulate_signal(self, acquisition_scheme: AcquisitionScheme,
                        parameters_array_or_dict: ArrayLike | Mapping[str, ArrayLike]
                        ) -> np.ndarray:
        """Signal attenuation (..., N) for parameter vectors (..., P) or a dict with
        ``sh_coeff`` (and ``partial_volume_i``): ``sum_k f_k A_k c`` (each tissue's S0
        response is not applied: attenuations)."""
        vec = self._check_vector(parameters_array_or_dict)
        check_scheme(acquisition_scheme, self._required_acquisition_parameters,
                     type(self).__name__)
        flat = vec.reshape(-1, vec.shape[-1])
        values = self._parameters_with_links(self._free_dict(flat, self._state), flat.shape[0])
        design, _ = self._design(acquisition_scheme)
        fractions = self._volume_fractions(values, flat.shape[0])
        sh = np.asarray(values["sh_coeff"], dtype=float).reshape(flat.shape[0], -1)
        out = np.zeros((flat.shape[0], acquisition_scheme.number_of_measurements))
        for k, a_k in enumerate(design):
            out += fractions[:, k:k + 1] * (sh @ a_k.T)
        return out.reshape(vec.shape[:-1] + (out.shape[-1],))

    def fod(self, vertices: ArrayLike, **kwargs: Any) -> np.ndarray:
        """FOD (1/sr) at unit vectors (K, 3) of one ``sh_coeff`` vector."""
        sh = np.asarray(kwargs.get("sh_coeff"), dtype=float)
        if sh.ndim == 0:
            raise InputError("fod needs sh_coeff")
        return sh_basis(self.sh_order, np.asarray(vertices, dtype=float)) @ sh

    # ------------------------------------------------------------------ fitting
    def fit(self, acquisition_scheme: AcquisitionScheme, data: ArrayLike,
            mask: ArrayLike | None = None, solver: str = "csd", lambda_lb: float = 1e-5,
            unity_constraint: bool | np.bool_ | str = "kernel_dependent", **kwargs: Any
            ) -> FittedMultiCompartmentSphericalHarmonicsModel:
        """Deconvolve ``data`` (..., N) voxel by voxel.

        ``solver``: 'csd', 'csd_cvxpy' or 'csd_tournier07' (the latter needs fixed volume
        fractions, like dmipy's). ``lambda_lb`` (>= 0) weighs the Laplace-Beltrami
        smoothness penalty. ``unity_constraint``: True / False, or 'kernel_dependent'
        (True when volume fractions are fitted without S0 responses). Remaining dmipy
        keywords (``use_parallel_processing``, ``number_of_processors``, ``verbose``) are
        accepted and ignored.
        """
        unknown = set(kwargs) - {"use_parallel_processing", "number_of_processors", "verbose"}
        if unknown:
            raise InputError(f"fit got unexpected keyword(s) {sorted(unknown)}")
        if solver not in _SOLVERS:
            raise InputError(f"unknown solver {solver!r}; expected one of {_SOLVERS}")
        if not np.isfinite(lambda_lb) or lambda_lb < 0:
            raise InputError(f"lambda_lb must be a finite number >= 0, got {lambda_lb!r}")
        check_scheme(acquisition_scheme, self._required_acquisition_parameters,
                     type(self).__name__)
        values = self._kernel_parameters()
        pv_names = self.partial_volume_names
        free_names = {p.name for p in self._state.free()}
        fractions_fixed = not any(name in free_names for name in pv_names)
        if not fractions_fixed and self.multiple_anisotropic_kernels:
            raise InputError("volume fractions of several anisotropic kernels cannot be fitted "
                             "together: fix them with set_fixed_parameter")
        if solver == "csd_tournier07" and not fractions_fixed:
            raise InputError("solver 'csd_tournier07' needs every volume fraction fixed; use "
                             "'csd' to fit volume fractions")
        if unity_constraint == "kernel_dependent":
            unity = (not fractions_fixed) and not self.fit_S0_response
        elif isinstance(unity_constraint, (bool, np.bool_)):
            unity = bool(unity_constraint)
        else:
            raise InputError("unity_constraint must be True, False or 'kernel_dependent', got "
                             f"{unity_constraint!r}")
        scheme = acquisition_scheme
        arr = np.asarray(data, dtype=float)
        n_meas = scheme.number_of_measurements
        if arr.ndim == 0 or arr.shape[-1] != n_meas:
            raise InputError(f"data has shape {arr.shape}; expected (..., {n_meas} "
                             "measurements)")
        arr2 = np.atleast_2d(arr)
        shape = arr2.shape[:-1]
        b0 = np.asarray(scheme.b0_mask, dtype=bool)
        if not b0.any():
            raise InputError("the acquisition scheme has no b0 measurement to normalise by")
        s0_map = arr2[..., b0].mean(axis=-1)
        use = s0_map > 0
        if mask is not None:
            m = np.asarray(mask, dtype=bool)
            if m.shape != shape and m.shape != arr.shape[:-1]:
                raise InputError(f"mask has shape {m.shape}; expected {arr.shape[:-1]}")
            use &= m.reshape(shape)
        design, _ = self._design(scheme)
        if self.fit_S0_response:
            s0r = np.asarray(self.S0_tissue_responses, dtype=float)
            scale = float(s0r.max())
            design = [a * (s / scale) for a, s in zip(design, s0r, strict=True)]
            norm = np.full(shape, scale)
        else:
            norm = s0_map
        fixed_fractions = self._volume_fractions(values, 1)[0] if fractions_fixed else None
        problem = _CsdProblem(design, self.sh_order, lambda_lb, unity, fixed_fractions,
                              [_all_isotropic(m) for m in self.models])
        signals = arr2[use] / norm[use][:, None]
        start = time.perf_counter()
        sh, vf = problem.solve_many(signals)
        logger.info("MC-CSD: %d voxels in %.2f s", signals.shape[0],
                    time.perf_counter() - start)
        n_par = sum(p.cardinality for p in self._state.free())
        vectors = np.zeros(shape + (n_par,))
        fitted = {"sh_coeff": sh}
        for k, name in enumerate(pv_names):
            if name in free_names:
                fitted[name] = vf[:, k]
        block = np.zeros((signals.shape[0], n_par))
        pos = 0
        for p in self._state.free():
            block[:, pos:pos + p.cardinality] = np.asarray(fitted[p.name]).reshape(
                signals.shape[0], p.cardinality)
            pos += p.cardinality
        vectors[use] = block
        s0_out = np.where(use, norm, 0.0)
        return FittedMultiCompartmentSphericalHarmonicsModel(
            self, scheme, vectors.reshape(arr.shape[:-1] + (n_par,)) if arr.ndim > 1
            else vectors, s0_out.reshape(arr.shape[:-1]) if arr.ndim > 1 else s0_out,
            use.reshape(arr.shape[:-1]) if arr.ndim > 1 else use)


def _all_isotropic(model: Any) -> bool:
    if _is_distributed(model):
        return all(is_isotropic(m) for m in model.models)
    return is_isotropic(model)


class _CsdProblem:
    """The convex programme of one scheme and kernel set, solved per voxel (Clarabel)."""

    def __init__(self, design: list[np.ndarray], sh_order: int, lambda_lb: float,
                 unity: bool, fixed_fractions: np.ndarray | None,
                 isotropic: list[bool]) -> None:
        from scipy import sparse  # lazy: keeps scipy.sparse off import

        self.n_coef = design[0].shape[1]
        self.n_models = len(design)
        self.fixed = fixed_fractions
        degrees = _degrees(sh_order)
        lb = (degrees * (degrees + 1.0)) ** 2
        grid = sh_basis(sh_order, hemisphere_grid())
        if fixed_fractions is not None:
            # one FOD, kernels summed with their fixed fractions
            a = sum(f * d for f, d in zip(fixed_fractions, design, strict=True))
            self.columns = a
            reg = lb
            cones_a = [-grid]
            self.fod_slice = slice(0, self.n_coef)
            self.iso_index: list[int] = []
            self.aniso_index = None
            eq_rows = [np.eye(1, self.n_coef)] if unity else []
            eq_rhs = [Y00] if unity else []
        else:
            # unknowns: the anisotropic kernel's FOD scaled by its fraction, then one
            # fraction per isotropic kernel
            aniso = [k for k in range(self.n_models) if not isotropic[k]]
            self.aniso_index = aniso[0]
            self.iso_index = [k for k in range(self.n_models) if isotropic[k]]
            cols = [design[self.aniso_index]] + [design[k][:, :1] * Y00 for k in
                                                 self.iso_index]
            self.columns = np.hstack(cols)
            n_iso = len(self.iso_index)
            reg = np.concatenate([lb, np.zeros(n_iso)])
            pos = np.zeros((grid.shape[0], self.n_coef + n_iso))
            pos[:, :self.n_coef] = grid
            nonneg = np.zeros((n_iso + 1, self.n_coef + n_iso))
            nonneg[0, 0] = 1.0  # f_aniso = c_00 / Y00 >= 0
            nonneg[1:, self.n_coef:] = np.eye(n_iso)
            cones_a = [-pos, -nonneg]
            self.fod_slice = slice(0, self.n_coef)
            row = np.zeros((1, self.n_coef + n_iso))
            row[0, 0] = 1.0 / Y00
            row[0, self.n_coef:] = 1.0
            eq_rows = [row] if unity else []
            eq_rhs = [1.0] if unity else []
        n_var = self.columns.shape[1]
        gram = self.columns.T @ self.columns + lambda_lb * np.diag(reg)
        self._ldp = None
        if fixed_fractions is not None:
            self._ldp = _LeastDistance(self.columns, gram, grid, Y00 if unity else None)
        self.P = sparse.csc_matrix(np.triu(2.0 * gram))
        ineq = np.vstack(cones_a)
        self.n_eq = len(eq_rows)
        a_all = np.vstack(eq_rows + [ineq]) if eq_rows else ineq
        self.A = sparse.csc_matrix(a_all)
        self.b = np.concatenate([np.asarray(eq_rhs, dtype=float), np.zeros(ineq.shape[0])])
        self.n_ineq = ineq.shape[0]
        self.n_var = n_var

    def solve_many(self, signals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import clarabel  # lazy: the QP solver loads when CSD first solves

        settings = clarabel.DefaultSettings()
        settings.verbose = False
        cones: list[Any] = []
        if self.n_eq:
            cones.append(clarabel.ZeroConeT(self.n_eq))
        cones.append(clarabel.NonnegativeConeT(self.n_ineq))
        n = signals.shape[0]
        sh = np.zeros((n, self.n_coef))
        vf = np.zeros((n, self.n_models))
        if self._ldp is not None:
            for i in range(n):
                sh[i] = self._ldp.solve(signals[i])
            vf[:] = self.fixed
            return sh, vf
        for i in range(n):
            q = -2.0 * (self.columns.T @ signals[i])
            solver = clarabel.DefaultSolver(self.P, q, self.A, self.b, cones, settings)
            result = solver.solve()
            x = np.asarray(result.x, dtype=float)
            if str(result.status) not in ("Solved", "AlmostSolved") or not np.all(
                    np.isfinite(x)):
                logger.warning("MC-CSD: voxel %d not solved (%s)", i, result.status)
                continue
            if self.fixed is not None:
                sh[i] = x
                vf[i] = self.fixed
            else:
                fod = x[:self.n_coef]
                f_aniso = fod[0] / Y00
                # the normalised FOD has c_00 = Y00 (it integrates to one)
                sh[i] = fod / f_aniso if f_aniso > 1e-12 else fod
                vf[i, self.aniso_index] = f_aniso
                vf[i, self.iso_index] = x[self.n_coef:]
        return sh, vf


class _LeastDistance:
    """``min ||A x - y||^2 + x' R x`` subject to ``G x >= 0`` (and optionally
    ``x_0 = c``), as a least-distance programme solved exactly by NNLS (Lawson and
    Hanson 1974, ch. 23): with ``H = A'A + R = L L'`` and ``w = L' x - L^-1 A' y`` it is
    ``min ||w||`` subject to ``E w >= f``, whose solution is read off the NNLS residual
    of ``[E'; f'] v = e_last``."""

    def __init__(self, columns: np.ndarray, gram: np.ndarray, grid: np.ndarray,
                 first: float | None) -> None:
        from scipy.linalg import cholesky, solve_triangular  # lazy: keeps SciPy off import

        n = columns.shape[1]
        self.x_fixed = np.zeros(n)
        self.keep = np.arange(n)
        if first is not None:
            self.x_fixed[0] = first
            self.keep = np.arange(1, n)
        k = self.keep
        self.columns = columns
        self.a_keep = columns[:, k]
        self.lower = cholesky(gram[np.ix_(k, k)], lower=True)
        self.e = solve_triangular(self.lower, grid[:, k].T, lower=True).T
        self.h = -(grid @ self.x_fixed)
        self._solve_triangular = solve_triangular

    def solve(self, y: np.ndarray) -> np.ndarray:
        from scipy.optimize import nnls  # lazy: keeps SciPy off import

        st = self._solve_triangular
        u0 = st(self.lower, self.a_keep.T @ (y - self.columns @ self.x_fixed), lower=True)
        f = self.h - self.e @ u0
        m = np.vstack([self.e.T, f[None, :]])
        target = np.zeros(m.shape[0])
        target[-1] = 1.0
        v, _ = nnls(m, target, maxiter=50 * m.shape[1])
        r = m @ v - target
        x = self.x_fixed.copy()
        if abs(r[-1]) < 1e-14:  # infeasible (cannot happen: x = 0 is feasible) - keep 0
            return x
        x[self.keep] = st(self.lower.T, -r[:-1] / r[-1] + u0, lower=False)
        return x


class FittedMultiCompartmentSphericalHarmonicsModel:
    """Result of :meth:`MultiCompartmentSphericalHarmonicsModel.fit` (dmipy's names).

    ``fitted_parameters`` maps ``sh_coeff`` (..., n_coef) (the FOD; integrates to one when
    its volume fraction is fitted or the unity constraint holds) and the fitted
    ``partial_volume_i`` (...,) to maps; ``S0`` the normalisation used per voxel.
    """

    def __init__(self, model: MultiCompartmentSphericalHarmonicsModel, scheme: AcquisitionScheme,
                 vectors: np.ndarray, S0: np.ndarray, mask: np.ndarray) -> None:  # noqa: N803
        self.model = model
        self.acquisition_scheme = scheme
        self.fitted_parameters_vector = vectors
        self.S0 = S0
        self.mask = mask

    @property
    def fitted_parameters(self) -> dict[str, np.ndarray]:
        """Fitted parameter maps by name."""
        out = {}
        pos = 0
        for p in self.model._state.free():
            chunk = self.fitted_parameters_vector[..., pos:pos + p.cardinality]
            out[p.name] = chunk[..., 0] if p.cardinality == 1 else chunk
            pos += p.cardinality
        return out

    @property
    def fitted_multi_tissue_fractions(self) -> dict[str, np.ndarray]:
        """Volume fractions (the fitted ones are volume fractions already when the model
        has S0 responses)."""
        return {k: v for k, v in self.fitted_parameters.items()
                if k.startswith("partial_volume_")}

    def fod(self, vertices: ArrayLike, visual_odi_lower_bound: float = 0.0) -> np.ndarray:
        """FOD values (..., K) at unit vectors ``vertices`` (K, 3) (1/sr)."""
        basis = sh_basis(self.model.sh_order, np.asarray(vertices, dtype=float))
        return self.fitted_parameters["sh_coeff"] @ basis.T

    def fod_sh(self) -> np.ndarray:
        """The FOD SH coefficients (..., n_coef) in dmipy's basis."""
        return self.fitted_parameters["sh_coeff"]

    def anisotropy_index(self) -> np.ndarray:
        """``sqrt(1 - c_00^2 / sum c_lm^2)`` of the FOD (...,), 0 for isotropic FODs."""
        sh = self.fitted_parameters["sh_coeff"]
        total = np.sum(sh ** 2, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(total > 0, np.sqrt(np.clip(1.0 - sh[..., 0] ** 2 / total, 0, 1)),
                            0.0)

    def norm_of_laplacian_fod(self) -> np.ndarray:
        """``sqrt(sum (l (l + 1))^2 c_lm^2)`` of the FOD (...,), its roughness."""
        degrees = _degrees(self.model.sh_order)
        sh = self.fitted_parameters["sh_coeff"]
        return np.sqrt(np.sum((degrees * (degrees + 1.0)) ** 2 * sh ** 2, axis=-1))

    def peaks_cartesian(self, max_peaks: int = 3, relative_peak_threshold: float = 0.1,
                        min_separation_angle: float = 25.0) -> np.ndarray:
        """Up to ``max_peaks`` FOD maxima per voxel as unit vectors (..., max_peaks, 3),
        largest first, zero rows where there are fewer (refined from a 4000-point
        hemisphere grid by Newton steps on the sphere)."""
        sh = self.fitted_parameters["sh_coeff"]
        flat = sh.reshape(-1, sh.shape[-1])
        peaks = fod_peaks(flat, self.model.sh_order, max_peaks, relative_peak_threshold,
                          min_separation_angle)[0]
        return peaks.reshape(sh.shape[:-1] + (max_peaks, 3))

    def predict(self, acquisition_scheme: AcquisitionScheme | None = None,
                S0: ArrayLike | None = None, mask: ArrayLike | None = None) -> np.ndarray:
        """Fitted signals (..., N) times ``S0`` (default: the normalisation used), zero
        outside the fitted mask."""
        scheme = self.acquisition_scheme if acquisition_scheme is None else acquisition_scheme
        use = self.mask if mask is None else np.asarray(mask, dtype=bool) & self.mask
        s0 = self.S0 if S0 is None else np.broadcast_to(np.asarray(S0, dtype=float),
                                                        self.mask.shape)
        out = np.zeros(self.mask.shape + (scheme.number_of_measurements,))
        if np.any(use):
            out[use] = self.model.simulate_signal(scheme, self.fitted_parameters_vector[use]) \
                * np.asarray(s0)[use][:, None]
        if self.mask.shape == (1,) and out.ndim == 2:
            return out
        return out

    def _residuals(self, data: Any) -> tuple[np.ndarray, np.ndarray]:
        arr = np.asarray(data, dtype=float)
        if arr.shape != self.mask.shape + (self.acquisition_scheme.number_of_measurements,):
            if arr.ndim == 1 and self.mask.shape == (1,):
                arr = arr[None, :]
            else:
                raise InputError(f"data has shape {arr.shape}; expected {self.mask.shape} + "
                                 f"({self.acquisition_scheme.number_of_measurements},)")
        pred = self.predict()
        return arr, pred

    def mean_squared_error(self, data: ArrayLike) -> np.ndarray:
        """Mean squared error (...,) between data and prediction, divided by S0^2."""
        arr, pred = self._residuals(data)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.mean((arr - pred) ** 2, axis=-1) / np.where(self.S0 > 0, self.S0, 1) ** 2
        return np.where(self.mask, out, 0.0)

    def R2_coefficient_of_determination(self, data: ArrayLike) -> np.ndarray:  # noqa: N802
        """1 - SS_res / SS_tot (...,) of the prediction against the data."""
        arr, pred = self._residuals(data)
        res = np.sum((arr - pred) ** 2, axis=-1)
        tot = np.sum((arr - arr.mean(axis=-1, keepdims=True)) ** 2, axis=-1)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.where(tot > 0, 1.0 - res / tot, np.nan)
        return np.where(self.mask, out, 0.0)
