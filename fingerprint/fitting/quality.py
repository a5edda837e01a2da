"""Per-voxel quality flags: how far each voxel's estimate can be trusted.

Every fitted voxel gets a bit map (:data:`FLAGS`) computed from what the fit already knows:
its noise estimate, its distance to the dictionary, the spread of its matched neighbours
and its residual. The rules, with ``sigma2`` the voxel's noise variance in b0-normalised
units (floored at :data:`SIGMA_FLOOR` squared) and ``k`` the number of matched features:

``invalid`` (1)
    the voxel could not be fitted: NaN/inf or negative signals, no positive b=0 signal.
``at_bound`` (2)
    a scalar estimate lies within :data:`BOUND_FRACTION` of its parameter range, or
    within :data:`BOUND_SDS` of its posterior standard deviations, of a bound of the
    dictionary's range (the truth may lie beyond it).
``outside_dictionary`` (4)
    the voxel's features are far from the dictionary: the squared distance ``d2`` to the
    matched (refined) prediction exceeds what noise and the dictionary's own spacing
    explain, ``d2 / (k * sigma2 + spacing2) > chi2_limit(k)`` with
    ``chi2_limit(k) = max(CHI2_FLOOR, 1 + CHI2_SIGMAS * sqrt(2 / k))`` and ``spacing2``
    the squared distance between neighbouring atoms (the :data:`SPACING_PERCENTILE`
    percentile over :data:`SPACING_SAMPLE` atoms): a model that does not describe the
    tissue, artefacts.
``ambiguous`` (8)
    the matched neighbours disagree: some scalar parameter's posterior standard deviation
    exceeds :data:`AMBIGUOUS_FRACTION` of its range (several distant parameter sets fit
    the signal equally well, e.g. two modes).
``poor_fit`` (16)
    the residual sum of squares ``rss`` of the fitted signal over its ``m`` measurements
    (shell means for spherical-mean models) exceeds what noise and spacing explain,
    ``rss / (m * sigma2_b0 + spacing2) > max(CHI2_FLOOR, F(1 - POOR_FIT_P; m, nu))``:
    the noise here is the b=0 spread alone (``nu`` = b0 count - 1 degrees of freedom),
    which a poor fit cannot inflate, and the limit is the F distribution's quantile;
    with fewer than 4 b0s the pooled ``sigma2`` and :func:`chi2_limit` are used.
``below_resolution`` (32)
    models with an axon diameter (a cylinder's, or a Gamma distribution's mean): the
    estimated diameter is not clearly above the resolution limit of the scheme at the
    voxel's own SNR (``s0 / sigma``; it lies below the limit after subtracting half its
    posterior spread; :mod:`fingerprint.fitting.resolution`, Nilsson et al. 2017):
    diameters below the limit cannot be told apart.

The noise estimate (``sigma``, raw signal units) and an orientation uncertainty (degrees:
the 1-sd cone angle of the fibre axis, from the Fisher information of the fitted angular
profile for single-fibre models, or the weighted angular spread of the matched atoms'
axes for models matched on the raw signal) are written as maps beside the flags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fingerprint.fitting.resolution import below_resolution

if TYPE_CHECKING:  # type names only
    from fingerprint.fitting.estimator import VoxelEstimates

    from .features import FeatureMap

__all__ = [
    "AMBIGUOUS_FRACTION",
    "BOUND_FRACTION",
    "BOUND_SDS",
    "CHI2_FLOOR",
    "CHI2_SIGMAS",
    "FLAGS",
    "POOR_FIT_P",
    "SIGMA_FLOOR",
    "SPACING_PERCENTILE",
    "SPACING_SAMPLE",
    "chi2_limit",
    "fit_limit",
    "flag_counts",
    "neighbour_cone_angle",
    "profile_orientation_sd",
    "quality_flags",
    "voxel_quality",
]

#: Bit of each flag in the quality map.
FLAGS: Mapping[str, int] = {"invalid": 1, "at_bound": 2, "outside_dictionary": 4,
                            "ambiguous": 8, "poor_fit": 16, "below_resolution": 32}
#: Distance to a bound, as a fraction of the parameter's range, that counts as "at it" ...
BOUND_FRACTION = 1e-3
#: ... or as a number of the estimate's posterior standard deviations.
BOUND_SDS = 1.0
#: Posterior sd, as a fraction of the parameter's range, above which a voxel is ambiguous.
AMBIGUOUS_FRACTION = 0.15
#: Smallest per-dof chi-square limit of the distance and residual rules.
CHI2_FLOOR = 3.0
#: Standard deviations of the chi-square distribution above its mean that are flagged.
CHI2_SIGMAS = 6.0
#: False-alarm probability of the poor-fit F test.
POOR_FIT_P = 1e-3
#: Smallest noise sd (b0-normalised) used by the rules (noise-free data).
SIGMA_FLOOR = 1e-3
#: Atoms sampled, and the percentile of their nearest-other-atom distances taken, to
#: measure the dictionary's spacing (what its sampling alone leaves unexplained).
SPACING_SAMPLE = 512
SPACING_PERCENTILE = 99.0


def chi2_limit(dof: int | np.ndarray) -> np.ndarray:
    """Per-degree-of-freedom chi-square limit: ``max(CHI2_FLOOR, 1 + CHI2_SIGMAS *
    sqrt(2 / dof))`` (a reduced chi-square this far above 1 is not noise)."""
    d = np.maximum(np.asarray(dof, dtype=float), 1.0)
    return np.maximum(CHI2_FLOOR, 1.0 + CHI2_SIGMAS * np.sqrt(2.0 / d))


def fit_limit(n_fit: int, noise_dof: int | None) -> float:
    """Limit of the poor-fit rule: ``max(CHI2_FLOOR, F quantile 1 - POOR_FIT_P)`` with
    (``n_fit``, ``noise_dof``) degrees of freedom, or :func:`chi2_limit` without
    ``noise_dof``."""
    if noise_dof is None:
        return float(chi2_limit(n_fit))
    # the F quantile by scipy.special (scipy.stats.f.ppf is the same function, but
    # importing scipy.stats costs a second of every command-line fit)
    # lazy: keeps SciPy off import
    from scipy.special import fdtri

    return max(CHI2_FLOOR, float(fdtri(max(int(n_fit), 1), max(int(noise_dof), 1),
                                       1.0 - POOR_FIT_P)))


def quality_flags(*, valid: np.ndarray, parameters: np.ndarray, uncertainty: np.ndarray,
                  lower: Sequence[float] | np.ndarray, upper: Sequence[float] | np.ndarray,
                  scalar_columns: Sequence[int] | np.ndarray,
                  match_chi2: np.ndarray | None, n_features: int,
                  fit_chi2: np.ndarray | None, n_fit: int,
                  noise_dof: int | None = None) -> np.ndarray:
    """Quality bit map (n,) uint8 (:data:`FLAGS`).

    ``parameters`` / ``uncertainty`` (n, P) with the parameters' ``lower`` / ``upper``
    bounds (P,) and the ``scalar_columns`` the bound and ambiguity rules look at;
    ``match_chi2`` (n,) reduced chi-square of the features against the matched prediction
    over ``n_features``; ``fit_chi2`` (n,) reduced chi-square of the signal residual over
    ``n_fit`` measurements (None: rule not applied), against a noise estimate with
    ``noise_dof`` degrees of freedom (None: a pooled estimate, :func:`chi2_limit`).
    """
    valid = np.asarray(valid, dtype=bool)
    n = valid.shape[0]
    flags = np.zeros(n, dtype=np.uint8)
    flags[~valid] |= FLAGS["invalid"]
    cols = np.asarray(scalar_columns, dtype=int)
    if cols.size:
        lo = np.asarray(lower, dtype=float)[cols]
        hi = np.asarray(upper, dtype=float)[cols]
        span = np.where(hi > lo, hi - lo, 1.0)
        p = np.asarray(parameters, dtype=float)[:, cols]
        with np.errstate(invalid="ignore"):
            sd = np.asarray(uncertainty, dtype=float)[:, cols]
            reach = np.maximum(BOUND_FRACTION * span, BOUND_SDS * np.nan_to_num(sd))
            near = ((p - lo) <= reach) | ((hi - p) <= reach)
            wide = sd > AMBIGUOUS_FRACTION * span
        flags[valid & near.any(axis=1)] |= FLAGS["at_bound"]
        flags[valid & wide.any(axis=1)] |= FLAGS["ambiguous"]
    with np.errstate(invalid="ignore"):
        if match_chi2 is not None:
            far = np.asarray(match_chi2) > chi2_limit(n_features)
            flags[valid & far] |= FLAGS["outside_dictionary"]
        if fit_chi2 is not None:
            poor = np.asarray(fit_chi2) > fit_limit(n_fit, noise_dof)
            flags[valid & poor] |= FLAGS["poor_fit"]
    return flags


def flag_counts(flags: np.ndarray) -> dict[str, int]:
    """Number of voxels carrying each flag, plus ``any`` (flagged at all) and ``total``."""
    f = np.asarray(flags, dtype=np.uint8).ravel()
    out = {name: int(np.count_nonzero(f & bit)) for name, bit in FLAGS.items()}
    out["any"] = int(np.count_nonzero(f))
    out["total"] = int(f.size)
    return out


def _perpendicular(axes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors (n, 3) perpendicular to each unit axis and to each other."""
    helper = np.where(np.abs(axes[:, [0]]) < 0.9, [[1.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]])
    e1 = np.cross(axes, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(axes, e1)
    return e1, e2


def profile_orientation_sd(profile: object, features: np.ndarray, frames: np.ndarray,
                           sigma2: np.ndarray, dwi: np.ndarray,
                           step: float = 1e-3) -> np.ndarray:
    """Orientation uncertainty (n,) in degrees of single-fibre voxels: the 1-sd cone angle
    sqrt(trace(F^-1)) of the axis, with F the Fisher information of the fitted angular
    profile (b0-normalised signals described by ``features`` (n, k) in ``frames``
    (n, 3)) under Gaussian noise of variance ``sigma2`` (n,); at most 90. ``dwi`` (N,)
    bool selects the measurements that carry orientation.

    ``profile`` is a zonal :class:`~fingerprint.fitting.features.FeatureMap`: F comes from
    the analytic derivative of its Legendre series in one pass
    (:func:`fingerprint.kernels.features.zonal_orientation_sd`); or any
    ``reconstruct(features, frames) -> signals (n, N)``: F comes from central
    differences of the profile tilted by ``step`` radians about two axes perpendicular
    to the fibre (four reconstructions; the reference the analytic form is tested
    against)."""
    s2 = np.maximum(np.asarray(sigma2, dtype=float), SIGMA_FLOOR ** 2)
    if getattr(profile, "kind", None) == "zonal":
        # lazy: keeps numba off import
        from fingerprint.kernels import run_parallel
        from fingerprint.kernels.features import zonal_orientation_sd

        fmap: FeatureMap = profile  # type: ignore[assignment]
        coef = np.asarray(features, dtype=np.float64) / fmap.weights
        return run_parallel(zonal_orientation_sd, coef,
                            np.ascontiguousarray(frames, dtype=np.float64),
                            fmap.directions, fmap.shell_of, fmap.n_coefficients,
                            fmap.offsets, np.ascontiguousarray(dwi, dtype=np.bool_), s2)
    reconstruct = getattr(profile, "reconstruct", profile)
    axes = np.asarray(frames, dtype=float)
    axes = axes / np.linalg.norm(axes, axis=1, keepdims=True)
    e1, e2 = _perpendicular(axes)
    grads = []
    for e in (e1, e2):
        plus = axes * np.cos(step) + e * np.sin(step)
        minus = axes * np.cos(step) - e * np.sin(step)
        d = (reconstruct(features, plus) - reconstruct(features, minus)) / (2 * step)  # type: ignore[operator]
        grads.append(d[:, dwi])
    g1, g2 = grads
    f11 = (g1 * g1).sum(axis=1) / s2
    f22 = (g2 * g2).sum(axis=1) / s2
    f12 = (g1 * g2).sum(axis=1) / s2
    det = f11 * f22 - f12 ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        trace_inv = np.where(det > 0, (f11 + f22) / det, np.inf)
    angle = np.degrees(np.sqrt(trace_inv))
    return np.minimum(angle, 90.0)


def neighbour_cone_angle(weights: np.ndarray, indices: np.ndarray,
                         atom_axes: np.ndarray, best_axes: np.ndarray) -> np.ndarray:
    """Weighted angular spread (n,) in degrees of the matched atoms' axes about
    ``best_axes`` (n, 3): sqrt of the weighted mean squared angle (antipodal axes equal).
    ``atom_axes`` (atoms, 3) unit vectors; ``indices`` (n, k) (-1: none)."""
    idx = np.asarray(indices)
    ok = idx >= 0
    axes = np.asarray(atom_axes, dtype=float)[np.where(ok, idx, 0)]
    cos = np.abs(np.einsum("nkj,nj->nk", axes, np.asarray(best_axes, dtype=float)))
    ang = np.arccos(np.clip(cos, 0.0, 1.0))
    w = np.where(ok, np.asarray(weights, dtype=float), 0.0)
    total = np.maximum(w.sum(axis=1), 1e-300)
    return np.degrees(np.sqrt((w * ang ** 2).sum(axis=1) / total))


def voxel_quality(fitter: object, ve: VoxelEstimates) -> dict[str, np.ndarray]:
    """Quality bit map (uint8), noise sd (raw units) and orientation uncertainty (degrees)
    of estimates ``ve`` (a VoxelEstimates) made by ``fitter``: its estimator's
    ``quality_flags`` when it has one, otherwise the ``invalid`` flag alone."""
    valid = np.asarray(ve.valid, dtype=bool)
    n = valid.shape[0]
    est = getattr(fitter, "estimator", fitter)
    if hasattr(est, "quality_flags") and getattr(ve, "match_chi2", None) is not None:
        flags = np.asarray(est.quality_flags(ve), dtype=np.uint8)
    else:
        flags = np.where(valid, 0, FLAGS["invalid"]).astype(np.uint8)
    sigma = getattr(ve, "sigma", None)
    model, scheme = getattr(fitter, "model", None), getattr(fitter, "scheme", None)
    if sigma is not None and model is not None and scheme is not None and valid.any():
        with np.errstate(divide="ignore", invalid="ignore"):
            snr = np.asarray(ve.s0, dtype=np.float64) / np.asarray(sigma, dtype=np.float64)
        below = below_resolution(model, scheme, np.asarray(ve.parameters), snr,
                                 getattr(ve, "uncertainty", None))
        flags[valid & below] |= FLAGS["below_resolution"]
    orient = getattr(ve, "orientation_sd", None)
    return {"quality": flags,
            "sigma": np.full(n, np.nan, np.float32) if sigma is None
            else np.asarray(sigma, dtype=np.float32),
            "orientation_sd": np.full(n, np.nan, np.float32) if orient is None
            else np.asarray(orient, dtype=np.float32)}
