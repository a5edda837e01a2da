"""Three-tissue (white matter, grey matter, CSF) response estimation without a T1 image
(Dhollander et al. 2016), with its signal decay metric and Ridgway's optimal threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike

from fingerprint.errors import InputError
from fingerprint.signal_models.tissue_response_models import (
    TR1IsotropicTissueResponseModel,
    TR2AnisotropicTissueResponseModel,
    diffusion_tensor_eigen,
    estimate_TR1_isotropic_tissue_response_model,
    fractional_anisotropy,
)
from fingerprint.tissue_response.white_matter_response import (
    white_matter_response_tournier07,
    white_matter_response_tournier13,
)

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme

__all__ = ["optimal_threshold", "signal_decay_metric", "three_tissue_response_dhollander16"]

logger = logging.getLogger(__name__)

#: thresholds tried by :func:`optimal_threshold`
_THRESHOLD_STEPS = 1000
#: the signal decay metric is clipped to this range (dimensionless)
SDM_RANGE = (0.0, 10.0)

#: white-matter response algorithms: (S0, response model, indices of the voxels used)
_WM_ALGORITHMS: dict[str, Callable[..., tuple[float, TR2AnisotropicTissueResponseModel,
                                              np.ndarray]]] = {
    "tournier07": white_matter_response_tournier07,
    "tournier13": white_matter_response_tournier13}


def signal_decay_metric(acquisition_scheme: AcquisitionScheme, data: ArrayLike) -> np.ndarray:
    """Signal decay metric (...,) of signals (..., N): the mean over diffusion-weighted
    shells of ``log(mean b0 / mean shell signal)`` (Dhollander et al. 2016); 0 where a
    mean is not positive, clipped to [0, 10]."""
    arr = np.asarray(data, dtype=float)
    n = acquisition_scheme.number_of_measurements
    if arr.ndim == 0 or arr.shape[-1] != n:
        raise InputError(f"data has shape {arr.shape}; expected (..., {n} measurements)")
    b0 = np.asarray(acquisition_scheme.b0_mask, dtype=bool)
    if not b0.any():
        raise InputError("the acquisition scheme has no b0 measurement")
    idx = np.asarray(acquisition_scheme.shell_indices)
    shells = [s for s, is_b0 in enumerate(acquisition_scheme.shell_b0_mask) if not is_b0]
    means = np.stack([arr[..., b0].mean(axis=-1)]
                     + [arr[..., idx == s].mean(axis=-1) for s in shells], axis=-1)
    ok = np.all(means > 0, axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.log(means[..., :1] / means[..., 1:]).mean(axis=-1)
    sdm = np.where(ok, ratio, 0.0)
    if np.any(sdm[ok] > SDM_RANGE[1]) or np.any(sdm[ok] < SDM_RANGE[0]):
        logger.warning("signal decay metric outside [0, 10]: clipped")
    return np.clip(sdm, *SDM_RANGE)


def optimal_threshold(data: ArrayLike) -> float:
    """The threshold T maximising the Pearson correlation between ``data`` and the mask
    ``data > T`` (Ridgway et al. 2009), searched on 1000 steps between the data's
    extremes."""
    values = np.asarray(data, dtype=float).reshape(-1)
    values = values[np.isfinite(values)]
    if values.size < 2 or values.min() == values.max():
        raise InputError("optimal_threshold needs at least two distinct finite values")
    thresholds = np.linspace(values.min(), values.max(), _THRESHOLD_STEPS + 2)[1:-1]
    centred = values - values.mean()
    masks = values[None, :] > thresholds[:, None]
    m_centred = masks - masks.mean(axis=1, keepdims=True)
    num = m_centred @ centred
    den = np.sqrt(np.sum(m_centred ** 2, axis=1) * np.sum(centred ** 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = np.where(den > 0, num / den, -np.inf)
    return float(thresholds[int(np.argmax(corr))])


def three_tissue_response_dhollander16(
        acquisition_scheme: AcquisitionScheme, data: ArrayLike, wm_algorithm: str = "tournier13",
        wm_N_candidate_voxels: int = 300, gm_perc: float = 0.02,  # noqa: N803
        csf_perc: float = 0.1, mask: ArrayLike | None = None, **kwargs: Any
) -> tuple[list[float], list[TR2AnisotropicTissueResponseModel | TR1IsotropicTissueResponseModel],
           np.ndarray]:
    """White-matter, grey-matter and CSF responses from a DWI volume ``data`` (..., N)
    (Dhollander et al. 2016): FA > 0.2 voxels give white matter (after removing signal
    decay metric outliers), the FA < 0.2 voxels are split into grey matter and CSF by the
    optimal threshold of their signal decay metric and refined by optimal thresholds; the
    ``gm_perc`` grey-matter voxels closest to their median metric and the ``csf_perc``
    CSF voxels of highest metric give the isotropic responses.

    ``mask`` (boolean, leading shape) restricts the voxels (default: positive b0).
    Returns ``([S0_wm, S0_gm, S0_csf], [TR2 wm, TR1 gm, TR1 csf], selection)`` with
    ``selection`` (..., 3) the voxels used for each tissue."""
    if wm_algorithm not in _WM_ALGORITHMS:
        raise InputError(f"wm_algorithm must be one of {sorted(_WM_ALGORITHMS)}, got "
                         f"{wm_algorithm!r}")
    arr = np.asarray(data, dtype=float)
    n = acquisition_scheme.number_of_measurements
    if arr.ndim < 2 or arr.shape[-1] != n:
        raise InputError(f"data has shape {arr.shape}; expected (..., {n} measurements)")
    shape = arr.shape[:-1]
    flat = arr.reshape(-1, n)
    b0 = np.asarray(acquisition_scheme.b0_mask, dtype=bool)
    brain = flat[:, b0].mean(axis=1) > 0
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != shape:
            raise InputError(f"mask has shape {m.shape}; expected {shape}")
        brain &= m.reshape(-1)
    fa = np.zeros(flat.shape[0])
    fa[brain] = fractional_anisotropy(diffusion_tensor_eigen(acquisition_scheme,
                                                             flat[brain])[0])
    sdm = signal_decay_metric(acquisition_scheme, flat)
    wm = brain & (fa > 0.2)
    iso = brain & (fa <= 0.2)
    if wm.sum() < 2 or iso.sum() < 4:
        raise InputError("too few anisotropic (FA > 0.2) or isotropic voxels to estimate "
                         "three tissue responses")
    split = optimal_threshold(sdm[iso])
    csf = iso & (sdm > split)
    gm = iso & (sdm <= split)
    # white matter: drop voxels whose decay metric is above the WM median + 2 IQR
    q1, med, q3 = np.percentile(sdm[wm], [25, 50, 75])
    wm_refined = wm & (sdm < med + 2.0 * (q3 - q1))
    gm_median = np.median(sdm[gm])
    upper = sdm[gm] > gm_median
    lower = sdm[gm] < gm_median
    gm_refined = gm.copy()
    if upper.sum() > 1 and np.ptp(sdm[gm][upper]) > 0:
        gm_refined &= sdm < optimal_threshold(sdm[gm][upper])
    if lower.sum() > 1 and np.ptp(sdm[gm][lower]) > 0:
        gm_refined &= sdm > optimal_threshold(sdm[gm][lower])
    if csf.sum() > 1 and np.ptp(sdm[csf]) > 0:
        csf_refined = csf & (sdm > optimal_threshold(sdm[csf]))
    else:
        csf_refined = csf
    wm_index = np.nonzero(wm_refined)[0]
    s0_wm, wm_model, picked = _WM_ALGORITHMS[wm_algorithm](
        acquisition_scheme, flat[wm_index], N_candidate_voxels=wm_N_candidate_voxels,
        **kwargs)
    gm_index = np.nonzero(gm_refined)[0]
    n_gm = max(1, int(round(gm_perc * gm_index.size)))
    gm_pick = gm_index[np.argsort(np.abs(sdm[gm_index] - np.median(sdm[gm_index])))[:n_gm]]
    csf_index = np.nonzero(csf_refined)[0]
    n_csf = max(1, int(round(csf_perc * csf_index.size)))
    csf_pick = csf_index[np.argsort(-sdm[csf_index])[:n_csf]]
    s0_gm, gm_model = estimate_TR1_isotropic_tissue_response_model(acquisition_scheme,
                                                                   flat[gm_pick])
    s0_csf, csf_model = estimate_TR1_isotropic_tissue_response_model(acquisition_scheme,
                                                                     flat[csf_pick])
    selection = np.zeros((flat.shape[0], 3))
    selection[wm_index[picked], 0] = 1.0
    selection[gm_pick, 1] = 1.0
    selection[csf_pick, 2] = 1.0
    return ([s0_wm, s0_gm, s0_csf], [wm_model, gm_model, csf_model],
            selection.reshape(shape + (3,)))
