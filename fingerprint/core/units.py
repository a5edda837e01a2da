"""Units of model parameters, as written in map sidecars (BIDS, CMIXF notation, SI).

Each compartment declares the unit of each of its parameters next to their ranges
(``_parameter_units``), each distributed model those of its distribution's parameters
(``_distribution_units``); models expose them as ``parameter_units``. Sidecars, docs and
checks read them from there, never from parameter names.
"""

from __future__ import annotations

__all__ = ["ANGLE", "AREA", "DIFFUSIVITY", "DIMENSIONLESS", "KNOWN_UNITS", "LENGTH", "TIME"]

#: m²/s (diffusivities)
DIFFUSIVITY = "m^2/s"
#: m (diameters, radii, Gamma scales)
LENGTH = "m"
#: m² (the temporal zeppelin's characteristic coefficient A)
AREA = "m^2"
#: rad (orientations theta/phi, Bingham psi)
ANGLE = "rad"
#: s (pulse timing)
TIME = "s"
#: volume fractions, dispersion indices, shapes: no unit
DIMENSIONLESS = "n/a"

KNOWN_UNITS = (DIFFUSIVITY, LENGTH, AREA, ANGLE, TIME, DIMENSIONLESS)
