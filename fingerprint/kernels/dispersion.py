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
(b, q, delta, Delta) of the scheme; ``a_l`` of the Watson density
``W ~ exp(kappa t^2)`` by Gauss-Legendre quadrature too. Everything is per measurement:
no spherical-harmonic fit per shell.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import numba
import numpy as np

from fingerprint.kernels import njit, prange

__all__ = [
    "dispersed_legendre_sum",
    "gauss_legendre_unit",
    "significant_terms",
    "legendre_even_matrix",
    "watson_legendre_coefficients",
    "watson_order",
]


_LOCK = threading.Lock()
#: below this many inner operations a kernel runs on the calling thread only (launching
#: the parallel team costs milliseconds on a busy machine)
SERIAL_WORK = 200_000


def run_kernel(parallel: Callable[..., Any], serial: Callable[..., Any], work: float,
               *args: Any) -> None:
    """Run ``serial(*args)`` for small ``work``, else ``parallel(*args)``; parallel
    launches are serialised when numba's threading layer is ``workqueue`` (the only layer
    that is not safe for concurrent launches from several threads)."""
    if work < SERIAL_WORK:
        serial(*args)
        return
    try:
        layer = numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        layer = "unknown"
    if layer in ("workqueue", "unknown"):
        with _LOCK:
            parallel(*args)
        return
    parallel(*args)


@lru_cache(maxsize=64)
def gauss_legendre_unit(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes and weights on ``[0, 1]`` (``n`` nodes, read-only)."""
    x, w = np.polynomial.legendre.leggauss(int(n))
    nodes = 0.5 * (x + 1.0)
    weights = 0.5 * w
    nodes.setflags(write=False)
    weights.setflags(write=False)
    return nodes, weights


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
