"""``solver='mix'``: differential evolution of the non-linear parameters with the volume
fractions solved exactly, then bounded non-linear least squares.

The stochastic global search runs on every voxel at once: each voxel has its own
population (``popsize`` members per searched parameter, Latin-hypercube start), evolved
by the *best/1/bin* strategy (mutation factor dithered in [0.5, 1), crossover 0.7).
Each candidate's cost is the residual of the signal with the top-level volume fractions
solved by non-negative least squares for that candidate (variable projection, when the
fractions are free and unlinked; otherwise they are searched too and held at a sum of
one by a penalty). A voxel stops evolving when the spread of its population's costs
falls below ``tol`` times their mean (or 1e-7 of the signal's energy), or after
``maxiter`` generations. The best member
then starts the Levenberg-Marquardt refinement of the whole vector, as in brute2fine.
A given ``x0`` joins each voxel's initial population.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from fingerprint.fitting.nonlinear import _held, _numba_threads, _Problem, refine_nonlinear
from fingerprint.fitting.solvers.common import ClassicalOptions

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = ["fit_mix"]

_CROSSOVER = 0.7
#: Spread of a population's costs, relative to 0.5 |y|², below which it has converged
#: whatever its mean (noise-free signals: costs near 0).
_ATOL = 1e-7
_ROWS = 4096


def _cost(problem: _Problem, templates: np.ndarray, z: np.ndarray, ys: np.ndarray
          ) -> np.ndarray:
    out = np.empty(z.shape[0])
    for s in range(0, z.shape[0], _ROWS):
        res, _, _ = problem.batch_residuals(templates[s:s + _ROWS], z[s:s + _ROWS],
                                            ys[s:s + _ROWS])
        c = 0.5 * np.sum(res ** 2, axis=1)
        out[s:s + _ROWS] = np.where(np.isfinite(c), c, np.inf)
    return out


def _search_bounds(problem: _Problem) -> tuple[np.ndarray, np.ndarray]:
    """Bounds (m,) of the searched (scaled, free) values: orientations theta in [0, pi],
    phi in [-pi, pi]."""
    lo = problem.lower[problem.free].copy()
    hi = problem.upper[problem.free].copy()
    orient = problem.orientation[problem.free]
    lo[orient] = np.where(np.isin(problem.free[orient],
                                  [p[0] for p in problem.orientation_pairs]), 0.0, -np.pi)
    hi[orient] = np.where(np.isin(problem.free[orient],
                                  [p[0] for p in problem.orientation_pairs]), np.pi, np.pi)
    return lo, hi


def fit_mix(model: MultiCompartmentModelProperties, scheme: AcquisitionScheme, signals: np.ndarray,
            x0: np.ndarray | None = None, options: ClassicalOptions | None = None,
            fixed: np.ndarray | None = None
            ) -> tuple[np.ndarray, np.ndarray]:
    """Fit b0-normalised ``signals`` (n, N) by differential evolution then refinement.

    ``x0`` (n, P), NaN where not given, joins the initial population (its missing
    values drawn at random). ``fixed`` (n, P): per-voxel fixed values (NaN where
    estimated; a column is fixed in every voxel or in none), held throughout. Returns
    parameter vectors (n, P) (SI units) and costs (n,) (half the residual sum of squares
    of the normalised signals).
    """
    options = options or ClassicalOptions()
    t0 = time.perf_counter()
    y = np.asarray(signals, dtype=np.float64)
    n = y.shape[0]
    P = int(sum(model.parameter_cardinality.values()))
    fixed_values, held = _held(fixed, n, P)
    problem = _Problem(model, scheme, sum_to_one=True, held=held)
    obs = problem.observed(y)
    rng = np.random.default_rng(options.seed)
    lo, hi = _search_bounds(problem)
    m = lo.size
    template = 0.5 * (problem.lower + problem.upper) * problem.scales
    bound_only = problem.upper <= problem.lower
    template[bound_only] = (problem.lower * problem.scales)[bound_only]
    if problem.pv_columns.size:
        template[problem.pv_columns] = 1.0 / problem.pv_columns.size
    ok = np.flatnonzero(np.all(np.isfinite(obs), axis=1))
    # each voxel's template: the fixed values of its own (held columns)
    voxel_template = np.repeat(template[None, :], n, axis=0)
    voxel_template[:, held] = fixed_values[:, held]
    best_z = np.full((n, m), np.nan)
    generations = 0
    with _numba_threads(options.n_jobs):
        if m and ok.size:
            npop = max(5, options.popsize * m)
            v = ok.size
            # Latin hypercube in the unit cube, per voxel
            u = (np.argsort(rng.random((v, npop, m)), axis=1) + rng.random((v, npop, m))
                 ) / npop
            pop = lo + u * (hi - lo)
            if x0 is not None:
                seed = np.asarray(x0, float)[ok][:, problem.free] / problem.scales[problem.free]
                pop[:, 0] = np.where(np.isfinite(seed), np.clip(seed, lo, hi), pop[:, 0])
            tmpl = np.repeat(voxel_template[ok], npop, axis=0)
            ys = np.repeat(obs[ok], npop, axis=0)
            cost = _cost(problem, tmpl, pop.reshape(-1, m), ys).reshape(v, npop)
            active = np.ones(v, dtype=bool)
            scale = 0.5 * np.sum(obs[ok] ** 2, axis=1)
            for _ in range(options.maxiter):
                act = np.flatnonzero(active)
                if act.size == 0:
                    break
                generations += 1
                a = act.size
                p, c = pop[act], cost[act]
                best = p[np.arange(a), np.argmin(c, axis=1)]
                r = np.argsort(rng.random((a, npop, npop)), axis=2)[:, :, :2]
                f = rng.uniform(0.5, 1.0, (a, 1, 1))
                r1 = np.take_along_axis(p, r[:, :, 0:1], 1)
                r2 = np.take_along_axis(p, r[:, :, 1:2], 1)
                mutant = best[:, None, :] + f * (r1 - r2)
                cross = rng.random((a, npop, m)) < _CROSSOVER
                cross[np.arange(a)[:, None], np.arange(npop)[None, :],
                      rng.integers(0, m, (a, npop))] = True
                trial = np.where(cross, mutant, p)
                out = (trial < lo) | (trial > hi)
                trial = np.where(out, lo + rng.random(trial.shape) * (hi - lo), trial)
                tc = _cost(problem, np.repeat(voxel_template[ok][act], npop, axis=0),
                           trial.reshape(-1, m),
                           np.repeat(obs[ok][act], npop, axis=0)).reshape(a, npop)
                better = tc <= c
                pop[act] = np.where(better[:, :, None], trial, p)
                cost[act] = np.where(better, tc, c)
                cc = cost[act]
                spread = np.std(cc, axis=1) <= options.tol * np.abs(np.mean(cc, axis=1)) \
                    + _ATOL * scale[act]
                active[act[spread]] = False
            best_z[ok] = pop[np.arange(v), np.argmin(cost, axis=1)]
        t1 = time.perf_counter()
        start = np.full((n, problem.P), np.nan)
        start[ok] = voxel_template[ok]
        if m:
            start[ok[:, None], problem.free[None, :]] = best_z[ok] * problem.scales[
                problem.free]
        out_x, out_cost = refine_nonlinear(model, scheme, y, start, n_jobs=options.n_jobs,
                                           max_nfev=options.maxiter, return_cost=True,
                                           sum_to_one=True,
                                           held=fixed_values if held.any() else None)
    logger.info("mix: %d voxels, differential evolution %d generation(s) (%.3g s), "
                "refinement %.3g s", n, generations, t1 - t0, time.perf_counter() - t1)
    return out_x, out_cost
