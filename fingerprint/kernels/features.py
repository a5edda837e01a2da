"""Numba kernels of the fitting engine: per-voxel fibre frames, zonal Legendre features,
posterior-weighted neighbour averages and the local-linear refinement.

All kernels are nopython, cached and parallel over voxels (``prange``), each with a serial
twin that :func:`fingerprint.kernels.run_parallel` uses for fewer than
:data:`SERIAL_ROWS` voxels (a small fit then never pays the much longer compilation of the
parallel version); they take and return plain float64/float32 arrays and hold no state, so
they are safe to call from several threads at once.
"""

from __future__ import annotations

import math

import numpy as np

from fingerprint.kernels import njit, parallel_kernel, prange

#: Below this many rows (voxels or atoms) a kernel of this module runs its serial twin.
SERIAL_ROWS = 4096
#: Arithmetic flags of the inner loops over measurements: reassociation lets LLVM
#: vectorise their sums (results change in the last bits only); no assumptions about
#: NaN or infinity, so the finiteness checks keep their meaning.
_FAST = {"reassoc", "contract", "nsz", "arcp"}
#: Legendre coefficients per shell that the power-basis kernels handle (l = 0, 2, 4, 6).
POWER_COEFFICIENTS = 4

__all__ = [
    "align_frames",
    "dti_principal_directions",
    "legendre_even",
    "local_linear_refine",
    "posterior_average",
    "prepare_signals",
    "principal_eigenvectors",
    "zonal_fit_residuals",
    "reconstruct_zonal",
    "rician_correct",
    "refine_frames",
    "shell_means",
    "usable_rows",
    "weighted_rows",
    "zonal_features",
    "zonal_orientation_sd",
]


@njit(cache=True, nogil=True)
def legendre_even(u: float, lmax: int, out: np.ndarray) -> None:
    """Write P_0(u), P_2(u), ..., P_lmax(u) (even orders) into ``out``."""
    x = u * u
    out[0] = 1.0
    if lmax > 6:
        _legendre_even_recursion(u, lmax, out, out, False)
        return
    # explicit polynomials in u² up to the features' l = 6: these run for every
    # measurement of every voxel, and the recursion's divisions sit on its critical path
    if lmax >= 2:
        out[1] = 1.5 * x - 0.5
    if lmax >= 4:
        out[2] = (4.375 * x - 3.75) * x + 0.375
    if lmax >= 6:
        out[3] = ((14.4375 * x - 19.6875) * x + 6.5625) * x - 0.3125


@njit(cache=True, nogil=True)
def legendre_even_with_derivative(u: float, lmax: int, out: np.ndarray,
                                  dout: np.ndarray) -> None:
    """P_0..P_lmax (even orders) into ``out`` and their derivatives dP_l/du into ``dout``."""
    x = u * u
    out[0] = 1.0
    dout[0] = 0.0
    if lmax > 6:
        _legendre_even_recursion(u, lmax, out, dout, True)
        return
    if lmax >= 2:
        out[1] = 1.5 * x - 0.5
        dout[1] = 3.0 * u
    if lmax >= 4:
        out[2] = (4.375 * x - 3.75) * x + 0.375
        dout[2] = (17.5 * x - 7.5) * u
    if lmax >= 6:
        out[3] = ((14.4375 * x - 19.6875) * x + 6.5625) * x - 0.3125
        dout[3] = ((86.625 * x - 78.75) * x + 13.125) * u


@njit(cache=True, nogil=True)
def _legendre_even_recursion(u: float, lmax: int, out: np.ndarray, dout: np.ndarray,
                             derivative: bool) -> None:
    """Bonnet's recursion for any even ``lmax`` (and dP_l/du into ``dout`` when
    ``derivative``)."""
    p_prev = 1.0  # P_{l-1}
    p_cur = u     # P_l, starting at l = 1
    dp_prev = 0.0
    dp_cur = 1.0
    out[0] = 1.0
    if derivative:
        dout[0] = 0.0
    j = 1
    for lval in range(1, lmax):
        p_next = ((2 * lval + 1) * u * p_cur - lval * p_prev) / (lval + 1)
        dp_next = dp_prev + (2 * lval + 1) * p_cur
        p_prev = p_cur
        p_cur = p_next
        dp_prev = dp_cur
        dp_cur = dp_next
        if (lval + 1) % 2 == 0:
            out[j] = p_cur
            if derivative:
                dout[j] = dp_cur
            j += 1


@njit(cache=True, nogil=True)
def _principal_eigenvector(d: np.ndarray, out: np.ndarray) -> None:
    """Unit eigenvector of the largest eigenvalue of the symmetric 3x3 matrix
    (dxx, dyy, dzz, dxy, dxz, dyz) ``d`` (analytic eigenvalues, cross products)."""
    a00, a11, a22, a01, a02, a12 = d[0], d[1], d[2], d[3], d[4], d[5]
    p1 = a01 * a01 + a02 * a02 + a12 * a12
    q = (a00 + a11 + a22) / 3.0
    p2 = (a00 - q) ** 2 + (a11 - q) ** 2 + (a22 - q) ** 2 + 2.0 * p1
    p = math.sqrt(p2 / 6.0)
    if not (p > 1e-30 * (abs(q) + 1e-300)) or not math.isfinite(p):
        out[0] = 0.0
        out[1] = 0.0
        out[2] = 1.0
        return
    b00 = (a00 - q) / p
    b11 = (a11 - q) / p
    b22 = (a22 - q) / p
    b01 = a01 / p
    b02 = a02 / p
    b12 = a12 / p
    detb = (b00 * (b11 * b22 - b12 * b12) - b01 * (b01 * b22 - b12 * b02)
            + b02 * (b01 * b12 - b11 * b02))
    r = min(max(detb / 2.0, -1.0), 1.0)
    phi = math.acos(r) / 3.0
    lam = q + 2.0 * p * math.cos(phi)
    # rows of (A - lam I); the eigenvector is orthogonal to all of them
    r0x, r0y, r0z = a00 - lam, a01, a02
    r1x, r1y, r1z = a01, a11 - lam, a12
    r2x, r2y, r2z = a02, a12, a22 - lam
    c0x = r0y * r1z - r0z * r1y
    c0y = r0z * r1x - r0x * r1z
    c0z = r0x * r1y - r0y * r1x
    c1x = r0y * r2z - r0z * r2y
    c1y = r0z * r2x - r0x * r2z
    c1z = r0x * r2y - r0y * r2x
    c2x = r1y * r2z - r1z * r2y
    c2y = r1z * r2x - r1x * r2z
    c2z = r1x * r2y - r1y * r2x
    n0 = c0x * c0x + c0y * c0y + c0z * c0z
    n1 = c1x * c1x + c1y * c1y + c1z * c1z
    n2 = c2x * c2x + c2y * c2y + c2z * c2z
    if n0 >= n1 and n0 >= n2:
        vx, vy, vz, nn = c0x, c0y, c0z, n0
    elif n1 >= n2:
        vx, vy, vz, nn = c1x, c1y, c1z, n1
    else:
        vx, vy, vz, nn = c2x, c2y, c2z, n2
    if nn <= 0.0 or not math.isfinite(nn):
        out[0] = 0.0
        out[1] = 0.0
        out[2] = 1.0
        return
    nn = math.sqrt(nn)
    if vz < 0.0:  # sign convention: upper hemisphere
        nn = -nn
    out[0] = vx / nn
    out[1] = vy / nn
    out[2] = vz / nn


@parallel_kernel(serial_rows=SERIAL_ROWS)
def dti_principal_directions(signals: np.ndarray, columns: np.ndarray,
                             pinv: np.ndarray, floor: float) -> np.ndarray:
    """Principal diffusion direction of every voxel by a linear least-squares DTI fit.

    ``signals`` (n, N) are b0-normalised; ``columns`` (M,) the measurements used;
    ``pinv`` (6, M) the pseudo-inverse of the design ``-b (gx², gy², gz², 2gxgy, 2gxgz,
    2gygz)`` so that ``D = pinv @ log(S)``. Signals are floored at ``floor`` before the
    logarithm. Returns (n, 3) unit vectors (z for degenerate tensors).
    """
    n = signals.shape[0]
    m = columns.shape[0]
    out = np.empty((n, 3))
    for i in prange(n):
        d = np.zeros(6)
        for j in range(m):
            s = signals[i, columns[j]]
            if not (s > floor):
                s = floor
            y = math.log(s)
            for k in range(6):
                d[k] += pinv[k, j] * y
        _principal_eigenvector(d, out[i])
    return out


@parallel_kernel(serial_rows=SERIAL_ROWS, nogil=True)
def principal_eigenvectors(tensors: np.ndarray) -> np.ndarray:
    """Unit eigenvectors (n, 3), z >= 0, of the largest eigenvalue of symmetric 3x3
    matrices ``tensors`` (n, 6) stored as (dxx, dyy, dzz, dxy, dxz, dyz) (z for
    degenerate ones)."""
    n = tensors.shape[0]
    out = np.empty((n, 3))
    for i in prange(n):
        _principal_eigenvector(tensors[i], out[i])
    return out


@njit(cache=True, nogil=True)
def _cholesky_solve(a: np.ndarray, b: np.ndarray, n: int, x: np.ndarray) -> bool:
    """Solve a x = b for the leading n x n block of the SPD matrix ``a`` (in place
    factorisation); False when not positive definite."""
    if not _cholesky_factor(a, n):
        return False
    _cholesky_substitute(a, b, n, x)
    return True


@njit(cache=True, nogil=True)
def _cholesky_factor(a: np.ndarray, n: int) -> bool:
    """Cholesky factor L (lower triangle, in place) of the leading n x n block of the SPD
    matrix ``a``; False when not positive definite."""
    for j in range(n):
        s = a[j, j]
        for k in range(j):
            s -= a[j, k] * a[j, k]
        if s <= 1e-12 * (abs(a[j, j]) + 1e-300):
            return False
        a[j, j] = math.sqrt(s)
        for i in range(j + 1, n):
            t = a[i, j]
            for k in range(j):
                t -= a[i, k] * a[j, k]
            a[i, j] = t / a[j, j]
    return True


@njit(cache=True, nogil=True)
def _cholesky_substitute(a: np.ndarray, b: np.ndarray, n: int, x: np.ndarray) -> None:
    """Solve L Lᵀ x = b with the factor of :func:`_cholesky_factor` in ``a``."""
    for i in range(n):
        t = b[i]
        for k in range(i):
            t -= a[i, k] * x[k]
        x[i] = t / a[i, i]
    for i in range(n - 1, -1, -1):
        t = x[i]
        for k in range(i + 1, n):
            t -= a[k, i] * x[k]
        x[i] = t / a[i, i]


@parallel_kernel(serial_rows=SERIAL_ROWS, nogil=True)
def zonal_features(signals: np.ndarray, frames: np.ndarray, directions: np.ndarray,
                   shell_of: np.ndarray, n_coefficients: np.ndarray,
                   offsets: np.ndarray, weights: np.ndarray,
                   ridge: float, gram: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Zonal (axially symmetric) Legendre coefficients of every voxel's signal per shell.

    For each voxel i and shell s, fits S(g) ~ sum_l c_l P_l(g . frame_i) over the
    measurements of that shell by least squares (even l = 0, 2, ..., 2 (L_s - 1);
    ``n_coefficients[s]`` = L_s; ``ridge`` a tiny Tikhonov term). Output column
    ``offsets[s] + j`` holds ``c_{2j} * weights[offsets[s] + j]``.

    ``shell_of`` (N,) maps each measurement to its feature shell (-1: unused, e.g. b0).
    When ``gram`` has n rows, (n, shells, L, L), each shell's Gram matrix of the Legendre
    basis at the voxel's frame is written there (for :func:`zonal_fit_residuals`; pass
    an empty (0, 1, 1, 1) array otherwise).
    Returns (features (n, k) float32, residual sum of squares (n,) float64).

    With at most :data:`POWER_COEFFICIENTS` coefficients per shell, the normal equations
    come from the moments of x = u² (:func:`_zonal_moments`, one vectorised pass per
    shell) instead of the polynomials at each measurement.
    """
    n = signals.shape[0]
    nmeas = signals.shape[1]
    n_shells = n_coefficients.shape[0]
    k = weights.shape[0]
    lmax_n = 0
    for s in range(n_shells):
        lmax_n = max(lmax_n, n_coefficients[s])
    feats = np.empty((n, k), dtype=np.float32)
    rss = np.empty(n)
    power = lmax_n <= POWER_COEFFICIENTS
    order, starts = shell_layout(shell_of, n_shells, np.ones(nmeas, np.bool_))
    m = order.shape[0]
    gx = np.empty(m)
    gy = np.empty(m)
    gz = np.empty(m)
    for j in range(m):
        gx[j] = directions[order[j], 0]
        gy[j] = directions[order[j], 1]
        gz[j] = directions[order[j], 2]
    for i in prange(n):
        ata = np.zeros((n_shells, lmax_n, lmax_n))
        aty = np.zeros((n_shells, lmax_n))
        yty = np.zeros(n_shells)
        fx, fy, fz = frames[i, 0], frames[i, 1], frames[i, 2]
        if power:
            y = np.empty(m)
            for j in range(m):
                y[j] = signals[i, order[j]]
            moments = np.empty(12)
            for s in range(n_shells):
                _zonal_moments(y, gx, gy, gz, starts[s], starts[s + 1], fx, fy, fz, moments)
                _legendre_normal_equations(moments, n_coefficients[s], ata[s], aty[s])
                yty[s] = moments[11]
        else:
            p = np.empty(lmax_n)
            for j in range(nmeas):
                s = shell_of[j]
                if s < 0:
                    continue
                yj = signals[i, j]
                u = directions[j, 0] * fx + directions[j, 1] * fy + directions[j, 2] * fz
                nc = n_coefficients[s]
                legendre_even(u, 2 * (nc - 1), p)
                for a in range(nc):
                    aty[s, a] += p[a] * yj
                    for b in range(a + 1):
                        ata[s, a, b] += p[a] * p[b]
                yty[s] += yj * yj
        total = 0.0
        c = np.zeros(lmax_n)
        keep_gram = gram.shape[0] == n
        for s in range(n_shells):
            nc = n_coefficients[s]
            if keep_gram:
                for a in range(nc):
                    for b in range(a + 1):
                        gram[i, s, a, b] = ata[s, a, b]
                        gram[i, s, b, a] = ata[s, a, b]
            for a in range(nc):
                ata[s, a, a] += ridge * (ata[s, 0, 0] + 1.0)
                for b in range(a):
                    ata[s, b, a] = ata[s, a, b]
            rhs = aty[s].copy()
            ok = _cholesky_solve(ata[s], rhs, nc, c)
            if not ok:
                for a in range(nc):
                    c[a] = 0.0
                c[0] = aty[s, 0] / max(ata[s, 0, 0], 1.0)
            fit = 0.0
            for a in range(nc):
                fit += c[a] * aty[s, a]
                feats[i, offsets[s] + a] = c[a] * weights[offsets[s] + a]
            total += max(yty[s] - fit, 0.0)
        rss[i] = total
    return feats, rss


@njit(cache=True, nogil=True, fastmath=_FAST)
def _zonal_moments(y: np.ndarray, gx: np.ndarray, gy: np.ndarray, gz: np.ndarray,
                   start: int, stop: int, fx: float, fy: float, fz: float,
                   out: np.ndarray) -> None:
    """Moments of the grouped measurements ``start:stop`` about the axis f: ``out`` =
    (count, sum x, ..., sum x⁶, sum y, sum x y, sum x² y, sum x³ y, sum y²) with
    x = (g . f)²."""
    h1 = 0.0
    h2 = 0.0
    h3 = 0.0
    h4 = 0.0
    h5 = 0.0
    h6 = 0.0
    t0 = 0.0
    t1 = 0.0
    t2 = 0.0
    t3 = 0.0
    q = 0.0
    for j in range(start, stop):
        u = gx[j] * fx + gy[j] * fy + gz[j] * fz
        x = u * u
        x2 = x * x
        x3 = x2 * x
        yj = y[j]
        h1 += x
        h2 += x2
        h3 += x3
        h4 += x2 * x2
        h5 += x2 * x3
        h6 += x3 * x3
        t0 += yj
        t1 += x * yj
        t2 += x2 * yj
        t3 += x3 * yj
        q += yj * yj
    out[0] = stop - start
    out[1] = h1
    out[2] = h2
    out[3] = h3
    out[4] = h4
    out[5] = h5
    out[6] = h6
    out[7] = t0
    out[8] = t1
    out[9] = t2
    out[10] = t3
    out[11] = q


#: Even Legendre polynomials P_0, P_2, P_4, P_6 in powers of x = u² (row l/2, column p:
#: coefficient of x^p).
_LEGENDRE_POWER = np.array([[1.0, 0.0, 0.0, 0.0],
                            [-0.5, 1.5, 0.0, 0.0],
                            [0.375, -3.75, 4.375, 0.0],
                            [-0.3125, 6.5625, -19.6875, 14.4375]])


@njit(cache=True, nogil=True)
def _legendre_normal_equations(moments: np.ndarray, nc: int, ata: np.ndarray,
                               aty: np.ndarray) -> None:
    """Lower triangle of the Legendre Gram matrix ``ata`` (nc, nc) and ``aty`` (nc,) of
    one shell from its :func:`_zonal_moments` (nc <= 4)."""
    t = _LEGENDRE_POWER
    for a in range(nc):
        v = 0.0
        for p in range(a + 1):
            v += t[a, p] * moments[7 + p]
        aty[a] = v
        for b in range(a + 1):
            v = 0.0
            for p in range(a + 1):
                w = 0.0
                for q in range(b + 1):
                    w += t[b, q] * moments[p + q]
                v += t[a, p] * w
            ata[a, b] = v


@njit(cache=True, nogil=True)
def _axis_gauss_newton_step(signals: np.ndarray, i: int, mu: np.ndarray, c: np.ndarray,
                            directions: np.ndarray, shell_of: np.ndarray,
                            n_coefficients: np.ndarray, max_step: float, p: np.ndarray,
                            dp: np.ndarray, rss: np.ndarray) -> float:
    """One Gauss-Newton step (in place on the unit vector ``mu``, kept with z >= 0) of the
    axis of voxel ``i``'s per-shell Legendre series ``c`` (shells, L) against its signal;
    the step is limited to ``max_step`` radians. Writes the residual sum of squares at
    the *starting* axis into ``rss[0]``. Returns the step length, or -1 when the normal
    equations are singular (``mu`` unchanged)."""
    nmeas = signals.shape[1]
    e1x, e1y, e1z, e2x, e2y, e2z = _tangent_basis(mu[0], mu[1], mu[2])
    j11 = 0.0
    j12 = 0.0
    j22 = 0.0
    r1 = 0.0
    r2 = 0.0
    total = 0.0
    for j in range(nmeas):
        s = shell_of[j]
        if s < 0:
            continue
        gx, gy, gz = directions[j, 0], directions[j, 1], directions[j, 2]
        u = gx * mu[0] + gy * mu[1] + gz * mu[2]
        nc = n_coefficients[s]
        legendre_even_with_derivative(u, 2 * (nc - 1), p, dp)
        pred = 0.0
        dpred = 0.0
        for a in range(nc):
            pred += c[s, a] * p[a]
            dpred += c[s, a] * dp[a]
        res = signals[i, j] - pred
        total += res * res
        ja = dpred * (gx * e1x + gy * e1y + gz * e1z)
        jb = dpred * (gx * e2x + gy * e2y + gz * e2z)
        j11 += ja * ja
        j12 += ja * jb
        j22 += jb * jb
        r1 += ja * res
        r2 += jb * res
    rss[0] = total
    return _tangent_step(mu, e1x, e1y, e1z, e2x, e2y, e2z, j11, j12, j22, r1, r2,
                         max_step)




@njit(cache=True, nogil=True)
def shell_layout(shell_of: np.ndarray, n_shells: int, use: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Measurements grouped by feature shell: (order (M,) measurement indices with
    ``shell_of`` >= 0 and ``use``, shell by shell in ascending index; starts (shells + 1,)
    so that shell s is ``order[starts[s]:starts[s + 1]]``)."""
    starts = np.zeros(n_shells + 1, dtype=np.int64)
    for j in range(shell_of.shape[0]):
        s = shell_of[j]
        if s >= 0 and use[j]:
            starts[s + 1] += 1
    for s in range(n_shells):
        starts[s + 1] += starts[s]
    order = np.empty(starts[n_shells], dtype=np.int64)
    fill = starts[:n_shells].copy()
    for j in range(shell_of.shape[0]):
        s = shell_of[j]
        if s >= 0 and use[j]:
            order[fill[s]] = j
            fill[s] += 1
    return order, starts


@njit(cache=True, nogil=True)
def _legendre_to_power(c: np.ndarray, o: int, nc: int, scale: np.ndarray,
                       out: np.ndarray) -> None:
    """Coefficients (a0, a1, a2, a3) in powers of x = u² of the even Legendre series
    sum_l c[o + l] / scale[o + l] P_2l(u), l < nc <= 4 (``scale`` whitening weights, or
    ones)."""
    c0 = c[o] / scale[o]
    c1 = c[o + 1] / scale[o + 1] if nc > 1 else 0.0
    c2 = c[o + 2] / scale[o + 2] if nc > 2 else 0.0
    c3 = c[o + 3] / scale[o + 3] if nc > 3 else 0.0
    out[0] = c0 - 0.5 * c1 + 0.375 * c2 - 0.3125 * c3
    out[1] = 1.5 * c1 - 3.75 * c2 + 6.5625 * c3
    out[2] = 4.375 * c2 - 19.6875 * c3
    out[3] = 14.4375 * c3


@njit(cache=True, nogil=True, fastmath=_FAST)
def _axis_sums(y: np.ndarray, gx: np.ndarray, gy: np.ndarray, gz: np.ndarray,
               starts: np.ndarray, poly: np.ndarray, m0: float, m1: float, m2: float,
               sums: np.ndarray) -> None:
    """Residual and Gauss-Newton sums of the axis (m0, m1, m2) of per-shell series in
    powers of x = u², u = g . m (``poly`` (shells, 4)), against the signals ``y`` (M,)
    of the grouped measurements with directions (gx, gy, gz): ``sums`` = (rss,
    v = sum r d g (3), G = sum d² g gᵀ (xx, xy, xz, yy, yz, zz)) with r the residual and
    d the derivative of the series with respect to u."""
    rss = 0.0
    vx = 0.0
    vy = 0.0
    vz = 0.0
    gxx = 0.0
    gxy = 0.0
    gxz = 0.0
    gyy = 0.0
    gyz = 0.0
    gzz = 0.0
    for s in range(starts.shape[0] - 1):
        a0 = poly[s, 0]
        a1 = poly[s, 1]
        a2 = poly[s, 2]
        a3 = poly[s, 3]
        b1 = 2.0 * a1
        b2 = 4.0 * a2
        b3 = 6.0 * a3
        for j in range(starts[s], starts[s + 1]):
            ex = gx[j]
            ey = gy[j]
            ez = gz[j]
            u = ex * m0 + ey * m1 + ez * m2
            x = u * u
            r = y[j] - (a0 + x * (a1 + x * (a2 + x * a3)))
            d = u * (b1 + x * (b2 + x * b3))
            rss += r * r
            rd = r * d
            dd = d * d
            vx += rd * ex
            vy += rd * ey
            vz += rd * ez
            gxx += dd * ex * ex
            gxy += dd * ex * ey
            gxz += dd * ex * ez
            gyy += dd * ey * ey
            gyz += dd * ey * ez
            gzz += dd * ez * ez
    sums[0] = rss
    sums[1] = vx
    sums[2] = vy
    sums[3] = vz
    sums[4] = gxx
    sums[5] = gxy
    sums[6] = gxz
    sums[7] = gyy
    sums[8] = gyz
    sums[9] = gzz


@njit(cache=True, nogil=True)
def _tangent_basis(m0: float, m1: float, m2: float) -> tuple[float, float, float,
                                                              float, float, float]:
    """Two unit vectors perpendicular to the unit vector (m0, m1, m2) and to each other
    (the basis of :func:`_axis_gauss_newton_step`)."""
    if abs(m2) < 0.9:
        e1x, e1y, e1z = -m1, m0, 0.0
    else:
        e1x, e1y, e1z = 0.0, -m2, m1
    nn = math.sqrt(e1x * e1x + e1y * e1y + e1z * e1z)
    e1x /= nn
    e1y /= nn
    e1z /= nn
    e2x = m1 * e1z - m2 * e1y
    e2y = m2 * e1x - m0 * e1z
    e2z = m0 * e1y - m1 * e1x
    return e1x, e1y, e1z, e2x, e2y, e2z


@njit(cache=True, nogil=True)
def _tangent_step(mu: np.ndarray, e1x: float, e1y: float, e1z: float, e2x: float,
                  e2y: float, e2z: float, j11: float, j12: float, j22: float, r1: float,
                  r2: float, max_step: float) -> float:
    """Move the unit vector ``mu`` (in place, kept with z >= 0) by the Gauss-Newton step
    of the 2×2 normal equations [[j11, j12], [j12, j22]] d = (r1, r2) in the tangent
    basis (e1, e2), the step limited to ``max_step`` radians. Returns the step length,
    or -1 when the equations are singular (``mu`` unchanged)."""
    det = j11 * j22 - j12 * j12
    if not (det > 1e-30):
        return -1.0
    da = (j22 * r1 - j12 * r2) / det
    db = (j11 * r2 - j12 * r1) / det
    step = math.sqrt(da * da + db * db)
    if step > max_step:
        da *= max_step / step
        db *= max_step / step
    mx = mu[0] + da * e1x + db * e2x
    my = mu[1] + da * e1y + db * e2y
    mz = mu[2] + da * e1z + db * e2z
    nn = math.sqrt(mx * mx + my * my + mz * mz)
    if mz < 0.0:
        nn = -nn
    mu[0] = mx / nn
    mu[1] = my / nn
    mu[2] = mz / nn
    return step


@njit(cache=True, nogil=True)
def _quadratic_form(sums: np.ndarray, ax: float, ay: float, az: float, bx: float,
                    by: float, bz: float) -> float:
    """aᵀ G b of the symmetric G stored in ``sums[4:10]`` (xx, xy, xz, yy, yz, zz)."""
    return (ax * (sums[4] * bx + sums[5] * by + sums[6] * bz)
            + ay * (sums[5] * bx + sums[7] * by + sums[8] * bz)
            + az * (sums[6] * bx + sums[8] * by + sums[9] * bz))


@njit(cache=True, nogil=True)
def _power_axis_step(y: np.ndarray, gx: np.ndarray, gy: np.ndarray, gz: np.ndarray,
                     starts: np.ndarray, poly: np.ndarray, mu: np.ndarray, max_step: float,
                     sums: np.ndarray) -> float:
    """:func:`_axis_gauss_newton_step` for series in powers of u² (``poly``) over grouped
    measurements: one bounded Gauss-Newton step of ``mu`` in place, the residual sum of
    squares at the starting axis in ``sums[0]``; returns the step length (-1: singular)."""
    _axis_sums(y, gx, gy, gz, starts, poly, mu[0], mu[1], mu[2], sums)
    e1x, e1y, e1z, e2x, e2y, e2z = _tangent_basis(mu[0], mu[1], mu[2])
    j11 = _quadratic_form(sums, e1x, e1y, e1z, e1x, e1y, e1z)
    j12 = _quadratic_form(sums, e1x, e1y, e1z, e2x, e2y, e2z)
    j22 = _quadratic_form(sums, e2x, e2y, e2z, e2x, e2y, e2z)
    r1 = sums[1] * e1x + sums[2] * e1y + sums[3] * e1z
    r2 = sums[1] * e2x + sums[2] * e2y + sums[3] * e2z
    return _tangent_step(mu, e1x, e1y, e1z, e2x, e2y, e2z, j11, j12, j22, r1, r2,
                         max_step)


@parallel_kernel(serial_rows=SERIAL_ROWS, nogil=True)
def align_frames(signals: np.ndarray, frames: np.ndarray, coefficients: np.ndarray,
                 directions: np.ndarray, shell_of: np.ndarray, n_coefficients: np.ndarray,
                 offsets: np.ndarray, iterations: int, max_step: float,
                 accept_step: float = 0.0) -> np.ndarray:
    """Axis of every voxel for a *given* angular profile: Gauss-Newton on the orientation
    of the per-shell Legendre series ``coefficients`` (n, k) (unwhitened, layout of
    ``offsets``) held fixed, from ``frames`` (n, 3); steps limited to ``max_step``
    radians. A step whose residual turns out higher is undone and ends the search (one
    pass over the data per iteration: each pass measures the residual of the previous
    step and takes the next); a step shorter than ``accept_step`` radians is taken
    without that check and ends the search (near convergence a Gauss-Newton step is
    reliable; this saves the pass that would only confirm it). Unlike
    :func:`refine_frames`, whose coefficients follow the axis, the profile here is a
    matched atom's, so the axis cannot bend the profile towards the noise. Returns (n, 3)
    unit vectors with z >= 0.

    With at most :data:`POWER_COEFFICIENTS` coefficients per shell (the feature maps'
    case) each series is rewritten as a cubic in u² and each pass sums over the
    measurements grouped by shell (:func:`shell_layout`), a loop the compiler
    vectorises; the Gauss-Newton normal equations are accumulated as 3-vectors and a
    3x3 matrix in gradient coordinates and projected on the tangent plane afterwards."""
    n = signals.shape[0]
    n_shells = n_coefficients.shape[0]
    lmax_n = 1
    for s in range(n_shells):
        lmax_n = max(lmax_n, n_coefficients[s])
    out = frames.copy()
    if lmax_n > POWER_COEFFICIENTS:
        for i in prange(n):
            _align_general(signals, i, coefficients, directions, shell_of, n_coefficients,
                           offsets, iterations, max_step, lmax_n, out, accept_step)
        return out
    order, starts = shell_layout(shell_of, n_shells, np.ones(shell_of.shape[0], np.bool_))
    m = order.shape[0]
    gx = np.empty(m)
    gy = np.empty(m)
    gz = np.empty(m)
    for j in range(m):
        gx[j] = directions[order[j], 0]
        gy[j] = directions[order[j], 1]
        gz[j] = directions[order[j], 2]
    ones = np.ones(coefficients.shape[1])
    for i in prange(n):
        y = np.empty(m)
        for j in range(m):
            y[j] = signals[i, order[j]]
        poly = np.empty((n_shells, 4))
        for s in range(n_shells):
            _legendre_to_power(coefficients[i], offsets[s], n_coefficients[s], ones, poly[s])
        sums = np.empty(10)
        mu = np.empty(3)
        good = np.empty(3)
        trial = np.empty(3)
        for a in range(3):
            mu[a] = out[i, a]
            good[a] = out[i, a]
        best_rss = np.inf
        for _ in range(iterations + 1):
            for a in range(3):
                trial[a] = mu[a]
            step = _power_axis_step(y, gx, gy, gz, starts, poly, mu, max_step, sums)
            if not (sums[0] < best_rss):  # the step that led here made it worse
                break
            best_rss = sums[0]
            for a in range(3):
                good[a] = trial[a]
            if not (step >= 0.0):  # no step possible
                break
            if step < accept_step:  # small enough to take unchecked
                for a in range(3):
                    good[a] = mu[a]
                break
            if step < 1e-4:  # converged
                break
        out[i, 0] = good[0]
        out[i, 1] = good[1]
        out[i, 2] = good[2]
    return out


@njit(cache=True, nogil=True)
def _align_general(signals: np.ndarray, i: int, coefficients: np.ndarray,
                   directions: np.ndarray, shell_of: np.ndarray, n_coefficients: np.ndarray,
                   offsets: np.ndarray, iterations: int, max_step: float, lmax_n: int,
                   out: np.ndarray, accept_step: float = 0.0) -> None:
    """:func:`align_frames` of voxel ``i`` (in place in ``out``) for series of any length
    (Legendre polynomials evaluated measurement by measurement)."""
    n_shells = n_coefficients.shape[0]
    p = np.empty(lmax_n)
    dp = np.empty(lmax_n)
    rss = np.empty(1)
    c = np.zeros((n_shells, lmax_n))
    for s in range(n_shells):
        for a in range(n_coefficients[s]):
            c[s, a] = coefficients[i, offsets[s] + a]
    mu = out[i].copy()
    good = mu.copy()
    trial = mu.copy()
    best_rss = np.inf
    for _ in range(iterations + 1):
        for a in range(3):  # element-wise: a slice copy compiles a shape check
            trial[a] = mu[a]
        step = _axis_gauss_newton_step(signals, i, mu, c, directions, shell_of,
                                       n_coefficients, max_step, p, dp, rss)
        if not (rss[0] < best_rss):  # the step that led here made it worse
            break
        best_rss = rss[0]
        for a in range(3):
            good[a] = trial[a]
        if not (step >= 0.0):  # no step possible
            break
        if step < accept_step:  # small enough to take unchecked
            for a in range(3):
                good[a] = mu[a]
            break
        if step < 1e-4:  # converged
            break
    out[i, 0] = good[0]
    out[i, 1] = good[1]
    out[i, 2] = good[2]


@parallel_kernel(serial_rows=SERIAL_ROWS)
def refine_frames(signals: np.ndarray, frames: np.ndarray, directions: np.ndarray,
                  shell_of: np.ndarray, n_coefficients: np.ndarray, iterations: int,
                  max_step: float, check_last: bool) -> tuple[np.ndarray, np.ndarray]:
    """Axis of symmetry of every voxel's signal: Gauss-Newton on the orientation of the
    per-shell zonal Legendre model (coefficients re-fitted by least squares each
    iteration). Starts from ``frames`` (n, 3); steps are limited to ``max_step`` radians;
    a step that does not lower the residual is rejected. Without ``check_last`` the last
    step is returned unchecked (the caller compares the residual of its own fit at the
    new axis with the returned starting residual). Returns ((n, 3) unit vectors,
    residual sum of squares at the starting axes (n,))."""
    n = signals.shape[0]
    nmeas = signals.shape[1]
    n_shells = n_coefficients.shape[0]
    lmax_n = 0
    for s in range(n_shells):
        lmax_n = max(lmax_n, n_coefficients[s])
    out = frames.copy()
    rss0 = np.full(n, np.nan)
    for i in prange(n):
        p = np.empty(lmax_n)
        dp = np.empty(lmax_n)
        c = np.zeros((n_shells, lmax_n))
        ata = np.zeros((n_shells, lmax_n, lmax_n))
        aty = np.zeros((n_shells, lmax_n))
        mu = out[i].copy()
        best_rss = np.inf
        best_mu = mu.copy()
        scratch = np.empty(1)
        unchecked = False
        for it in range(iterations + 1):
            if it == iterations and not check_last:
                unchecked = True
                break
            # zonal least squares at mu
            ata[:] = 0.0
            aty[:] = 0.0
            yty = 0.0
            for j in range(nmeas):
                s = shell_of[j]
                if s < 0:
                    continue
                y = signals[i, j]
                u = directions[j, 0] * mu[0] + directions[j, 1] * mu[1] + \
                    directions[j, 2] * mu[2]
                nc = n_coefficients[s]
                legendre_even(u, 2 * (nc - 1), p)
                for a in range(nc):
                    aty[s, a] += p[a] * y
                    for b in range(a + 1):
                        ata[s, a, b] += p[a] * p[b]
                yty += y * y
            fit = 0.0
            sol = np.zeros(lmax_n)
            for s in range(n_shells):
                nc = n_coefficients[s]
                for a in range(nc):
                    ata[s, a, a] += 1e-10 * (ata[s, 0, 0] + 1.0)
                    for b in range(a):
                        ata[s, b, a] = ata[s, a, b]
                rhs = aty[s].copy()
                if not _cholesky_solve(ata[s], rhs, nc, sol):
                    for a in range(nc):
                        sol[a] = 0.0
                for a in range(nc):
                    c[s, a] = sol[a]
                    fit += sol[a] * aty[s, a]
            rss = yty - fit
            if it == 0:
                rss0[i] = rss
            if rss < best_rss:
                best_rss = rss
                for a in range(3):
                    best_mu[a] = mu[a]
            else:  # rejected: go back to the best point and stop
                break
            if it == iterations:
                break
            step = _axis_gauss_newton_step(signals, i, mu, c, directions, shell_of,
                                           n_coefficients, max_step, p, dp, scratch)
            if not (step >= 0.0):
                break
            if step < 1e-4:
                break
        if unchecked:
            for a in range(3):
                best_mu[a] = mu[a]
        out[i, 0] = best_mu[0]
        out[i, 1] = best_mu[1]
        out[i, 2] = best_mu[2]
    return out, rss0


@njit(cache=True, nogil=True)
def _zonal_value(coefficients: np.ndarray, i: int, j: int, s: int, frames: np.ndarray,
                 directions: np.ndarray, n_coefficients: np.ndarray, offsets: np.ndarray,
                 p: np.ndarray) -> float:
    """Value of voxel ``i``'s Legendre series of shell ``s`` at measurement ``j`` (``p`` is
    scratch space for the polynomials)."""
    u = directions[j, 0] * frames[i, 0] + directions[j, 1] * frames[i, 1] + \
        directions[j, 2] * frames[i, 2]
    nc = n_coefficients[s]
    legendre_even(u, 2 * (nc - 1), p)
    v = 0.0
    for a in range(nc):
        v += coefficients[i, offsets[s] + a] * p[a]
    return v


@parallel_kernel(serial_rows=SERIAL_ROWS)
def reconstruct_zonal(coefficients: np.ndarray, frames: np.ndarray, directions: np.ndarray,
                      shell_of: np.ndarray, n_coefficients: np.ndarray, offsets: np.ndarray,
                      out: np.ndarray) -> np.ndarray:
    """Evaluate the per-shell Legendre series ``coefficients`` (n, k) (unwhitened) at every
    measurement in each voxel's ``frames`` (n, 3), writing into ``out`` (n, N) (columns
    with ``shell_of`` -1 are left as they are). Returns ``out``."""
    n = coefficients.shape[0]
    nmeas = directions.shape[0]
    lmax_n = 1
    for s in range(n_coefficients.shape[0]):
        lmax_n = max(lmax_n, n_coefficients[s])
    for i in prange(n):
        p = np.empty(lmax_n)
        for j in range(nmeas):
            s = shell_of[j]
            if s < 0:
                continue
            out[i, j] = _zonal_value(coefficients, i, j, s, frames, directions,
                                     n_coefficients, offsets, p)
    return out


@parallel_kernel(serial_rows=SERIAL_ROWS, nogil=True)
def zonal_orientation_sd(coefficients: np.ndarray, frames: np.ndarray,
                         directions: np.ndarray, shell_of: np.ndarray,
                         n_coefficients: np.ndarray, offsets: np.ndarray,
                         use: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    """Orientation uncertainty (n,) in degrees of the per-shell Legendre series
    ``coefficients`` (n, k) (unwhitened) about each voxel's axis ``frames`` (n, 3): the
    1-sd cone angle sqrt(trace(F^-1)) (at most 90) with F the 2x2 Fisher information of
    the axis under Gaussian noise of variance ``sigma2`` (n,), from the analytic
    derivative of the series: tilting the axis mu towards a unit vector e perpendicular
    to it changes the prediction at gradient g by sum_l c_l P_l'(g.mu) (g.e). Only
    measurements with ``use`` and a feature shell (``shell_of`` >= 0) count."""
    n = coefficients.shape[0]
    nmeas = directions.shape[0]
    lmax_n = 1
    for s in range(n_coefficients.shape[0]):
        lmax_n = max(lmax_n, n_coefficients[s])
    out = np.empty(n)
    if lmax_n <= POWER_COEFFICIENTS:
        n_shells = n_coefficients.shape[0]
        order, starts = shell_layout(shell_of, n_shells, use)
        m = order.shape[0]
        gx = np.empty(m)
        gy = np.empty(m)
        gz = np.empty(m)
        for j in range(m):
            gx[j] = directions[order[j], 0]
            gy[j] = directions[order[j], 1]
            gz[j] = directions[order[j], 2]
        ones = np.ones(coefficients.shape[1])
        for i in prange(n):
            poly = np.empty((n_shells, 4))
            for s in range(n_shells):
                _legendre_to_power(coefficients[i], offsets[s], n_coefficients[s], ones,
                                   poly[s])
            sums = np.empty(10)
            mx, my, mz = frames[i, 0], frames[i, 1], frames[i, 2]
            nn = math.sqrt(mx * mx + my * my + mz * mz)
            mx /= nn
            my /= nn
            mz /= nn
            _fisher_sums(gx, gy, gz, starts, poly, mx, my, mz, sums)
            e1x, e1y, e1z, e2x, e2y, e2z = _tangent_basis(mx, my, mz)
            f11 = _quadratic_form(sums, e1x, e1y, e1z, e1x, e1y, e1z)
            f12 = _quadratic_form(sums, e1x, e1y, e1z, e2x, e2y, e2z)
            f22 = _quadratic_form(sums, e2x, e2y, e2z, e2x, e2y, e2z)
            out[i] = _cone_angle(f11, f12, f22, sigma2[i])
        return out
    for i in prange(n):
        p = np.empty(lmax_n)
        dp = np.empty(lmax_n)
        mx, my, mz = frames[i, 0], frames[i, 1], frames[i, 2]
        nn = math.sqrt(mx * mx + my * my + mz * mz)
        mx /= nn
        my /= nn
        mz /= nn
        # two unit vectors perpendicular to the axis (trace(F^-1) does not depend on which)
        if abs(mx) < 0.9:
            hx, hy, hz = 1.0, 0.0, 0.0
        else:
            hx, hy, hz = 0.0, 1.0, 0.0
        e1x = my * hz - mz * hy
        e1y = mz * hx - mx * hz
        e1z = mx * hy - my * hx
        nn = math.sqrt(e1x * e1x + e1y * e1y + e1z * e1z)
        e1x /= nn
        e1y /= nn
        e1z /= nn
        e2x = my * e1z - mz * e1y
        e2y = mz * e1x - mx * e1z
        e2z = mx * e1y - my * e1x
        f11 = 0.0
        f12 = 0.0
        f22 = 0.0
        for j in range(nmeas):
            s = shell_of[j]
            if s < 0 or not use[j]:
                continue
            gx, gy, gz = directions[j, 0], directions[j, 1], directions[j, 2]
            u = gx * mx + gy * my + gz * mz
            nc = n_coefficients[s]
            legendre_even_with_derivative(u, 2 * (nc - 1), p, dp)
            d = 0.0
            o = offsets[s]
            for a in range(nc):
                d += coefficients[i, o + a] * dp[a]
            ga = d * (gx * e1x + gy * e1y + gz * e1z)
            gb = d * (gx * e2x + gy * e2y + gz * e2z)
            f11 += ga * ga
            f12 += ga * gb
            f22 += gb * gb
        out[i] = _cone_angle(f11, f12, f22, sigma2[i])
    return out


@njit(cache=True, nogil=True)
def _cone_angle(f11: float, f12: float, f22: float, s2: float) -> float:
    """1-sd cone angle (degrees, at most 90) of the axis whose Fisher information is
    F / s2, F = [[f11, f12], [f12, f22]] (90 when singular or not finite)."""
    det = (f11 * f22 - f12 * f12) / (s2 * s2)
    if det > 0.0:
        return min(math.degrees(math.sqrt((f11 + f22) / s2 / det)), 90.0)
    return 90.0


@njit(cache=True, nogil=True, fastmath=_FAST)
def _fisher_sums(gx: np.ndarray, gy: np.ndarray, gz: np.ndarray, starts: np.ndarray,
                 poly: np.ndarray, m0: float, m1: float, m2: float, sums: np.ndarray) -> None:
    """G = sum d² g gᵀ into ``sums[4:10]`` (the layout of :func:`_axis_sums`) with d the
    derivative with respect to u = g . m of each shell's series in powers of u²."""
    gxx = 0.0
    gxy = 0.0
    gxz = 0.0
    gyy = 0.0
    gyz = 0.0
    gzz = 0.0
    for s in range(starts.shape[0] - 1):
        b1 = 2.0 * poly[s, 1]
        b2 = 4.0 * poly[s, 2]
        b3 = 6.0 * poly[s, 3]
        for j in range(starts[s], starts[s + 1]):
            ex = gx[j]
            ey = gy[j]
            ez = gz[j]
            u = ex * m0 + ey * m1 + ez * m2
            x = u * u
            d = u * (b1 + x * (b2 + x * b3))
            dd = d * d
            gxx += dd * ex * ex
            gxy += dd * ex * ey
            gxz += dd * ex * ez
            gyy += dd * ey * ey
            gyz += dd * ey * ez
            gzz += dd * ez * ez
    sums[4] = gxx
    sums[5] = gxy
    sums[6] = gxz
    sums[7] = gyy
    sums[8] = gyz
    sums[9] = gzz


@parallel_kernel(serial_rows=SERIAL_ROWS)
def usable_rows(data: np.ndarray, b0_mask: np.ndarray) -> np.ndarray:
    """(n,) bool: rows of ``data`` (n, N) whose values are all finite and non-negative and
    whose b=0 measurements (``b0_mask`` (N,)) have a positive mean (always true without
    b=0 measurements); one pass, no temporaries."""
    n, m = data.shape
    out = np.zeros(n, dtype=np.bool_)
    nb0 = 0
    for j in range(m):
        if b0_mask[j]:
            nb0 += 1
    for i in prange(n):
        ok = True
        acc = 0.0
        for j in range(m):
            v = data[i, j]
            if not (v >= 0.0) or math.isinf(v):  # NaN compares false
                ok = False
                break
            if b0_mask[j]:
                acc += v
        out[i] = ok and (nb0 == 0 or acc > 0.0)
    return out


@parallel_kernel(serial_rows=SERIAL_ROWS)
def prepare_signals(data: np.ndarray, b0_mask: np.ndarray, sigma_in: np.ndarray,
                    min_b0_for_noise: int, rician: bool
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validity, S0, noise level and b0-normalised signals of raw voxels ``data`` (n, N)
    (float32 or float64; the arithmetic is float64 either way).

    A voxel is valid when every value is finite and the mean of its b0 measurements
    (``b0_mask``) is positive (without b0 measurements S0 = 1). The noise standard
    deviation is ``sigma_in[i]`` when finite, else the sample standard deviation of the
    b0s when there are at least ``min_b0_for_noise`` of them, else NaN. With ``rician``,
    diffusion-weighted values become sqrt(max(S² - sigma², 0)) (first-order Rician bias
    correction). Returns (corrected signals / S0 (n, N), uncorrected signals / S0 (n, N)
    (the same array without ``rician``), s0 (n,), sigma (n,), valid (n,)).
    """
    n, m = data.shape
    out = np.zeros((n, m))
    plain = np.zeros((n, m)) if rician else out
    s0 = np.full(n, np.nan)
    sigma = np.full(n, np.nan)
    valid = np.zeros(n, dtype=np.bool_)
    nb0 = 0
    for j in range(m):
        if b0_mask[j]:
            nb0 += 1
    for i in prange(n):
        ok = True
        acc = 0.0
        for j in range(m):
            v = float(data[i, j])  # float32 input: computed in float64 all the same
            if not math.isfinite(v):
                ok = False
                break
            if b0_mask[j]:
                acc += v
        if not ok:
            continue
        mean = acc / nb0 if nb0 > 0 else 1.0
        if not (mean > 0.0):
            continue
        sg = sigma_in[i]
        if not math.isfinite(sg) and nb0 >= min_b0_for_noise:
            ss = 0.0
            for j in range(m):
                if b0_mask[j]:
                    d = float(data[i, j]) - mean
                    ss += d * d
            sg = math.sqrt(ss / (nb0 - 1))
        s2 = sg * sg if (rician and math.isfinite(sg)) else 0.0
        inv = 1.0 / mean
        for j in range(m):
            v = float(data[i, j])
            plain[i, j] = v * inv
            if s2 > 0.0 and not b0_mask[j]:
                v = math.sqrt(max(v * v - s2, 0.0))
            out[i, j] = v * inv
        s0[i] = mean
        sigma[i] = sg
        valid[i] = True
    return out, plain, s0, sigma, valid


@parallel_kernel(serial_rows=SERIAL_ROWS)
def rician_correct(signals: np.ndarray, sigma: np.ndarray, b0_mask: np.ndarray
                   ) -> np.ndarray:
    """First-order Rician bias correction sqrt(max(S² - sigma², 0)) of the non-b0
    columns of b0-normalised ``signals`` (n, N), ``sigma`` (n,) in the same units.
    Returns a new array."""
    n, m = signals.shape
    out = np.empty((n, m))
    for i in prange(n):
        s2 = sigma[i] * sigma[i]
        if not math.isfinite(s2):
            s2 = 0.0
        for j in range(m):
            v = signals[i, j]
            if not b0_mask[j] and s2 > 0.0:
                v = math.sqrt(max(v * v - s2, 0.0))
            out[i, j] = v
    return out


@parallel_kernel(serial_rows=SERIAL_ROWS)
def zonal_fit_residuals(signals: np.ndarray, fit_features: np.ndarray, fit_rss: np.ndarray,
                        gram: np.ndarray, coefficients: np.ndarray, weights: np.ndarray,
                        shell_of: np.ndarray, n_coefficients: np.ndarray,
                        offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Residual and total sums of squares (n,) of b0-normalised ``signals`` (n, N) against
    the per-shell Legendre series ``coefficients`` (n, k) (unwhitened), around the frames
    at which :func:`zonal_features` gave ``fit_features`` (whitened), ``fit_rss`` and
    ``gram``; measurements with ``shell_of`` -1 are predicted as 1 (b0).

    No Legendre series is evaluated: the least-squares fit leaves a residual orthogonal to
    the basis, so |y - Z c|² = |y - Z ĉ|² + (ĉ - c)ᵀ ZᵀZ (ĉ - c) shell by shell."""
    n, nmeas = signals.shape
    n_shells = n_coefficients.shape[0]
    rss = np.full(n, np.nan)
    tss = np.full(n, np.nan)
    for i in prange(n):
        if not math.isfinite(coefficients[i, 0]):
            continue
        r = fit_rss[i]
        for s in range(n_shells):
            o = offsets[s]
            for a in range(n_coefficients[s]):
                da = fit_features[i, o + a] / weights[o + a] - coefficients[i, o + a]
                for b in range(n_coefficients[s]):
                    db = fit_features[i, o + b] / weights[o + b] - coefficients[i, o + b]
                    r += da * gram[i, s, a, b] * db
        total = 0.0
        squares = 0.0
        for j in range(nmeas):
            y = signals[i, j]
            total += y
            squares += y * y
            if shell_of[j] < 0:
                r += (y - 1.0) * (y - 1.0)
        rss[i] = max(r, 0.0)
        tss[i] = max(squares - total * total / nmeas, 0.0)
    return rss, tss


@parallel_kernel(serial_rows=SERIAL_ROWS)
def shell_means(signals: np.ndarray, shell_of: np.ndarray, n_shells: int,
                weights: np.ndarray, mean_weights: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-shell spherical means of every voxel, ``sum_j mean_weights[j] * signal[j]``
    over each shell's measurements (``shell_of`` -1 skipped), times ``weights``. Returns
    (features (n, n_shells) float32, within-shell residual sum of squares about the
    means (n,))."""
    n = signals.shape[0]
    nmeas = signals.shape[1]
    feats = np.empty((n, n_shells), dtype=np.float32)
    rss = np.empty(n)
    for i in prange(n):
        mean = np.zeros(n_shells)
        acc = np.zeros(n_shells)
        acc2 = np.zeros(n_shells)
        cnt = np.zeros(n_shells)
        for j in range(nmeas):
            s = shell_of[j]
            if s < 0:
                continue
            y = signals[i, j]
            mean[s] += mean_weights[j] * y
            acc[s] += y
            acc2[s] += y * y
            cnt[s] += 1.0
        total = 0.0
        for s in range(n_shells):
            m = mean[s]
            feats[i, s] = m * weights[s]
            total += max(acc2[s] - 2.0 * m * acc[s] + cnt[s] * m * m, 0.0)
        rss[i] = total
    return feats, rss


@parallel_kernel(serial_rows=SERIAL_ROWS)
def weighted_rows(weights: np.ndarray, indices: np.ndarray, table: np.ndarray) -> np.ndarray:
    """sum_j weights[i, j] * table[indices[i, j]] for every i: (n, columns) float64
    (indices -1 are skipped)."""
    n, k = indices.shape
    m = table.shape[1]
    out = np.zeros((n, m))
    for i in prange(n):
        for j in range(k):
            a = indices[i, j]
            if a < 0:
                continue
            w = weights[i, j]
            for c in range(m):
                out[i, c] += w * table[a, c]
    return out


@parallel_kernel(serial_rows=SERIAL_ROWS)
def posterior_average(distances: np.ndarray, indices: np.ndarray,
                      atom_params: np.ndarray, sigma2: np.ndarray, temperature: float,
                      orientation_curvature: np.ndarray, use_curvature: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior-weighted average of the neighbours' parameters.

    ``distances`` (n, k) are squared feature distances (whitened features: the squared
    signal residual of each neighbour, up to a per-voxel constant), ``indices`` (n, k)
    atom rows (-1: missing), ``atom_params`` (atoms, P), ``sigma2`` (n,) the voxel's noise
    variance in feature units. The log-weight of neighbour j is
    -(d_j - d_min) / (2 T sigma2) - log(1 + J_j / (T sigma2)) where J_j =
    ``orientation_curvature[atom]`` is the curvature of the atom's squared residual with
    respect to a tilt of its axis: the second term is the Laplace approximation of the
    integral of the likelihood over the (estimated, not known) orientation, relative to
    the hemisphere (applied where ``use_curvature[i]``).
    Returns (mean (n, P), standard deviation (n, P), weights (n, k)).
    """
    n, k = indices.shape
    npar = atom_params.shape[1]
    mean = np.full((n, npar), np.nan)
    std = np.full((n, npar), np.nan)
    weights = np.zeros((n, k))
    for i in prange(n):
        scale = temperature * max(sigma2[i], 1e-12)
        lw = np.full(k, -np.inf)
        lmax = -np.inf
        for j in range(k):
            a = indices[i, j]
            if a >= 0 and math.isfinite(distances[i, j]):
                v = -distances[i, j] / (2.0 * scale)
                if use_curvature[i]:
                    v -= math.log1p(orientation_curvature[a] / scale)
                lw[j] = v
                if v > lmax:
                    lmax = v
        if not math.isfinite(lmax):
            continue
        wsum = 0.0
        for j in range(k):
            if math.isfinite(lw[j]):
                w = math.exp(lw[j] - lmax)
                weights[i, j] = w
                wsum += w
        for j in range(k):
            weights[i, j] /= wsum
        for p in range(npar):
            m = 0.0
            for j in range(k):
                if indices[i, j] >= 0:
                    m += weights[i, j] * atom_params[indices[i, j], p]
            v = 0.0
            for j in range(k):
                if indices[i, j] >= 0:
                    d = atom_params[indices[i, j], p] - m
                    v += weights[i, j] * d * d
            mean[i, p] = m
            std[i, p] = math.sqrt(v)
    return mean, std, weights


@parallel_kernel(serial_rows=SERIAL_ROWS, nogil=True)
def local_linear_refine(queries: np.ndarray, indices: np.ndarray, weights: np.ndarray,
                        atom_features: np.ndarray, atom_params: np.ndarray,
                        start: np.ndarray, lower: np.ndarray, upper: np.ndarray,
                        columns: np.ndarray, floor_weight: float,
                        damping: float, max_step: np.ndarray, shrinkage: float = 0.0
                        ) -> tuple[np.ndarray, np.ndarray]:
    """One Gauss-Newton step per voxel with a Jacobian learnt from its neighbours.

    Over the k neighbours of voxel i (weights ``weights[i]`` floored at ``floor_weight``
    times the largest, so that the fit sees the neighbourhood), fits the affine forward
    model ``f ~ f0 + J (theta - theta0)`` of the features on the parameters ``columns``
    (weighted least squares, theta0 = ``start[i]``), then solves
    ``(J^T J + damping diag) d = J^T (q - f0)`` and returns ``start + d`` clipped to
    [lower, upper], each step limited to ``max_step[i]`` (n, m). Voxels whose fit is singular keep
    ``start``. Also returns the features (n, nf) that the local model predicts at the
    result (the weighted mean of the neighbours' features when the fit is singular).

    ``shrinkage`` > 0 scales each voxel's step (and the predicted features' change from
    the weighted mean) by min(1, shrinkage / n_eff), n_eff = 1 / sum(weights²) the
    effective number of neighbours.
    """
    n, k = indices.shape
    nf = atom_features.shape[1]
    m = columns.shape[0]
    out = start.copy()
    fpred = np.full((n, nf), np.nan)
    for i in prange(n):
        if not math.isfinite(start[i, 0]):
            continue
        wtot = 0.0
        for f in range(nf):
            fpred[i, f] = 0.0
        for j in range(k):
            a = indices[i, j]
            if a >= 0:
                wtot += weights[i, j]
                for f in range(nf):
                    fpred[i, f] += weights[i, j] * atom_features[a, f]
        if wtot > 0.0:
            for f in range(nf):
                fpred[i, f] /= wtot
        wmax = 0.0
        for j in range(k):
            if weights[i, j] > wmax:
                wmax = weights[i, j]
        # design: [1, theta - theta0] (k, m+1)
        q = m + 1
        ata = np.zeros((q, q))
        atf = np.zeros((q, nf))
        x = np.empty(q)
        ok_count = 0
        for j in range(k):
            a = indices[i, j]
            if a < 0:
                continue
            w = max(weights[i, j], floor_weight * wmax)
            x[0] = 1.0
            for c in range(m):
                x[c + 1] = atom_params[a, columns[c]] - start[i, columns[c]]
            for r in range(q):
                for c in range(r + 1):
                    ata[r, c] += w * x[r] * x[c]
                for f in range(nf):
                    atf[r, f] += w * x[r] * atom_features[a, f]
            ok_count += 1
        if ok_count < q + 1:
            continue
        for r in range(q):
            for c in range(r):
                ata[c, r] = ata[r, c]
        # small ridge relative to the diagonal keeps degenerate neighbourhoods solvable
        for r in range(1, q):
            ata[r, r] += 1e-9 * (ata[r, r] + 1e-30)
        coef = np.zeros((q, nf))
        if not _cholesky_factor(ata, q):
            continue
        rhs = np.empty(q)
        sol = np.empty(q)
        for f in range(nf):
            for r in range(q):
                rhs[r] = atf[r, f]
            _cholesky_substitute(ata, rhs, q, sol)
            for r in range(q):
                coef[r, f] = sol[r]
        # Gauss-Newton normal equations on J = coef[1:].T (nf, m), residual q - f0
        jtj = np.zeros((m, m))
        jtr = np.zeros(m)
        for f in range(nf):
            res = queries[i, f] - coef[0, f]
            for r in range(m):
                jtr[r] += coef[r + 1, f] * res
                for c in range(m):
                    jtj[r, c] += coef[r + 1, f] * coef[c + 1, f]
        for r in range(m):
            jtj[r, r] *= 1.0 + damping
            jtj[r, r] += 1e-12
        step = np.zeros(m)
        if not _cholesky_solve(jtj, jtr, m, step):
            continue
        lam = 1.0
        if shrinkage > 0.0:
            w2 = 0.0
            for j in range(k):
                w2 += weights[i, j] * weights[i, j]
            lam = min(1.0, shrinkage * max(w2, 1e-300))
        for f in range(nf):
            base = fpred[i, f]
            v = coef[0, f]
            for c in range(m):
                col = columns[c]
                d = min(max(step[c], -max_step[i, c]), max_step[i, c])
                v += coef[c + 1, f] * (min(max(start[i, col] + d, lower[c]), upper[c])
                                       - start[i, col])
            fpred[i, f] = base + lam * (v - base) if lam < 1.0 else v
        for c in range(m):
            col = columns[c]
            d = min(max(step[c], -max_step[i, c]), max_step[i, c])
            v = min(max(start[i, col] + d, lower[c]), upper[c])
            out[i, col] = start[i, col] + lam * (v - start[i, col]) if lam < 1.0 else v
    return out, fpred
