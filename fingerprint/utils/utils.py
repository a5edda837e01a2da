"""Coordinate conversions, rotations and parameter links under dmipy's names.

Angles are in radians: ``theta`` the polar angle from +z in [0, pi], ``phi`` the azimuth
from +x in (-pi, pi]. An orientation ``mu`` is the pair ``[theta, phi]`` of a unit vector.
Spherical coordinates are ``[r, theta, phi]``.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.core.orientations import mu_to_vectors
from fingerprint.errors import InputError

__all__ = [
    "R2mu_psi",
    "T1_tortuosity",
    "cart2mu",
    "cart2sphere",
    "define_shell_indices",
    "fractional_parameter",
    "parameter_equality",
    "perpendicular_vector",
    "rotation_matrix_001_to_xyz",
    "rotation_matrix_100_to_theta_phi",
    "rotation_matrix_100_to_theta_phi_psi",
    "rotation_matrix_100_to_xyz",
    "rotation_matrix_around_100",
    "sphere2cart",
    "unitsphere2cart_1d",
    "unitsphere2cart_Nd",
]


def _last_axis(value: ArrayLike, size: int, name: str) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if arr.ndim == 0 or arr.shape[-1] != size:
        raise InputError(f"{name} must have last dimension {size}, got shape {arr.shape}")
    return arr


def cart2sphere(cartesian_coordinates: ArrayLike) -> np.ndarray:
    """Cartesian ``(..., 3)`` to spherical ``(..., 3) = [r, theta, phi]`` (r in the input's
    unit, angles in radians). The zero vector maps to ``[0, 0, 0]``."""
    xyz = _last_axis(cartesian_coordinates, 3, "cartesian_coordinates")
    r = np.linalg.norm(xyz, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        theta = np.where(r > 0, np.arccos(np.clip(xyz[..., 2] / np.where(r > 0, r, 1.0),
                                                  -1.0, 1.0)), 0.0)
    phi = np.arctan2(xyz[..., 1], xyz[..., 0])
    return np.stack([r, theta, phi], axis=-1)


def sphere2cart(spherical_coordinates: ArrayLike) -> np.ndarray:
    """Spherical ``(..., 3) = [r, theta, phi]`` (angles in radians) to Cartesian
    ``(..., 3)``."""
    sph = _last_axis(spherical_coordinates, 3, "spherical_coordinates")
    return sph[..., :1] * mu_to_vectors(sph[..., 1:])


def cart2mu(xyz: ArrayLike) -> np.ndarray:
    """Orientations ``(..., 2) = [theta, phi]`` (radians) of Cartesian vectors
    ``(..., 3)``."""
    return cart2sphere(xyz)[..., 1:]


def unitsphere2cart_1d(mu: ArrayLike) -> np.ndarray:
    """Unit vector ``(3,)`` of one orientation ``mu = [theta, phi]`` (radians)."""
    arr = _last_axis(mu, 2, "mu")
    if arr.shape != (2,):
        raise InputError(f"unitsphere2cart_1d takes one orientation (2,), got {arr.shape}")
    return mu_to_vectors(arr)


def unitsphere2cart_Nd(mu: ArrayLike) -> np.ndarray:  # noqa: N802 - dmipy's name
    """Unit vectors ``(..., 3)`` of orientations ``mu`` ``(..., 2) = [theta, phi]``
    (radians)."""
    return mu_to_vectors(_last_axis(mu, 2, "mu"))


def perpendicular_vector(v: ArrayLike) -> np.ndarray:
    """A unit vector perpendicular to ``v`` (3,): ``v x e_x`` normalised, or ``v x e_y``
    when ``v`` lies along x (dmipy's choice)."""
    vec = _last_axis(v, 3, "v").astype(float).reshape(3)
    if not np.any(vec):
        raise InputError("perpendicular_vector: v is the zero vector")
    other = np.array([0.0, 1.0, 0.0]) if vec[1] == 0 and vec[2] == 0 else np.array(
        [1.0, 0.0, 0.0])
    out = np.cross(vec, other)
    return out / np.linalg.norm(out)


def rotation_matrix_around_100(psi: float) -> np.ndarray:
    """Rotation (3, 3) by ``psi`` (radians) about the x axis."""
    c, s = np.cos(psi), np.sin(psi)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


def _minimal_rotation(source: np.ndarray, target: ArrayLike) -> np.ndarray:
    """The rotation (3, 3) of least angle taking unit vector ``source`` to ``target``."""
    t = np.asarray(target, dtype=float).reshape(3)
    norm = np.linalg.norm(t)
    if norm == 0:
        raise InputError("rotation target is the zero vector")
    t = t / norm
    axis = np.cross(source, t)
    s = np.linalg.norm(axis)
    c = float(source @ t)
    if s < 1e-15:
        if c > 0:
            return np.eye(3)
        # antiparallel: half turn about an axis perpendicular to source
        p = perpendicular_vector(source)
        return 2.0 * np.outer(p, p) - np.eye(3)
    k = axis / s
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + s * kx + (1.0 - c) * (kx @ kx)


def rotation_matrix_100_to_xyz(x: float, y: float, z: float) -> np.ndarray:
    """Least-angle rotation (3, 3) taking ``[1, 0, 0]`` to the direction ``(x, y, z)``."""
    return _minimal_rotation(np.array([1.0, 0.0, 0.0]), [x, y, z])


def rotation_matrix_001_to_xyz(x: float, y: float, z: float) -> np.ndarray:
    """Least-angle rotation (3, 3) taking ``[0, 0, 1]`` to the direction ``(x, y, z)``."""
    return _minimal_rotation(np.array([0.0, 0.0, 1.0]), [x, y, z])


def rotation_matrix_100_to_theta_phi(theta: float, phi: float) -> np.ndarray:
    """Least-angle rotation (3, 3) taking ``[1, 0, 0]`` to the orientation
    ``(theta, phi)`` (radians)."""
    return rotation_matrix_100_to_xyz(*mu_to_vectors(np.array([theta, phi], dtype=float)))


def rotation_matrix_100_to_theta_phi_psi(theta: float, phi: float, psi: float) -> np.ndarray:
    """Rotation (3, 3): first by ``psi`` about x, then x to ``(theta, phi)`` (radians);
    the frame of dmipy's Bingham distribution."""
    return rotation_matrix_100_to_theta_phi(theta, phi) @ rotation_matrix_around_100(psi)


def R2mu_psi(R: ArrayLike) -> tuple[np.ndarray, float]:  # noqa: N802 - dmipy's name
    """Inverse of :func:`rotation_matrix_100_to_theta_phi_psi`: ``(mu, psi)`` (radians)
    of a rotation matrix (3, 3)."""
    rot = np.asarray(R, dtype=float)
    if rot.shape != (3, 3):
        raise InputError(f"R must be a (3, 3) rotation matrix, got shape {rot.shape}")
    mu = cart2mu(rot[:, 0])
    around = rotation_matrix_100_to_theta_phi(*mu).T @ rot
    return mu, float(np.arctan2(around[2, 1], around[1, 1]))


def tortuosity(lambda_par: np.ndarray, vf_intra: np.ndarray,
               vf_extra: np.ndarray | None = None, S0_intra: float = 1.0,  # noqa: N803
               S0_extra: float = 1.0) -> np.ndarray:
    """Tortuous perpendicular diffusivity (m²/s), dmipy's ``T1_tortuosity``.

    With a nested intra fraction only: ``(1 - vf_intra) * lambda_par``. With both fractions
    dmipy first normalises the intra fraction, ``n = vf_intra / (vf_intra + vf_extra)``,
    then uses ``f = n / (n + vf_extra)`` and returns ``(1 - f) * lambda_par``; this is kept
    as is for compatibility (it equals ``vf_extra / (vf_intra + vf_extra) * lambda_par``
    whenever the two fractions sum to one).

    Multi-tissue models give the S0 responses of the intra- and extra-axonal tissues: the
    signal fractions become volume fractions first, ``f = n S0_extra / (n S0_extra +
    e S0_intra)`` with ``n`` the (normalised) intra and ``e`` the extra fraction.
    """
    lambda_par = np.asarray(lambda_par, dtype=float)
    vf_intra = np.asarray(vf_intra, dtype=float)
    if vf_extra is None:
        if S0_intra == S0_extra:
            return (1.0 - vf_intra) * lambda_par
        n, e = vf_intra, 1.0 - vf_intra
    else:
        e = np.asarray(vf_extra, dtype=float)
        with np.errstate(invalid="ignore", divide="ignore"):
            n = vf_intra / (vf_intra + e)
    with np.errstate(invalid="ignore", divide="ignore"):
        f = n * S0_extra / (n * S0_extra + e * S0_intra)
    return (1.0 - f) * lambda_par


class T1_tortuosity:  # noqa: N801 - dmipy's name
    """Tortuosity link: the extra-axonal perpendicular diffusivity (m²/s) from the
    parallel one and the volume fractions.

    ``S0_intra`` and ``S0_extra`` are the S0 responses of the intra- and extra-axonal
    tissues (multi-tissue models); the signal fractions are turned into volume fractions
    with them before the tortuosity ``lambda_perp = (1 - f_intra) lambda_par`` is applied
    (:func:`tortuosity`).
    """

    def __init__(self, S0_intra: float = 1.0, S0_extra: float = 1.0) -> None:  # noqa: N803
        for name, value in (("S0_intra", S0_intra), ("S0_extra", S0_extra)):
            if not np.isfinite(value) or value <= 0:
                raise InputError(f"T1_tortuosity: {name} must be a positive number, got "
                                 f"{value!r}")
        self.S0_intra = S0_intra
        self.S0_extra = S0_extra

    def __call__(self, lambda_par: ArrayLike, vf_intra: ArrayLike,
                 vf_extra: ArrayLike | None = None) -> np.ndarray:
        """``lambda_par`` (m²/s); ``vf_intra`` the nested intra fraction when ``vf_extra``
        is None, else the intra and extra fractions (their sum at most 1)."""
        return tortuosity(np.asarray(lambda_par, dtype=float),
                          np.asarray(vf_intra, dtype=float),
                          None if vf_extra is None else np.asarray(vf_extra, dtype=float),
                          self.S0_intra, self.S0_extra)

    def __repr__(self) -> str:
        return f"T1_tortuosity(S0_intra={self.S0_intra!r}, S0_extra={self.S0_extra!r})"


def parameter_equality(param: ArrayLike) -> ArrayLike:
    """The identity link of :meth:`set_equal_parameter`."""
    return param


def fractional_parameter(fractional_parameter: ArrayLike, parameter2: ArrayLike) -> np.ndarray:
    """A parameter given as a fraction (0-1) of ``parameter2``: their product."""
    return np.asarray(fractional_parameter, dtype=float) * np.asarray(parameter2, dtype=float)


def define_shell_indices(bvals: ArrayLike, b_value_ranges: ArrayLike
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Shell index of each b-value (s/m²) from explicit ranges ``[[lo, hi], ...]``
    (inclusive) and the mean b-value of each shell. Every b-value must fall in exactly
    one range."""
    b = np.asarray(bvals, dtype=float).reshape(-1)
    ranges = np.asarray(b_value_ranges, dtype=float)
    if ranges.ndim != 2 or ranges.shape[1] != 2:
        raise InputError(f"b_value_ranges must be (n_shells, 2), got shape {ranges.shape}")
    inside = (b[:, None] >= ranges[None, :, 0]) & (b[:, None] <= ranges[None, :, 1])
    counts = inside.sum(axis=1)
    if np.any(counts != 1):
        bad = b[counts != 1][:3]
        raise InputError(f"b-values {bad.tolist()} fall in {'no' if counts.min() == 0 else ''}"
                         " or several of the given b_value_ranges")
    indices = np.argmax(inside, axis=1)
    means = np.array([b[indices == k].mean() if np.any(indices == k) else np.nan
                      for k in range(ranges.shape[0])])
    return indices, means
