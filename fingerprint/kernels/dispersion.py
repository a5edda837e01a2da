"""Numba kernels of the orientation and size distributions.

Exact orientation dispersion of axially symmetric kernels (Funk-Hecke)
----------------------------------------------------------------------
An axially symmetric compartment gives, for one measurement, a signal ``K(t)`` that depends
only on ``t = cos`` of the angle between the gradient and the compartment axis; ``K`` is
even in ``t``. Expanding ``K(t) = sum_l k_l P_l(t)`` (even ``l``) with

    k_l = (2l + 1) * integral_0^1 K(t) P_l(t) dt

and a rotationally symmetric orientation density ``W`` (axis ``mu``) with Legendre
coefficients ``a_l = 2 pi integral_{-1}^{1} W(t) P_l(t) dt`` (``a_0 = 1``), the
Funk-Hecke theorem gives the dispersed signal at a gradient ``g``:

    E(g) = sum_l k_l a_l P_l(g . mu).

``k_l`` is obtained by Gauss-Legendre quadrature of ``K`` on ``[0, 1]`` for each unique
(b, q, delta, Delta) of the scheme. Everything is per measurement: no spherical-harmonic
fit per shell.

Fast path (:func:`watson_dispersed_sum`, one fused kernel per batch): the Watson
coefficients ``a_l`` of ``W ~ exp(kappa t^2)`` come from a backward continued fraction of
their ratios (relative accuracy, ~20-50 divisions per atom); kernels common to every atom
are projected once, the others atom by atom onto the orders the atom needs; per atom and
unique measurement the series is cut where the absolute sum of the remaining terms (a
strict error bound, ``|P_l| <= 1``) falls below a tolerance, converted to a Chebyshev
series in ``x = 2 t^2 - 1`` (a perfectly conditioned change of basis) and summed by
Clenshaw, vectorised over the measurements of that unique row.
:func:`watson_legendre_coefficients` (Gauss-Legendre quadrature) and
:func:`dispersed_legendre_sum` remain as the plain reference computations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numba
import numpy as np

from fingerprint.kernels import gauss_legendre_unit, njit, prange, run_large

__all__ = [
    "chebyshev_from_legendre_even",
    "dispersed_legendre_sum",
    "gauss_legendre_unit",
    "significant_terms",
    "legendre_even_matrix",
    "watson_dispersed_sum",
    "watson_legendre_coefficients",
    "watson_order",
]

#: below this many inner operations a kernel runs on the calling thread only (launching
#: the parallel team costs milliseconds on a busy machine)
SERIAL_WORK = 200_000


def run_kernel(parallel: Callable[..., Any], serial: Callable[..., Any], work: float,
               *args: Any) -> None:
    """Run ``serial(*args)`` for small ``work``, else through
    :func:`fingerprint.kernels.run_large` (parallel once its compiled code is at hand or a
    serial run proved slow); parallel launches go through
    :func:`fingerprint.kernels.run_parallel` (serialised by the package-wide lock when
    numba's threading layer is ``workqueue``, the only layer that is not safe for
    concurrent launches from several threads)."""
    if work < SERIAL_WORK or numba.get_num_threads() == 1:
        serial(*args)
        return
    run_large(parallel, serial, *args)


@njit(cache=True)
def _legendre_even_row(t: float, n_even: int, out: np.ndarray) -> None:
    """P_0, P_2, ..., P_{2(n_even-1)} at t (three-term recurrence)."""
    p_prev = 1.0  # P_0
    p_cur = t  # P_1
    out[0] = 1.0
    l_max = 2 * (n_even - 1)
    for l in range(1, l_max):
        p_next = ((2 * l + 1) * t * p_cur - l * p_prev) / (l + 1)
        p_prev = p_cur
        p_cur = p_next
        if (l + 1) % 2 == 0:
            out[(l + 1) // 2] = p_cur


@njit(cache=True)
def _legendre_even_matrix(t: np.ndarray, n_even: int) -> np.ndarray:
    out = np.empty((t.shape[0], n_even))
    row = np.empty(n_even)
    for i in range(t.shape[0]):
        _legendre_even_row(t[i], n_even, row)
        for k in range(n_even):
            out[i, k] = row[k]
    return out


def legendre_even_matrix(t: np.ndarray, l_max: int) -> np.ndarray:
    """``P_l(t)`` for even ``l = 0, 2, ..., l_max``: array (len(t), l_max/2 + 1)."""
    return _legendre_even_matrix(np.ascontiguousarray(t, dtype=np.float64), l_max // 2 + 1)


@njit(cache=True)
def _watson_row(i: int, kappa: np.ndarray, nodes: np.ndarray, weights: np.ndarray,
                pmat: np.ndarray, out: np.ndarray) -> None:
    q, n_even = pmat.shape
    k = kappa[i]
    norm = 0.0
    w = np.empty(q)
    for j in range(q):
        # exp(kappa (t^2 - 1)) keeps large kappa finite; the factor cancels.
        w[j] = weights[j] * np.exp(k * (nodes[j] * nodes[j] - 1.0))
        norm += w[j]
    for m in range(n_even):
        s = 0.0
        for j in range(q):
            s += w[j] * pmat[j, m]
        out[i, m] = s / norm


@njit(cache=True, parallel=True)
def _watson_parallel(kappa: np.ndarray, nodes: np.ndarray, weights: np.ndarray,
                     pmat: np.ndarray, out: np.ndarray) -> None:
    for i in prange(kappa.shape[0]):
        _watson_row(i, kappa, nodes, weights, pmat, out)


@njit(cache=True)
def _watson_serial(kappa: np.ndarray, nodes: np.ndarray, weights: np.ndarray,
                   pmat: np.ndarray, out: np.ndarray) -> None:
    for i in range(kappa.shape[0]):
        _watson_row(i, kappa, nodes, weights, pmat, out)


def watson_quadrature_size(l_max: int, kappa_max: float) -> int:
    """Gauss-Legendre nodes on [0, 1] needed for the Watson coefficients."""
    return int(max(96, l_max + 64, 6.0 * np.sqrt(max(kappa_max, 0.0)) + l_max))


def watson_legendre_coefficients(kappa: np.ndarray, l_max: int) -> np.ndarray:
    """Legendre coefficients ``a_0 = 1, a_2, ..., a_{l_max}`` of Watson densities.

    ``a_l = integral exp(kappa t^2) P_l(t) dt / integral exp(kappa t^2) dt`` over
    ``[-1, 1]`` for every ``kappa`` (n,) (dimensionless, >= 0). Returns (n, l_max/2 + 1).
    """
    kappa = np.ascontiguousarray(kappa, dtype=np.float64).ravel()
    kmax = float(np.max(kappa)) if kappa.size else 0.0
    nodes, weights = gauss_legendre_unit(watson_quadrature_size(l_max, kmax))
    pmat = legendre_even_matrix(nodes, l_max)
    out = np.empty((kappa.shape[0], pmat.shape[1]))
    run_kernel(_watson_parallel, _watson_serial, kappa.size * pmat.size, kappa, nodes,
               weights, pmat, out)
    return out


def watson_order(kappa_max: float, tolerance: float = 1e-9, cap: int = 400) -> int:
    """Smallest even order ``L`` with ``(2l + 1) a_l < tolerance`` for every even
    ``l > L`` at concentration ``kappa_max`` (coefficients decrease with ``l`` and increase
    with ``kappa``, so it serves every smaller ``kappa`` too)."""
    kappa_max = float(max(kappa_max, 0.0))
    # heat-kernel estimate a_l ~ exp(-l(l+1) / (2 kappa)) gives a starting guess
    guess = int(np.sqrt(2.0 * kappa_max * (np.log(1.0 / tolerance) + 6.0))) + 8
    l_try = min(cap, max(8, guess + guess % 2))
    while True:
        coeffs = watson_legendre_coefficients(np.array([kappa_max]), l_try)[0]
        ls = np.arange(0, l_try + 1, 2)
        small = np.abs(coeffs) * (2 * ls + 1) < tolerance
        if small[-1] or l_try >= cap:
            # last even l above which every coefficient is negligible
            big = np.nonzero(~small)[0]
            last = int(ls[big[-1]]) if big.size else 0
            return int(min(cap, max(2, last + 2)))
        l_try = min(cap, 2 * l_try)


@njit(cache=True)
def _dispersed_row(i: int, coeffs: np.ndarray, cosines: np.ndarray, inverse: np.ndarray,
                   n_terms: np.ndarray, rec_a: np.ndarray, rec_b: np.ndarray,
                   out: np.ndarray) -> None:
    terms = n_terms[i]
    for j in range(cosines.shape[1]):
        t = cosines[i, j]
        if t > 1.0:
            t = 1.0
        elif t < -1.0:
            t = -1.0
        u = inverse[j]
        s = coeffs[i, u, 0]
        p_even = 1.0  # P_{2m-2}
        p_odd = t  # P_{2m-1}
        for m in range(1, terms):
            l_odd = 2 * m - 1
            p_even = rec_a[l_odd] * t * p_odd - rec_b[l_odd] * p_even  # P_{2m}
            s += coeffs[i, u, m] * p_even
            p_odd = rec_a[l_odd + 1] * t * p_even - rec_b[l_odd + 1] * p_odd  # P_{2m+1}
        out[i, j] = s


@njit(cache=True, parallel=True)
def _dispersed_parallel(coeffs: np.ndarray, cosines: np.ndarray, inverse: np.ndarray,
                        n_terms: np.ndarray, rec_a: np.ndarray, rec_b: np.ndarray,
                        out: np.ndarray) -> None:
    for i in prange(cosines.shape[0]):
        _dispersed_row(i, coeffs, cosines, inverse, n_terms, rec_a, rec_b, out)


@njit(cache=True)
def _dispersed_serial(coeffs: np.ndarray, cosines: np.ndarray, inverse: np.ndarray,
                      n_terms: np.ndarray, rec_a: np.ndarray, rec_b: np.ndarray,
                      out: np.ndarray) -> None:
    for i in range(cosines.shape[0]):
        _dispersed_row(i, coeffs, cosines, inverse, n_terms, rec_a, rec_b, out)


def dispersed_legendre_sum(coeffs: np.ndarray, cosines: np.ndarray, inverse: np.ndarray,
                           n_terms: np.ndarray | None = None) -> np.ndarray:
    """``E[i, j] = sum_m coeffs[i, inverse[j], m] P_{2m}(cosines[i, j])``.

    coeffs (n, U, L2): combined kernel x distribution coefficients per unique measurement;
    cosines (n, N); inverse (N,) unique-measurement index of each measurement; n_terms
    (n,) number of even terms to sum per row (default all). Returns (n, N).
    """
    coeffs = np.ascontiguousarray(coeffs, dtype=np.float64)
    n_even = coeffs.shape[2]
    if n_terms is None:
        n_terms = np.full(coeffs.shape[0], n_even, dtype=np.int64)
    n_terms = np.clip(np.ascontiguousarray(n_terms, dtype=np.int64), 1, n_even)
    ls = np.arange(2 * n_even + 1, dtype=np.float64)
    rec_a = (2.0 * ls + 1.0) / (ls + 1.0)  # P_{l+1} = a_l t P_l - b_l P_{l-1}
    rec_b = ls / (ls + 1.0)
    cosines = np.ascontiguousarray(cosines, dtype=np.float64)
    out = np.empty(cosines.shape)
    run_kernel(_dispersed_parallel, _dispersed_serial, cosines.size * float(n_terms.mean()),
               coeffs, cosines, np.ascontiguousarray(inverse, dtype=np.int64), n_terms, rec_a,
               rec_b, out)
    return out


def significant_terms(coeffs: np.ndarray, tolerance: float) -> np.ndarray:
    """Per row of Legendre coefficients (n, L2) of even orders, the number of leading
    terms after which every ``(2l + 1) |a_l|`` is below ``tolerance``."""
    ls = 2.0 * np.arange(coeffs.shape[1])
    big = np.abs(coeffs) * (2.0 * ls + 1.0) >= tolerance
    last = coeffs.shape[1] - 1 - np.argmax(big[:, ::-1], axis=1)
    return np.where(big.any(axis=1), last + 1, 1).astype(np.int64)


@njit(cache=True)
def _cosines_row(i: int, directions: np.ndarray, axes: np.ndarray, out: np.ndarray) -> None:
    ax, ay, az = axes[i, 0], axes[i, 1], axes[i, 2]
    for j in range(directions.shape[0]):
        out[i, j] = directions[j, 0] * ax + directions[j, 1] * ay + directions[j, 2] * az


@njit(cache=True, parallel=True)
def _cosines_parallel(directions: np.ndarray, axes: np.ndarray, out: np.ndarray) -> None:
    for i in prange(axes.shape[0]):
        _cosines_row(i, directions, axes, out)


@njit(cache=True)
def _cosines_serial(directions: np.ndarray, axes: np.ndarray, out: np.ndarray) -> None:
    for i in range(axes.shape[0]):
        _cosines_row(i, directions, axes, out)


@njit(cache=True)
def _node_sum_row(i: int, values: np.ndarray, weights: np.ndarray, n_nodes: int,
                  out: np.ndarray) -> None:
    m = out.shape[1]
    for j in range(m):
        out[i, j] = 0.0
    for k in range(n_nodes):
        w = weights[i, k]
        base = k * m
        for j in range(m):
            out[i, j] += w * values[i, base + j]


@njit(cache=True, parallel=True)
def _node_sum_parallel(values: np.ndarray, weights: np.ndarray, n_nodes: int,
                       out: np.ndarray) -> None:
    for i in prange(values.shape[0]):
        _node_sum_row(i, values, weights, n_nodes, out)


@njit(cache=True)
def _node_sum_serial(values: np.ndarray, weights: np.ndarray, n_nodes: int,
                     out: np.ndarray) -> None:
    for i in range(values.shape[0]):
        _node_sum_row(i, values, weights, n_nodes, out)


def cosines_to_axes(directions: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Cosines (n, N) between directions (N, 3) and unit axes (n, 3)."""
    directions = np.ascontiguousarray(directions, dtype=np.float64)
    axes = np.ascontiguousarray(axes, dtype=np.float64)
    out = np.empty((axes.shape[0], directions.shape[0]))
    run_kernel(_cosines_parallel, _cosines_serial, out.size, directions, axes, out)
    return out


def weighted_node_sum(values: np.ndarray, weights: np.ndarray, n_nodes: int) -> np.ndarray:
    """Sum over quadrature nodes: values (n, K*N) node-major per row (column k*N + j),
    weights (n, K) -> (n, N)."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    out = np.empty((values.shape[0], values.shape[1] // int(n_nodes)))
    run_kernel(_node_sum_parallel, _node_sum_serial, values.size, values,
               np.ascontiguousarray(weights, dtype=np.float64), int(n_nodes), out)
    return out


# --------------------------------------------------------------------------- fused Watson sum
@lru_cache(maxsize=64)
def chebyshev_from_legendre_even(n_even: int) -> np.ndarray:
    """Change of basis of even Legendre series to Chebyshev series in ``x = 2 t^2 - 1``.

    Row ``m`` holds the coefficients ``M[m, k]`` of ``P_{2m}(t) = sum_k M[m, k] T_k(x)``
    (``T_k(2 t^2 - 1) = T_{2k}(t)``), zero for ``k > m``; shape (n_even, n_even),
    read-only. From ``P_n(cos th) = sum_k L_k L_{n-k} cos((n - 2k) th)`` with
    ``L_k = binom(2k, k) / 4^k``: ``M[m, 0] = L_m^2``, ``M[m, k] = 2 L_{m-k} L_{m+k}``.
    The entries are positive and every row sums to ``P_{2m}(1) = 1`` (perfectly
    conditioned conversion).
    """
    n_even = int(n_even)
    lam = np.ones(2 * n_even)
    for k in range(1, lam.size):
        lam[k] = lam[k - 1] * (2 * k - 1) / (2 * k)
    out = np.zeros((n_even, n_even))
    for m in range(n_even):
        out[m, 0] = lam[m] * lam[m]
        ks = np.arange(1, m + 1)
        out[m, 1:m + 1] = 2.0 * lam[m - ks] * lam[m + ks]
    out.setflags(write=False)
    return out


def watson_recurrence_start(kappa: float) -> int:
    """Even order where the backward continued fraction of the Watson coefficient ratios
    starts (``a_l`` is below 1e-16 of its converged value's scale well before; checked
    against a start at order 800 for ``kappa`` up to 300)."""
    start = int(30.0 + 12.0 * np.sqrt(max(float(kappa), 0.0)))
    return start + start % 2


@lru_cache(maxsize=16)
def watson_recurrence_terms(start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Coefficients ``(alpha_l, beta_l, gamma_l)`` indexed by ``l / 2`` (even ``l`` from 2
    to ``start``) of the ratio recurrence
    ``r_l = a_l / a_{l-2} = kappa / (alpha_l + kappa (beta_l + gamma_l r_{l+2}))``
    of the Watson Legendre coefficients, from the three-term relation that the Legendre
    equation and ``d/dt exp(kappa t^2) = 2 kappa t exp(kappa t^2)`` give for
    ``I_l = integral_{-1}^{1} exp(kappa t^2) P_l(t) dt``."""
    l = np.arange(0, int(start) + 1, 2, dtype=np.float64)
    lm1 = np.where(l > 1, l - 1.0, 1.0)
    alpha = (2 * l + 1) * (2 * l - 1) / (2 * lm1)
    beta = (l + 1) * (2 * l - 1) / ((2 * l + 3) * lm1) - l / lm1
    gamma = (l + 2) * (2 * l - 1) / ((2 * l + 3) * lm1)
    for arr in (alpha, beta, gamma):
        arr[0] = 0.0  # l = 0 unused
        arr.setflags(write=False)
    return alpha, beta, gamma


@njit(cache=True, nogil=True)
def _watson_ratios(k: float, alpha: np.ndarray, beta: np.ndarray, gamma: np.ndarray,
                   a: np.ndarray) -> int:
    """Watson coefficients a_0 = 1, a_2, ... into ``a`` (n_even,) by the backward continued
    fraction of their ratios; returns the number of leading coefficients with
    ``(4m + 1) a_m`` above 1e-17 (the rest are set to 0)."""
    n_even = a.shape[0]
    start = int(30.0 + 12.0 * math.sqrt(max(k, 0.0)))
    start = min(start + start % 2, 2 * (alpha.shape[0] - 1))
    for m in range(n_even):
        a[m] = 0.0
    r = 0.0
    for h in range(start // 2, 0, -1):
        r = k / (alpha[h] + k * (beta[h] + gamma[h] * r))
        if h < n_even:
            a[h] = r
    a[0] = 1.0
    n_a = 1
    for m in range(1, n_even):
        a[m] *= a[m - 1]
        if a[m] * (4 * m + 1) > 1e-17:
            n_a = m + 1
    for m in range(n_a, n_even):
        a[m] = 0.0
    return n_a


@njit(cache=True, nogil=True)
def _watson_sum_block(start: int, stop: int, kvals: np.ndarray, kweights: np.ndarray,
                      proj: np.ndarray, scoef: np.ndarray, sweights: np.ndarray,
                      kappa: np.ndarray, axes: np.ndarray, dx: np.ndarray, dy: np.ndarray,
                      dz: np.ndarray, order: np.ndarray, starts: np.ndarray,
                      alpha: np.ndarray, beta: np.ndarray, gamma: np.ndarray,
                      cheb: np.ndarray, tolerance: float, out: np.ndarray) -> None:
    """Rows ``start:stop`` of :func:`watson_dispersed_sum` (see there)."""
    q_nodes, n_even = proj.shape
    n_shared = scoef.shape[0]
    n_groups = starts.shape[0] - 1
    has_values = kvals.shape[0] > 0
    g_max = 1
    for u in range(n_groups):
        g_max = max(g_max, starts[u + 1] - starts[u])
    a = np.empty(n_even)
    c = np.empty(n_even)
    d = np.empty(n_even)
    y = np.empty(g_max)
    b1 = np.empty(g_max)
    b2 = np.empty(g_max)
    for i in range(start, stop):
        n_a = _watson_ratios(kappa[i], alpha, beta, gamma, a)
        ax = axes[i, 0]
        ay = axes[i, 1]
        az = axes[i, 2]
        for u in range(n_groups):
            # kernel Legendre coefficients of this unique measurement (orders with a
            # non-negligible Watson coefficient only): shared ones plus the projection of
            # this atom's kernel values at the Gauss-Legendre nodes
            for m in range(n_a):
                c[m] = 0.0
            for s in range(n_shared):
                f = sweights[i, s]
                for m in range(n_a):
                    c[m] += f * scoef[s, u, m]
            if has_values:
                f = kweights[i]
                base = u * q_nodes
                for q in range(q_nodes):
                    v = f * kvals[i, base + q]
                    for m in range(n_a):
                        c[m] += v * proj[q, m]
            # Funk-Hecke: times the Watson coefficients
            for m in range(n_a):
                c[m] *= a[m]
            # drop the trailing terms whose absolute sum (a bound on their contribution,
            # |P_l| <= 1) stays below the tolerance
            n_t = n_a
            tail = 0.0
            while n_t > 1 and tail + abs(c[n_t - 1]) <= tolerance:
                tail += abs(c[n_t - 1])
                n_t -= 1
            # Chebyshev coefficients in x = 2 t^2 - 1 of the truncated series
            for kk in range(n_t):
                d[kk] = 0.0
            for m in range(n_t):
                cm = c[m]
                for kk in range(m + 1):
                    d[kk] += cm * cheb[m, kk]
            g0 = starts[u]
            g = starts[u + 1] - g0
            if n_t == 1:
                for j in range(g):
                    out[i, order[g0 + j]] = d[0]
                continue
            for j in range(g):
                t = dx[g0 + j] * ax + dy[g0 + j] * ay + dz[g0 + j] * az
                t = min(max(t, -1.0), 1.0)
                y[j] = 4.0 * t * t - 2.0  # 2 x
                b1[j] = d[n_t - 1]
                b2[j] = 0.0
            # Clenshaw: b_k = d_k + 2 x b_{k+1} - b_{k+2}; f = d_0 + x b_1 - b_2
            for kk in range(n_t - 2, 0, -1):
                dk = d[kk]
                for j in range(g):
                    bn = dk + y[j] * b1[j] - b2[j]
                    b2[j] = b1[j]
                    b1[j] = bn
            d0 = d[0]
            for j in range(g):
                out[i, order[g0 + j]] = d0 + 0.5 * y[j] * b1[j] - b2[j]


@njit(cache=True, parallel=True)
def _watson_sum_parallel(chunk: int, kvals: np.ndarray, kweights: np.ndarray,
                         proj: np.ndarray, scoef: np.ndarray, sweights: np.ndarray,
                         kappa: np.ndarray, axes: np.ndarray, dx: np.ndarray,
                         dy: np.ndarray, dz: np.ndarray, order: np.ndarray,
                         starts: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                         gamma: np.ndarray, cheb: np.ndarray, tolerance: float,
                         out: np.ndarray) -> None:
    n = kappa.shape[0]
    n_chunks = (n + chunk - 1) // chunk
    for ch in prange(n_chunks):
        _watson_sum_block(ch * chunk, min(n, (ch + 1) * chunk), kvals, kweights, proj, scoef,
                          sweights, kappa, axes, dx, dy, dz, order, starts, alpha, beta,
                          gamma, cheb, tolerance, out)


@njit(cache=True)
def _watson_sum_serial(chunk: int, kvals: np.ndarray, kweights: np.ndarray,
                       proj: np.ndarray, scoef: np.ndarray, sweights: np.ndarray,
                       kappa: np.ndarray, axes: np.ndarray, dx: np.ndarray,
                       dy: np.ndarray, dz: np.ndarray, order: np.ndarray,
                       starts: np.ndarray, alpha: np.ndarray, beta: np.ndarray,
                       gamma: np.ndarray, cheb: np.ndarray, tolerance: float,
                       out: np.ndarray) -> None:
    _watson_sum_block(0, kappa.shape[0], kvals, kweights, proj, scoef, sweights, kappa, axes,
                      dx, dy, dz, order, starts, alpha, beta, gamma, cheb, tolerance, out)


#: atoms per parallel task of the fused Watson sum (scratch buffers are per task)
_WATSON_CHUNK = 256


def watson_dispersed_sum(kappa: np.ndarray, axes: np.ndarray, directions: np.ndarray,
                         inverse: np.ndarray, projection: np.ndarray, *,
                         kernel_values: np.ndarray | None = None,
                         kernel_weights: np.ndarray | None = None,
                         shared_coefficients: np.ndarray | None = None,
                         shared_weights: np.ndarray | None = None,
                         tolerance: float = 1e-10,
                         out: np.ndarray | None = None) -> np.ndarray:
    """Watson-dispersed signals of axially symmetric kernels (Funk-Hecke), fused.

    ``E[i, j] = sum_m k[i, inverse[j], m] a_m(kappa[i]) P_{2m}(directions[j] . axes[i])``
    where ``a_m`` are the Watson coefficients (:func:`watson_legendre_coefficients`,
    computed in the kernel) and the even Legendre coefficients ``k`` of the kernels per
    unique measurement ``u`` are

    ``k[i, u, :] = kernel_weights[i] * kernel_values[i, u*Q:(u+1)*Q] @ projection
    + sum_s shared_weights[i, s] * shared_coefficients[s, u, :]``.

    kappa (n,) Watson concentrations (>= 0); axes (n, 3) unit distribution axes;
    directions (N, 3) gradient directions; inverse (N,) unique-measurement index of each
    measurement; projection (Q, L2): kernel values at Q nodes -> even Legendre
    coefficients (with the ``(4m + 1)`` factor); kernel_values (n, U*Q) this atom's kernel
    at the nodes of each unique measurement (unique-major), kernel_weights (n,);
    shared_coefficients (S, U, L2) kernels common to every atom, shared_weights (n, S).

    Per atom and unique measurement, trailing terms whose absolute sum is below
    ``tolerance`` are dropped (a strict bound on the change of the signal since
    ``|P_l| <= 1``); the rest is summed as a Chebyshev series in ``2 t^2 - 1`` (Clenshaw),
    vectorised over the measurements of each unique row. Returns ``out`` (n, N).
    """
    kappa = np.ascontiguousarray(kappa, dtype=np.float64).ravel()
    n = kappa.shape[0]
    proj = np.ascontiguousarray(projection, dtype=np.float64)
    q_nodes, n_even = proj.shape
    inverse = np.ascontiguousarray(inverse, dtype=np.int64)
    directions = np.asarray(directions, dtype=np.float64)
    n_unique = int(inverse.max()) + 1 if inverse.size else 0
    if kernel_values is None:
        kvals = np.zeros((0, n_unique * q_nodes))
        kweights = np.zeros(n)
    else:
        kvals = np.ascontiguousarray(kernel_values, dtype=np.float64)
        kweights = (np.ones(n) if kernel_weights is None
                    else np.ascontiguousarray(kernel_weights, dtype=np.float64))
    if shared_coefficients is None:
        scoef = np.zeros((0, n_unique, n_even))
        sweights = np.zeros((n, 0))
    else:
        scoef = np.ascontiguousarray(shared_coefficients, dtype=np.float64)
        sweights = np.ascontiguousarray(shared_weights, dtype=np.float64)
    if kvals.shape[1] != n_unique * q_nodes or scoef.shape[1:] != (n_unique, n_even):
        raise ValueError("watson_dispersed_sum: kernel arrays do not match the unique "
                         "measurements and the projection")
    if out is None:
        out = np.empty((n, directions.shape[0]))
    if n == 0:
        return out
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    starts = np.searchsorted(inverse[order], np.arange(n_unique + 1)).astype(np.int64)
    dirs = directions[order]
    alpha, beta, gamma = watson_recurrence_terms(
        watson_recurrence_start(float(np.max(kappa))))
    work = n * directions.shape[0] * 8.0
    run_kernel(_watson_sum_parallel, _watson_sum_serial, work, _WATSON_CHUNK, kvals,
               kweights, proj, scoef, sweights, kappa,
               np.ascontiguousarray(axes, dtype=np.float64),
               np.ascontiguousarray(dirs[:, 0]), np.ascontiguousarray(dirs[:, 1]),
               np.ascontiguousarray(dirs[:, 2]), order, starts, alpha, beta, gamma,
               chebyshev_from_legendre_even(n_even), float(tolerance), out)
    return out
