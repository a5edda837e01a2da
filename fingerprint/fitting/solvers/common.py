"""What the classical solvers share: options, orientation samples, starting vectors and
the exact variable-projection cost of many parameter sets at once."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["ClassicalOptions", "projected_costs", "sphere_samples"]

#: dmipy's defaults: grid points per parameter, orientations of the brute-force grid,
#: iterations of the optimisers.
DEFAULT_NS = 5
DEFAULT_SPHERE_SAMPLES = 30
DEFAULT_MAXITER = 300
#: The largest brute-force grid (parameter sets) accepted.
MAX_GRID = 2_000_000


@dataclass(frozen=True)
class ClassicalOptions:
    """Options of the classical solvers (dmipy's names).

    Ns: grid points per scalar parameter (brute2fine).
    N_sphere_samples: orientations of the brute-force grid (brute2fine).
    maxiter: residual evaluations per start of the refinement; for mix also the
        generations of the differential evolution.
    n_jobs: threads of the batched simulation (None: all cores).
    starts: best grid points refined per voxel (brute2fine).
    popsize: differential-evolution population per non-linear parameter (mix).
    tol: relative spread of the population's costs at which the evolution of a voxel
        stops (mix).
    seed: seed of the differential evolution (mix).
    """

    Ns: int = DEFAULT_NS
    N_sphere_samples: int = DEFAULT_SPHERE_SAMPLES
    maxiter: int = DEFAULT_MAXITER
    n_jobs: int | None = None
    starts: int = 1
    popsize: int = 6
    tol: float = 0.05
    seed: int = 0

    @classmethod
    def from_fit_options(cls, options: object) -> ClassicalOptions:
        """The settings of a :class:`~fingerprint.fitting.options.FitOptions`
        (``classical``, ``threads``, ``seed``)."""
        c = getattr(options, "classical", None)
        values = {} if c is None else dataclasses.asdict(c)
        starts = values.pop("grid_starts", 1)
        return cls(**values, starts=int(starts), n_jobs=getattr(options, "threads", None),
                   seed=int(getattr(options, "seed", 0) or 0))


def sphere_samples(n: int) -> np.ndarray:
    """``n`` orientations (n, 2) = (theta, phi), radians, spread evenly over the
    half-sphere z >= 0 (a Fibonacci lattice; antipodal axes are the same fibre)."""
    i = np.arange(n) + 0.5
    z = 1.0 - i / n  # uniform in (0, 1]: equal areas on the half-sphere
    phi = np.mod(np.pi * (3.0 - np.sqrt(5.0)) * i + np.pi, 2.0 * np.pi) - np.pi
    return np.stack([np.arccos(np.clip(z, -1.0, 1.0)), phi], axis=1)


def _supports(k: int) -> list[list[int]]:
    return [[j for j in range(k) if mask >> j & 1] for mask in range(1, 2 ** k)]


def projected_costs(a: np.ndarray, y: np.ndarray, sum_to_one: bool = False) -> np.ndarray:
    """Cost |y - A f|² with the fractions f >= 0 solved exactly (non-negative least
    squares; with ``sum_to_one``, least squares on the simplex: f >= 0, sum f = 1), for
    every voxel and every parameter set at once.

    ``a``: compartment signals, (g, K, N) shared by all voxels or (v, g, K, N) per
    voxel; ``y`` (v, N). Returns (v, g). The optimum is the (equality-constrained)
    least-squares solution on its own support, so it is the best feasible one over the
    2^K - 1 supports.
    """
    k = a.shape[-2]
    gram = a @ np.swapaxes(a, -1, -2)  # (..., g, K, K)
    if a.ndim == 3:
        b = np.einsum("gkn,vn->vgk", a, y)
    else:
        b = np.einsum("vgkn,vn->vgk", a, y)
    # best reduction of |y|²: 2 f.b - f G f (the empty support, f = 0, reduces nothing)
    best = np.full(b.shape[:2], -np.inf if sum_to_one else 0.0)
    trace = np.einsum("...ii->...", gram)[..., None, None]
    for cols in _supports(k):
        gs = gram[..., cols, :][..., :, cols]
        gs = gs + 1e-12 * trace * np.eye(len(cols))
        with np.errstate(all="ignore"):
            inv = np.linalg.inv(gs)
        bs = b[..., cols]
        xs = (inv @ bs[..., None])[..., 0]
        if sum_to_one:
            u = inv.sum(axis=-1)  # G^-1 1, (..., g, s)
            if a.ndim == 3:
                u = np.broadcast_to(u[None], xs.shape)
            with np.errstate(all="ignore"):
                mu = (1.0 - xs.sum(axis=-1)) / u.sum(axis=-1)
            xs = xs + u * mu[..., None]
            gx = np.einsum("...ij,...j->...i", gs, xs) if a.ndim == 4 else \
                np.einsum("gij,vgj->vgi", gs, xs)
            red = 2.0 * np.sum(xs * bs, axis=-1) - np.sum(xs * gx, axis=-1)
        else:
            red = np.sum(xs * bs, axis=-1)
        take = np.all(xs >= 0.0, axis=-1) & np.isfinite(red) & (red > best)
        best = np.where(take, red, best)
    return np.sum(y ** 2, axis=1)[:, None] - best
