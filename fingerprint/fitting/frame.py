"""Per-voxel fibre frame: the axis that voxel features are computed around.

The first guess is the principal eigenvector of a diffusion tensor fitted by linear least
squares to log(S/S0) of the diffusion-weighted measurements with b <= ``max_b``
(3.5e9 s/m² by default: the whole HCP scheme; higher shells are dominated by kurtosis).
The pseudo-inverse of the design matrix is computed once per scheme, so a voxel costs one
(6 x M) matrix-vector product and an analytic 3x3 eigenvector.

The guess is then optionally refined (``refine_iterations`` > 0) by Gauss-Newton on the
axis of the per-shell zonal Legendre model that the features use
(:func:`fingerprint.kernels.features.refine_frames`): it finds the axis around which the
signal is most axially symmetric, which is less noisy than the tensor's eigenvector
because it uses every shell with the right (non-Gaussian) angular profile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fingerprint.core.orientations import mu_to_vectors, vectors_to_mu
from fingerprint.errors import InputError

if TYPE_CHECKING:  # the feature map builds on the frame estimator
    from fingerprint.fitting.features import FeatureMap

__all__ = ["DEFAULT_MAX_B", "FrameEstimator", "frames_to_angles", "angles_to_frames"]

#: Gauss-Newton steps of :meth:`FrameEstimator.align` (wm-gm benchmark odi MAE with 2 steps
#: 0.0271, 3: 0.0268, 4: 0.0267).
ALIGN_ITERATIONS = 3
#: Largest b-value (s/m²) used by the tensor fit.
DEFAULT_MAX_B = 3.5e9
_LOG_FLOOR = 1e-3


def frames_to_angles(frames: np.ndarray) -> np.ndarray:
    """(theta, phi) in radians (n, 2) of unit vectors (n, 3), dmipy's convention
    (theta from +z, phi = atan2(y, x))."""
    return vectors_to_mu(np.asarray(frames, dtype=np.float64).reshape(-1, 3))


def angles_to_frames(angles: np.ndarray) -> np.ndarray:
    """Unit vectors (n, 3) of (theta, phi) angles (n, 2) in radians."""
    return mu_to_vectors(np.asarray(angles, dtype=np.float64).reshape(-1, 2))


@dataclass(frozen=True, eq=False)
class FrameEstimator:
    """Estimates each voxel's fibre axis (immutable, thread-safe).

    Attributes
    ----------
    columns: measurements used by the tensor fit.
    pinv: (6, M) pseudo-inverse of the tensor design matrix.
    directions, shell_of, n_coefficients: the zonal model used by the refinement.
    refine_iterations: Gauss-Newton iterations of the refinement (0: tensor only).
    """

    columns: np.ndarray
    pinv: np.ndarray
    directions: np.ndarray
    shell_of: np.ndarray
    n_coefficients: np.ndarray
    refine_iterations: int = 2
    max_step: float = 0.3

    @classmethod
    def for_scheme(cls, feature_map: FeatureMap, *, bvalues: np.ndarray | None = None,
                   max_b: float = DEFAULT_MAX_B, refine_iterations: int = 2
                   ) -> FrameEstimator:
        """Frame estimator for a zonal :class:`~fingerprint.fitting.features.FeatureMap`
        (``bvalues`` (N,) in s/m² are taken from the scheme when the map carries none)."""
        shell_of = np.asarray(feature_map.shell_of)
        dirs = np.asarray(feature_map.directions, dtype=np.float64)
        if bvalues is None:
            bvalues = getattr(feature_map, "bvalues", None)
        dwi = shell_of >= 0
        if bvalues is None:
            cols = np.flatnonzero(dwi)
            b = np.ones(dirs.shape[0])
        else:
            b = np.asarray(bvalues, dtype=np.float64)
            cols = np.flatnonzero(dwi & (b <= max_b))
            if cols.size < 6:
                lowest = np.min(b[dwi]) if dwi.any() else 0.0
                cols = np.flatnonzero(dwi & (b <= lowest * 1.5))
        if cols.size < 6:
            raise InputError(
                f"the acquisition scheme has only {cols.size} diffusion-weighted "
                "measurements usable for a tensor fit; at least 6 are needed to find "
                "fibre orientations")
        g = dirs[cols]
        design = -b[cols, None] * np.stack(
            [g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2, 2 * g[:, 0] * g[:, 1],
             2 * g[:, 0] * g[:, 2], 2 * g[:, 1] * g[:, 2]], axis=1)
        pinv = np.ascontiguousarray(np.linalg.pinv(design))
        for a in (cols, pinv):
            a.setflags(write=False)
        return cls(columns=cols.astype(np.int64), pinv=pinv, directions=dirs,
                   shell_of=shell_of, n_coefficients=np.asarray(feature_map.n_coefficients),
                   refine_iterations=int(refine_iterations))

    def tensor_directions(self, signals: np.ndarray) -> np.ndarray:
        """Principal tensor eigenvectors (n, 3) of b0-normalised ``signals`` (n, N)."""
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import dti_principal_directions

        return run_parallel(dti_principal_directions,
                            np.ascontiguousarray(signals, dtype=np.float64), self.columns,
                            self.pinv, _LOG_FLOOR)

    def refine(self, signals: np.ndarray, frames: np.ndarray,
               iterations: int | None = None) -> np.ndarray:
        """Refine ``frames`` (n, 3) by Gauss-Newton on the zonal model's axis."""
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import refine_frames

        it = self.refine_iterations if iterations is None else int(iterations)
        if it <= 0:
            return np.asarray(frames, dtype=np.float64)
        return run_parallel(refine_frames, np.ascontiguousarray(signals, dtype=np.float64),
                             np.ascontiguousarray(frames, dtype=np.float64), self.directions,
                             self.shell_of, self.n_coefficients, it, self.max_step, True)[0]

    def refine_unchecked(self, signals: np.ndarray, frames: np.ndarray
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Like :meth:`refine` but the last step is not checked: returns the moved frames
        and the zonal residual sum of squares at the starting ``frames``; the caller
        keeps the move only where its own fit at the new frame has a lower residual
        (this saves one pass over the data when the features are computed anyway)."""
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import refine_frames

        return run_parallel(refine_frames, np.ascontiguousarray(signals, dtype=np.float64),
                             np.ascontiguousarray(frames, dtype=np.float64), self.directions,
                             self.shell_of, self.n_coefficients,
                             max(int(self.refine_iterations), 1), self.max_step, False)

    def align(self, signals: np.ndarray, frames: np.ndarray, coefficients: np.ndarray,
              iterations: int = ALIGN_ITERATIONS) -> np.ndarray:
        """Axes (n, 3) that best fit b0-normalised ``signals`` (n, N) with the per-shell
        Legendre series ``coefficients`` (n, k) (unwhitened zonal features, e.g. of the
        matched atoms) held fixed, by Gauss-Newton from ``frames`` (n, 3).

        The free zonal fit of :meth:`refine` bends its profile towards the noise of the
        axis it is fitted around; with the profile of the matched atoms the axis is an
        estimate of the model's own orientation (better for dispersed voxels)."""
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import align_frames

        nc = np.asarray(self.n_coefficients, dtype=np.int64)
        signals = np.asarray(signals)
        n = signals.shape[0] if signals.ndim == 2 else -1
        if signals.ndim != 2 or signals.shape[1] != self.directions.shape[0]:
            raise InputError(f"signals must have shape (n, {self.directions.shape[0]}), got "
                             f"{signals.shape}")
        if np.shape(frames) != (n, 3):
            raise InputError(f"frames must have shape ({n}, 3), got {np.shape(frames)}")
        if np.shape(coefficients) != (n, int(nc.sum())):
            raise InputError(f"coefficients must have shape ({n}, {int(nc.sum())}), got "
                             f"{np.shape(coefficients)}")
        offsets = np.concatenate([[0], np.cumsum(nc)[:-1]]).astype(np.int64)
        return run_parallel(align_frames, np.ascontiguousarray(signals, dtype=np.float64),
                            np.ascontiguousarray(frames, dtype=np.float64),
                            np.ascontiguousarray(coefficients, dtype=np.float64),
                            self.directions, self.shell_of, nc, offsets, int(iterations),
                            self.max_step)

    def estimate(self, signals: np.ndarray, start: np.ndarray | None = None, *,
                 check: bool = True) -> np.ndarray:
        """Fibre axes (n, 3), unit vectors with z >= 0, of b0-normalised ``signals``
        (n, N): tensor eigenvector (or ``start`` when given) refined by the zonal fit.
        Without ``check`` the last (bounded) Gauss-Newton step is kept without verifying
        that it lowers the residual (one pass over the data less)."""
        frames = self.tensor_directions(signals) if start is None else \
            np.asarray(start, dtype=np.float64)
        if check or self.refine_iterations <= 0:
            return self.refine(signals, frames)
        return self.refine_unchecked(signals, frames)[0]
