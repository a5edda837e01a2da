"""The full diffusion tensor as a compartment (DTI's forward model, SI units).

``DT1DiffusionTensor`` has no axis of symmetry: its six parameters are the independent
elements of the symmetric tensor D (m²/s) in the b-vector frame, and its signal is
E = exp(-b g^T D g), computed from each measurement's own b-value and direction. It has
no ``mu``: the modelling framework gives it no axis cosines and it reads the gradient
directions itself. Eigen-decomposition into FA, MD, AD, RD and the principal direction
is :func:`tensor_eigen` (the derived maps of the ``dti`` model).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.units import DIFFUSIVITY
from fingerprint.errors import InputError
from fingerprint.signal_models.base import DIFFUSIVITY_SCALING, CompartmentModel, Measurements

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.core.acquisition_scheme import MeasurementSet

__all__ = ["TENSOR_ELEMENTS", "DT1DiffusionTensor", "tensor_eigen", "tensor_matrix"]

#: Parameter names of the tensor elements, in vector order.
TENSOR_ELEMENTS = ("d_xx", "d_yy", "d_zz", "d_xy", "d_xz", "d_yz")


def tensor_matrix(elements: np.ndarray) -> np.ndarray:
    """Symmetric tensors (n, 3, 3) from elements (n, 6) in :data:`TENSOR_ELEMENTS` order."""
    e = np.asarray(elements, dtype=np.float64).reshape(-1, 6)
    xx, yy, zz, xy, xz, yz = e.T
    return np.stack([np.stack([xx, xy, xz], -1), np.stack([xy, yy, yz], -1),
                     np.stack([xz, yz, zz], -1)], axis=-2)


def tensor_eigen(elements: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (n, 3), largest first (m²/s), and principal eigenvectors (n, 3) of
    tensors given by their elements (n, 6); NaN rows stay NaN."""
    e = np.asarray(elements, dtype=np.float64).reshape(-1, 6)
    ok = np.all(np.isfinite(e), axis=1)
    vals = np.full((e.shape[0], 3), np.nan)
    v1 = np.full((e.shape[0], 3), np.nan)
    if ok.any():
        w, v = np.linalg.eigh(tensor_matrix(e[ok]))
        vals[ok] = w[:, ::-1]
        vec = v[:, :, 2]
        # one sign convention: the largest component positive (directions are axes)
        big = np.argmax(np.abs(vec), axis=1)
        sign = np.sign(vec[np.arange(vec.shape[0]), big])
        v1[ok] = vec * np.where(sign == 0, 1.0, sign)[:, None]
    return vals, v1


class DT1DiffusionTensor(CompartmentModel):
    """Full (Gaussian) diffusion tensor: E = exp(-b g^T D g) (Basser et al. 1994).

    Parameters
    ----------
    d_xx, d_yy, d_zz, d_xy, d_xz, d_yz : float, optional
        Elements of the symmetric diffusion tensor in the b-vector frame, m²/s (the
        off-diagonal ones may be negative).
    """

    _required_acquisition_parameters = ["bvalues", "gradient_directions"]
    _parameter_ranges = {"d_xx": (0.0, 4.0), "d_yy": (0.0, 4.0), "d_zz": (0.0, 4.0),
                         "d_xy": (-2.0, 2.0), "d_xz": (-2.0, 2.0), "d_yz": (-2.0, 2.0)}
    _parameter_scales = {k: DIFFUSIVITY_SCALING for k in TENSOR_ELEMENTS}
    _parameter_types = {k: "normal" for k in TENSOR_ELEMENTS}
    _parameter_units = {k: DIFFUSIVITY for k in TENSOR_ELEMENTS}
    #: depends on the gradient direction, but through all of it (no axis cosines)
    is_isotropic = False
    has_axis = False

    def __init__(self, d_xx: float | None = None, d_yy: float | None = None,
                 d_zz: float | None = None, d_xy: float | None = None,
                 d_xz: float | None = None, d_yz: float | None = None) -> None:
        super().__init__(d_xx=d_xx, d_yy=d_yy, d_zz=d_zz, d_xy=d_xy, d_xz=d_xz, d_yz=d_yz)

    def __call__(self, acquisition_scheme: AcquisitionScheme | MeasurementSet,
                 **kwargs: Any) -> np.ndarray:
        self._check_kwargs(kwargs)
        meas = acquisition_scheme.measurements if hasattr(acquisition_scheme, "measurements") \
            else acquisition_scheme
        return self.signal_from_cosines(meas, None, **self._single_params(kwargs))[0]

    def signal_from_cosines(self, meas: Measurements, cosines: ArrayLike | None = None,
                            **params: Any) -> np.ndarray:
        """Signals (n, M) of n tensors on the measurements of ``meas`` (``cosines`` is
        ignored: the tensor reads the measurements' own directions)."""
        params = {k: v for k, v in params.items() if k != "mu"}
        source = meas.measurements if isinstance(meas, AcquisitionScheme) else meas
        directions = getattr(source, "directions", None)
        if directions is None:
            raise InputError("DT1DiffusionTensor needs the measurements' gradient directions")
        g = np.asarray(directions, dtype=np.float64).reshape(-1, 3)
        b = np.asarray(source.b, dtype=np.float64).reshape(-1)
        n, values = self._batch_params(params, None)
        # b g^T D g = b (gx² Dxx + gy² Dyy + gz² Dzz + 2 gx gy Dxy + 2 gx gz Dxz + 2 gy gz Dyz)
        design = b[:, None] * np.stack([g[:, 0] ** 2, g[:, 1] ** 2, g[:, 2] ** 2,
                                        2 * g[:, 0] * g[:, 1], 2 * g[:, 0] * g[:, 2],
                                        2 * g[:, 1] * g[:, 2]], axis=1)
        elements = np.stack([values[k] for k in TENSOR_ELEMENTS], axis=1)  # (n, 6)
        return np.exp(-(elements @ design.T)).reshape(n, b.size)

    def spherical_mean_batch(self, meas: Measurements, **params: Any) -> np.ndarray:
        raise InputError("DT1DiffusionTensor has no spherical-mean form (use the tensor "
                         "itself, or a zeppelin in spherical-mean models)")
