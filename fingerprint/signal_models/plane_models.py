"""Plane compartments: diffusion between two infinite parallel reflecting planes
(dmipy's P2PlaneStejskalTannerApproximation and P3PlaneCallaghanApproximation, SI units).

Both are one-dimensional NMR models (``_model_type = 'NMRModel'``): the gradient is taken
perpendicular to the planes and the signal depends only on ``q`` (and the diffusion time),
so they cannot be mixed with orientation-dependent compartments in a multi-compartment
model. ``diameter`` is the distance L between the planes (m); ``x = 2 pi q L``.

* P2 (short pulses, long diffusion time; Balinov et al. 1993, eq. 6):
  ``E = 2 (1 - cos x) / x^2 = sinc^2(q L)``, exact in that limit.
* P3 (short pulses, finite diffusion time ``tau = Delta - delta / 3``; Callaghan 1995):
  the exact eigenmode series of the reflecting slab,
  ``E = 2 (1 - cos x) / x^2 + 4 x^2 sum_{n>=1} exp(-n^2 pi^2 D tau / L^2)
  (1 - (-1)^n cos x) / (x^2 - n^2 pi^2)^2``, written without the removable 0/0 at
  ``x = n pi`` (``(1 - (-1)^n cos x) = 2 sin^2((x - n pi) / 2)``); modes n <= 2
  ``number_of_roots`` (dmipy sums as many, as even and odd modes of the half-width).
"""

from __future__ import annotations

import math

import numpy as np

from fingerprint.core import units
from fingerprint.core.constants import WATER_IN_AXONS_DIFFUSION_CONSTANT
from fingerprint.errors import InputError
from fingerprint.signal_models.base import DIAMETER_SCALING, CompartmentModel, MeasurementArrays

__all__ = ["P2PlaneStejskalTannerApproximation", "P3PlaneCallaghanApproximation"]

_PLANE_RANGES = {"diameter": (1e-2, 20)}
_PLANE_SCALES = {"diameter": DIAMETER_SCALING}
_PLANE_TYPES = {"diameter": "plane"}
_PLANE_UNITS = {"diameter": units.LENGTH}


def _sinc_u(y: np.ndarray) -> np.ndarray:
    """sin(y) / y (1 at 0)."""
    return np.sinc(y / math.pi)


def _rows(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q, dtype=float)
    return q[None, :] if q.ndim == 1 else q


def plane_stejskal_tanner(q: np.ndarray, diameter: np.ndarray) -> np.ndarray:
    """``2 (1 - cos x) / x^2`` with ``x = 2 pi q L``: q (M,) or (n, M) in 1/m, L (n,) in
    m -> (n, M)."""
    return np.sinc(np.asarray(diameter, dtype=float)[:, None] * _rows(q)) ** 2


def plane_callaghan(q: np.ndarray, tau: np.ndarray, diameter: np.ndarray,
                    diffusivity: float, n_modes: int) -> np.ndarray:
    """Finite-time slab signal (n, M) for q (M,) or (n, M) 1/m, tau (M,) s, L (n,) m."""
    length = np.asarray(diameter, dtype=float)[:, None]
    x = 2.0 * math.pi * _rows(q) * length
    out = _sinc_u(0.5 * x) ** 2
    decay = diffusivity * np.asarray(tau, dtype=float)[None, :] / length ** 2
    for n in range(1, n_modes + 1):
        npi = n * math.pi
        weight = np.exp(-(npi ** 2) * decay)
        if not np.any(weight > 1e-300):
            break
        d = x - npi
        # 4 x^2 (1 - (-1)^n cos x) / (x^2 - (n pi)^2)^2 = 2 x^2 sinc_u(d/2)^2 / (x + n pi)^2
        out = out + weight * 2.0 * x * x * _sinc_u(0.5 * d) ** 2 / (x + npi) ** 2
    return out


class _Plane(CompartmentModel):
    _parameter_ranges = _PLANE_RANGES
    _parameter_scales = _PLANE_SCALES
    _parameter_types = _PLANE_TYPES
    _parameter_units = _PLANE_UNITS
    _model_type = "NMRModel"
    is_isotropic = True


class P2PlaneStejskalTannerApproximation(_Plane):
    """Planes at distance ``diameter`` (m), short pulses and long diffusion time:
    ``E = 2 (1 - cos x) / x^2``, ``x = 2 pi q L``. Needs q-values."""

    _required_acquisition_parameters = ["qvalues"]

    def __init__(self, diameter: float | None = None) -> None:
        super().__init__(diameter=diameter)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        out[:] = plane_stejskal_tanner(meas.q(self._name), params["diameter"])


class P3PlaneCallaghanApproximation(_Plane):
    """Planes at distance ``diameter`` (m), short pulses, finite diffusion time
    ``tau = Delta - delta / 3`` (Callaghan 1995; exact slab eigenmode series).

    Parameters
    ----------
    diameter : float, optional
        Distance between the planes in m.
    diffusion_constant : float
        Diffusivity between the planes in m²/s (default 1.7e-9).
    number_of_roots : int
        The series sums the first ``2 number_of_roots`` modes (default 40).
    """

    _required_acquisition_parameters = ["qvalues", "tau"]
    _constant_names = ("diffusion_constant", "number_of_roots")
    diffusion_constant: float
    number_of_roots: int

    def __init__(self, diameter: float | None = None,
                 diffusion_constant: float = WATER_IN_AXONS_DIFFUSION_CONSTANT,
                 number_of_roots: int = 40) -> None:
        name = type(self).__name__
        value = float(diffusion_constant)
        if not np.isfinite(value) or value <= 0:
            raise InputError(f"{name}: diffusion_constant must be positive and finite, got "
                             f"{diffusion_constant!r}")
        if isinstance(number_of_roots, bool) or int(number_of_roots) < 1:
            raise InputError(f"{name}: number_of_roots must be an integer >= 1, got "
                             f"{number_of_roots!r}")
        super().__init__(diameter=diameter, diffusion_constant=value,
                         number_of_roots=int(number_of_roots))

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        q = meas.q(self._name)
        index, deltas, Deltas = meas.timings(self._name)
        tau = (Deltas - deltas / 3.0)[index]
        out[:] = plane_callaghan(q, tau, params["diameter"], self.diffusion_constant,
                                 2 * self.number_of_roots)
