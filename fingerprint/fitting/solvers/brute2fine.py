"""``solver='brute2fine'``: a brute-force grid, then bounded non-linear least squares.

1. **Grid.** Every free scalar parameter takes ``Ns`` values evenly spread inside its
   bounds (the midpoints of ``Ns`` equal cells) and every free orientation
   ``N_sphere_samples`` axes spread evenly over the half-sphere (dmipy's options and
   defaults). When the top-level volume fractions are free and unlinked they are not
   gridded: for each grid point they are solved exactly by non-negative least squares
   (variable projection), so the grid spans only the non-linear parameters. The grid is
   simulated once and shared by all voxels; parameters given in ``x0`` (for every voxel)
   replace their grid axis, and the grid is then simulated per voxel.
2. **Refinement.** The best grid point(s) of each voxel start the bounded
   Levenberg-Marquardt of :func:`~fingerprint.fitting.nonlinear.refine_nonlinear` on the
   whole parameter vector, run to convergence (``maxiter`` residual evaluations per
   start, voxels still moving then continue with the trust-region solver).
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from fingerprint.errors import InputError
from fingerprint.fitting.nonlinear import _held, _numba_threads, _Problem, refine_nonlinear
from fingerprint.fitting.solvers.common import (
    MAX_GRID,
    ClassicalOptions,
    projected_costs,
    sphere_samples,
)

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = ["brute_force_grid", "fit_brute2fine"]

#: Parameter sets simulated together in the shared grid, and voxels costed together.
_ATOM_CHUNK = 2048
_VOXEL_CHUNK = 256
#: Grid rows (voxels x grid points) simulated together when the grid is per voxel.
_ROW_CHUNK = 4096


def _axes(problem: _Problem, given: np.ndarray, options: ClassicalOptions
          ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Grid axes: a list of column-index arrays and, for each, the values (SI) it takes
    (orientation pairs move together)."""
    cols, values = [], []
    pairs = {c for pair in problem.orientation_pairs for c in pair}
    free = [int(c) for c in problem.free]
    for pair in problem.orientation_pairs:
        if pair[0] in free and not given[pair].any():
            cols.append(np.asarray(pair))
            values.append(sphere_samples(options.N_sphere_samples))
    for c in free:
        if c in pairs or given[c]:
            continue
        lo, hi = problem.lower[c], problem.upper[c]
        centres = lo + (np.arange(options.Ns) + 0.5) / options.Ns * (hi - lo)
        cols.append(np.asarray([c]))
        values.append((centres * problem.scales[c])[:, None])
    return cols, values


def brute_force_grid(model: MultiCompartmentModelProperties,
                     options: ClassicalOptions | None = None, given: np.ndarray | None = None,
                     held: np.ndarray | None = None
                     ) -> np.ndarray:
    """The brute-force grid of ``model``: parameter vectors (G, P), SI units.

    ``given`` (P,) bool marks columns left out of the grid (their values come from the
    caller); they hold the middle of their range here. ``held`` (P,) bool marks
    per-voxel fixed columns (left out too; with held fractions the others are gridded).
    Fixed-range parameters hold their bound; volume fractions solved by projection hold
    1/K.
    """
    options = options or ClassicalOptions()
    problem = _Problem(model, None, held=held)
    given = np.zeros(problem.P, dtype=bool) if given is None else np.asarray(given, bool)
    base = 0.5 * (problem.lower + problem.upper) * problem.scales
    fixed = problem.upper <= problem.lower
    base[fixed] = (problem.lower * problem.scales)[fixed]
    if problem.pv_columns.size:
        base[problem.pv_columns] = 1.0 / problem.pv_columns.size
    cols, values = _axes(problem, given, options)
    size = int(np.prod([v.shape[0] for v in values])) if values else 1
    if size > MAX_GRID:
        raise InputError(f"brute2fine grid of {size} parameter sets is too large (limit "
                         f"{MAX_GRID}); lower Ns ({options.Ns}) or N_sphere_samples "
                         f"({options.N_sphere_samples}), or fix parameters")
    grid = np.repeat(base[None, :], size, axis=0)
    if values:
        idx = np.array(list(itertools.product(*[range(v.shape[0]) for v in values])))
        for j, (c, v) in enumerate(zip(cols, values, strict=True)):
            grid[:, c] = v[idx[:, j]]
    if not problem.varpro and problem.pv_columns.size >= 2:
        f = grid[:, problem.pv_columns]
        grid[:, problem.pv_columns] = f / f.sum(axis=1, keepdims=True)
    return grid


def _costs_shared(problem: _Problem, grid: np.ndarray, obs: np.ndarray, k: int
                  ) -> np.ndarray:
    """Indices (n, k) of the k cheapest grid points of every voxel."""
    n = obs.shape[0]
    best_cost = np.full((n, 0), np.inf)
    best_idx = np.zeros((n, 0), dtype=int)
    for g0 in range(0, grid.shape[0], _ATOM_CHUNK):
        block = grid[g0:g0 + _ATOM_CHUNK]
        if problem.varpro:
            a = problem._compartments(block)
        else:
            a = problem.model.simulate_signal(problem.scheme, block)
        bad = ~np.all(np.isfinite(a.reshape(a.shape[0], -1)), axis=1)
        a = np.where(np.isfinite(a), a, 0.0)
        costs = np.empty((n, block.shape[0]))
        for v0 in range(0, n, _VOXEL_CHUNK):
            y = obs[v0:v0 + _VOXEL_CHUNK]
            if problem.varpro:
                costs[v0:v0 + y.shape[0]] = projected_costs(a, y, sum_to_one=True)
            else:
                costs[v0:v0 + y.shape[0]] = (np.sum(y ** 2, 1)[:, None] - 2 * y @ a.T
                                             + np.sum(a ** 2, 1)[None, :])
        costs[:, bad] = np.inf
        all_cost = np.concatenate([best_cost, costs], axis=1)
        all_idx = np.concatenate([best_idx, np.broadcast_to(
            np.arange(g0, g0 + block.shape[0]), costs.shape)], axis=1)
        keep = min(k, all_cost.shape[1])
        part = np.argpartition(all_cost, keep - 1, axis=1)[:, :keep]
        best_cost = np.take_along_axis(all_cost, part, 1)
        best_idx = np.take_along_axis(all_idx, part, 1)
    order = np.argsort(best_cost, axis=1)
    return np.take_along_axis(best_idx, order, 1)


def _starts_per_voxel(problem: _Problem, grid: np.ndarray, given: np.ndarray,
                      x0: np.ndarray, obs: np.ndarray, k: int) -> np.ndarray:
    """Starts (n, k, P): the k cheapest points of each voxel's own grid (the grid with
    the ``given`` columns set to the voxel's x0)."""
    n, g = obs.shape[0], grid.shape[0]
    k = min(k, g)
    out = np.empty((n, k, problem.P))
    per = max(1, _ROW_CHUNK // g)
    for v0 in range(0, n, per):
        v1 = min(n, v0 + per)
        rows = np.repeat(grid[None], v1 - v0, axis=0)  # (v, g, P)
        rows[:, :, given] = x0[v0:v1, None, :][:, :, given]
        flat = rows.reshape(-1, problem.P)
        y = obs[v0:v1]
        if problem.varpro:
            a = problem._compartments(flat).reshape((v1 - v0, g) + (problem.pv_columns.size,
                                                                    -1))
            bad = ~np.all(np.isfinite(a), axis=(2, 3))
            costs = projected_costs(np.where(np.isfinite(a), a, 0.0), y,
                                    sum_to_one=True)
        else:
            a = problem.model.simulate_signal(problem.scheme, flat).reshape(v1 - v0, g, -1)
            bad = ~np.all(np.isfinite(a), axis=2)
            costs = np.sum((np.where(np.isfinite(a), a, 0.0) - y[:, None, :]) ** 2, axis=2)
        costs[bad] = np.inf
        order = np.argsort(costs, axis=1)[:, :k]
        out[v0:v1] = np.take_along_axis(rows, order[:, :, None], 1)
    return out


def fit_brute2fine(model: MultiCompartmentModelProperties, scheme: AcquisitionScheme,
                   signals: np.ndarray, x0: np.ndarray | None = None,
                   options: ClassicalOptions | None = None,
                   fixed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fit b0-normalised ``signals`` (n, N) by brute force then refinement.

    ``x0`` (n, P) with NaN where not given: columns given for every voxel replace their
    grid axis; a partly given x0 also starts one refinement (NaN filled from the grid).
    ``fixed`` (n, P): per-voxel fixed values (NaN where estimated; a column is fixed in
    every voxel or in none): left out of the grid and held by the refinement.
    Returns parameter vectors (n, P) (SI units) and costs (n,) (half the residual sum of
    squares of the normalised signals).
    """
    options = options or ClassicalOptions()
    t0 = time.perf_counter()
    y = np.asarray(signals, dtype=np.float64)
    n = y.shape[0]
    P = int(sum(model.parameter_cardinality.values()))
    fixed_values, held = _held(fixed, n, P)
    problem = _Problem(model, scheme, sum_to_one=True, held=held)
    obs = problem.observed(y)
    ok = np.all(np.isfinite(obs), axis=1)
    x0m = np.full((n, problem.P), np.nan) if x0 is None else np.array(x0, float)
    x0m[:, held] = fixed_values[:, held]
    given = np.all(np.isfinite(x0m), axis=0) if n else np.zeros(problem.P, bool)
    if problem.varpro:
        given[problem.pv_columns] = False  # solved by projection anyway
    grid = brute_force_grid(model, options, given, held)
    k = options.starts
    starts = np.full((n, k, problem.P), np.nan)
    with _numba_threads(options.n_jobs):
        if ok.any():
            if given.any():
                s = _starts_per_voxel(problem, grid, given, x0m[ok], obs[ok], k)
            else:
                idx = _costs_shared(problem, grid, obs[ok], k)
                s = grid[idx]
            starts[ok, :s.shape[1]] = s
        t1 = time.perf_counter()
        partial = np.any(np.isfinite(x0m), axis=1) & ~np.all(
            np.isfinite(x0m) | given[None, :], axis=1)
        if partial.any():  # x0 given for some voxels only: also refine from it
            extra = np.where(np.isfinite(x0m), x0m, starts[:, 0, :])
            extra[~partial] = np.nan
            starts = np.concatenate([starts, extra[:, None, :]], axis=1)
        out, cost = refine_nonlinear(model, scheme, y, starts, n_jobs=options.n_jobs,
                                     max_nfev=options.maxiter, return_cost=True,
                                     sum_to_one=True,
                                     held=fixed_values if held.any() else None)
    logger.info("brute2fine: %d voxels, grid of %d points (%.3g s), refinement %.3g s",
                n, grid.shape[0], t1 - t0, time.perf_counter() - t1)
    return out, cost
