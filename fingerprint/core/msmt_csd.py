"""Batched multi-shell multi-tissue constrained spherical deconvolution (MSMT-CSD) in
MRtrix3's conventions (its FOD peaks: :func:`fingerprint.core.csd_peaks.fod_peaks_batched`).

Basis
    MRtrix3's real orthonormal even spherical harmonics: for even ``l`` and
    ``-l <= m <= l``, ``Y_lm = sqrt(2) Im[Y_l^|m|]`` (m < 0), ``Y_l^0`` (m = 0),
    ``sqrt(2) Re[Y_l^m]`` (m > 0), with ``Y_l^m`` the complex orthonormal harmonics
    including the Condon-Shortley phase ``(-1)^m``; coefficient ``c_lm`` is stored at
    index ``l (l + 1) / 2 + m``. dmipy's basis has the same signs and ordering without the
    ``sqrt(2)``; both are evaluated by
    :func:`fingerprint.utils.spherical_convolution.mrtrix3_sh_basis`.

Model (Jeurissen et al. 2014)
    ``S(b, g) = sum_lm c_lm R_l^WM(b) sqrt(4 pi / (2 l + 1)) Y_lm(g) + sum_t f_t S_t(b)``
    with ``R_l^WM(b)`` the white-matter response's zonal coefficients per shell (signal
    units, as in MRtrix3's response files) and ``S_t(b)`` the isotropic tissues' signals
    per shell. A voxel made only of white matter like the response has ``c_00 = Y_00``:
    the white-matter signal fraction is ``sqrt(4 pi) c_00``.

Solver
    Least squares with the FOD non-negative on :data:`CONSTRAINT_POINTS` directions and
    the isotropic fractions non-negative, solved for a whole chunk of voxels at once by
    the constraint-set iteration of Tournier et al. (2007) with a hard penalty: solve,
    put a weight of :data:`PENALTY` times the data's scale on every violated constraint,
    re-solve (batched normal equations, one LAPACK call per chunk), until no voxel's
    violated set changes (the set only grows after :data:`RELEASE_ITERATIONS`, so the
    loop ends). The first set is the one of the FOD truncated at order 4 (as MRtrix3's
    ``csd`` does); the iteration then settles in ~10 steps. Negative lobes left are
    below ~1e-3 of the FOD's peak.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike
from scipy import sparse

from fingerprint.core.orientations import fibonacci_hemisphere
from fingerprint.errors import InputError
from fingerprint.utils.spherical_convolution import (
    check_sh_order,
    mrtrix3_sh_basis,
    sh_degrees_orders,
)

__all__ = [
    "CONSTRAINT_POINTS",
    "MsmtCsd",
    "TissueResponses",
]

logger = logging.getLogger(__name__)

#: Y_00 = 1 / (2 sqrt(pi))
Y00 = 0.5 / math.sqrt(math.pi)
#: hemisphere directions on which the FOD is kept non-negative (300 on the sphere)
CONSTRAINT_POINTS = 150
#: weight of a violated constraint, relative to the data term's mean diagonal
PENALTY = 100.0
#: constraint-set iterations before violated sets may only grow
RELEASE_ITERATIONS = 12
#: a constrained point is released when the FOD there exceeds this times |c_00|
HYSTERESIS = 1e-3
#: hard cap on the constraint-set iterations
MAX_ITERATIONS = 60


# ----------------------------------------------------------------------------- responses
@dataclass(frozen=True)
class TissueResponses:
    """Tissue responses per shell, in signal units (MRtrix3's response-file layout).

    shell_bvalues : (S,) increasing b-values of the shells, s/m² (the first normally b=0).
    white_matter : (S, n_l) zonal SH coefficients ``R_0, R_2, ...`` of the single-fibre
        white-matter response (fibre along z) per shell.
    isotropic : (T, S) the ``l = 0`` coefficient of each isotropic tissue per shell
        (``sqrt(4 pi)`` times its signal).
    isotropic_names : names of the isotropic tissues (e.g. ``("gm", "csf")``).
    """

    shell_bvalues: tuple[float, ...]
    white_matter: tuple[tuple[float, ...], ...]
    isotropic: tuple[tuple[float, ...], ...] = ()
    isotropic_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        b = np.asarray(self.shell_bvalues, dtype=float)
        wm = np.asarray(self.white_matter, dtype=float)
        if b.ndim != 1 or b.size == 0 or not np.all(np.isfinite(b)) or np.any(b < 0):
            raise InputError("TissueResponses.shell_bvalues must be finite b-values >= 0 "
                             f"(s/m²), got {self.shell_bvalues!r}")
        if np.any(np.diff(b) <= 0):
            raise InputError("TissueResponses.shell_bvalues must increase, got "
                             f"{(b / 1e6).round(1).tolist()} s/mm²")
        if wm.ndim != 2 or wm.shape[0] != b.size or not np.all(np.isfinite(wm)):
            raise InputError(f"TissueResponses.white_matter must be finite, one row per "
                             f"shell ({b.size}), got shape {wm.shape}")
        iso = np.asarray(self.isotropic, dtype=float).reshape(-1, b.size) \
            if len(self.isotropic) else np.zeros((0, b.size))
        if not np.all(np.isfinite(iso)):
            raise InputError("TissueResponses.isotropic must be finite")
        if len(self.isotropic_names) != iso.shape[0]:
            raise InputError("TissueResponses.isotropic_names must name every isotropic "
                             f"tissue ({iso.shape[0]}), got {self.isotropic_names!r}")

    @property
    def n_tissues(self) -> int:
        """White matter plus the isotropic tissues."""
        return 1 + len(self.isotropic)

    @classmethod
    def from_arrays(cls, shell_bvalues: ArrayLike, white_matter: ArrayLike,
                    isotropic: Sequence[ArrayLike] = (),
                    isotropic_names: Sequence[str] = ()) -> TissueResponses:
        """From arrays: b-values (S,) s/m², white matter (S, n_l), isotropic (T, S)."""
        wm = np.atleast_2d(np.asarray(white_matter, dtype=float))
        return cls(tuple(np.asarray(shell_bvalues, dtype=float).reshape(-1).tolist()),
                   tuple(tuple(r) for r in wm.tolist()),
                   tuple(tuple(np.asarray(i, dtype=float).reshape(-1).tolist())
                         for i in isotropic), tuple(isotropic_names))

    def shell_of(self, bvalues: ArrayLike, tolerance: float = 0.1) -> np.ndarray:
        """Index of the response shell of each b-value (N,); InputError for b-values
        farther than ``tolerance`` (relative, or 100 s/mm² near b=0) from every shell."""
        b = np.asarray(bvalues, dtype=float).reshape(-1)
        shells = np.asarray(self.shell_bvalues, dtype=float)
        dist = np.abs(b[:, None] - shells[None, :])
        best = np.argmin(dist, axis=1)
        allowed = np.maximum(tolerance * shells[best], 100e6)
        bad = dist[np.arange(b.size), best] > allowed
        if np.any(bad):
            raise InputError(f"b-value(s) {np.unique(b[bad] / 1e6).round(0)[:4].tolist()} "
                             "s/mm² match none of the response shells "
                             f"{(shells / 1e6).round(0).tolist()} s/mm²")
        return best


def _kernel_rows(responses: TissueResponses, bvalues: np.ndarray, sh_order: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Per-measurement white-matter zonal factors ``R_l sqrt(4 pi / (2l + 1))``
    (N, sh_order / 2 + 1) and isotropic signals (N, T)."""
    idx = responses.shell_of(bvalues)
    wm = np.asarray(responses.white_matter, dtype=float)
    n_l = sh_order // 2 + 1
    padded = np.zeros((wm.shape[0], n_l))
    k = min(n_l, wm.shape[1])
    padded[:, :k] = wm[:, :k]
    ell = 2.0 * np.arange(n_l)
    factors = padded * np.sqrt(4.0 * np.pi / (2.0 * ell + 1.0))
    iso = np.asarray(responses.isotropic, dtype=float).reshape(-1, wm.shape[0])
    return factors[idx], (iso * Y00).T[idx]


# ----------------------------------------------------------------------------- solver
class MsmtCsd:
    """Batched MSMT-CSD of one scheme and one set of responses (immutable once built).

    Parameters
    ----------
    bvalues : (N,) s/m²; directions : (N, 3) unit vectors (rows of b=0 measurements are
        ignored).
    responses : :class:`TissueResponses` in the data's signal units.
    sh_order : even SH order of the white-matter FOD (default 8).
    lambda_lb : weight of the Laplace-Beltrami penalty ``sum l^2 (l + 1)^2 c_lm^2``,
        relative to the data term's mean diagonal (default 0: MRtrix3's msmt_csd has none).
    """

    def __init__(self, bvalues: ArrayLike, directions: ArrayLike,
                 responses: TissueResponses, sh_order: int = 8,
                 lambda_lb: float = 0.0) -> None:
        self.sh_order = check_sh_order(sh_order)
        if not np.isfinite(lambda_lb) or lambda_lb < 0:
            raise InputError(f"lambda_lb must be a finite number >= 0, got {lambda_lb!r}")
        b = np.asarray(bvalues, dtype=float).reshape(-1)
        g = np.asarray(directions, dtype=float).reshape(-1, 3)
        if g.shape[0] != b.size:
            raise InputError(f"{b.size} b-values but {g.shape[0]} directions")
        self.responses = responses
        degrees, _ = sh_degrees_orders(self.sh_order)
        self.n_coef = degrees.size
        factors, iso = _kernel_rows(responses, b, self.sh_order)
        basis = mrtrix3_sh_basis(self.sh_order, np.where(np.isfinite(g), g, 0.0))
        wm_design = factors[:, degrees // 2] * basis
        self.design = np.hstack([wm_design, iso])
        self.n_iso = iso.shape[1]
        n_var = self.design.shape[1]
        gram = self.design.T @ self.design
        scale = float(np.mean(np.diag(gram))) or 1.0
        lb = np.zeros(n_var)
        lb[:self.n_coef] = (degrees * (degrees + 1.0)) ** 2
        self.gram = gram + lambda_lb * scale * np.diag(lb) + 1e-10 * scale * np.eye(n_var)
        grid = mrtrix3_sh_basis(self.sh_order, fibonacci_hemisphere(CONSTRAINT_POINTS))
        constraints = np.zeros((CONSTRAINT_POINTS + self.n_iso, n_var))
        constraints[:CONSTRAINT_POINTS, :self.n_coef] = grid
        constraints[CONSTRAINT_POINTS:, self.n_coef:] = np.eye(self.n_iso)
        # every constraint weighs PENALTY * scale whatever its row norm
        norms = np.linalg.norm(constraints, axis=1)
        self.constraints = constraints / norms[:, None]
        self.penalty = PENALTY * scale
        self._tri = np.triu_indices(n_var)
        self._outer = self.constraints[:, self._tri[0]] * self.constraints[:, self._tri[1]]
        self._high = np.nonzero(np.concatenate([degrees > 4, np.zeros(self.n_iso, bool)]))[0]

    @property
    def n_variables(self) -> int:
        """FOD coefficients plus isotropic fractions."""
        return self.design.shape[1]

    def solve(self, signals: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """FOD SH coefficients (V, n_coef) (MRtrix3 basis) and isotropic fractions (V, T)
        of signals (V, N) in the responses' units."""
        y = np.asarray(signals, dtype=float)
        if y.ndim != 2 or y.shape[1] != self.design.shape[0]:
            raise InputError(f"signals have shape {y.shape}; expected (voxels, "
                             f"{self.design.shape[0]})")
        n_var = self.n_variables
        tri_i, tri_j = self._tri
        rhs = y @ self.design
        x = np.linalg.solve(self.gram, rhs.T).T
        # the first constraint set comes from the FOD truncated at order 4 (the full
        # unconstrained FOD rings everywhere; starting there makes the iteration swing)
        low = x.copy()
        low[:, self._high] = 0.0
        active = (low @ self.constraints.T) < 0.0
        packed = self.gram[tri_i, tri_j][None, :] + self.penalty * np.asarray(
            sparse.csr_matrix(active.astype(float)) @ self._outer)
        todo = np.arange(y.shape[0])
        h = np.empty((todo.size, n_var, n_var))
        for it in range(MAX_ITERATIONS):
            if todo.size == 0:
                break
            logger.debug("MSMT-CSD iteration %d: %d voxel(s) to solve", it, todo.size)
            h = h[:todo.size]
            h[:, tri_i, tri_j] = packed[todo]
            h[:, tri_j, tri_i] = packed[todo]
            x[todo] = np.linalg.solve(h, rhs[todo][:, :, None])[:, :, 0]
            values = x[todo] @ self.constraints.T
            # hysteresis: a constrained point is released only when clearly positive
            tol = HYSTERESIS * np.abs(x[todo, :1])
            viol = (values < 0.0) | (active[todo] & (values < tol))
            if it >= RELEASE_ITERATIONS:
                viol |= active[todo]
            delta = viol.astype(np.int8) - active[todo].astype(np.int8)
            changed = np.any(delta != 0, axis=1)
            active[todo] = viol
            todo, delta = todo[changed], delta[changed]
            if todo.size:
                packed[todo] += self.penalty * np.asarray(
                    sparse.csr_matrix(delta.astype(float)) @ self._outer)
        else:
            logger.warning("MSMT-CSD: %d voxel(s) did not settle their constraint set in %d "
                           "iterations", todo.size, MAX_ITERATIONS)
        fod = x[:, :self.n_coef]
        iso = np.maximum(x[:, self.n_coef:], 0.0)
        return fod, iso
