"""Numba kernels of multi-fascicle fitting: rotated zonal atoms, small NNLS, searches.

A single-fascicle compartment (a stick, a Watson-dispersed bundle, ...) is axially
symmetric: on a shell its signal is a zonal function of ``t = g . u`` (gradient ``g``,
fascicle axis ``u``), even in ``t``. An atom is stored as its even Legendre coefficients
per shell, ``C[a, s, j]`` for ``P_{2j}``, so that the atom rotated to ``u`` is, for a
measurement ``i`` of shell ``s(i)``::

    S_a(i; u) = sum_j C[a, s(i), j] P_{2j}(g_i . u)

Products with a vector ``v`` are projections: ``S_a . v = sum_{s,j} C[a,s,j]
(sum_{i in s} P_{2j}(g_i . u) v_i)``, so a whole table of atoms is scored against a voxel
at the cost of one small matrix product, without forming the rotated signals.

Every kernel here works on one voxel at a time inside a ``prange`` loop over voxels, so
a voxel's result does not depend on how voxels are batched (chunked volume fits give the
same numbers as one call).
"""

from __future__ import annotations

import math

import numpy as np

from fingerprint.kernels import njit, parallel_kernel, prange

__all__ = ["even_legendre", "fit_joint_kernel", "forward_directions_kernel",
           "legendre_to_power", "nnls_small", "rotated_signals"]

#: Largest number of columns of the small NNLS problems (fascicles + isotropic).
MAX_COLUMNS = 8
_RIDGE = 1e-12
#: The joint polish stops when a step lowers the residual sum of squares by less than
#: this many units of the noise variance (estimated from the residual itself: a step
#: worth much less than one chi-squared unit does not move the estimates meaningfully).
_POLISH_CHI2 = 0.05
#: Largest step of a continuous grid coordinate per polish iteration (grid steps).
_Z_STEP = 8.0


@njit(cache=True)
def even_legendre(t: float, n_even: int, values: np.ndarray, derivs: np.ndarray) -> None:
    """``values[j] = P_{2j}(t)``, ``derivs[j] = P'_{2j}(t)`` for j < n_even."""
    p_prev, p_cur = 1.0, t          # P_0, P_1
    d_prev, d_cur = 0.0, 1.0        # P'_0, P'_1
    values[0] = 1.0
    derivs[0] = 0.0
    lmax = 2 * (n_even - 1)
    for ell in range(1, lmax):
        # P_{l+1} = ((2l+1) t P_l - l P_{l-1}) / (l+1); P'_{l+1} = P'_{l-1} + (2l+1) P_l
        p_next = ((2 * ell + 1) * t * p_cur - ell * p_prev) / (ell + 1)
        d_next = d_prev + (2 * ell + 1) * p_cur
        p_prev, p_cur = p_cur, p_next
        d_prev, d_cur = d_cur, d_next
        if (ell + 1) % 2 == 0:
            values[(ell + 1) // 2] = p_cur
            derivs[(ell + 1) // 2] = d_cur


def legendre_to_power(coef: np.ndarray) -> np.ndarray:
    """Even Legendre coefficients ``coef`` (..., E) (of ``P_0, P_2, ..., P_{2E-2}``) as
    coefficients of ``t^0, t^2, ..., t^{2E-2}`` (same shape): the same zonal functions,
    evaluated by Horner's rule in ``t^2``."""
    coef = np.asarray(coef, dtype=np.float64)
    n_even = coef.shape[-1]
    conv = np.zeros((n_even, n_even))  # conv[j, l]: coefficient of t^{2j} in P_{2l}
    for ell in range(n_even):
        c = np.zeros(2 * ell + 1)
        c[-1] = 1.0
        power = np.polynomial.legendre.leg2poly(c)
        conv[:ell + 1, ell] = power[::2]
    return np.ascontiguousarray(coef @ conv.T)


#: Recurrence constants (2l + 1) / (l + 1) and l / (l + 1) of the Legendre polynomials.
_REC_A = np.array([(2.0 * ell + 1.0) / (ell + 1.0) for ell in range(64)])
_REC_B = np.array([ell / (ell + 1.0) for ell in range(64)])


@njit(cache=True)
def _legendre_rows(grad: np.ndarray, u: np.ndarray, n_even: int, pv: np.ndarray,
                   pd: np.ndarray) -> None:
    """P_{2j}(g_i . u) and derivatives for every measurement: pv, pd (N, n_even)."""
    n = grad.shape[0]
    u0, u1, u2 = u[0], u[1], u[2]
    for i in range(n):
        t = grad[i, 0] * u0 + grad[i, 1] * u1 + grad[i, 2] * u2
        if t > 1.0:
            t = 1.0
        elif t < -1.0:
            t = -1.0
        p_prev, p_cur = 1.0, t
        d_prev, d_cur = 0.0, 1.0
        pv[i, 0] = 1.0
        pd[i, 0] = 0.0
        for j in range(1, n_even):
            ell = 2 * j - 1  # P_{ell} -> P_{ell + 1} (even) -> P_{ell + 2} (odd)
            p_even = _REC_A[ell] * t * p_cur - _REC_B[ell] * p_prev
            d_even = d_prev + (2 * ell + 1) * p_cur
            pv[i, j] = p_even
            pd[i, j] = d_even
            if j < n_even - 1:
                p_odd = _REC_A[ell + 1] * t * p_even - _REC_B[ell + 1] * p_cur
                d_odd = d_cur + (2 * ell + 3) * p_even
                p_prev, p_cur = p_even, p_odd
                d_prev, d_cur = d_even, d_odd


@njit(cache=True)
def rotated_signals(coef: np.ndarray, shell: np.ndarray, grad: np.ndarray,
                    directions: np.ndarray) -> np.ndarray:
    """Signals (D, N) of one atom ``coef`` (S, n_even) rotated to each of ``directions``
    (D, 3)."""
    n_dir = directions.shape[0]
    n = grad.shape[0]
    n_even = coef.shape[1]
    out = np.zeros((n_dir, n))
    pv = np.empty((n, n_even))
    pd = np.empty((n, n_even))
    for d in range(n_dir):
        _legendre_rows(grad, directions[d], n_even, pv, pd)
        for i in range(n):
            s = shell[i]
            acc = 0.0
            for j in range(n_even):
                acc += coef[s, j] * pv[i, j]
            out[d, i] = acc
    return out


@njit(cache=True)
def nnls_small(g: np.ndarray, b: np.ndarray, m: int, x: np.ndarray) -> float:
    """Non-negative least squares from the normal equations of ``m`` columns (m <= 8):
    minimises ``x.G x - 2 x.b`` over x >= 0 (the unconstrained solution when it is
    feasible, else every support); writes ``x`` and returns the minimum (relative to
    |y|^2)."""
    return _nnls_work(g, b, m, x, np.empty(m, dtype=np.int64), np.empty((m, m)),
                      np.empty(m))


@njit(cache=True)
def _nnls_work(g: np.ndarray, b: np.ndarray, m: int, x: np.ndarray, idx: np.ndarray,
               a: np.ndarray, r: np.ndarray) -> float:
    """:func:`nnls_small` with caller-provided work arrays idx (m,), a (m, m), r (m,)."""
    best = 0.0
    for j in range(m):
        x[j] = 0.0
    full = (1 << m) - 1
    # the unconstrained solution, when feasible, is the NNLS solution (convex problem)
    for mask in range(full, 0, -1):
        k = 0
        for j in range(m):
            if mask >> j & 1:
                idx[k] = j
                k += 1
        # Cholesky-free Gaussian elimination on the k x k system
        for p in range(k):
            r[p] = b[idx[p]]
            for q in range(k):
                a[p, q] = g[idx[p], idx[q]]
            a[p, p] += _RIDGE * (g[idx[p], idx[p]] + 1e-300)
        ok = True
        for p in range(k):
            piv = a[p, p]
            if not piv > 0.0:
                ok = False
                break
            for q in range(p + 1, k):
                f = a[q, p] / piv
                if f != 0.0:
                    for c in range(p, k):
                        a[q, c] -= f * a[p, c]
                    r[q] -= f * r[p]
        if not ok:
            continue
        feasible = True
        for p in range(k - 1, -1, -1):
            acc = r[p]
            for c in range(p + 1, k):
                acc -= a[p, c] * r[c]
            r[p] = acc / a[p, p]
            if not r[p] >= 0.0:
                feasible = False
                break
        if not feasible:
            continue
        cost = 0.0
        for p in range(k):
            cost -= r[p] * b[idx[p]]
        if cost < best:
            best = cost
            for j in range(m):
                x[j] = 0.0
            for p in range(k):
                x[idx[p]] = r[p]
        if mask == full:
            break
    return best


@njit(cache=True)
def _nnls_bounded(g: np.ndarray, b: np.ndarray, m: int, x: np.ndarray, idx: np.ndarray,
                  a: np.ndarray, r: np.ndarray, bound: float) -> float:
    """:func:`_nnls_work` for a caller that only wants a cost below ``bound``: the
    unconstrained least-squares cost is a lower bound of the NNLS cost, so when the
    unconstrained solution is infeasible and its cost is not below ``bound``, that cost
    is returned at once (``x`` then undefined); otherwise the NNLS cost and solution."""
    for p in range(m):
        r[p] = b[p]
        for q in range(m):
            a[p, q] = g[p, q]
        a[p, p] += _RIDGE * (g[p, p] + 1e-300)
    for p in range(m):
        piv = a[p, p]
        if not piv > 0.0:
            return _nnls_work(g, b, m, x, idx, a, r)
        for q in range(p + 1, m):
            f = a[q, p] / piv
            if f != 0.0:
                for c in range(p, m):
                    a[q, c] -= f * a[p, c]
                r[q] -= f * r[p]
    feasible = True
    for p in range(m - 1, -1, -1):
        acc = r[p]
        for c in range(p + 1, m):
            acc -= a[p, c] * r[c]
        r[p] = acc / a[p, p]
        if not r[p] >= 0.0:
            feasible = False
    cost = 0.0
    for p in range(m):
        cost -= r[p] * b[p]
    if feasible:
        for p in range(m):
            x[p] = r[p]
        return cost
    if cost >= bound:
        return cost
    return _nnls_work(g, b, m, x, idx, a, r)


@parallel_kernel()
def forward_directions_kernel(y: np.ndarray, templates: np.ndarray, gram: np.ndarray,
                              grid: np.ndarray, iso: np.ndarray, n_fascicles: int,
                              min_separation: float) -> np.ndarray:
    """Greedy forward selection of ``n_fascicles`` directions per voxel.

    y (n, N) signals; templates (D, N) a typical fascicle atom rotated to the D grid
    directions ``grid`` (D, 3), gram (D, D) their products; iso (N,) a typical
    isotropic signal. Step k adds the grid direction that, with the k-1 already chosen
    and the isotropic column, gives the lowest NNLS cost; directions within
    ``min_separation`` (|cos| above it) of a chosen one are skipped. Returns grid
    indices (n, n_fascicles).
    """
    n, n_meas = y.shape
    n_dir = templates.shape[0]
    out = np.zeros((n, n_fascicles), dtype=np.int64)
    tiso = templates @ iso
    iso2 = 0.0
    for i in range(n_meas):
        iso2 += iso[i] * iso[i]
    for v in prange(n):
        ty = templates @ y[v]
        yiso = 0.0
        for i in range(n_meas):
            yiso += y[v, i] * iso[i]
        m = n_fascicles + 1
        g = np.zeros((m, m))
        b = np.zeros(m)
        x = np.zeros(m)
        wi = np.empty(m, dtype=np.int64)
        wa = np.empty((m, m))
        wr = np.empty(m)
        chosen = np.zeros(n_fascicles, dtype=np.int64)
        for k in range(n_fascicles):
            # columns: chosen[0..k-1], candidate, iso
            size = k + 2
            best_cost = 1e300
            best_d = 0
            for d in range(n_dir):
                skip = False
                for c in range(k):
                    cos = (grid[chosen[c], 0] * grid[d, 0] + grid[chosen[c], 1] * grid[d, 1]
                           + grid[chosen[c], 2] * grid[d, 2])
                    if abs(cos) > min_separation:
                        skip = True
                        break
                if skip:
                    continue
                for p in range(k):
                    for q in range(k):
                        g[p, q] = gram[chosen[p], chosen[q]]
                    g[p, k] = gram[chosen[p], d]
                    g[k, p] = g[p, k]
                    g[p, k + 1] = tiso[chosen[p]]
                    g[k + 1, p] = g[p, k + 1]
                    b[p] = ty[chosen[p]]
                g[k, k] = gram[d, d]
                g[k, k + 1] = tiso[d]
                g[k + 1, k] = tiso[d]
                g[k + 1, k + 1] = iso2
                b[k] = ty[d]
                b[k + 1] = yiso
                cost = _nnls_bounded(g, b, size, x, wi, wa, wr, best_cost)
                if cost < best_cost:
                    best_cost = cost
                    best_d = d
            chosen[k] = best_d
        for k in range(n_fascicles):
            out[v, k] = chosen[k]
    return out


@njit(cache=True)
def _project(pv: np.ndarray, shell: np.ndarray, n_shells: int, v: np.ndarray,
             out: np.ndarray) -> None:
    """out[s, j] = sum_{i in s} P_{2j}(t_i) v_i."""
    n, n_even = pv.shape
    for s in range(n_shells):
        for j in range(n_even):
            out[s, j] = 0.0
    for i in range(n):
        s = shell[i]
        vi = v[i]
        for j in range(n_even):
            out[s, j] += pv[i, j] * vi


@njit(cache=True)
def _atom_signal(coef: np.ndarray, pv: np.ndarray, shell: np.ndarray, out: np.ndarray
                 ) -> None:
    n, n_even = pv.shape
    for i in range(n):
        s = shell[i]
        acc = 0.0
        for j in range(n_even):
            acc += coef[s, j] * pv[i, j]
        out[i] = acc


@njit(cache=True)
def _atom_deriv(coef: np.ndarray, pd: np.ndarray, shell: np.ndarray, grad: np.ndarray,
                e: np.ndarray, out: np.ndarray) -> None:
    """d S / d(angle along tangent e) = sum_j c_j P'_{2j}(t) (g . e)."""
    n, n_even = pd.shape
    for i in range(n):
        s = shell[i]
        acc = 0.0
        for j in range(n_even):
            acc += coef[s, j] * pd[i, j]
        out[i] = acc * (grad[i, 0] * e[0] + grad[i, 1] * e[1] + grad[i, 2] * e[2])


@njit(cache=True)
def _tangents(u: np.ndarray, e1: np.ndarray, e2: np.ndarray) -> None:
    if abs(u[0]) < 0.9:
        a0, a1, a2 = 1.0, 0.0, 0.0
    else:
        a0, a1, a2 = 0.0, 1.0, 0.0
    # e1 = normalise(u x a), e2 = u x e1
    c0 = u[1] * a2 - u[2] * a1
    c1 = u[2] * a0 - u[0] * a2
    c2 = u[0] * a1 - u[1] * a0
    nrm = math.sqrt(c0 * c0 + c1 * c1 + c2 * c2)
    e1[0], e1[1], e1[2] = c0 / nrm, c1 / nrm, c2 / nrm
    e2[0] = u[1] * e1[2] - u[2] * e1[1]
    e2[1] = u[2] * e1[0] - u[0] * e1[2]
    e2[2] = u[0] * e1[1] - u[1] * e1[0]


@njit(cache=True)
def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """a . b with four interleaved partial sums (independent chains, so the products
    pipeline; the summation order depends only on the length, so results stay
    reproducible)."""
    n = a.shape[0]
    m = n - n % 4
    a0 = 0.0
    a1 = 0.0
    a2 = 0.0
    a3 = 0.0
    for i in range(0, m, 4):
        a0 += a[i] * b[i]
        a1 += a[i + 1] * b[i + 1]
        a2 += a[i + 2] * b[i + 2]
        a3 += a[i + 3] * b[i + 3]
    for i in range(m, n):
        a0 += a[i] * b[i]
    return (a0 + a1) + (a2 + a3)


@njit(cache=True)
def _solve_sym(a: np.ndarray, r: np.ndarray, m: int, out: np.ndarray) -> bool:
    """Solve the m x m system a out = r (Gaussian elimination, partial pivoting);
    ``a`` and ``r`` are overwritten."""
    for p in range(m):
        piv = p
        big = abs(a[p, p])
        for q in range(p + 1, m):
            if abs(a[q, p]) > big:
                big = abs(a[q, p])
                piv = q
        if not big > 0.0:
            return False
        if piv != p:
            for c in range(m):
                a[p, c], a[piv, c] = a[piv, c], a[p, c]
            r[p], r[piv] = r[piv], r[p]
        for q in range(p + 1, m):
            f = a[q, p] / a[p, p]
            if f != 0.0:
                for c in range(p, m):
                    a[q, c] -= f * a[p, c]
                r[q] -= f * r[p]
    for p in range(m - 1, -1, -1):
        acc = r[p]
        for c in range(p + 1, m):
            acc -= a[p, c] * out[c]
        out[p] = acc / a[p, p]
    return True


@njit(cache=True)
def _search_atoms(yv: np.ndarray, cols: np.ndarray, m: int, k: int, table: np.ndarray,
                  pv: np.ndarray, norms: np.ndarray, shell: np.ndarray, n_shells: int,
                  proj_y: np.ndarray, proj_c: np.ndarray, g: np.ndarray, b: np.ndarray,
                  x: np.ndarray, work: tuple[np.ndarray, np.ndarray, np.ndarray,
                                             np.ndarray, np.ndarray]
                  ) -> tuple[int, float]:
    """Best atom of the rotated table for column k (others fixed): (atom, cost).
    ``norms`` (A,) the atoms' squared norms and ``proj_y`` the voxel's Legendre
    projection at this fascicle's direction (:func:`_direction_cache`)."""
    n_atoms, _, n_even = table.shape
    for c in range(m):
        if c != k:
            _project(pv, shell, n_shells, cols[c], proj_c[c])
    # Gram of the fixed columns
    for p in range(m):
        if p == k:
            continue
        b[p] = _dot(cols[p], yv)
        for q in range(p, m):
            if q != k:
                g[p, q] = _dot(cols[p], cols[q])
                g[q, p] = g[p, q]
    wi, wa, wr, fixed_g, fixed_b = work
    for p in range(m):
        fixed_b[p] = b[p]
        for q in range(m):
            fixed_g[p, q] = g[p, q]
    best_a = 0
    best_cost = 1e300
    for a in range(n_atoms):
        ca = table[a]
        by = 0.0
        for s in range(n_shells):
            for j in range(n_even):
                by += ca[s, j] * proj_y[s, j]
        for p in range(m):
            for q in range(m):
                g[p, q] = fixed_g[p, q]
            b[p] = fixed_b[p]
        for c in range(m):
            if c == k:
                continue
            ac = 0.0
            for s in range(n_shells):
                for j in range(n_even):
                    ac += ca[s, j] * proj_c[c, s, j]
            g[k, c] = ac
            g[c, k] = ac
        g[k, k] = norms[a]
        b[k] = by
        cost = _nnls_bounded(g, b, m, x, wi, wa, wr, best_cost)
        if cost < best_cost:
            best_cost = cost
            best_a = a
    return best_a, best_cost


@njit(cache=True)
def _direction_cache(yv: np.ndarray, table: np.ndarray, pv: np.ndarray, shell: np.ndarray,
                     n_shells: int, pp: np.ndarray, norms: np.ndarray, proj_y: np.ndarray
                     ) -> None:
    """What the atom search needs at one fascicle direction, whatever the other columns:
    every atom's squared norm |S_a|^2 = sum_s c_s^T PP_s c_s and the voxel's
    projection."""
    n_atoms, _, n_even = table.shape
    _pp(pv, shell, n_shells, pp)
    _project(pv, shell, n_shells, yv, proj_y)
    for a in range(n_atoms):
        ca = table[a]
        aa = 0.0
        for s in range(n_shells):
            for j in range(n_even):
                cj = ca[s, j]
                if cj == 0.0:
                    continue
                acc = 0.0
                for l2 in range(n_even):
                    acc += pp[s, j, l2] * ca[s, l2]
                aa += cj * acc
        norms[a] = aa


@njit(cache=True)
def _search_iso(yv: np.ndarray, cols: np.ndarray, m: int, c: int, tab: np.ndarray,
                size: int, iso_norm: np.ndarray, iso_y: np.ndarray, g: np.ndarray,
                b: np.ndarray, x: np.ndarray,
                work: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
                ) -> tuple[int, float]:
    """Best isotropic atom for column c (others fixed): (atom, cost relative to
    |y|^2)."""
    n = yv.shape[0]
    wi, wa, wr, fixed_g, fixed_b = work
    for p in range(m):
        if p == c:
            continue
        fixed_b[p] = _dot(cols[p], yv)
        for q in range(p, m):
            if q != c:
                fixed_g[p, q] = _dot(cols[p], cols[q])
                fixed_g[q, p] = fixed_g[p, q]
    best = 1e300
    best_a = 0
    for a in range(size):
        for p in range(m):
            for q in range(m):
                g[p, q] = fixed_g[p, q]
            b[p] = fixed_b[p]
        for p in range(m):
            if p == c:
                continue
            acc = 0.0
            for i in range(n):
                acc += tab[a, i] * cols[p, i]
            g[c, p] = acc
            g[p, c] = acc
        g[c, c] = iso_norm[a]
        b[c] = iso_y[a]
        cost = _nnls_bounded(g, b, m, x, wi, wa, wr, best)
        if cost < best:
            best = cost
            best_a = a
    return best_a, best


@njit(cache=True)
def _pp(pv: np.ndarray, shell: np.ndarray, n_shells: int, out: np.ndarray) -> None:
    n, n_even = pv.shape
    for s in range(n_shells):
        for j in range(n_even):
            for l2 in range(n_even):
                out[s, j, l2] = 0.0
    for i in range(n):
        s = shell[i]
        for j in range(n_even):
            pj = pv[i, j]
            for l2 in range(j, n_even):
                out[s, j, l2] += pj * pv[i, l2]
    for s in range(n_shells):
        for j in range(n_even):
            for l2 in range(j):
                out[s, j, l2] = out[s, l2, j]


@njit(cache=True)
def _weights(yv: np.ndarray, cols: np.ndarray, m: int, g: np.ndarray, b: np.ndarray,
             x: np.ndarray, work: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray,
                                        np.ndarray]) -> float:
    """NNLS weights of the current columns; returns the residual sum of squares."""
    for p in range(m):
        b[p] = _dot(cols[p], yv)
        for q in range(p, m):
            g[p, q] = _dot(cols[p], cols[q])
            g[q, p] = g[p, q]
    cost = _nnls_work(g, b, m, x, work[0], work[1], work[2])
    return _dot(yv, yv) + cost


# ------------------------------------------------------------------ joint (continuous) fit
@njit(cache=True)
def _interp(table: np.ndarray, z: np.ndarray, axes_n: np.ndarray, strides: np.ndarray,
            coef: np.ndarray, dcoef: np.ndarray) -> None:
    """Catmull-Rom (C1, tensor-product cubic) interpolation of the atom table (A, S, E)
    at grid coordinates z (M,) (atom index = sum_d i_d strides[d], i_d in
    [0, axes_n[d]), end points repeated): coef (S, E) and its derivatives along each
    coordinate dcoef (M, S, E). Exact at grid points; a continuous derivative keeps the
    Levenberg-Marquardt steps from zig-zagging across grid cells."""
    n_dim = z.shape[0]
    _, n_shells, n_even = table.shape
    for s in range(n_shells):
        for j in range(n_even):
            coef[s, j] = 0.0
            for d in range(n_dim):
                dcoef[d, s, j] = 0.0
    nd = max(n_dim, 1)
    idx = np.zeros((nd, 4), dtype=np.int64)
    w = np.zeros((nd, 4))
    dw = np.zeros((nd, 4))
    taps = np.ones(nd, dtype=np.int64)
    for d in range(n_dim):
        n = axes_n[d]
        if n < 2:
            idx[d, 0] = 0
            w[d, 0] = 1.0
            dw[d, 0] = 0.0
            taps[d] = 1
            continue
        zd = min(max(z[d], 0.0), n - 1.0)
        i0 = min(int(math.floor(zd)), n - 2)
        t = zd - i0
        t2 = t * t
        t3 = t2 * t
        w[d, 0] = 0.5 * (-t3 + 2.0 * t2 - t)
        w[d, 1] = 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0)
        w[d, 2] = 0.5 * (-3.0 * t3 + 4.0 * t2 + t)
        w[d, 3] = 0.5 * (t3 - t2)
        dw[d, 0] = 0.5 * (-3.0 * t2 + 4.0 * t - 1.0)
        dw[d, 1] = 0.5 * (9.0 * t2 - 10.0 * t)
        dw[d, 2] = 0.5 * (-9.0 * t2 + 8.0 * t + 1.0)
        dw[d, 3] = 0.5 * (3.0 * t2 - 2.0 * t)
        for q in range(4):
            idx[d, q] = min(max(i0 - 1 + q, 0), n - 1)
        taps[d] = 4
    total = 1
    for d in range(n_dim):
        total *= taps[d]
    for combo in range(total):
        rest = combo
        atom = 0
        weight = 1.0
        for d in range(n_dim):
            q = rest % taps[d]
            rest //= taps[d]
            atom += idx[d, q] * strides[d]
            weight *= w[d, q]
        for s in range(n_shells):
            for j in range(n_even):
                coef[s, j] += weight * table[atom, s, j]
        for d in range(n_dim):
            if taps[d] < 2:
                continue
            rest = combo
            wd = 1.0
            for e in range(n_dim):
                q = rest % taps[e]
                rest //= taps[e]
                wd *= dw[e, q] if e == d else w[e, q]
            if wd == 0.0:
                continue
            for s in range(n_shells):
                for j in range(n_even):
                    dcoef[d, s, j] += wd * table[atom, s, j]


@njit(cache=True)
def _z_index(z: np.ndarray, axes_n: np.ndarray, strides: np.ndarray) -> int:
    """Atom index of the grid point nearest to coordinates z."""
    idx = 0
    for d in range(axes_n.shape[0]):
        idx += int(min(max(round(z[d]), 0), axes_n[d] - 1)) * strides[d]
    return idx


@njit(cache=True)
def _atom_index_to_z(a: int, axes_n: np.ndarray, strides: np.ndarray, z: np.ndarray) -> None:
    for d in range(axes_n.shape[0]):
        z[d] = float((a // strides[d]) % axes_n[d])


@njit(cache=True)
def _interp_iso(tab: np.ndarray, size: int, w: float, out: np.ndarray, dout: np.ndarray
                ) -> None:
    """Catmull-Rom interpolation of the isotropic atoms ``tab`` (Amax, N) (the first
    ``size`` valid, one parameter axis) at grid coordinate ``w``: the signal ``out`` (N,)
    and its derivative along ``w`` ``dout`` (N,). Exact at grid points."""
    n = tab.shape[1]
    for i in range(n):
        out[i] = 0.0
        dout[i] = 0.0
    if size < 2:
        for i in range(n):
            out[i] = tab[0, i]
        return
    wd = min(max(w, 0.0), size - 1.0)
    i0 = min(int(math.floor(wd)), size - 2)
    t = wd - i0
    t2 = t * t
    t3 = t2 * t
    for q in range(4):
        if q == 0:
            wq = 0.5 * (-t3 + 2.0 * t2 - t)
            dq = 0.5 * (-3.0 * t2 + 4.0 * t - 1.0)
        elif q == 1:
            wq = 0.5 * (3.0 * t3 - 5.0 * t2 + 2.0)
            dq = 0.5 * (9.0 * t2 - 10.0 * t)
        elif q == 2:
            wq = 0.5 * (-3.0 * t3 + 4.0 * t2 + t)
            dq = 0.5 * (-9.0 * t2 + 8.0 * t + 1.0)
        else:
            wq = 0.5 * (t3 - t2)
            dq = 0.5 * (3.0 * t2 - 2.0 * t)
        a = min(max(i0 - 1 + q, 0), size - 1)
        for i in range(n):
            out[i] += wq * tab[a, i]
            dout[i] += dq * tab[a, i]


@njit(cache=True)
def _zonal(mono: np.ndarray, dmono: np.ndarray, n_dim: int, t: np.ndarray,
           shell: np.ndarray, sig: np.ndarray, dsig_dt: np.ndarray, dsig_dz: np.ndarray
           ) -> None:
    """A zonal atom from its power-series coefficients ``mono`` (S, E) in ``t^2``
    (Horner): the signal ``sig`` (N,) at cosines ``t`` (N,), its derivative along t
    ``dsig_dt`` and, from ``dmono`` (M, S, E), along each grid coordinate ``dsig_dz``
    (M, N)."""
    n = t.shape[0]
    n_even = mono.shape[1]
    for i in range(n):
        s = shell[i]
        ti = t[i]
        xx = ti * ti
        p = mono[s, n_even - 1]
        dp = 0.0
        for j in range(n_even - 2, -1, -1):
            dp = dp * xx + p
            p = p * xx + mono[s, j]
        sig[i] = p
        dsig_dt[i] = 2.0 * ti * dp
        for d in range(n_dim):
            q = dmono[d, s, n_even - 1]
            for j in range(n_even - 2, -1, -1):
                q = q * xx + dmono[d, s, j]
            dsig_dz[d, i] = q


@njit(cache=True)
def _zonal_value(mono: np.ndarray, t: np.ndarray, shell: np.ndarray, sig: np.ndarray
                 ) -> None:
    """The signal of :func:`_zonal` only."""
    n = t.shape[0]
    n_even = mono.shape[1]
    for i in range(n):
        s = shell[i]
        xx = t[i] * t[i]
        p = mono[s, n_even - 1]
        for j in range(n_even - 2, -1, -1):
            p = p * xx + mono[s, j]
        sig[i] = p


@njit(cache=True)
def _cosines(grad: np.ndarray, u: np.ndarray, t: np.ndarray) -> None:
    """t_i = g_i . u, clipped to [-1, 1]."""
    for i in range(grad.shape[0]):
        c = grad[i, 0] * u[0] + grad[i, 1] * u[1] + grad[i, 2] * u[2]
        t[i] = min(max(c, -1.0), 1.0)


@njit(cache=True)
def _polish_joint(yv: np.ndarray, cols: np.ndarray, m: int, n_fasc: int, mono: np.ndarray,
                  axes_n: np.ndarray, strides: np.ndarray, z: np.ndarray, dirs: np.ndarray,
                  shell: np.ndarray, grad: np.ndarray,
                  iso_tables: np.ndarray, iso_sizes: np.ndarray, iso_cont: np.ndarray,
                  wiso: np.ndarray, iters: int, g: np.ndarray, b: np.ndarray,
                  x: np.ndarray,
                  work: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
                  ) -> float:
    """Levenberg-Marquardt on the fractions (held non-negative), every fascicle's
    direction (two tangent angles) and own parameters (continuous grid coordinates, atoms
    interpolated) and the one-parameter isotropic compartments' parameter (continuous
    grid coordinate ``wiso``, where ``iso_cont``) together, from the NNLS fractions of the
    current atoms; the fractions are solved by NNLS again at the end. The fascicle atoms
    are evaluated from their power series in ``(g . u)^2`` (``mono``, the atom table in
    that basis: Horner's rule, no Legendre recurrence). The normal equations are formed
    once per iteration (the damping retries reuse them); the iterations stop when a step
    gains less than ``_POLISH_CHI2`` noise-variance units (the variance estimated as
    RSS / (N - parameters)). Updates cols, z, dirs, wiso, x; returns the residual sum of
    squares."""
    n = yv.shape[0]
    n_dim = z.shape[1]
    nd1 = max(n_dim, 1)
    per = 2 + n_dim
    n_iso = m - n_fasc
    n_ci = 0
    for j in range(n_iso):
        if iso_cont[j]:
            n_ci += 1
    base_iso = m + per * n_fasc
    npar = base_iso + n_ci
    n_shells = mono.shape[1]
    n_even = mono.shape[2]
    e1 = np.zeros(3)
    e2 = np.zeros(3)
    jac = np.zeros((npar, n))
    res = np.zeros(n)
    coef = np.zeros((n_fasc, n_shells, n_even))
    dcoef = np.zeros((n_fasc, nd1, n_shells, n_even))
    t_coef = np.zeros((n_fasc, n_shells, n_even))
    t_dcoef = np.zeros((n_fasc, nd1, n_shells, n_even))
    tt = np.zeros((n_fasc, n))
    trial_t = np.zeros((n_fasc, n))
    dsig = np.zeros(n)
    dsz = np.zeros((nd1, n))
    trial_cols = cols.copy()
    trial_dirs = dirs.copy()
    trial_z = z.copy()
    n_iso1 = max(n_iso, 1)
    diso = np.zeros((n_iso1, n))
    trial_diso = np.zeros((n_iso1, n))
    trial_w = np.zeros(n_iso1)
    a0 = np.zeros((npar, npar))
    r0 = np.zeros(npar)
    a = np.zeros((npar, npar))
    r = np.zeros(npar)
    step = np.zeros(npar)
    xt = np.zeros(m)
    lam = 1e-3
    for k in range(n_fasc):
        _interp(mono, z[k], axes_n, strides, coef[k], dcoef[k])
        _cosines(grad, dirs[k], tt[k])
        _zonal_value(coef[k], tt[k], shell, cols[k])
    for j in range(n_iso):
        trial_w[j] = wiso[j]
        if iso_cont[j]:
            _interp_iso(iso_tables[j], iso_sizes[j], wiso[j], cols[n_fasc + j], diso[j])
    cost = _weights(yv, cols, m, g, b, x, work)
    dof = max(n - npar, 1)
    for _it in range(iters):
        for i in range(n):
            acc = -yv[i]
            for c in range(m):
                acc += x[c] * cols[c, i]
            res[i] = acc
        for c in range(m):
            for i in range(n):
                jac[c, i] = cols[c, i]
        for k in range(n_fasc):
            _tangents(dirs[k], e1, e2)
            row = m + per * k
            _zonal(coef[k], dcoef[k], n_dim, tt[k], shell, cols[k], dsig, dsz)
            xk = x[k]
            for i in range(n):
                ds = xk * dsig[i]
                jac[row, i] = ds * (grad[i, 0] * e1[0] + grad[i, 1] * e1[1]
                                    + grad[i, 2] * e1[2])
                jac[row + 1, i] = ds * (grad[i, 0] * e2[0] + grad[i, 1] * e2[1]
                                        + grad[i, 2] * e2[2])
                for d in range(n_dim):
                    jac[row + 2 + d, i] = xk * dsz[d, i]
        row = base_iso
        for j in range(n_iso):
            if iso_cont[j]:
                for i in range(n):
                    jac[row, i] = x[n_fasc + j] * diso[j, i]
                row += 1
        for p in range(npar):
            r0[p] = -_dot(jac[p], res)
            for q in range(p, npar):
                a0[p, q] = _dot(jac[p], jac[q])
                a0[q, p] = a0[p, q]
        improved = False
        gain = 0.0
        for _attempt in range(8):
            for p in range(npar):
                r[p] = r0[p]
                for q in range(npar):
                    a[p, q] = a0[p, q]
                a[p, p] = a0[p, p] * (1.0 + lam) + 1e-12
            if not _solve_sym(a, r, npar, step):
                lam *= 10.0
                continue
            for c in range(m):
                xt[c] = max(x[c] + step[c], 0.0)
            for k in range(n_fasc):
                _tangents(dirs[k], e1, e2)
                row = m + per * k
                s1 = step[row]
                s2 = step[row + 1]
                big = math.sqrt(s1 * s1 + s2 * s2)
                if big > 0.3:
                    s1 *= 0.3 / big
                    s2 *= 0.3 / big
                nrm = 0.0
                for c in range(3):
                    trial_dirs[k, c] = dirs[k, c] + s1 * e1[c] + s2 * e2[c]
                    nrm += trial_dirs[k, c] ** 2
                nrm = math.sqrt(nrm)
                for c in range(3):
                    trial_dirs[k, c] /= nrm
                for d in range(n_dim):
                    sd = min(max(step[row + 2 + d], -_Z_STEP), _Z_STEP)
                    trial_z[k, d] = min(max(z[k, d] + sd, 0.0), axes_n[d] - 1.0)
                _interp(mono, trial_z[k], axes_n, strides, t_coef[k], t_dcoef[k])
                _cosines(grad, trial_dirs[k], trial_t[k])
                _zonal_value(t_coef[k], trial_t[k], shell, trial_cols[k])
            row = base_iso
            for j in range(n_iso):
                if iso_cont[j]:
                    sw = min(max(step[row], -_Z_STEP), _Z_STEP)
                    trial_w[j] = min(max(wiso[j] + sw, 0.0), iso_sizes[j] - 1.0)
                    _interp_iso(iso_tables[j], iso_sizes[j], trial_w[j],
                                trial_cols[n_fasc + j], trial_diso[j])
                    row += 1
            trial_cost = 0.0
            for i in range(n):
                acc = -yv[i]
                for c in range(n_fasc):
                    acc += xt[c] * trial_cols[c, i]
                for j in range(n_iso):
                    if iso_cont[j]:
                        acc += xt[n_fasc + j] * trial_cols[n_fasc + j, i]
                    else:
                        acc += xt[n_fasc + j] * cols[n_fasc + j, i]
                trial_cost += acc * acc
            if trial_cost < cost:
                improved = True
                gain = cost - trial_cost
                cost = trial_cost
                for k in range(n_fasc):
                    for c in range(3):
                        dirs[k, c] = trial_dirs[k, c]
                    for d in range(n_dim):
                        z[k, d] = trial_z[k, d]
                    coef[k, :, :] = t_coef[k]
                    dcoef[k, :, :, :] = t_dcoef[k]
                    for i in range(n):
                        cols[k, i] = trial_cols[k, i]
                        tt[k, i] = trial_t[k, i]
                for j in range(n_iso):
                    if iso_cont[j]:
                        wiso[j] = trial_w[j]
                        for i in range(n):
                            cols[n_fasc + j, i] = trial_cols[n_fasc + j, i]
                            diso[j, i] = trial_diso[j, i]
                for c in range(m):
                    x[c] = xt[c]
                lam = max(lam * 0.3, 1e-9)
                break
            lam *= 10.0
        if not improved or gain < _POLISH_CHI2 * cost / dof:
            break
    return _weights(yv, cols, m, g, b, x, work)


@njit(cache=True)
def _fit_voxel_joint(yv: np.ndarray, u0: np.ndarray, n_fasc: int, table: np.ndarray,
                     mono: np.ndarray, axes_n: np.ndarray, strides: np.ndarray,
                     iso_tables: np.ndarray, iso_sizes: np.ndarray, iso_cont: np.ndarray,
                     shell: np.ndarray,
                     n_shells: int, grad: np.ndarray, rounds: int, first_passes: int,
                     polish_iters: int, close_cos: float, rss_gate: float,
                     z_out: np.ndarray,
                     iso_out: np.ndarray, dirs_out: np.ndarray, w_out: np.ndarray,
                     warm: bool, z0: np.ndarray) -> float:
    """One voxel, ``n_fasc`` fascicles from directions ``u0``: discrete atom search (up
    to ``first_passes`` passes over the fascicles), then rounds of joint polish
    (directions, continuous fascicle and isotropic parameters) and atom search, a
    discrete atom replacing a continuous one only when it lowers the residual (with two
    or more fascicles, only while two of them are closer than ``close_cos``, |cos|
    above it: farther apart the first polish has found the optimum); no polish
    when the discrete fit's residual sum of squares exceeds ``rss_gate`` (another count
    is far better). ``warm``: start from the atoms at grid coordinates ``z0``
    (n_fasc, M) instead of the first discrete search of the fascicles' atoms (the polish
    moves them from there). Returns the residual sum of squares."""
    n = yv.shape[0]
    n_iso = iso_tables.shape[0]
    m = n_fasc + n_iso
    n_even = table.shape[2]
    n_atoms = table.shape[0]
    n_dim = axes_n.shape[0]
    cols = np.zeros((m, n))
    pv = np.zeros((n_fasc, n, n_even))
    pd = np.zeros((n_fasc, n, n_even))
    pp = np.zeros((n_shells, n_even, n_even))
    proj_c = np.zeros((m, n_shells, n_even))
    g = np.zeros((m, m))
    b = np.zeros(m)
    x = np.zeros(m)
    work = (np.empty(m, dtype=np.int64), np.empty((m, m)), np.empty(m), np.empty((m, m)),
            np.empty(m))
    dirs = np.zeros((n_fasc, 3))
    z = np.zeros((n_fasc, n_dim))
    wiso = np.zeros(max(n_iso, 1))
    saved = np.zeros(n)
    norms = np.zeros((n_fasc, n_atoms))
    proj_yk = np.zeros((n_fasc, n_shells, n_even))
    fresh = np.zeros(n_fasc, dtype=np.bool_)
    wcoef = np.zeros((n_shells, n_even))
    wdcoef = np.zeros((max(n_dim, 1), n_shells, n_even))
    amax = iso_tables.shape[1]
    iso_norm = np.zeros((max(n_iso, 1), amax))
    iso_y = np.zeros((max(n_iso, 1), amax))
    yy = _dot(yv, yv)
    for j in range(n_iso):
        for a in range(iso_sizes[j]):
            iso_norm[j, a] = _dot(iso_tables[j, a], iso_tables[j, a])
            iso_y[j, a] = _dot(iso_tables[j, a], yv)
    for k in range(n_fasc):
        nrm = math.sqrt(u0[k, 0] ** 2 + u0[k, 1] ** 2 + u0[k, 2] ** 2)
        for c in range(3):
            dirs[k, c] = u0[k, c] / nrm
        _legendre_rows(grad, dirs[k], n_even, pv[k], pd[k])
        if warm:
            for d in range(n_dim):
                z[k, d] = min(max(z0[k, d], 0.0), axes_n[d] - 1.0)
            _interp(table, z[k], axes_n, strides, wcoef, wdcoef)
            _atom_signal(wcoef, pv[k], shell, cols[k])
        else:
            _atom_index_to_z(n_atoms // 2, axes_n, strides, z[k])
            _atom_signal(table[n_atoms // 2], pv[k], shell, cols[k])
    for j in range(n_iso):
        wiso[j] = float(iso_sizes[j] // 2)
        for i in range(n):
            cols[n_fasc + j, i] = iso_tables[j, iso_sizes[j] // 2, i]
    cost = _weights(yv, cols, m, g, b, x, work)
    # first round: coordinate descent over the discrete atoms until none changes (at
    # most first_passes passes); later rounds: one pass, an atom replacing a fascicle's
    # (or an isotropic compartment's) continuous one only when it lowers the residual
    changed_pass = False
    for rnd in range(max(rounds, 1)):
        changed = False
        searches = n_fasc * (max(first_passes, 1) if rnd == 0 else 1)
        if warm and rnd == 0:
            searches = 0
        for kk in range(searches):
            if rnd == 0 and kk > 0 and kk % n_fasc == 0 and not changed_pass:
                break
            if kk % n_fasc == 0:
                changed_pass = False
            k = kk % n_fasc
            if not fresh[k]:
                _direction_cache(yv, table, pv[k], shell, n_shells, pp, norms[k],
                                 proj_yk[k])
                fresh[k] = True
            a, c_best = _search_atoms(yv, cols, m, k, table, pv[k], norms[k], shell,
                                      n_shells, proj_yk[k], proj_c, g, b, x, work)
            if rnd == 0 or yy + c_best < cost * (1.0 - 1e-9):
                for i in range(n):
                    saved[i] = cols[k, i]
                _atom_signal(table[a], pv[k], shell, cols[k])
                new_cost = _weights(yv, cols, m, g, b, x, work)
                if rnd == 0 or new_cost < cost:
                    before = _z_index(z[k], axes_n, strides)
                    _atom_index_to_z(a, axes_n, strides, z[k])
                    cost = new_cost
                    changed = True
                    changed_pass = changed_pass or before != a
                else:
                    for i in range(n):
                        cols[k, i] = saved[i]
        for j in range(n_iso):
            c = n_fasc + j
            best_a, c_best = _search_iso(yv, cols, m, c, iso_tables[j], iso_sizes[j],
                                         iso_norm[j], iso_y[j], g, b, x, work)
            if rnd == 0 or yy + c_best < cost * (1.0 - 1e-9):
                changed = changed or float(best_a) != wiso[j]
                wiso[j] = float(best_a)
                for i in range(n):
                    cols[c, i] = iso_tables[j, best_a, i]
                cost = _weights(yv, cols, m, g, b, x, work)
        cost = _weights(yv, cols, m, g, b, x, work)
        if polish_iters <= 0 or (rnd > 0 and not changed) or cost > rss_gate:
            break
        cost = _polish_joint(yv, cols, m, n_fasc, mono, axes_n, strides, z, dirs, shell,
                             grad, iso_tables, iso_sizes, iso_cont, wiso, polish_iters, g,
                             b, x, work)
        if n_fasc > 1:  # more rounds only when two fascicles are close
            close = False
            for k in range(n_fasc):
                for q in range(k):
                    c = (dirs[k, 0] * dirs[q, 0] + dirs[k, 1] * dirs[q, 1]
                         + dirs[k, 2] * dirs[q, 2])
                    close = close or abs(c) > close_cos
            if not close:
                break
        for k in range(n_fasc):  # the search rounds work in the Legendre basis
            _legendre_rows(grad, dirs[k], n_even, pv[k], pd[k])
        fresh[:] = False
    rss = _weights(yv, cols, m, g, b, x, work)
    for k in range(n_fasc):
        for c in range(3):
            dirs_out[k, c] = dirs[k, c]
        for d in range(n_dim):
            z_out[k, d] = z[k, d]
    for j in range(n_iso):
        iso_out[j] = wiso[j]
    for c in range(m):
        w_out[c] = x[c]
    return rss


@parallel_kernel()
def fit_joint_kernel(y: np.ndarray, u0: np.ndarray, n_fasc: int, table: np.ndarray,
                     mono: np.ndarray, axes_n: np.ndarray, strides: np.ndarray,
                     iso_tables: np.ndarray, iso_sizes: np.ndarray, iso_cont: np.ndarray,
                     shell: np.ndarray,
                     n_shells: int, grad: np.ndarray, rounds: int, first_passes: int,
                     polish_iters: int, close_cos: float, rss_gate: np.ndarray,
                     warm: np.ndarray, z0: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fit every voxel of y (n, N) with ``n_fasc`` fascicles from directions u0
    (n, >= n_fasc, 3) (see :func:`_fit_voxel_joint`; ``table`` (A, S, E) the atoms'
    even Legendre coefficients, ``mono`` the same atoms' coefficients of
    ``(g . u)^(2j)``, see :func:`legendre_to_power`): fascicle grid coordinates
    (n, n_fasc, M), isotropic grid coordinates (n, I) (continuous where ``iso_cont``,
    else an atom index), directions (n, n_fasc, 3), NNLS weights (n, n_fasc + I) and the
    residual sum of squares (n,). ``rss_gate`` (n,): a voxel whose discrete fit has a
    larger residual sum of squares is not polished (``inf``: always polished).
    ``warm`` (n,) bool and ``z0`` (n, n_fasc, M): voxels that start from the atoms at
    grid coordinates z0 and go straight to the polish (no first discrete search)."""
    n = y.shape[0]
    n_iso = iso_tables.shape[0]
    m = n_fasc + n_iso
    zs = np.zeros((n, n_fasc, axes_n.shape[0]))
    iso = np.zeros((n, max(n_iso, 1)))
    dirs = np.zeros((n, max(n_fasc, 1), 3))
    weights = np.zeros((n, m))
    rss = np.zeros(n)
    for v in prange(n):
        rss[v] = _fit_voxel_joint(y[v], u0[v], n_fasc, table, mono, axes_n, strides,
                                  iso_tables, iso_sizes, iso_cont, shell, n_shells, grad, rounds,
                                  first_passes, polish_iters, close_cos, rss_gate[v], zs[v],
                                  iso[v], dirs[v], weights[v], warm[v], z0[v])
    return zs, iso, dirs, weights, rss
