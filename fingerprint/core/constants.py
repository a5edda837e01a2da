"""Physical constants used by fingerprint (SI units).

``CONSTANTS`` mirrors the dictionary of the same name in dmipy so that ported scripts
that look constants up by name keep working.
"""

from __future__ import annotations

from types import MappingProxyType

__all__ = [
    "CONSTANTS",
    "GYROMAGNETIC_RATIO",
    "WATER_DIFFUSION_CONSTANT",
    "WATER_IN_AXONS_DIFFUSION_CONSTANT",
]

#: Gyromagnetic ratio of the proton (water), rad s⁻¹ T⁻¹. dmipy's value (CODATA gives
#: 2.6752219e8): schemes given as gradient strengths then agree with dmipy exactly.
GYROMAGNETIC_RATIO: float = 2.67513e8

#: Self-diffusivity of free water at body temperature, m² s⁻¹.
WATER_DIFFUSION_CONSTANT: float = 3.0e-9

#: Intra-axonal parallel diffusivity commonly assumed in white matter, m² s⁻¹.
WATER_IN_AXONS_DIFFUSION_CONSTANT: float = 1.7e-9

#: Read-only name -> value mapping (dmipy's key names).
CONSTANTS = MappingProxyType({
    "water_gyromagnetic_ratio": GYROMAGNETIC_RATIO,
    "water_diffusion_constant": WATER_DIFFUSION_CONSTANT,
    "water_in_axons_diffusion_constant": WATER_IN_AXONS_DIFFUSION_CONSTANT,
})
