"""Numba kernels of the compartment signals (SI units throughout).

Every kernel fills ``out`` of shape ``(n, M)``: ``n`` parameter sets (atoms) by ``M``
measurements, parallel over atoms; each has a serial twin (``kernel.serial``) for small
batches, chosen by :func:`fingerprint.kernels.run_kernel`. Per-measurement inputs are
``(M,)`` arrays, per-atom parameters ``(n,)`` arrays. ``cos`` holds the cosine between
gradient and compartment axis, either per atom ``(n, M)`` or shared by all atoms ``(1, M)``.

Timing-dependent kernels receive the distinct timings of the measurements (``T`` of them)
and, per measurement, the index of its timing, so that per-atom sums over roots are
evaluated once per timing rather than once per measurement.

Notation: ``b`` b-value (s/m²), ``q`` q-value (1/m), ``gG`` = gyromagnetic ratio x
gradient strength = 2 pi q / delta (rad s⁻¹ m⁻¹), ``delta``/``Delta`` pulse duration and
separation (s), ``tau = Delta - delta / 3`` (s), diffusivities in m²/s, diameters in m.
"""

from __future__ import annotations

import math

import numpy as np

from fingerprint.kernels import njit, parallel_kernel, prange

__all__ = [
    "axisymmetric_gaussian_spherical_mean",
    "ball_signal",
    "bessel_j1",
    "bessel_jn_array",
    "cylinder_callaghan_signal",
    "cylinder_gaussian_phase_signal",
    "cylinder_stejskal_tanner_signal",
    "dawson",
    "fast_exp",
    "gather_columns",
    "sphere_gaussian_phase_signal",
    "sphere_stejskal_tanner_signal",
    "stick_signal",
    "temporal_zeppelin_signal",
    "zeppelin_signal",
]

_TWO_PI = 2.0 * math.pi
_SQRT_PI = math.sqrt(math.pi)
_INV_SQRT_PI = 1.0 / math.sqrt(math.pi)


# --------------------------------------------------------------------------- special functions
@njit(cache=True, nogil=True)
def _miller_start(x: float, nmax: int) -> int:
    """Even starting order of the backward recurrence for J_0..J_nmax at x."""
    n = max(nmax, int(x)) + 1
    start = n + int(math.sqrt(40.0 * n)) + 10
    return start + (start % 2)


@njit(cache=True, nogil=True)
def bessel_jn_array(x: float, out: np.ndarray) -> None:
    """Bessel functions J_0(x)..J_{K-1}(x) of the first kind into ``out`` (K,), x >= 0.

    Miller's backward recurrence normalised by J_0 + 2 sum_k J_2k = 1 (accurate to a few
    ulps for any x >= 0).
    """
    nmax = out.shape[0] - 1
    if x == 0.0:
        out[:] = 0.0
        out[0] = 1.0
        return
    start = _miller_start(x, nmax)
    two_over_x = 2.0 / x
    j_next = 0.0  # J_{k+1}
    j = 1.0e-300  # J_k at k = start (arbitrary scale)
    total = 2.0 * j  # start is even
    for k in range(start, 0, -1):
        j_prev = k * two_over_x * j - j_next  # J_{k-1}
        j_next = j
        j = j_prev
        if abs(j) > 1.0e250:
            j *= 1.0e-250
            j_next *= 1.0e-250
            total *= 1.0e-250
            for m in range(k, nmax + 1):
                out[m] *= 1.0e-250
        kk = k - 1
        if kk <= nmax:
            out[kk] = j
        if kk > 0 and kk % 2 == 0:
            total += 2.0 * j
    total += j
    scale = 1.0 / total
    for m in range(nmax + 1):
        out[m] *= scale


@njit(cache=True, nogil=True)
def bessel_j1(x: float) -> float:
    """Bessel function J_1(x) for x >= 0 (Miller's recurrence, no allocation)."""
    if x == 0.0:
        return 0.0
    start = _miller_start(x, 1)
    two_over_x = 2.0 / x
    j_next = 0.0
    j = 1.0e-300
    total = 2.0 * j
    j1 = 0.0
    for k in range(start, 0, -1):
        j_prev = k * two_over_x * j - j_next
        j_next = j
        j = j_prev
        if abs(j) > 1.0e250:
            j *= 1.0e-250
            j_next *= 1.0e-250
            total *= 1.0e-250
            j1 *= 1.0e-250
        kk = k - 1
        if kk == 1:
            j1 = j
        if kk > 0 and kk % 2 == 0:
            total += 2.0 * j
    total += j
    return j1 / total


@njit(cache=True, nogil=True)
def dawson(x: float) -> float:
    """Dawson's integral F(x) = exp(-x²) int_0^x exp(t²) dt, x >= 0 (Rybicki, h = 0.2)."""
    if x < 0.2:
        # Maclaurin series sum_n (-2x²)^n x / (1 3 5 ... (2n+1))
        x2 = x * x
        term = x
        total = x
        for k in range(1, 40):
            term *= -2.0 * x2 / (2 * k + 1)
            total += term
            if abs(term) < 1e-17 * abs(total):
                break
        return total
    h = 0.2
    # F(x) = lim_{h->0} 1/sqrt(pi) sum_{n odd} exp(-(x - n h)²) / n, error ~ exp(-(pi/2h)²)
    n_lo = int(math.floor((x - 8.0) / h))
    n_hi = int(math.ceil((x + 8.0) / h))
    total = 0.0
    for n in range(n_lo, n_hi + 1):
        if n % 2 == 0:
            continue
        d = x - n * h
        total += math.exp(-d * d) / n
    # odd n < n_lo (negative side) are below 1e-27 relative: the window covers |x - nh| < 8
    return total * _INV_SQRT_PI


@njit(cache=True, nogil=True)
def _erf_ratio(x2: float) -> float:
    """sqrt(pi) erf(x) / (2 x) with x = sqrt(x2), x2 >= 0 (1 at x = 0)."""
    if x2 <= 0.0:
        return 1.0
    x = math.sqrt(x2)
    return _SQRT_PI * math.erf(x) / (2.0 * x)


@njit(cache=True, nogil=True)
def _dawson_ratio(x2: float) -> float:
    """F(x) / x with x = sqrt(x2) (1 at x = 0), F Dawson's integral."""
    if x2 < 1e-12:
        return 1.0 - 2.0 * x2 / 3.0
    x = math.sqrt(x2)
    return dawson(x) / x


# --------------------------------------------------------------------------- exponential
_LOG2E = 1.4426950408889634
_LN2_HI = 6.93147180369123816490e-01  # ln 2 split for an exact reduction (Cody-Waite)
_LN2_LO = 1.90821492927058770002e-10
_EXP2_OFFSET = 1100
#: 2**k for k in [-1100, 1100] (0 below the subnormals, inf above the largest double).
with np.errstate(over="ignore", under="ignore"):
    _EXP2_TABLE = np.ldexp(1.0, np.arange(-_EXP2_OFFSET, _EXP2_OFFSET + 1))


@njit(cache=True, nogil=True, inline="always")
def fast_exp(x: float) -> float:
    """exp(x) to ~1 ulp, written so that loops calling it vectorise (no libm call).

    x = k ln2 + r with |r| <= ln2 / 2; e^r by its degree-13 Taylor polynomial (truncation
    below 1e-17); 2^k from a table. Underflows to 0, overflows to inf, NaN propagates.
    """
    xc = min(max(x, -750.0), 750.0)
    k = math.floor(xc * _LOG2E + 0.5)
    r = (xc - k * _LN2_HI) - k * _LN2_LO
    p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (
        1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0 + r * (1.0 / 40320.0 + r * (
            1.0 / 362880.0 + r * (1.0 / 3628800.0 + r * (1.0 / 39916800.0 + r * (
                1.0 / 479001600.0 + r * (1.0 / 6227020800.0)))))))))))))
    y = (p * _EXP2_TABLE[np.int64(k) + _EXP2_OFFSET - 1]) * 2.0  # 2^(k-1): no overflow at k=1024
    return y if x == x else x


# --------------------------------------------------------------------------- Gaussian
@parallel_kernel(error_model="numpy")
def stick_signal(b: np.ndarray, cos: np.ndarray, lambda_par: np.ndarray,
                 out: np.ndarray) -> None:
    """Stick: exp(-b lambda_par u²)."""
    n, m = out.shape
    stride = 0 if cos.shape[0] == 1 else 1
    for i in prange(n):
        ci = i * stride
        lp = lambda_par[i]
        for j in range(m):
            u = cos[ci, j]
            out[i, j] = fast_exp(-b[j] * lp * u * u)


@parallel_kernel(error_model="numpy")
def zeppelin_signal(b: np.ndarray, cos: np.ndarray, lambda_par: np.ndarray,
                    lambda_perp: np.ndarray, out: np.ndarray) -> None:
    """Zeppelin: exp(-b (lambda_par u² + lambda_perp (1 - u²)))."""
    n, m = out.shape
    stride = 0 if cos.shape[0] == 1 else 1
    for i in prange(n):
        ci = i * stride
        lp = lambda_par[i]
        lq = lambda_perp[i]
        d = lp - lq
        for j in range(m):
            u = cos[ci, j]
            out[i, j] = fast_exp(-b[j] * (lq + d * u * u))


@parallel_kernel(error_model="numpy")
def temporal_zeppelin_signal(b: np.ndarray, time_factor: np.ndarray, cos: np.ndarray,
                             lambda_par: np.ndarray, lambda_inf: np.ndarray, A: np.ndarray,
                             out: np.ndarray) -> None:
    """Temporal zeppelin: lambda_perp = lambda_inf + A * time_factor per measurement.

    ``time_factor`` = (ln(Delta / delta) + 3/2) / (Delta - delta / 3) (1/s), zero where
    b = 0.
    """
    n, m = out.shape
    stride = 0 if cos.shape[0] == 1 else 1
    for i in prange(n):
        ci = i * stride
        lp = lambda_par[i]
        for j in range(m):
            u = cos[ci, j]
            lq = lambda_inf[i] + A[i] * time_factor[j]
            out[i, j] = fast_exp(-b[j] * (lq + (lp - lq) * u * u))


@parallel_kernel(error_model="numpy")
def ball_signal(b: np.ndarray, lambda_iso: np.ndarray, out: np.ndarray) -> None:
    """Ball: exp(-b lambda_iso)."""
    n, m = out.shape
    for i in prange(n):
        li = lambda_iso[i]
        for j in range(m):
            out[i, j] = fast_exp(-b[j] * li)


@parallel_kernel(error_model="numpy")
def axisymmetric_gaussian_spherical_mean(b: np.ndarray, time_factor: np.ndarray,
                                         lambda_par: np.ndarray, lambda_perp: np.ndarray,
                                         A: np.ndarray, out: np.ndarray) -> None:
    """Orientation average of exp(-b (l_par u² + l_perp (1 - u²))), closed form.

    l_perp = lambda_perp + A * time_factor per measurement (stick: lambda_perp = A = 0;
    zeppelin: A = 0). l_par > l_perp: exp(-b l_perp) sqrt(pi) erf(x) / (2x) with
    x² = b (l_par - l_perp); otherwise exp(-b l_par) F(x) / x with x² = b (l_perp - l_par)
    and F Dawson's integral.
    """
    n, m = out.shape
    for i in prange(n):
        lp = lambda_par[i]
        for j in range(m):
            bj = b[j]
            if bj <= 0.0:
                out[i, j] = 1.0
                continue
            lq = lambda_perp[i] + A[i] * time_factor[j]
            d = lp - lq
            if d >= 0.0:
                out[i, j] = math.exp(-bj * lq) * _erf_ratio(bj * d)
            else:
                out[i, j] = math.exp(-bj * lp) * _dawson_ratio(-bj * d)


# --------------------------------------------------------------------------- cylinders
@njit(cache=True, nogil=True)
def _sin2(u: float) -> float:
    s = 1.0 - u * u
    return s if s > 0.0 else 0.0


@parallel_kernel(error_model="numpy")
def cylinder_stejskal_tanner_signal(b: np.ndarray, q: np.ndarray, cos: np.ndarray,
                                    lambda_par: np.ndarray, diameter: np.ndarray,
                                    out: np.ndarray) -> None:
    """Cylinder, short-pulse long-time limit (Soderman): stick x (2 J1(x) / x)².

    x = 2 pi q_perp R, q_perp = q sqrt(1 - u²).
    """
    n, m = out.shape
    stride = 0 if cos.shape[0] == 1 else 1
    for i in prange(n):
        ci = i * stride
        lp = lambda_par[i]
        radius = 0.5 * diameter[i]
        for j in range(m):
            u = cos[ci, j]
            e = math.exp(-b[j] * lp * u * u)
            x = _TWO_PI * q[j] * math.sqrt(_sin2(u)) * radius
            if x > 0.0:
                r = 2.0 * bessel_j1(x) / x
                e *= r * r
            out[i, j] = e


@parallel_kernel(error_model="numpy")
def cylinder_callaghan_signal(b: np.ndarray, q: np.ndarray, tau_index: np.ndarray,
                              taus: np.ndarray, cos: np.ndarray, lambda_par: np.ndarray,
                              diameter: np.ndarray, alpha: np.ndarray, weights: np.ndarray,
                              diffusivity: float, out: np.ndarray) -> None:
    """Cylinder, finite-time Callaghan model: stick x perpendicular attenuation.

    E_perp = sum_{k,m} w_km exp(-a_km² D tau / R²) (x J_m'(x))² / (x² - a_km²)²,
    x = 2 pi q_perp R; ``alpha`` (K, F) the roots a_km of J_m' (a_00 = 0), ``weights``
    (K, F): 4 for m = 0, 8 a² / (a² - m²) otherwise. 1 where q_perp = 0.
    """
    n, m = out.shape
    stride = 0 if cos.shape[0] == 1 else 1
    n_roots, n_funcs = alpha.shape
    n_tau = taus.shape[0]
    for i in prange(n):
        ci = i * stride
        lp = lambda_par[i]
        radius = 0.5 * diameter[i]
        decay = np.empty((n_tau, n_roots, n_funcs))
        for t in range(n_tau):
            rate = diffusivity * taus[t] / (radius * radius)
            for k in range(n_roots):
                for f in range(n_funcs):
                    a = alpha[k, f]
                    decay[t, k, f] = weights[k, f] * math.exp(-a * a * rate)
        jn = np.empty(n_funcs + 1)
        for j in range(m):
            u = cos[ci, j]
            e = math.exp(-b[j] * lp * u * u)
            x = _TWO_PI * q[j] * math.sqrt(_sin2(u)) * radius
            if x > 0.0:
                bessel_jn_array(x, jn)
                x2 = x * x
                t = tau_index[j]
                total = 0.0
                for f in range(n_funcs):
                    if f == 0:
                        jp = -jn[1]
                    else:
                        jp = 0.5 * (jn[f - 1] - jn[f + 1])
                    p = (x * jp) * (x * jp)
                    for k in range(n_roots):
                        a = alpha[k, f]
                        den = x2 - a * a
                        total += decay[t, k, f] * p / (den * den)
                e *= total
            out[i, j] = e


@parallel_kernel(error_model="numpy")
def cylinder_gaussian_phase_signal(b: np.ndarray, gG: np.ndarray, timing_index: np.ndarray,
                                   deltas: np.ndarray, Deltas: np.ndarray, cos: np.ndarray,
                                   lambda_par: np.ndarray, diameter: np.ndarray,
                                   roots: np.ndarray, diffusivity: float,
                                   out: np.ndarray) -> None:
    """Cylinder, Gaussian phase approximation (Van Gelderen): stick x perpendicular term.

    E_perp = exp(-2 (gG_perp)² S(R, delta, Delta)), gG_perp² = gG² (1 - u²), with
    S = sum_r (2 a²D d - 2 + 2 e^{-a²D d} + 2 e^{-a²D D} - e^{-a²D (D - d)}
    - e^{-a²D (D + d)}) / (D_c² a⁶ (R² a² - 1)), a = root_r / R (roots of J_1').
    """
    n, m = out.shape
    stride = 0 if cos.shape[0] == 1 else 1
    n_t = deltas.shape[0]
    D = diffusivity
    for i in prange(n):
        ci = i * stride
        lp = lambda_par[i]
        radius = 0.5 * diameter[i]
        sums = np.zeros(n_t)
        terms = np.empty(roots.shape[0])
        for t in range(n_t):
            d = deltas[t]
            dd = Deltas[t]
            for r in range(roots.shape[0]):  # no reduction here: this loop vectorises
                a = roots[r] / radius
                a2 = a * a
                a2d = a2 * D
                num = (2.0 * a2d * d - 2.0 + 2.0 * fast_exp(-a2d * d)
                       + 2.0 * fast_exp(-a2d * dd) - fast_exp(-a2d * (dd - d))
                       - fast_exp(-a2d * (dd + d)))
                terms[r] = num / (D * D * a2 * a2 * a2 * (radius * radius * a2 - 1.0))
            s = 0.0
            for r in range(roots.shape[0]):
                s += terms[r]
            sums[t] = s
        # per-measurement factor first: an indexed read in the main loop would stop it
        # from vectorising
        factor = np.empty(m)
        for j in range(m):
            g = gG[j]
            factor[j] = 2.0 * g * g * sums[timing_index[j]]
        for j in range(m):
            u = cos[ci, j]
            out[i, j] = fast_exp(-b[j] * lp * u * u - factor[j] * _sin2(u))


# --------------------------------------------------------------------------- spheres
@parallel_kernel(error_model="numpy")
def sphere_stejskal_tanner_signal(q: np.ndarray, diameter: np.ndarray,
                                  out: np.ndarray) -> None:
    """Sphere, short-pulse long-time limit: (3 (sin x - x cos x) / x³)², x = 2 pi q R."""
    n, m = out.shape
    for i in prange(n):
        radius = 0.5 * diameter[i]
        for j in range(m):
            x = _TWO_PI * q[j] * radius
            if x <= 0.0:
                out[i, j] = 1.0
                continue
            if x < 1.0:
                # 3 j1(x) / x = 3 sum_k (-x²/2)^k / (k! (2k+3)!!), no cancellation
                h = -0.5 * x * x
                term = 1.0 / 3.0
                f = term
                for k in range(1, 30):
                    term *= h / (k * (2 * k + 3))
                    f += term
                    if abs(term) < 1e-17:
                        break
                f *= 3.0
            else:
                f = 3.0 * (math.sin(x) - x * math.cos(x)) / (x * x * x)
            out[i, j] = f * f


@parallel_kernel(error_model="numpy")
def sphere_gaussian_phase_signal(gG: np.ndarray, timing_index: np.ndarray,
                                 deltas: np.ndarray, Deltas: np.ndarray,
                                 diameter: np.ndarray, roots: np.ndarray,
                                 diffusivity: float, out: np.ndarray) -> None:
    """Sphere, Gaussian phase approximation (Balinov / Murday-Cotts).

    E = exp(-2 gG² / D S), S = sum_r a⁻⁴ / (a² R² - 2) (2 d - (2 + e^{-a²D (D - d)}
    - 2 e^{-a²D d} - 2 e^{-a²D D} + e^{-a²D (D + d)}) / (a² D)), a = root_r / R
    (roots of j_1').
    """
    n, m = out.shape
    n_t = deltas.shape[0]
    D = diffusivity
    for i in prange(n):
        radius = 0.5 * diameter[i]
        sums = np.zeros(n_t)
        terms = np.empty(roots.shape[0])
        for t in range(n_t):
            d = deltas[t]
            dd = Deltas[t]
            for r in range(roots.shape[0]):  # no reduction here: this loop vectorises
                a = roots[r] / radius
                a2 = a * a
                a2d = a2 * D
                inner = (2.0 + fast_exp(-a2d * (dd - d)) - 2.0 * fast_exp(-a2d * d)
                         - 2.0 * fast_exp(-a2d * dd) + fast_exp(-a2d * (dd + d)))
                terms[r] = (2.0 * d - inner / a2d) / (a2 * a2 * (a2 * radius * radius - 2.0))
            s = 0.0
            for r in range(roots.shape[0]):
                s += terms[r]
            sums[t] = s
        for j in range(m):  # few distinct timings: the exponent repeats, no need to vectorise
            g = gG[j]
            out[i, j] = fast_exp(-2.0 * g * g / D * sums[timing_index[j]])


# --------------------------------------------------------------------------- helpers
@parallel_kernel()
def gather_columns(small: np.ndarray, index: np.ndarray, out: np.ndarray) -> None:
    """out[i, j] = small[i, index[j]] (expand signals of distinct measurements)."""
    n, m = out.shape
    for i in prange(n):
        for j in range(m):
            out[i, j] = small[i, index[j]]
