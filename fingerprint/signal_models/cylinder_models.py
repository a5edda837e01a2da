"""Cylinder compartments: C1Stick and the restricted cylinders C2, C3, C4 (dmipy names, SI)."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.constants import WATER_IN_AXONS_DIFFUSION_CONSTANT
from fingerprint.core.units import ANGLE, DIFFUSIVITY, LENGTH
from fingerprint.errors import InputError
from fingerprint.kernels import compartments as kernels
from fingerprint.kernels import run_kernel
from fingerprint.signal_models.base import (
    DIAMETER_SCALING,
    DIFFUSIVITY_SCALING,
    ORIENTATION_RANGE,
    CompartmentModel,
    MeasurementArrays,
)

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "C1Stick",
    "C2CylinderStejskalTannerApproximation",
    "C3CylinderCallaghanApproximation",
    "C4CylinderGaussianPhaseApproximation",
]

#: Number of roots of J_1' in the Gaussian-phase cylinder series.
CYLINDER_GPA_ROOTS = 100


@lru_cache(maxsize=4)
def cylinder_gpa_roots(count: int = CYLINDER_GPA_ROOTS) -> np.ndarray:
    """The first ``count`` positive roots of J_1' (read-only, ascending)."""
    from scipy import special  # lazy: keeps SciPy off import

    roots = np.sort(special.jnp_zeros(1, int(count)))
    roots.setflags(write=False)
    return roots


@lru_cache(maxsize=8)
def callaghan_roots(number_of_roots: int, number_of_functions: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Roots a_km of J_m' (K, F) with a_00 = 0, and the series weights (K, F).

    Weights are 4 for m = 0 and 8 a² / (a² - m²) for m >= 1 (Callaghan 1995).
    """
    from scipy import special  # lazy: keeps SciPy off import

    k, f = int(number_of_roots), int(number_of_functions)
    alpha = np.zeros((k, f))
    if k > 1:
        alpha[1:, 0] = special.jnp_zeros(0, k - 1)
    for m in range(1, f):
        alpha[:, m] = special.jnp_zeros(m, k)
    weights = np.full((k, f), 4.0)
    if f > 1:
        a2 = alpha[:, 1:] ** 2
        m2 = np.arange(1, f, dtype=float) ** 2
        weights[:, 1:] = 8.0 * a2 / (a2 - m2)
    alpha.setflags(write=False)
    weights.setflags(write=False)
    return alpha, weights


_CYLINDER_RANGES = {
    "mu": ORIENTATION_RANGE,
    "lambda_par": (0.1, 3),
    "diameter": (1e-2, 20),
}
_CYLINDER_SCALES = {
    "mu": np.r_[1.0, 1.0],
    "lambda_par": DIFFUSIVITY_SCALING,
    "diameter": DIAMETER_SCALING,
}
_CYLINDER_TYPES = {"mu": "orientation", "lambda_par": "normal", "diameter": "cylinder"}
_CYLINDER_UNITS = {"mu": ANGLE, "lambda_par": DIFFUSIVITY, "diameter": LENGTH}


def _positive_constant(owner: str, name: str, value: Any) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{owner}: {name} must be a number, got {value!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise InputError(f"{owner}: {name} must be positive and finite, got {value}")
    return value


class C1Stick(CompartmentModel):
    """Stick: a cylinder of zero radius, E = exp(-b lambda_par u²) (Behrens et al. 2003).

    Parameters
    ----------
    mu : [theta, phi], optional
        Axis orientation in radians (theta in [0, pi], phi in [-pi, pi]).
    lambda_par : float, optional
        Parallel diffusivity in m²/s.
    """

    _required_acquisition_parameters = ["bvalues", "gradient_directions"]
    _parameter_ranges = {"mu": ORIENTATION_RANGE, "lambda_par": (0.1, 3)}
    _parameter_scales = {"mu": np.r_[1.0, 1.0], "lambda_par": DIFFUSIVITY_SCALING}
    _parameter_types = {"mu": "orientation", "lambda_par": "normal"}
    _parameter_units = {"mu": ANGLE, "lambda_par": DIFFUSIVITY}

    def __init__(self, mu: ArrayLike | None = None, lambda_par: float | None = None) -> None:
        super().__init__(mu=mu, lambda_par=lambda_par)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        run_kernel(kernels.stick_signal, self._work(out), meas.b, cos, params["lambda_par"], out)

    def _spherical_mean_kernel(self, meas: Any, arrays: MeasurementArrays,
                               params: dict[str, np.ndarray], out: np.ndarray) -> None:
        n = out.shape[0]
        zeros = np.zeros(n)
        run_kernel(kernels.axisymmetric_gaussian_spherical_mean, self._work(out), arrays.b,
                   np.zeros(arrays.size), params["lambda_par"], zeros, zeros, out)


class C2CylinderStejskalTannerApproximation(CompartmentModel):
    """Cylinder of finite radius, short pulses and long diffusion time (Soderman 1995).

    E = stick(lambda_par) x (2 J_1(x) / x)², x = 2 pi q_perp R. Needs q-values.

    Parameters
    ----------
    mu : [theta, phi], optional
        Axis orientation in radians.
    lambda_par : float, optional
        Parallel diffusivity in m²/s.
    diameter : float, optional
        Cylinder diameter in m.
    """

    _required_acquisition_parameters = ["bvalues", "gradient_directions", "qvalues"]
    _work_per_value = 40.0
    _parameter_ranges = _CYLINDER_RANGES
    _parameter_scales = _CYLINDER_SCALES
    _parameter_types = _CYLINDER_TYPES
    _parameter_units = _CYLINDER_UNITS

    def __init__(self, mu: ArrayLike | None = None, lambda_par: float | None = None,
                 diameter: float | None = None) -> None:
        super().__init__(mu=mu, lambda_par=lambda_par, diameter=diameter)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        run_kernel(kernels.cylinder_stejskal_tanner_signal, self._work(out), meas.b,
                   meas.q(self._name), cos, params["lambda_par"], params["diameter"], out)


class C3CylinderCallaghanApproximation(CompartmentModel):
    """Cylinder of finite radius with finite diffusion time (Callaghan 1995).

    Needs q-values and the diffusion time tau = Delta - delta/3.

    Parameters
    ----------
    mu : [theta, phi], optional
        Axis orientation in radians.
    lambda_par : float, optional
        Parallel diffusivity in m²/s.
    diameter : float, optional
        Cylinder diameter in m.
    diffusion_perpendicular : float
        Intra-cylinder diffusivity in m²/s (default 1.7e-9).
    number_of_roots, number_of_functions : int
        Size of the series (roots per Bessel order, Bessel orders); defaults 20 and 50.
    """

    _required_acquisition_parameters = ["bvalues", "gradient_directions", "qvalues", "tau"]
    _work_per_value = 2000.0
    _parameter_ranges = _CYLINDER_RANGES
    _parameter_scales = _CYLINDER_SCALES
    _parameter_types = _CYLINDER_TYPES
    _parameter_units = _CYLINDER_UNITS
    _constant_names = ("diffusion_perpendicular", "number_of_roots", "number_of_functions")
    diffusion_perpendicular: float
    number_of_roots: int
    number_of_functions: int

    def __init__(self, mu: ArrayLike | None = None, lambda_par: float | None = None,
                 diameter: float | None = None,
                 diffusion_perpendicular: float = WATER_IN_AXONS_DIFFUSION_CONSTANT,
                 number_of_roots: int = 20, number_of_functions: int = 50) -> None:
        name = type(self).__name__
        diffusion_perpendicular = _positive_constant(name, "diffusion_perpendicular",
                                                     diffusion_perpendicular)
        if int(number_of_roots) < 1 or int(number_of_functions) < 1:
            raise InputError(f"{name}: number_of_roots and number_of_functions must be "
                             "at least 1")
        super().__init__(mu=mu, lambda_par=lambda_par, diameter=diameter,
                         diffusion_perpendicular=diffusion_perpendicular,
                         number_of_roots=int(number_of_roots),
                         number_of_functions=int(number_of_functions))

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        alpha, weights = callaghan_roots(self.number_of_roots, self.number_of_functions)
        q = meas.q(self._name)
        index, deltas, Deltas = meas.timings(self._name)
        taus = np.ascontiguousarray(Deltas - deltas / 3.0)
        run_kernel(kernels.cylinder_callaghan_signal, self._work(out), meas.b, q, index, taus, cos,
                   params["lambda_par"], params["diameter"], alpha, weights,
                   self.diffusion_perpendicular, out)


class C4CylinderGaussianPhaseApproximation(CompartmentModel):
    """Cylinder of finite radius, Gaussian phase approximation (Van Gelderen et al. 1994).

    Depends on gradient strength, delta and Delta of every measurement.

    Parameters
    ----------
    mu : [theta, phi], optional
        Axis orientation in radians.
    lambda_par : float, optional
        Parallel diffusivity in m²/s.
    diameter : float, optional
        Cylinder diameter in m.
    diffusion_perpendicular : float
        Intra-cylinder diffusivity in m²/s (default 1.7e-9).
    """

    _required_acquisition_parameters = [
        "bvalues", "gradient_directions", "gradient_strengths", "delta", "Delta"]
    _work_per_value = 4.0
    _parameter_ranges = _CYLINDER_RANGES
    _parameter_scales = _CYLINDER_SCALES
    _parameter_types = _CYLINDER_TYPES
    _parameter_units = _CYLINDER_UNITS
    _constant_names = ("diffusion_perpendicular",)
    diffusion_perpendicular: float

    def __init__(self, mu: ArrayLike | None = None, lambda_par: float | None = None,
                 diameter: float | None = None,
                 diffusion_perpendicular: float = WATER_IN_AXONS_DIFFUSION_CONSTANT) -> None:
        diffusion_perpendicular = _positive_constant(
            type(self).__name__, "diffusion_perpendicular", diffusion_perpendicular)
        super().__init__(mu=mu, lambda_par=lambda_par, diameter=diameter,
                         diffusion_perpendicular=diffusion_perpendicular)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        gg = meas.gamma_g(self._name)
        index, deltas, Deltas = meas.timings(self._name)
        run_kernel(kernels.cylinder_gaussian_phase_signal, self._work(out), meas.b, gg, index,
                   deltas, Deltas, cos, params["lambda_par"], params["diameter"],
                   cylinder_gpa_roots(), self.diffusion_perpendicular, out)
