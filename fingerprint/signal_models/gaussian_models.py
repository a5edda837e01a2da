"""Gaussian compartments: G1Ball, G2Zeppelin, G3TemporalZeppelin (dmipy names, SI units)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.units import ANGLE, AREA, DIFFUSIVITY
from fingerprint.kernels import compartments as kernels
from fingerprint.kernels import run_kernel
from fingerprint.signal_models.base import (
    A_SCALING,
    DIFFUSIVITY_SCALING,
    ORIENTATION_RANGE,
    CompartmentModel,
    MeasurementArrays,
)

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["G1Ball", "G2Zeppelin", "G3TemporalZeppelin"]


class G1Ball(CompartmentModel):
    """Ball: isotropic Gaussian diffusion, E = exp(-b lambda_iso) (Behrens et al. 2003).

    Parameters
    ----------
    lambda_iso : float, optional
        Isotropic diffusivity in m²/s (fixed default when given).
    """

    _required_acquisition_parameters = ["bvalues"]
    _parameter_ranges = {"lambda_iso": (0.1, 3)}
    _parameter_scales = {"lambda_iso": DIFFUSIVITY_SCALING}
    _parameter_types = {"lambda_iso": "normal"}
    _parameter_units = {"lambda_iso": DIFFUSIVITY}
    is_isotropic = True

    def __init__(self, lambda_iso: float | None = None) -> None:
        super().__init__(lambda_iso=lambda_iso)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        run_kernel(kernels.ball_signal, self._work(out), meas.b, params["lambda_iso"], out)


class G2Zeppelin(CompartmentModel):
    """Zeppelin: axially symmetric tensor (Panagiotaki et al. 2012).

    E = exp(-b (lambda_par u² + lambda_perp (1 - u²))), u = cos(gradient, mu).

    Parameters
    ----------
    mu : [theta, phi], optional
        Axis orientation in radians.
    lambda_par, lambda_perp : float, optional
        Parallel and perpendicular diffusivities in m²/s.
    """

    _required_acquisition_parameters = ["bvalues", "gradient_directions"]
    _parameter_ranges = {
        "mu": ORIENTATION_RANGE,
        "lambda_par": (0.1, 3),
        "lambda_perp": (0.1, 3),
    }
    _parameter_scales = {
        "mu": np.r_[1.0, 1.0],
        "lambda_par": DIFFUSIVITY_SCALING,
        "lambda_perp": DIFFUSIVITY_SCALING,
    }
    _parameter_types = {"mu": "orientation", "lambda_par": "normal", "lambda_perp": "normal"}
    _parameter_units = {"mu": ANGLE, "lambda_par": DIFFUSIVITY, "lambda_perp": DIFFUSIVITY}

    def __init__(self, mu: ArrayLike | None = None, lambda_par: float | None = None,
                 lambda_perp: float | None = None) -> None:
        super().__init__(mu=mu, lambda_par=lambda_par, lambda_perp=lambda_perp)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        run_kernel(kernels.zeppelin_signal, self._work(out), meas.b, cos, params["lambda_par"],
                   params["lambda_perp"], out)

    def _spherical_mean_kernel(self, meas: Any, arrays: MeasurementArrays,
                               params: dict[str, np.ndarray], out: np.ndarray) -> None:
        n = out.shape[0]
        run_kernel(kernels.axisymmetric_gaussian_spherical_mean, self._work(out), arrays.b,
                   np.zeros(arrays.size), params["lambda_par"], params["lambda_perp"], np.zeros(n),
                   out)


class G3TemporalZeppelin(CompartmentModel):
    """Zeppelin with a time-dependent perpendicular diffusivity (Burcaw et al. 2015).

    lambda_perp = lambda_inf + A (ln(Delta / delta) + 3/2) / (Delta - delta / 3) per
    measurement; needs delta and Delta.

    Parameters
    ----------
    mu : [theta, phi], optional
        Axis orientation in radians.
    lambda_par, lambda_inf : float, optional
        Parallel and long-time perpendicular diffusivities in m²/s.
    A : float, optional
        Characteristic coefficient in m².
    """

    _required_acquisition_parameters = ["bvalues", "gradient_directions", "delta", "Delta"]
    _parameter_ranges = {
        "mu": ORIENTATION_RANGE,
        "lambda_par": (0.1, 3),
        "lambda_inf": (0.1, 3),
        "A": (0, 10),
    }
    _parameter_scales = {
        "mu": np.r_[1.0, 1.0],
        "lambda_par": DIFFUSIVITY_SCALING,
        "lambda_inf": DIFFUSIVITY_SCALING,
        "A": A_SCALING,
    }
    _parameter_types = {
        "mu": "orientation",
        "lambda_par": "normal",
        "lambda_inf": "normal",
        "A": "normal",
    }
    _parameter_units = {"mu": ANGLE, "lambda_par": DIFFUSIVITY, "lambda_inf": DIFFUSIVITY,
                        "A": AREA}

    def __init__(self, mu: ArrayLike | None = None, lambda_par: float | None = None,
                 lambda_inf: float | None = None, A: float | None = None) -> None:
        super().__init__(mu=mu, lambda_par=lambda_par, lambda_inf=lambda_inf, A=A)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        run_kernel(kernels.temporal_zeppelin_signal, self._work(out), meas.b,
                   meas.time_factor(self._name), cos, params["lambda_par"],
                   params["lambda_inf"], params["A"], out)

    def _spherical_mean_kernel(self, meas: Any, arrays: MeasurementArrays,
                               params: dict[str, np.ndarray], out: np.ndarray) -> None:
        run_kernel(kernels.axisymmetric_gaussian_spherical_mean, self._work(out), arrays.b,
                   arrays.time_factor(self._name), params["lambda_par"],
                   params["lambda_inf"], params["A"], out)
