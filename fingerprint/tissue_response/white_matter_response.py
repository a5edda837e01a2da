"""Single-fibre white-matter response estimation (Tournier et al. 2007 and 2013).

Both return ``(S0_wm, TR2 response model, selected voxel indices)``; ``data`` is
(voxels, N) or (..., N) with an optional boolean ``mask`` of the leading shape.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.core.csd_peaks import fod_peaks
from fingerprint.core.spherical_harmonics_model import (
    MultiCompartmentSphericalHarmonicsModel,
)
from fingerprint.errors import InputError
from fingerprint.signal_models.tissue_response_models import (
    TR2AnisotropicTissueResponseModel,
    diffusion_tensor_eigen,
    estimate_TR2_anisotropic_tissue_response_model,
    fractional_anisotropy,
)

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme

__all__ = ["white_matter_response_tournier07", "white_matter_response_tournier13"]

logger = logging.getLogger(__name__)

_RATIO_SETTINGS = ("ratio", "mrtrix")


def _voxels(acquisition_scheme: Any, data: ArrayLike, mask: ArrayLike | None) -> np.ndarray:
    arr = np.asarray(data, dtype=float)
    n = acquisition_scheme.number_of_measurements
    if arr.ndim == 0 or arr.shape[-1] != n:
        raise InputError(f"data has shape {arr.shape}; expected (..., {n} measurements)")
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != arr.shape[:-1]:
            raise InputError(f"mask has shape {m.shape}; expected {arr.shape[:-1]}")
        arr = arr[m]
    flat = arr.reshape(-1, n)
    b0 = np.asarray(acquisition_scheme.b0_mask, dtype=bool)
    return flat[flat[:, b0].mean(axis=1) > 0]


def _candidates(n_voxels: int, n_candidates: int) -> int:
    if isinstance(n_candidates, bool) or int(n_candidates) < 1:
        raise InputError(f"N_candidate_voxels must be a positive integer, got {n_candidates!r}")
    if n_voxels < n_candidates:
        logger.info("only %d voxels given for %d candidate voxels: using all of them",
                    n_voxels, n_candidates)
    return min(int(n_candidates), n_voxels)


def white_matter_response_tournier07(
        acquisition_scheme: AcquisitionScheme, data: ArrayLike, N_candidate_voxels: int = 300,  # noqa: N803
        mask: ArrayLike | None = None, **kwargs: Any
) -> tuple[float, TR2AnisotropicTissueResponseModel, np.ndarray]:
    """The response of the ``N_candidate_voxels`` voxels of highest fractional
    anisotropy (Tournier et al. 2007). Extra keywords (dmipy's ``peak_ratio_setting``)
    are accepted and ignored."""
    voxels = _voxels(acquisition_scheme, data, mask)
    n = _candidates(voxels.shape[0], N_candidate_voxels)
    fa = fractional_anisotropy(diffusion_tensor_eigen(acquisition_scheme, voxels)[0])
    selected = np.argsort(fa)[-n:]
    s0, model = estimate_TR2_anisotropic_tissue_response_model(acquisition_scheme,
                                                               voxels[selected])
    return s0, model, selected


def white_matter_response_tournier13(
        acquisition_scheme: AcquisitionScheme, data: ArrayLike, max_iter: int = 5,
        sh_order: int = 10, N_candidate_voxels: int = 300, peak_ratio_setting: str = "mrtrix",  # noqa: N803
        mask: ArrayLike | None = None
) -> tuple[float, TR2AnisotropicTissueResponseModel, np.ndarray]:
    """Iterative single-fibre selection (Tournier et al. 2013): start from the
    highest-FA voxels, deconvolve every voxel with their response, keep the voxels whose
    two largest FOD peaks are most single-fibre like, repeat until the selection stops
    changing (at most ``max_iter`` times). ``peak_ratio_setting``: ``'ratio'`` ranks by
    ``p2 / p1``, ``'mrtrix'`` by ``1 / (p1 (1 - p2 / p1))`` (favours large first peaks)."""
    if peak_ratio_setting not in _RATIO_SETTINGS:
        raise InputError(f"peak_ratio_setting must be one of {_RATIO_SETTINGS}, got "
                         f"{peak_ratio_setting!r}")
    voxels = _voxels(acquisition_scheme, data, mask)
    n = _candidates(voxels.shape[0], N_candidate_voxels)
    fa = fractional_anisotropy(diffusion_tensor_eigen(acquisition_scheme, voxels)[0])
    selected = np.sort(np.argsort(fa)[-n:])
    for iteration in range(max(1, int(max_iter))):
        s0, model = estimate_TR2_anisotropic_tissue_response_model(acquisition_scheme,
                                                                   voxels[selected])
        fit = MultiCompartmentSphericalHarmonicsModel([model], sh_order=sh_order).fit(
            acquisition_scheme, voxels, solver="csd_tournier07", lambda_lb=0.0)
        _, heights = fod_peaks(fit.fitted_parameters["sh_coeff"], sh_order, max_peaks=2,
                               relative_peak_threshold=0.0)
        p1, p2 = heights[:, 0], heights[:, 1]
        with np.errstate(divide="ignore", invalid="ignore"):
            if peak_ratio_setting == "ratio":
                ratio = p2 / p1
            else:
                ratio = 1.0 / (p1 * (1.0 - p2 / p1))
        ratio = np.where(np.isfinite(ratio) & (p1 > 0), ratio, np.inf)
        new = np.sort(np.argsort(ratio, kind="stable")[:n])
        overlap = np.intersect1d(new, selected).size / n
        logger.info("Tournier13 iteration %d: %.1f %% of the candidates kept", iteration + 1,
                    100 * overlap)
        selected = new
        if overlap == 1.0:
            break
    s0, model = estimate_TR2_anisotropic_tissue_response_model(acquisition_scheme,
                                                               voxels[selected])
    return s0, model, selected
