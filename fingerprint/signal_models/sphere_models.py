"""Sphere compartments: S1Dot, S2SphereStejskalTannerApproximation,
S4SphereGaussianPhaseApproximation (dmipy names, SI units)."""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

from fingerprint.core.constants import WATER_IN_AXONS_DIFFUSION_CONSTANT
from fingerprint.core.units import LENGTH
from fingerprint.errors import InputError
from fingerprint.kernels import compartments as kernels
from fingerprint.kernels import run_kernel
from fingerprint.signal_models.base import (
    DIAMETER_SCALING,
    CompartmentModel,
    MeasurementArrays,
)

__all__ = [
    "S1Dot",
    "S2SphereStejskalTannerApproximation",
    "S4SphereGaussianPhaseApproximation",
]

#: The Gaussian-phase sphere series uses the roots a R of j_1' below this bound.
SPHERE_GPA_ROOT_BOUND = 100.0 * math.pi


@lru_cache(maxsize=2)
def sphere_gpa_roots(bound: float = SPHERE_GPA_ROOT_BOUND) -> np.ndarray:
    """Positive roots of the derivative of the spherical Bessel function j_1 below ``bound``.

    They solve (1 / x) J_{3/2}(x) = J_{5/2}(x) (Balinov et al. 1993); read-only, ascending.
    """
    from scipy import optimize, special  # lazy: keeps SciPy off import

    def f(x: float) -> float:
        return float(special.spherical_jn(1, x, derivative=True))

    grid = np.arange(0.5, bound + 0.05, 0.05)
    values = special.spherical_jn(1, grid, derivative=True)
    roots = []
    for lo, hi, f_lo, f_hi in zip(grid[:-1], grid[1:], values[:-1], values[1:], strict=True):
        if f_lo == 0.0:
            roots.append(lo)
        elif f_lo * f_hi < 0.0:
            roots.append(optimize.brentq(f, lo, hi, xtol=1e-14, rtol=1e-15))
    out = np.array([r for r in roots if r < bound])
    out.setflags(write=False)
    return out


class S1Dot(CompartmentModel):
    """Dot: a non-diffusing compartment, E = 1 (Panagiotaki et al. 2012)."""

    _required_acquisition_parameters = []
    _parameter_ranges = {}
    _parameter_scales = {}
    _parameter_types = {}
    _parameter_units = {}
    is_isotropic = True

    def __init__(self) -> None:
        super().__init__()

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        out[:] = 1.0


class S2SphereStejskalTannerApproximation(CompartmentModel):
    """Sphere, short pulses and long diffusion time (Balinov et al. 1993).

    E = (3 (sin x - x cos x) / x³)², x = 2 pi q R. Needs q-values.

    Parameters
    ----------
    diameter : float, optional
        Sphere diameter in m.
    """

    _required_acquisition_parameters = ["qvalues"]
    _work_per_value = 3.0
    _parameter_ranges = {"diameter": (1e-2, 20)}
    _parameter_scales = {"diameter": DIAMETER_SCALING}
    _parameter_types = {"diameter": "sphere"}
    _parameter_units = {"diameter": LENGTH}
    is_isotropic = True

    def __init__(self, diameter: float | None = None) -> None:
        super().__init__(diameter=diameter)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        run_kernel(kernels.sphere_stejskal_tanner_signal, self._work(out), meas.q(self._name),
                   params["diameter"], out)


class S4SphereGaussianPhaseApproximation(CompartmentModel):
    """Sphere, Gaussian phase approximation (Balinov et al. 1993).

    Depends on gradient strength, delta and Delta of every measurement.

    Parameters
    ----------
    diameter : float, optional
        Sphere diameter in m.
    diffusion_constant : float
        Diffusivity inside the sphere in m²/s (default 1.7e-9).
    """

    _required_acquisition_parameters = ["gradient_strengths", "delta", "Delta"]
    _work_per_value = 4.0
    _parameter_ranges = {"diameter": (1e-2, 20)}
    _parameter_scales = {"diameter": DIAMETER_SCALING}
    _parameter_types = {"diameter": "sphere"}
    _parameter_units = {"diameter": LENGTH}
    _constant_names = ("diffusion_constant",)
    diffusion_constant: float
    is_isotropic = True

    def __init__(self, diameter: float | None = None,
                 diffusion_constant: float = WATER_IN_AXONS_DIFFUSION_CONSTANT) -> None:
        try:
            value = float(diffusion_constant)
        except (TypeError, ValueError):
            raise InputError(f"{type(self).__name__}: diffusion_constant must be a number, "
                             f"got {diffusion_constant!r}") from None
        if not np.isfinite(value) or value <= 0:
            raise InputError(f"{type(self).__name__}: diffusion_constant must be positive "
                             f"and finite, got {value}")
        super().__init__(diameter=diameter, diffusion_constant=value)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        gg = meas.gamma_g(self._name)
        index, deltas, Deltas = meas.timings(self._name)
        run_kernel(kernels.sphere_gaussian_phase_signal, self._work(out), gg, index, deltas,
                   Deltas, params["diameter"], sphere_gpa_roots(), self.diffusion_constant, out)
