"""Orientations: dmipy's (theta, phi) angles <-> unit vectors, and the angle between axes.
The one implementation every layer uses (compartments, models, fibre frames, maps,
phantoms and tests).

Conventions (dmipy's): theta in [0, pi] from +z, phi = atan2(y, x) in (-pi, pi], radians.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.errors import InputError

__all__ = ["angular_error_deg", "fibonacci_hemisphere", "mu_to_vectors", "vectors_to_mu"]


def mu_to_vectors(mu: ArrayLike, *, nonfinite: float | None = None) -> np.ndarray:
    """Unit vectors (..., 3) of angles ``mu`` (..., 2) = (theta, phi) in radians.

    ``nonfinite``: the value given to the components of vectors that are not finite
    (None: left as they are, NaN in, NaN out)."""
    arr = np.asarray(mu, dtype=np.float64)
    if arr.shape[-1:] != (2,):
        raise InputError(f"mu must hold the two angles (theta, phi) in radians; got shape "
                         f"{arr.shape}")
    theta, phi = arr[..., 0], arr[..., 1]
    st = np.sin(theta)
    out = np.stack([st * np.cos(phi), st * np.sin(phi), np.cos(theta)], axis=-1)
    if nonfinite is not None:
        out[~np.isfinite(out)] = nonfinite
    return out


def vectors_to_mu(vectors: ArrayLike, *, normalise: bool = False) -> np.ndarray:
    """Angles (..., 2) = (theta, phi) in radians of unit vectors (..., 3) (``normalise``:
    of any non-zero vectors)."""
    arr = np.asarray(vectors, dtype=np.float64)
    if arr.shape[-1:] != (3,):
        raise InputError(f"vectors must have 3 components; got shape {arr.shape}")
    z = arr[..., 2]
    if normalise:
        with np.errstate(invalid="ignore", divide="ignore"):
            z = z / np.linalg.norm(arr, axis=-1)
    return np.stack([np.arccos(np.clip(z, -1.0, 1.0)), np.arctan2(arr[..., 1], arr[..., 0])],
                    axis=-1)


def angular_error_deg(a: ArrayLike, b: ArrayLike) -> np.ndarray:
    """Angle in degrees between axes (antipodally symmetric) of vectors (..., 3)."""
    va = np.asarray(a, dtype=np.float64)
    vb = np.asarray(b, dtype=np.float64)
    na = np.linalg.norm(va, axis=-1)
    nb = np.linalg.norm(vb, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.abs(np.sum(va * vb, axis=-1)) / (na * nb)
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def fibonacci_hemisphere(n_points: int) -> np.ndarray:
    """Quasi-uniform unit vectors (n_points, 3) on the upper hemisphere (Fibonacci
    lattice)."""
    i = np.arange(n_points) + 0.5
    z = 1.0 - i / n_points
    r = np.sqrt(1.0 - z * z)
    phi = np.pi * (3.0 - np.sqrt(5.0)) * i
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)
