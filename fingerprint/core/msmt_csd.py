"""Batched multi-shell multi-tissue constrained spherical deconvolution (MSMT-CSD) in
MRtrix3's conventions, and a vectorised FOD peak search.

Basis
    MRtrix3's real orthonormal even spherical harmonics: for even ``l`` and
    ``-l <= m <= l``, ``Y_lm = sqrt(2) Im[Y_l^|m|]`` (m < 0), ``Y_l^0`` (m = 0),
    ``sqrt(2) Re[Y_l^m]`` (m > 0), with ``Y_l^m`` the complex orthonormal harmonics
    including the Condon-Shortley phase ``(-1)^m``; coefficient ``c_lm`` is stored at
    index ``l (l + 1) / 2 + m``. dmipy's basis (:mod:`fingerprint.utils.spherical_convolution`)
    has the same signs and ordering without the ``sqrt(2)``.

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

from fingerprint.errors import InputError
from fingerprint.utils.spherical_convolution import check_sh_order

__all__ = [
    "CONSTRAINT_POINTS",
    "MsmtCsd",
    "TissueResponses",
    "fod_peaks_batched",
    "fod_to_peak_array",
    "mrtrix3_sh_basis",
    "sh_degrees_orders",
    "unit_hemisphere",
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
#: hemisphere points of the peak search grid
PEAK_GRID_POINTS = 2000
#: neighbours compared on the peak search grid
PEAK_NEIGHBOURS = 8
#: Newton steps refining each peak
PEAK_REFINE_STEPS = 3
#: candidates per voxel refined before the peak selection
PEAK_CANDIDATES = 6


def sh_degrees_orders(sh_order: int) -> tuple[np.ndarray, np.ndarray]:
    """Degree ``l`` and order ``m`` (n_coef,) of every coefficient, MRtrix3's ordering."""
    order = check_sh_order(sh_order)
    degrees = np.concatenate([np.full(2 * ell + 1, ell) for ell in range(0, order + 1, 2)])
    orders = np.concatenate([np.arange(-ell, ell + 1) for ell in range(0, order + 1, 2)])
    return degrees, orders


def _angles(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    v = np.asarray(vectors, dtype=float).reshape(-1, 3)
    norm = np.linalg.norm(v, axis=1)
    safe = np.where(norm > 0, norm, 1.0)
    return np.arccos(np.clip(v[:, 2] / safe, -1.0, 1.0)), np.arctan2(v[:, 1], v[:, 0])


def mrtrix3_sh_basis(sh_order: int, vectors: ArrayLike) -> np.ndarray:
    """MRtrix3's real orthonormal even SH basis (K, n_coef) at directions (K, 3) (need
    not be unit length; zero vectors give the basis at +z).

    Evaluated by the three-term recurrences of the normalised associated Legendre
    functions (Condon-Shortley phase included) and of ``cos(m phi)``, ``sin(m phi)``
    from the vector's components, without angles: vectorised over directions."""
    order = check_sh_order(sh_order)
    v = np.asarray(vectors, dtype=float).reshape(-1, 3)
    norm = np.linalg.norm(v, axis=1)
    z = np.where(norm > 0, v[:, 2] / np.where(norm > 0, norm, 1.0), 1.0)
    z = np.clip(z, -1.0, 1.0)
    rxy = np.hypot(v[:, 0], v[:, 1])
    cp = np.where(rxy > 0, v[:, 0] / np.where(rxy > 0, rxy, 1.0), 1.0)
    sp = np.where(rxy > 0, v[:, 1] / np.where(rxy > 0, rxy, 1.0), 0.0)
    sin_theta = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    out = np.zeros((v.shape[0], (order + 1) * (order + 2) // 2))
    p_mm = np.full(v.shape[0], 0.5 / math.sqrt(math.pi))  # P_00
    cos_m, sin_m = np.ones(v.shape[0]), np.zeros(v.shape[0])
    for m in range(0, order + 1):
        if m:
            p_mm = -math.sqrt((2.0 * m + 1.0) / (2.0 * m)) * sin_theta * p_mm
            cos_m, sin_m = cos_m * cp - sin_m * sp, sin_m * cp + cos_m * sp
        prev2, prev1 = np.zeros_like(p_mm), p_mm  # P_{m-1, m} = 0, P_{m, m}
        for ell in range(m, order + 1):
            if ell == m:
                p_lm = p_mm
            else:
                a = math.sqrt((4.0 * ell * ell - 1.0) / (ell * ell - m * m))
                a_prev = math.sqrt((4.0 * (ell - 1) ** 2 - 1.0) / ((ell - 1) ** 2 - m * m)) \
                    if ell - 1 > m else np.inf
                p_lm = a * (z * prev1 - prev2 / a_prev)
                prev2, prev1 = prev1, p_lm
            if ell % 2:
                continue
            base = ell * (ell + 1) // 2
            if m == 0:
                out[:, base] = p_lm
            else:
                out[:, base + m] = math.sqrt(2.0) * p_lm * cos_m
                out[:, base - m] = math.sqrt(2.0) * p_lm * sin_m
    return out


def unit_hemisphere(n_points: int) -> np.ndarray:
    """Quasi-uniform unit vectors (n_points, 3), z >= 0 (Fibonacci lattice); with their
    antipodes they cover the sphere evenly."""
    i = np.arange(n_points) + 0.5
    z = 1.0 - i / n_points
    r = np.sqrt(1.0 - z * z)
    phi = np.pi * (3.0 - math.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


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
        grid = mrtrix3_sh_basis(self.sh_order, unit_hemisphere(CONSTRAINT_POINTS))
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


# ----------------------------------------------------------------------------- peaks
_PEAK_GRIDS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _peak_grid(sh_order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if sh_order not in _PEAK_GRIDS:
        pts = unit_hemisphere(PEAK_GRID_POINTS)
        cos = np.abs(pts @ pts.T)
        np.fill_diagonal(cos, -1.0)
        neighbours = np.argpartition(-cos, PEAK_NEIGHBOURS, axis=1)[:, :PEAK_NEIGHBOURS]
        _PEAK_GRIDS[sh_order] = (pts, neighbours, mrtrix3_sh_basis(sh_order, pts))
    return _PEAK_GRIDS[sh_order]


def _refine(sh: np.ndarray, sh_order: int, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Newton steps on the sphere for peaks d (P, 3) of FODs sh (P, n_coef): refined unit
    vectors and FOD values (P,)."""
    eps = 1e-3
    value = np.zeros(d.shape[0])
    for _ in range(PEAK_REFINE_STEPS):
        helper = np.where(np.abs(d[:, :1]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
        e1 = np.cross(d, helper)
        e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
        e2 = np.cross(d, e1)
        pts = np.stack([d, d + eps * e1, d - eps * e1, d + eps * e2, d - eps * e2,
                        d + eps * (e1 + e2) / math.sqrt(2), d - eps * (e1 + e2) / math.sqrt(2)],
                       axis=1)
        pts /= np.linalg.norm(pts, axis=2, keepdims=True)
        f = np.einsum("pkc,pc->pk", mrtrix3_sh_basis(sh_order, pts.reshape(-1, 3))
                      .reshape(d.shape[0], 7, -1), sh)
        value = f[:, 0]
        g = np.stack([(f[:, 1] - f[:, 2]), (f[:, 3] - f[:, 4])], axis=1) / (2 * eps)
        h11 = (f[:, 1] - 2 * f[:, 0] + f[:, 2]) / eps ** 2
        h22 = (f[:, 3] - 2 * f[:, 0] + f[:, 4]) / eps ** 2
        hdd = (f[:, 5] - 2 * f[:, 0] + f[:, 6]) / eps ** 2
        h12 = hdd - 0.5 * (h11 + h22)
        det = h11 * h22 - h12 ** 2
        ok = (h11 < 0) & (det > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            s1 = np.where(ok, -(h22 * g[:, 0] - h12 * g[:, 1]) / det, 0.0)
            s2 = np.where(ok, -(-h12 * g[:, 0] + h11 * g[:, 1]) / det, 0.0)
        step = s1[:, None] * e1 + s2[:, None] * e2
        size = np.linalg.norm(step, axis=1, keepdims=True)
        step = np.where(size > 0.1, step * 0.1 / np.maximum(size, 1e-30), step)  # trust
        d = d + step
        d /= np.linalg.norm(d, axis=1, keepdims=True)
    final = np.einsum("pc,pc->p", mrtrix3_sh_basis(sh_order, d), sh)
    better = final >= value
    return d, np.where(better, final, value)


def fod_peaks_batched(sh: ArrayLike, sh_order: int, max_peaks: int = 3,
                      relative_peak_threshold: float = 0.1,
                      absolute_peak_threshold: float = 0.0,
                      min_separation_angle: float = 25.0
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Maxima of FODs ``sh`` (V, n_coef) in MRtrix3's basis, vectorised over voxels.

    Local maxima of the FOD on a 2000-direction hemisphere grid (antipodes merged) are
    refined by Newton steps on the sphere; a maximum is a peak when its amplitude is at
    least ``absolute_peak_threshold`` and at least ``relative_peak_threshold`` times the
    voxel's largest peak, and it lies more than ``min_separation_angle`` degrees from
    every larger peak. Returns unit vectors (V, max_peaks, 3) with z >= 0, amplitudes
    (V, max_peaks) (FOD values, 1/sr in the FOD's units) largest first, and the count of
    peaks (V,); rows past the count are zero.
    """
    coef = np.atleast_2d(np.asarray(sh, dtype=float))
    order = check_sh_order(sh_order)
    if isinstance(max_peaks, bool) or int(max_peaks) < 1:
        raise InputError(f"max_peaks must be a positive integer, got {max_peaks!r}")
    if not 0.0 <= relative_peak_threshold <= 1.0:
        raise InputError("relative_peak_threshold must be in [0, 1], got "
                         f"{relative_peak_threshold!r}")
    if not 0.0 <= min_separation_angle < 90.0:
        raise InputError("min_separation_angle must be in [0, 90) degrees, got "
                         f"{min_separation_angle!r}")
    max_peaks = int(max_peaks)
    pts, neighbours, basis = _peak_grid(order)
    n_vox = coef.shape[0]
    dirs = np.zeros((n_vox, max_peaks, 3))
    amps = np.zeros((n_vox, max_peaks))
    count = np.zeros(n_vox, dtype=np.int64)
    n_cand = PEAK_CANDIDATES
    cos_sep = math.cos(math.radians(min_separation_angle))
    for start in range(0, n_vox, 512):
        sub = coef[start:start + 512]
        n = sub.shape[0]
        v = sub @ basis.T
        is_max = np.all(v[:, :, None] >= v[:, neighbours], axis=2) & (v > 0)
        cand_v = np.where(is_max, v, -np.inf)
        k = min(n_cand, cand_v.shape[1])
        top = np.argpartition(-cand_v, k - 1, axis=1)[:, :k]
        top_v = np.take_along_axis(cand_v, top, axis=1)
        # only maxima that may pass the thresholds after refinement are refined
        floor = np.maximum(0.8 * relative_peak_threshold * top_v.max(axis=1, keepdims=True),
                           0.8 * absolute_peak_threshold)
        valid = np.isfinite(top_v) & (top_v >= floor)
        rows, cols = np.nonzero(valid)
        d_ref, v_ref = _refine(sub[rows], order, pts[top[rows, cols]])
        cand_d = np.zeros((n, k, 3))
        cand_a = np.full((n, k), -np.inf)
        cand_d[rows, cols] = d_ref
        cand_a[rows, cols] = v_ref
        srt = np.argsort(-cand_a, axis=1)
        cand_a = np.take_along_axis(cand_a, srt, axis=1)
        cand_d = np.take_along_axis(cand_d, srt[:, :, None], axis=1)
        largest = cand_a[:, 0]
        out_d = np.zeros((n, max_peaks, 3))
        out_a = np.zeros((n, max_peaks))
        cnt = np.zeros(n, dtype=np.int64)
        for j in range(k):
            a = cand_a[:, j]
            d = cand_d[:, j]
            keep = np.isfinite(a) & (a >= absolute_peak_threshold) & (a > 0) \
                & (a >= relative_peak_threshold * largest) & (cnt < max_peaks)
            if j:
                close = np.abs(np.einsum("npc,nc->np", out_d, d)) > cos_sep
                close &= np.arange(max_peaks)[None, :] < cnt[:, None]
                keep &= ~close.any(axis=1)
            idx = np.nonzero(keep)[0]
            out_d[idx, cnt[idx]] = np.where(d[idx, 2:3] < 0, -d[idx], d[idx])
            out_a[idx, cnt[idx]] = a[idx]
            cnt[idx] += 1
        dirs[start:start + n] = out_d
        amps[start:start + n] = out_a
        count[start:start + n] = cnt
    return dirs, amps, count


def fod_to_peak_array(directions: np.ndarray, amplitudes: np.ndarray,
                      count: np.ndarray) -> np.ndarray:
    """MRtrix ``sh2peaks`` layout (..., 3 * max_peaks): each peak's unit vector times its
    amplitude, NaN where a voxel has fewer peaks."""
    d = np.asarray(directions, dtype=float)
    a = np.asarray(amplitudes, dtype=float)
    out = d * a[..., None]
    absent = np.arange(d.shape[-2]) >= np.asarray(count)[..., None]
    out[absent] = np.nan
    return out.reshape(d.shape[:-2] + (3 * d.shape[-2],))
