"""Capped cylinders: cylinders of finite length (dmipy's
CC2CappedCylinderStejskalTannerApproximation and CC3CappedCylinderCallaghanApproximation).

The signal factorises into restricted diffusion across the cylinder (diameter) and
between its caps (length, planes at distance ``length``) with the gradient split into
``q_perp = q sqrt(1 - t^2)`` and ``q_par = q |t|``, ``t`` the cosine to the axis:

* CC2: short pulses, long diffusion time; Soderman cylinder x Balinov slab (both exact
  in that limit).
* CC3: short pulses, finite diffusion time; Callaghan cylinder series x exact slab
  eigenmode series (see :mod:`fingerprint.signal_models.plane_models`).

Parameters (SI): ``mu`` ([theta, phi], rad), ``diameter`` (m), ``length`` (m). dmipy's
classes lose ``length`` from their parameter list (the plane's ``diameter`` overwrites the
cylinder's); here both are parameters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from fingerprint.core import units
from fingerprint.core.constants import WATER_IN_AXONS_DIFFUSION_CONSTANT
from fingerprint.errors import InputError
from fingerprint.kernels import compartments as kernels
from fingerprint.kernels import run_kernel
from fingerprint.signal_models.base import (
    DIAMETER_SCALING,
    ORIENTATION_RANGE,
    CompartmentModel,
    MeasurementArrays,
)
from fingerprint.signal_models.cylinder_models import callaghan_roots
from fingerprint.signal_models.plane_models import plane_callaghan, plane_stejskal_tanner

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = ["CC2CappedCylinderStejskalTannerApproximation",
           "CC3CappedCylinderCallaghanApproximation"]

_RANGES = {"mu": ORIENTATION_RANGE, "diameter": (1e-2, 20), "length": (1e-2, 20)}
_SCALES = {"mu": np.r_[1.0, 1.0], "diameter": DIAMETER_SCALING, "length": DIAMETER_SCALING}
_TYPES = {"mu": "orientation", "diameter": "cylinder", "length": "plane"}
_UNITS = {"mu": units.ANGLE, "diameter": units.LENGTH, "length": units.LENGTH}


def _cosines(cos: np.ndarray | None, out: np.ndarray) -> np.ndarray:
    assert cos is not None
    return np.broadcast_to(cos, out.shape)


class CC2CappedCylinderStejskalTannerApproximation(CompartmentModel):
    """Capped cylinder, short pulses and long diffusion time. Needs q-values."""

    _required_acquisition_parameters = ["bvalues", "gradient_directions", "qvalues"]
    _parameter_ranges = _RANGES
    _parameter_scales = _SCALES
    _parameter_types = _TYPES
    _parameter_units = _UNITS
    _work_per_value = 45.0

    def __init__(self, mu: ArrayLike | None = None, diameter: float | None = None,
                 length: float | None = None) -> None:
        super().__init__(mu=mu, diameter=diameter, length=length)

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        t = _cosines(cos, out)
        q = meas.q(self._name)
        zero = np.zeros_like(params["diameter"])
        run_kernel(kernels.cylinder_stejskal_tanner_signal, self._work(out), meas.b, q,
                   np.ascontiguousarray(cos), zero, params["diameter"], out)
        out *= plane_stejskal_tanner(q[None, :] * np.abs(t), params["length"])


class CC3CappedCylinderCallaghanApproximation(CompartmentModel):
    """Capped cylinder, short pulses, finite diffusion time ``tau = Delta - delta / 3``.

    ``diffusion_intra`` (m²/s, default 1.7e-9) is the diffusivity inside; the series
    sizes default to dmipy's (cylinder: 20 roots x 50 functions; caps: 2 x 40 modes).
    """

    _required_acquisition_parameters = ["bvalues", "gradient_directions", "qvalues", "tau"]
    _parameter_ranges = _RANGES
    _parameter_scales = _SCALES
    _parameter_types = _TYPES
    _parameter_units = _UNITS
    _work_per_value = 2100.0
    _constant_names = ("diffusion_intra", "number_of_roots_cylinder",
                       "number_of_functions_cylinder", "number_of_roots_plane")
    diffusion_intra: float
    number_of_roots_cylinder: int
    number_of_functions_cylinder: int
    number_of_roots_plane: int

    def __init__(self, mu: ArrayLike | None = None, diameter: float | None = None,
                 length: float | None = None,
                 diffusion_intra: float = WATER_IN_AXONS_DIFFUSION_CONSTANT,
                 number_of_roots_cylinder: int = 20, number_of_functions_cylinder: int = 50,
                 number_of_roots_plane: int = 40) -> None:
        name = type(self).__name__
        value = float(diffusion_intra)
        if not np.isfinite(value) or value <= 0:
            raise InputError(f"{name}: diffusion_intra must be positive, got "
                             f"{diffusion_intra!r}")
        sizes = (number_of_roots_cylinder, number_of_functions_cylinder,
                 number_of_roots_plane)
        if any(isinstance(v, bool) or int(v) < 1 for v in sizes):
            raise InputError(f"{name}: the numbers of roots and functions must be >= 1")
        super().__init__(mu=mu, diameter=diameter, length=length, diffusion_intra=value,
                         number_of_roots_cylinder=int(number_of_roots_cylinder),
                         number_of_functions_cylinder=int(number_of_functions_cylinder),
                         number_of_roots_plane=int(number_of_roots_plane))

    def _kernel(self, meas: MeasurementArrays, cos: np.ndarray | None,
                params: dict[str, np.ndarray], out: np.ndarray) -> None:
        t = _cosines(cos, out)
        q = meas.q(self._name)
        index, deltas, Deltas = meas.timings(self._name)
        taus = np.ascontiguousarray(Deltas - deltas / 3.0)
        alpha, weights = callaghan_roots(self.number_of_roots_cylinder,
                                         self.number_of_functions_cylinder)
        zero = np.zeros_like(params["diameter"])
        run_kernel(kernels.cylinder_callaghan_signal, self._work(out), meas.b, q, index, taus,
                   np.ascontiguousarray(cos), zero, params["diameter"], alpha, weights,
                   self.diffusion_intra, out)
        out *= plane_callaghan(q[None, :] * np.abs(t), taus[index], params["length"],
                               self.diffusion_intra, 2 * self.number_of_roots_plane)
