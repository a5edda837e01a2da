"""Stand-alone distributions under dmipy's names: orientation densities (Watson,
Bingham, spherical harmonics) callable on unit vectors and the Gamma size distribution
callable for its radii.

Values are exact where dmipy approximates:

* ``SD1Watson``: density ``exp(kappa (n.mu)^2) / (4 pi 1F1(1/2; 3/2; kappa))`` with the
  confluent hypergeometric normalisation in closed form (Dawson's integral for large
  ``kappa``); ``kappa = 1 / tan(odi pi / 2)``. Its SH coefficients are the exact
  Legendre coefficients of the density (the kernels of
  :mod:`fingerprint.kernels.dispersion`) rotated onto ``mu`` by the addition theorem.
* ``SD2Bingham``: density ``exp(kappa (n.mu)^2 + beta (n.mu2)^2)`` normalised by 2-D
  quadrature (dmipy interpolates a spline table), ``beta = beta_fraction * kappa``, the
  frame of :func:`fingerprint.distributions.distribute_models.bingham_frame`.
* ``DD1Gamma``: radii sampled between the 0.5 % and 99.5 % quantiles of the weighted
  density (exact Gamma quantiles; dmipy interpolates a spline table), density normalised
  to unit area on that grid like dmipy.

Densities are in 1/sr (orientation) and 1/m (size); angles in radians, lengths in m.
SH coefficients use dmipy's basis (:mod:`fingerprint.utils.spherical_convolution`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, ClassVar

import numpy as np
from numpy.typing import ArrayLike
from scipy import special, stats

from fingerprint.distributions.distribute_models import bingham_frame, kappa2odi, odi2kappa
from fingerprint.errors import InputError
from fingerprint.kernels import gauss_legendre_unit
from fingerprint.kernels.dispersion import watson_legendre_coefficients, watson_order
from fingerprint.signal_models.base import unitsphere2cart
from fingerprint.utils.spherical_convolution import (
    check_sh_order,
    real_sym_sh_mrtrix,
    sh_order_from_coefficients,
)

__all__ = [
    "BETA_SCALING",
    "DD1Gamma",
    "SD1Watson",
    "SD2Bingham",
    "SD3SphericalHarmonics",
    "get_sh_order_from_odi",
    "kappa2odi",
    "odi2kappa",
    "sh_coefficients_by_quadrature",
    "watson_density",
]

#: Gamma ``beta`` (radius scale) is given to optimisers in micrometres.
BETA_SCALING = 1e-6
#: largest SH order chosen automatically (dmipy's table stops at 14)
_MAX_AUTO_ORDER = 14
#: relative truncation error accepted by :func:`get_sh_order_from_odi`
_AUTO_ORDER_TOLERANCE = 0.05
#: polar x azimuthal nodes of the sphere quadrature (exact for SH up to order ~2 x this)
_QUADRATURE_THETA = 96


def _unit_vectors(n: ArrayLike) -> tuple[np.ndarray, bool]:
    arr = np.asarray(n, dtype=float)
    single = arr.ndim == 1
    if not (arr.size % 3 == 0 and arr.shape[-1] == 3):
        raise InputError(f"n must be unit vectors (3,) or (K, 3), got shape {np.shape(n)}")
    return arr.reshape(-1, 3), single


def _mu_of(value: ArrayLike | None, name: str) -> np.ndarray:
    if value is None:
        raise InputError(f"{name}: mu has no value; give it as a keyword or to the "
                         "constructor")
    mu = np.asarray(value, dtype=float).reshape(-1)
    if mu.shape != (2,):
        raise InputError(f"{name}: mu must be [theta, phi] in radians, got {mu.shape[0]} "
                         "values")
    return mu


def _kappa_of(odi: ArrayLike | None, name: str) -> float:
    if odi is None:
        raise InputError(f"{name}: odi has no value; give it as a keyword or to the "
                         "constructor")
    value = float(np.asarray(odi, dtype=float).reshape(-1)[0])
    if not 0.0 < value <= 1.0:
        raise InputError(f"{name}: odi must be in (0, 1], got {value}")
    return max(float(odi2kappa(value)), 0.0)


def _watson_log_norm(kappa: float) -> float:
    """log of the sphere integral of exp(kappa t^2): log(4 pi 1F1(1/2; 3/2; kappa))."""
    if kappa < 1.0:
        return math.log(4.0 * math.pi * float(special.hyp1f1(0.5, 1.5, kappa)))
    # 1F1(1/2; 3/2; k) = exp(k) D(sqrt k) / sqrt k with D Dawson's integral
    root = math.sqrt(kappa)
    return math.log(4.0 * math.pi * float(special.dawsn(root)) / root) + kappa


def watson_density(n: np.ndarray, axis: np.ndarray, kappa: float) -> np.ndarray:
    """Watson density (1/sr) at unit vectors ``n`` (K, 3) about the unit ``axis`` (3,)
    with concentration ``kappa`` (>= 0)."""
    t = n @ axis
    return np.exp(kappa * t * t - _watson_log_norm(kappa))


def sphere_quadrature(n_theta: int = _QUADRATURE_THETA) -> tuple[np.ndarray, np.ndarray]:
    """Product quadrature of the unit sphere: points (K, 3) and weights (K,) summing to
    4 pi (Gauss-Legendre in cos theta, uniform in phi); exact for SH up to order
    ``n_theta`` (polar) and ``2 n_theta - 1`` (azimuthal)."""
    u, w = gauss_legendre_unit(n_theta)
    cos_t = np.concatenate([-u[::-1], u])
    w_t = np.concatenate([w[::-1], w])  # integrates over [-1, 1]
    n_phi = 2 * n_theta
    phi = 2.0 * np.pi * np.arange(n_phi) / n_phi
    sin_t = np.sqrt(1.0 - cos_t * cos_t)
    pts = np.stack([np.outer(sin_t, np.cos(phi)), np.outer(sin_t, np.sin(phi)),
                    np.repeat(cos_t[:, None], n_phi, axis=1)], axis=-1).reshape(-1, 3)
    weights = np.repeat(w_t, n_phi) * (2.0 * np.pi / n_phi)
    return pts, weights


def sh_coefficients_by_quadrature(values: np.ndarray, points: np.ndarray,
                                  weights: np.ndarray, sh_order: int) -> np.ndarray:
    """SH coefficients (dmipy's basis) of a function sampled at quadrature ``points``
    (K, 3) with ``weights`` (K,): the projection on the orthonormal real basis rescaled
    to dmipy's (``m != 0`` functions have norm 1 / sqrt(2))."""
    theta = np.arccos(np.clip(points[:, 2], -1.0, 1.0))
    phi = np.arctan2(points[:, 1], points[:, 0])
    basis, orders, _ = real_sym_sh_mrtrix(sh_order, theta, phi)
    # orthonormal basis: sqrt(2) x dmipy's for m != 0; coefficient in dmipy's basis is
    # sqrt(2) x the orthonormal one, i.e. 2 x the projection on dmipy's function
    scale = np.where(orders == 0, 1.0, 2.0)
    return (values * weights) @ basis * scale


class _Distribution:
    """dmipy-style parameter bookkeeping of a stand-alone distribution."""

    _parameter_ranges: ClassVar[dict[str, Any]] = {}
    _parameter_scales: ClassVar[dict[str, object]] = {}
    _parameter_types: ClassVar[dict[str, str]] = {}
    _model_type: ClassVar[str] = "SphericalDistribution"

    @property
    def parameter_names(self) -> list[str]:
        """Parameter names (dmipy order)."""
        return list(self._parameter_ranges)

    @property
    def parameter_ranges(self) -> OrderedDict:
        """Ranges in optimiser units (times :attr:`parameter_scales` for SI)."""
        return OrderedDict(self._parameter_ranges)

    @property
    def parameter_scales(self) -> OrderedDict:
        """Scales from optimiser units to SI."""
        return OrderedDict(self._parameter_scales)

    @property
    def parameter_types(self) -> OrderedDict:
        """Parameter types."""
        return OrderedDict(self._parameter_types)

    @property
    def parameter_cardinality(self) -> OrderedDict:
        """Number of values of each parameter."""
        return OrderedDict((k, len(np.atleast_2d(v))) for k, v in
                           self._parameter_ranges.items())

    def _get(self, name: str, kwargs: dict[str, object]) -> Any:
        """The value of parameter ``name`` from ``kwargs`` or the constructor: as the
        user gave it (a number, a sequence or an array), None when unset."""
        unknown = sorted(set(kwargs) - set(self._parameter_ranges))
        if unknown:
            raise InputError(f"{type(self).__name__} has no parameter {', '.join(unknown)}; "
                             f"parameters: {', '.join(self.parameter_names)}")
        value = kwargs.get(name)
        return getattr(self, name) if value is None else value

    def __setattr__(self, name: str, value: object) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is immutable: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        items = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._parameter_ranges)
        return f"{type(self).__name__}({items})"


class SD1Watson(_Distribution):
    """Watson orientation distribution.

    Parameters: ``mu`` ([theta, phi], rad) and ``odi`` (orientation dispersion index in
    (0, 1]; ``kappa = 1 / tan(odi pi / 2)``). Call it with unit vectors ``n`` (K, 3) or
    (3,) for the density (1/sr), parameters given to the call override the constructor's.
    """

    _parameter_ranges: ClassVar[dict[str, object]] = {
        "mu": ([0.0, np.pi], [-np.pi, np.pi]), "odi": (0.02, 0.99)}
    _parameter_scales: ClassVar[dict[str, object]] = {"mu": np.r_[1.0, 1.0], "odi": 1.0}
    _parameter_types: ClassVar[dict[str, str]] = {"mu": "orientation", "odi": "normal"}

    def __init__(self, mu: ArrayLike | None = None, odi: float | None = None) -> None:
        self.mu = None if mu is None else tuple(float(v) for v in _mu_of(mu, "SD1Watson"))
        self.odi = odi
        self._frozen = True

    def __call__(self, n: ArrayLike, **kwargs: object) -> np.ndarray | float:
        """Density (1/sr) at unit vectors ``n``: (K,) for (K, 3), a float for (3,)."""
        vectors, single = _unit_vectors(n)
        mu = _mu_of(self._get("mu", kwargs), "SD1Watson")
        kappa = _kappa_of(self._get("odi", kwargs), "SD1Watson")
        out = watson_density(vectors, unitsphere2cart(mu), kappa)
        return float(out[0]) if single else out

    def spherical_harmonics_representation(self, sh_order: int | None = None,
                                           **kwargs: object) -> np.ndarray:
        """SH coefficients (n,) of the density in dmipy's basis, exact (the Watson
        Legendre coefficients rotated onto ``mu``); ``sh_order`` defaults to
        :func:`get_sh_order_from_odi`."""
        mu = _mu_of(self._get("mu", kwargs), "SD1Watson")
        odi = self._get("odi", kwargs)
        kappa = _kappa_of(odi, "SD1Watson")
        order = get_sh_order_from_odi(float(odi)) if sh_order is None \
            else check_sh_order(sh_order)
        legendre = watson_legendre_coefficients(np.array([kappa]), order)[0]
        basis, orders, degrees = real_sym_sh_mrtrix(order, mu[0], mu[1])
        # addition theorem: P_l(n.mu) = 4 pi / (2l + 1) sum_m Yo_lm(n) Yo_lm(mu), with the
        # orthonormal Yo = dmipy's (m = 0) or sqrt(2) x dmipy's (m != 0); the density's
        # Legendre series is sum_l (2l + 1) / (4 pi) a_l P_l(n.mu)
        weight = np.where(orders == 0, 1.0, 2.0)
        return legendre[degrees // 2] * weight * basis[0]


class SD2Bingham(_Distribution):
    """Bingham orientation distribution.

    Parameters: ``mu`` ([theta, phi], rad), ``psi`` (rotation of the second axis about
    mu, rad), ``odi`` ((0, 1], ``kappa = 1 / tan(odi pi / 2)``) and ``beta_fraction``
    (``beta = beta_fraction * kappa``, 0-1). Density in 1/sr.
    """

    _parameter_ranges: ClassVar[dict[str, object]] = {
        "mu": ([0.0, np.pi], [-np.pi, np.pi]), "psi": (0.0, np.pi), "odi": (0.02, 0.99),
        "beta_fraction": (0.0, 1.0)}
    _parameter_scales: ClassVar[dict[str, object]] = {
        "mu": np.r_[1.0, 1.0], "psi": 1.0, "odi": 1.0, "beta_fraction": 1.0}
    _parameter_types: ClassVar[dict[str, str]] = {
        "mu": "orientation", "psi": "circular", "odi": "normal", "beta_fraction": "normal"}

    def __init__(self, mu: ArrayLike | None = None, psi: float | None = None,
                 odi: float | None = None, beta_fraction: float | None = None) -> None:
        self.mu = None if mu is None else tuple(float(v) for v in _mu_of(mu, "SD2Bingham"))
        self.psi = psi
        self.odi = odi
        self.beta_fraction = beta_fraction
        self._frozen = True

    def _parameters(self, kwargs: dict[str, object]) -> tuple[np.ndarray, np.ndarray, float,
                                                             float]:
        mu = _mu_of(self._get("mu", kwargs), "SD2Bingham")
        psi = self._get("psi", kwargs)
        bf = self._get("beta_fraction", kwargs)
        if psi is None or bf is None:
            raise InputError("SD2Bingham: psi and beta_fraction need values")
        bf = float(bf)
        if not 0.0 <= bf <= 1.0:
            raise InputError(f"SD2Bingham: beta_fraction must be in [0, 1], got {bf}")
        kappa = _kappa_of(self._get("odi", kwargs), "SD2Bingham")
        e1, e2 = bingham_frame(mu.reshape(1, 2), np.array([float(psi)]))
        return e1[0], e2[0], kappa, bf * kappa

    @staticmethod
    def _log_norm(kappa: float, beta: float) -> float:
        n_theta = _QUADRATURE_THETA + 2 * int(math.sqrt(kappa))
        pts, w = sphere_quadrature(n_theta)
        expo = kappa * pts[:, 2] ** 2 + beta * pts[:, 0] ** 2
        top = float(expo.max())
        return top + math.log(float(w @ np.exp(expo - top)))

    def __call__(self, n: ArrayLike, **kwargs: object) -> np.ndarray | float:
        """Density (1/sr) at unit vectors ``n``: (K,) for (K, 3), a float for (3,)."""
        vectors, single = _unit_vectors(n)
        e1, e2, kappa, beta = self._parameters(kwargs)
        t1 = vectors @ e1
        t2 = vectors @ e2
        out = np.exp(kappa * t1 * t1 + beta * t2 * t2 - self._log_norm(kappa, beta))
        return float(out[0]) if single else out

    def spherical_harmonics_representation(self, sh_order: int | None = None,
                                           **kwargs: object) -> np.ndarray:
        """SH coefficients (n,) of the density in dmipy's basis, by sphere quadrature
        (exact to rounding for the orders used); ``sh_order`` defaults to the Watson
        order of the same ``odi``."""
        odi = self._get("odi", kwargs)
        order = get_sh_order_from_odi(float(odi)) if sh_order is None \
            else check_sh_order(sh_order)
        pts, w = sphere_quadrature(max(_QUADRATURE_THETA, order + 2))
        return sh_coefficients_by_quadrature(np.asarray(self(pts, **kwargs)), pts, w, order)


class SD3SphericalHarmonics(_Distribution):
    """An orientation distribution given by its SH coefficients ``sh_coeff`` (dmipy's
    basis, order ``sh_order``); callable on unit vectors like the others."""

    _parameter_types: ClassVar[dict[str, str]] = {"sh_coeff": "sh_coefficients"}

    def __init__(self, sh_order: int, sh_coeff: ArrayLike | None = None) -> None:
        self.sh_order = check_sh_order(sh_order)
        n_coef = (self.sh_order + 1) * (self.sh_order + 2) // 2
        self._parameter_ranges = {"sh_coeff": [[None, None]] * n_coef}  # type: ignore[misc]
        self._parameter_scales = {"sh_coeff": np.ones(n_coef)}  # type: ignore[misc]
        self.sh_coeff = None if sh_coeff is None else np.array(sh_coeff, dtype=float)
        self._frozen = True

    def __call__(self, n: ArrayLike, **kwargs: object) -> np.ndarray | float:
        """The expansion at unit vectors ``n`` (1/sr if the coefficients are a density)."""
        vectors, single = _unit_vectors(n)
        coef = self._get("sh_coeff", kwargs)
        if coef is None:
            raise InputError("SD3SphericalHarmonics: sh_coeff has no value")
        coef = np.asarray(coef, dtype=float)
        order = sh_order_from_coefficients(coef.shape[-1])
        theta = np.arccos(np.clip(vectors[:, 2], -1.0, 1.0))
        phi = np.arctan2(vectors[:, 1], vectors[:, 0])
        out = real_sym_sh_mrtrix(order, theta, phi)[0] @ coef
        return float(out[0]) if single else out


class DD1Gamma(_Distribution):
    """Gamma distribution of radii (AxCaliber).

    Parameters: ``alpha`` (shape) and ``beta`` (scale of the radius, m). ``normalization``
    weights the density by the size of each radius' compartment: ``'standard'`` (none),
    ``'plane'`` (2 r), ``'cylinder'`` (pi r^2), ``'sphere'`` (4/3 pi r^3). Calling it
    returns ``(radii, density)``: ``Nsteps`` radii (m) spanning the 0.5 %-99.5 % quantiles
    of the weighted density (itself a Gamma density of shape ``alpha + k``) and the
    weighted density (1/m) normalised to unit trapezoid area on them.
    """

    _parameter_ranges: ClassVar[dict[str, object]] = {"alpha": (0.1, 30.0),
                                                      "beta": (1e-3, 2.0)}
    _parameter_scales: ClassVar[dict[str, object]] = {"alpha": 1.0, "beta": BETA_SCALING}
    _parameter_types: ClassVar[dict[str, str]] = {"alpha": "normal", "beta": "normal"}
    _model_type: ClassVar[str] = "SpatialDistribution"
    _POWERS: ClassVar[dict[str, int]] = {"standard": 0, "plane": 1, "cylinder": 2,
                                         "sphere": 3}
    _FACTORS: ClassVar[dict[str, float]] = {"standard": 1.0, "plane": 2.0,
                                            "cylinder": math.pi, "sphere": 4.0 * math.pi / 3}

    def __init__(self, alpha: float | None = None, beta: float | None = None,
                 Nsteps: int = 30, normalization: str = "standard") -> None:  # noqa: N803
        if normalization not in self._POWERS:
            raise InputError(f"DD1Gamma: unknown normalization {normalization!r}; expected "
                             f"one of {sorted(self._POWERS)}")
        if isinstance(Nsteps, bool) or int(Nsteps) != Nsteps or Nsteps < 2:
            raise InputError(f"DD1Gamma: Nsteps must be an integer >= 2, got {Nsteps!r}")
        self.alpha = alpha
        self.beta = beta
        self.Nsteps = int(Nsteps)
        self.normalization = normalization
        self._frozen = True

    def norm_func(self, radius: ArrayLike) -> np.ndarray:
        """The size weight of radii ``radius`` (m) for this normalisation."""
        r = np.asarray(radius, dtype=float)
        return self._FACTORS[self.normalization] * r ** self._POWERS[self.normalization]

    def __call__(self, **kwargs: object) -> tuple[np.ndarray, np.ndarray]:
        """``(radii (Nsteps,) in m, density (Nsteps,) in 1/m)``."""
        alpha = self._get("alpha", kwargs)
        beta = self._get("beta", kwargs)
        if alpha is None or beta is None:
            raise InputError("DD1Gamma: alpha and beta need values")
        alpha, beta = float(alpha), float(beta)
        if not (alpha > 0 and beta > 0 and np.isfinite(alpha) and np.isfinite(beta)):
            raise InputError(f"DD1Gamma: alpha and beta must be positive, got {alpha}, {beta}")
        weighted = stats.gamma(alpha + self._POWERS[self.normalization], scale=beta)
        lo, hi = weighted.ppf([0.005, 0.995])
        radii = np.linspace(max(lo, 1e-12), hi, self.Nsteps)
        density = weighted.pdf(radii)
        return radii, density / np.trapezoid(density, radii)


def get_sh_order_from_odi(odi: float) -> int:
    """Smallest even SH order (2-14) whose truncation of the Watson density of ``odi``
    drops less than 5 % of its Legendre mass (the 2-14 span of dmipy's table)."""
    kappa = _kappa_of(odi, "get_sh_order_from_odi")
    order = watson_order(kappa, tolerance=_AUTO_ORDER_TOLERANCE)
    return int(min(_MAX_AUTO_ORDER, max(2, order)))
