"""Bounded non-linear least-squares polish of dictionary matches.

Dictionary matching samples the parameter space; for models with several orientations
(Ball-Stick-Stick, ...) the sampling of the orientation pairs is too coarse for the
matched atom to fit the signal well. :func:`refine_nonlinear` starts from the matched
parameter vectors and minimises the signal residual with
:func:`scipy.optimize.least_squares` (trust-region reflective, bounds from the model's
``parameter_ranges``), in scaled units (values divided by ``parameter_scales``).

* **Partial volumes** -- when the top-level volume fractions are free and take part in
  no link (fixed/equal/tortuous), the signal is linear in them: for given non-linear
  parameters the fractions are solved exactly by non-negative least squares on the
  compartment signals (variable projection), with a free total that absorbs the error of
  the b0 normalisation, and are then normalised to sum to one. Otherwise every parameter
  is optimised within its bounds with a penalty residual holding the fractions' sum at
  one, and the fractions are renormalised at the end.
* **Orientations** are optimised as unbounded (theta, phi) and mapped back to
  theta in [0, pi], phi in (-pi, pi].
* **Several starts** per voxel (``x0`` of shape (n, k, P), e.g. the k best atoms) are
  polished and the lowest cost is kept.

The Jacobian is a forward difference evaluated in the same batched ``simulate_signal``
call as the residual, so one iteration costs one model call of (1 + m) x K rows (m
non-linear parameters, K compartments). Cost, measured for Ball-Stick-Stick on a
126-measurement scheme (shared 2-core machine): ~2.9 ms per voxel and start from a start
~9 degrees off, ~23 ms per voxel for the four starts ``fit_model`` uses (a Python loop
per voxel; voxel chunks run on ``n_jobs`` threads, which gain little: the loop holds the
GIL most of the time).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from scipy.optimize import least_squares, nnls

from fingerprint.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_MAX_NFEV", "goodness_of_fit", "refine_nonlinear"]

#: Default limit on residual evaluations per start.
DEFAULT_MAX_NFEV = 100
#: Weight of the sum-to-one residual when the fractions are optimised directly.
_SUM_WEIGHT = 10.0
_CHUNK = 16


class _Problem:
    """What the residuals of one model on one scheme need (immutable after __init__)."""

    def __init__(self, model: Any, scheme: Any) -> None:
        self.model = model
        self.scheme = scheme
        cards = list(model.parameter_cardinality.items())
        self.P = int(sum(c for _, c in cards))
        self.scales = np.asarray(model.scales_for_optimization, dtype=float)
        bounds = np.asarray(model.bounds_for_optimization, dtype=float).reshape(self.P, 2)
        self.lower, self.upper = bounds[:, 0].copy(), bounds[:, 1].copy()
        types = dict(model.parameter_types)
        self.orientation = np.zeros(self.P, dtype=bool)
        columns: dict[str, list[int]] = {}
        pos = 0
        for name, card in cards:
            columns[name] = list(range(pos, pos + card))
            if types.get(name) == "orientation":
                self.orientation[pos:pos + card] = True
            pos += card
        self.orientation_pairs = [columns[n] for n, _ in cards
                                  if types.get(n) == "orientation"]
        pv_names = list(getattr(model, "partial_volume_names", []) or [])
        free_pv = [n for n in pv_names if n in columns]
        self.pv_columns = np.asarray([columns[n][0] for n in free_pv], dtype=int)
        linked = set()
        for link in getattr(model, "parameter_links", []) or []:
            linked.add(link.target)
            linked.update(link.sources)
        self.varpro = (len(pv_names) >= 2 and len(free_pv) == len(pv_names)
                       and not linked.intersection(pv_names))
        fixed_range = (self.upper <= self.lower) & ~self.orientation
        exclude = fixed_range.copy()
        if self.varpro:
            exclude[self.pv_columns] = True
        self.free = np.flatnonzero(~exclude)
        lo = np.where(self.orientation, -np.inf, self.lower)[self.free]
        hi = np.where(self.orientation, np.inf, self.upper)[self.free]
        self.z_lower, self.z_upper = lo, hi
        self.spherical_mean = bool(getattr(model, "is_spherical_mean", False))

    # ---------------------------------------------------------------- helpers
    def observed(self, signals: np.ndarray) -> np.ndarray:
        """What the model predicts: the signals, or their shell means."""
        if not self.spherical_mean:
            return signals
        shells = np.asarray(self.scheme.shell_indices, dtype=int)
        n_shells = int(len(self.scheme.shell_bvalues))
        out = np.zeros((signals.shape[0], n_shells))
        for s in range(n_shells):
            out[:, s] = signals[:, shells == s].mean(axis=1)
        return out

    def _vectors(self, template: np.ndarray, zs: np.ndarray) -> np.ndarray:
        """Parameter vectors (SI) (r, P) from scaled free values zs (r, m)."""
        x = np.repeat(template[None, :], zs.shape[0], axis=0)
        x[:, self.free] = zs * self.scales[self.free]
        return x

    def residuals(self, template: np.ndarray, zs: np.ndarray, y: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray | None]:
        """Residuals (r, R) for scaled free values zs (r, m), and the fractions (r, K)
        solved by variable projection (None otherwise)."""
        x = self._vectors(template, zs)
        if self.varpro:
            K = self.pv_columns.size
            rows = np.repeat(x, K, axis=0)
            rows[:, self.pv_columns] = np.tile(np.eye(K), (x.shape[0], 1))
            sig = self.model.simulate_signal(self.scheme, rows).reshape(x.shape[0], K, -1)
            res = np.empty((x.shape[0], y.size))
            fr = np.empty((x.shape[0], K))
            for i in range(x.shape[0]):
                a = sig[i].T
                if not np.all(np.isfinite(a)):
                    res[i] = 1e3
                    fr[i] = 1.0 / K
                    continue
                f, _ = nnls(a, y)
                res[i] = a @ f - y
                fr[i] = f
            return res, fr
        sig = self.model.simulate_signal(self.scheme, x)
        res = np.where(np.isfinite(sig), sig - y[None, :], 1e3)
        if self.pv_columns.size >= 2:
            total = x[:, self.pv_columns].sum(axis=1) - 1.0
            res = np.concatenate([res, _SUM_WEIGHT * np.sqrt(y.size) * total[:, None]], 1)
        return res, None

    def steps(self, z: np.ndarray) -> np.ndarray:
        """Forward-difference steps (m,), pointing inside the bounds."""
        h = 1e-6 * np.maximum(1.0, np.abs(z))
        return np.where(z + h > self.z_upper, -h, h)

    # ---------------------------------------------------------------- one voxel
    def solve(self, y: np.ndarray, starts: np.ndarray, max_nfev: int
              ) -> tuple[np.ndarray, float]:
        """Best parameter vector (P,) over ``starts`` (k, P) and its cost."""
        best_x, best_cost = starts[0].copy(), np.inf
        for start in starts:
            if not np.all(np.isfinite(start)):
                continue
            template = start.copy()
            z0 = template[self.free] / self.scales[self.free]
            z0 = np.clip(z0, self.z_lower, self.z_upper)

            def fun(z: np.ndarray, template: np.ndarray = template) -> np.ndarray:
                return self.residuals(template, z[None, :], y)[0][0]

            def jac(z: np.ndarray, template: np.ndarray = template) -> np.ndarray:
                h = self.steps(z)
                zs = np.repeat(z[None, :], z.size + 1, axis=0)
                zs[np.arange(1, z.size + 1), np.arange(z.size)] += h
                r, _ = self.residuals(template, zs, y)
                return ((r[1:] - r[0]) / h[:, None]).T

            if z0.size:
                sol = least_squares(fun, z0, jac=jac, bounds=(self.z_lower, self.z_upper),
                                    method="trf", x_scale=1.0, max_nfev=max_nfev)
                z = sol.x
            else:
                z = z0
            res, fr = self.residuals(template, z[None, :], y)
            cost = 0.5 * float(np.sum(res[0] ** 2))
            if cost < best_cost:
                x = self._vectors(template, z[None, :])[0]
                if fr is not None:
                    total = fr[0].sum()
                    x[self.pv_columns] = fr[0] / total if total > 0 else \
                        1.0 / self.pv_columns.size
                best_x, best_cost = x, cost
        return self.finish(best_x), best_cost

    def finish(self, x: np.ndarray) -> np.ndarray:
        """Canonical orientations, renormalised fractions, values within bounds (SI)."""
        x = x.copy()
        for th, ph in self.orientation_pairs:
            theta, phi = x[th], x[ph]
            v = np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi),
                          np.cos(theta)])
            x[th] = float(np.arccos(np.clip(v[2], -1.0, 1.0)))
            x[ph] = float(np.arctan2(v[1], v[0]))
        if self.pv_columns.size >= 2:
            f = x[self.pv_columns]
            total = f.sum()
            if np.isfinite(total) and total > 0:
                x[self.pv_columns] = f / total
        lo, hi = self.lower * self.scales, self.upper * self.scales
        x = np.where(np.isfinite(x), np.clip(x, lo, hi), x)
        return x


def refine_nonlinear(model: Any, scheme: Any, signals: Any, x0: Any, *,
                     n_jobs: int | None = None, max_nfev: int = DEFAULT_MAX_NFEV,
                     return_cost: bool = False) -> Any:
    """Polish parameter vectors by bounded non-linear least squares on the signals.

    Parameters
    ----------
    model: a MultiCompartmentModel (or spherical-mean model: the signals' shell means
        are fitted).
    scheme: the AcquisitionScheme of the signals.
    signals: (n, N) signals divided by their S0 (b0-normalised, dimensionless).
    x0: starting parameter vectors in dmipy order, SI units: (n, P), or (n, k, P) for k
        starts per voxel (e.g. the k best dictionary atoms); the lowest-cost result is
        kept. Starts with non-finite entries are skipped; voxels without a finite start
        or with non-finite signals are returned as their first start.
    n_jobs: threads running voxel chunks (default 1).
    max_nfev: residual evaluations allowed per start.
    return_cost: also return the final costs (n,) (half the residual sum of squares).

    Returns
    -------
    (n, P) parameter vectors (SI units; orientations theta in [0, pi], phi in (-pi, pi]),
    within the model's bounds; with ``return_cost``, ``(vectors, cost)``.
    """
    y_all = np.asarray(signals, dtype=np.float64)
    starts = np.asarray(x0, dtype=np.float64)
    if y_all.ndim == 1:
        y_all = y_all[None, :]
    if starts.ndim == 1:
        starts = starts[None, :]
    if starts.ndim == 2:
        starts = starts[:, None, :]
    n_meas = int(scheme.number_of_measurements)
    if y_all.ndim != 2 or y_all.shape[1] != n_meas:
        raise InputError(f"signals must have shape (voxels, {n_meas}), got "
                         f"{np.shape(signals)}")
    problem = _Problem(model, scheme)
    if starts.ndim != 3 or starts.shape[0] != y_all.shape[0] or starts.shape[2] != problem.P:
        raise InputError(f"x0 must have shape ({y_all.shape[0]}, {problem.P}) or "
                         f"({y_all.shape[0]}, k, {problem.P}), got {np.shape(x0)}")
    if max_nfev < 1:
        raise InputError(f"max_nfev must be at least 1, got {max_nfev}")
    n = y_all.shape[0]
    obs = problem.observed(y_all)
    out = starts[:, 0, :].copy()
    cost = np.full(n, np.nan)

    def run(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            if not np.all(np.isfinite(obs[i])):
                continue
            out[i], cost[i] = problem.solve(obs[i], starts[i], max_nfev)

    workers = int(n_jobs) if n_jobs else 1
    chunks = [(s, min(s + _CHUNK, n)) for s in range(0, n, _CHUNK)]
    if workers <= 1 or len(chunks) <= 1:
        for lo, hi in chunks:
            run(lo, hi)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for fut in [pool.submit(run, lo, hi) for lo, hi in chunks]:
                fut.result()
    logger.debug("non-linear refinement of %d voxels (%d start(s) each, %s)", n,
                 starts.shape[1], "variable projection" if problem.varpro
                 else "all parameters")
    return (out, cost) if return_cost else out


def goodness_of_fit(model: Any, scheme: Any, signals: Any, parameters: Any
                    ) -> tuple[np.ndarray, np.ndarray]:
    """R² and mean squared error (n,) of ``parameters`` (n, P) on b0-normalised
    ``signals`` (n, N) (shell means for spherical-mean models), all measurements."""
    problem = _Problem(model, scheme)
    n_meas = int(scheme.number_of_measurements)
    obs = problem.observed(np.asarray(signals, dtype=np.float64).reshape(-1, n_meas))
    params = np.asarray(parameters, dtype=np.float64).reshape(obs.shape[0], problem.P)
    ok = np.all(np.isfinite(params), axis=1)
    pred = np.full(obs.shape, np.nan)
    if ok.any():
        pred[ok] = model.simulate_signal(scheme, params[ok])
    res = ((obs - pred) ** 2).sum(axis=1)
    tot = ((obs - obs.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        r2 = np.where(tot > 0, 1.0 - res / tot, np.nan)
    return r2, res / obs.shape[1]

