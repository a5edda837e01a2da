"""Resolution limit of axon-diameter estimates, and which voxels fall below it.

A cylinder's diffusion-weighted signal departs from a stick's by an amount that shrinks
as d⁴; below some diameter the departure drowns in noise and every smaller diameter fits
equally well. Nilsson et al. (2017) give that limit for a pulsed-gradient measurement
perpendicular to the cylinder, in the Gaussian-phase (small-diameter) regime:

    d_min = (768 / 7 * sigma_bar * D0 / (gamma² delta g²)) ** (1/4),
    sigma_bar = z_alpha / (SNR * sqrt(n)),

with D0 the intra-axonal diffusivity, delta the pulse duration, g the gradient strength,
n the measurements of the shell and z_alpha the one-sided normal quantile of the
significance level (1.64 for alpha = 0.05). :func:`diameter_resolution_limit` takes the
smallest limit over the scheme's shells (the most sensitive one). It assumes every
measurement of the shell is perpendicular to the axon, so it is a lower bound: on
random axon orientations the practical limit is higher.

Diameters below the limit are indistinguishable from each other (and from zero):
:func:`below_resolution` flags the voxels whose estimate is not clearly above it (the
estimate minus :data:`FLAG_SPREAD` times its posterior standard deviation, when the fit
gives one, lies below the limit), and the fitting core sets the ``below_resolution``
quality flag (:mod:`fingerprint.fitting.quality`) for models with a cylinder diameter
(ActiveAx, CHARMED) or a Gamma diameter distribution (AxCaliber: its mean diameter
2 alpha beta, without the spread). The restricted models' estimates are posterior means
(:mod:`fingerprint.fitting.posterior`), which the prior pulls up from sub-limit
diameters; counting half the posterior spread flags 62 % of the ActiveAx voxels whose
true diameter lies below the limit at SNR 30 (55 % for CHARMED) against 34 % (18 %) for
the estimate alone, with the same share of flagged voxels truly below it (35 %, 33 %) as
the previous matcher's estimate-alone flags had (docs/benchmarks.md, "Restricted
models").

Reference: Nilsson M, Lasič S, Drobnjak I, Topgaard D, Westin C-F. Resolution limit of
cylinder diameter estimation by diffusion MRI: the impact of gradient waveform and
orientation dispersion. NMR Biomed 30 (2017) e3711.
"""

from __future__ import annotations

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.constants import GYROMAGNETIC_RATIO
from fingerprint.core.modeling_framework import MultiCompartmentModelProperties as Model

__all__ = ["DEFAULT_D0", "FLAG_SPREAD", "Z_ALPHA", "below_resolution", "diameter_estimates",
           "diameter_resolution_limit"]

#: Intra-axonal diffusivity of the limit (m²/s) when the model does not give one.
DEFAULT_D0 = 1.7e-9
#: One-sided normal quantile of alpha = 0.05.
Z_ALPHA = 1.6449
#: Posterior standard deviations of the diameter subtracted from the estimate before it
#: is compared with the limit (a voxel is flagged unless the estimate lies clearly above).
FLAG_SPREAD = 0.5


def diameter_resolution_limit(scheme: AcquisitionScheme, snr: float | np.ndarray, *,
                              D0: float = DEFAULT_D0, z_alpha: float = Z_ALPHA
                              ) -> np.ndarray:
    """Smallest resolvable cylinder diameter (m) on ``scheme`` at b=0 signal-to-noise
    ratio ``snr`` (scalar or per voxel; NaN where the scheme has no timing or gradient
    strengths, or the SNR is not positive), over its diffusion-weighted shells."""
    snr_arr = np.asarray(snr, dtype=np.float64)
    g = scheme.gradient_strengths
    delta = scheme.delta
    if g is None or delta is None:
        return np.full(snr_arr.shape, np.nan)
    g = np.asarray(g, dtype=np.float64)
    delta = np.asarray(delta, dtype=np.float64)
    dwi = ~np.asarray(scheme.b0_mask, dtype=bool) & (g > 0) & (delta > 0)
    if not dwi.any():
        return np.full(snr_arr.shape, np.nan)
    shells = np.asarray(scheme.shell_indices)[dwi]
    best = np.inf
    for s in np.unique(shells):
        m = shells == s
        n = int(m.sum())
        sens = float(np.max(GYROMAGNETIC_RATIO ** 2 * delta[dwi][m] * g[dwi][m] ** 2))
        best = min(best, 768.0 / 7.0 * D0 / (sens * np.sqrt(n)))
    with np.errstate(divide="ignore", invalid="ignore"):
        sigma_bar = z_alpha / snr_arr
        out = (best * sigma_bar) ** 0.25
    return np.where(snr_arr > 0, out, np.nan)


def diameter_estimates(model: Model, parameters: np.ndarray) -> np.ndarray | None:
    """The diameter (m) each parameter vector (n, P) of ``model`` says, or None when the
    model has none: a cylinder's ``diameter``, or a Gamma distribution's mean diameter
    2 alpha beta (beta is the radius scale)."""
    layout = model.parameter_layout
    params = np.asarray(parameters, dtype=np.float64)
    names = list(model.parameter_names)
    diam = [n for n in names if n.endswith("_diameter") and "Cylinder" in n]
    if diam:
        return params[:, layout.slices[diam[0]]][:, 0]
    alpha = [n for n in names if n.endswith("DD1Gamma_1_alpha")]
    beta = [n for n in names if n.endswith("DD1Gamma_1_beta")]
    if alpha and beta and any("Cylinder" in n for n in names):
        return 2.0 * params[:, layout.slices[alpha[0]]][:, 0] * \
            params[:, layout.slices[beta[0]]][:, 0]
    return None


def _diameter_spread(model: Model, uncertainty: np.ndarray) -> np.ndarray | None:
    """The posterior standard deviation (n,) of a cylinder's diameter from the fit's
    ``uncertainty`` (n, P), or None (no cylinder diameter: a Gamma distribution's mean
    diameter has no spread of its own)."""
    names = [n for n in model.parameter_names if n.endswith("_diameter") and "Cylinder" in n]
    if not names:
        return None
    sd = np.asarray(uncertainty, dtype=np.float64)[:, model.parameter_layout.slices[names[0]]]
    return np.nan_to_num(sd[:, 0], nan=0.0)


def below_resolution(model: Model, scheme: AcquisitionScheme, parameters: np.ndarray,
                     snr: np.ndarray, uncertainty: np.ndarray | None = None) -> np.ndarray:
    """(n,) bool: voxels whose estimated diameter is not clearly above the resolution
    limit at their own SNR: the estimate, minus :data:`FLAG_SPREAD` times its posterior
    standard deviation when ``uncertainty`` (n, P) gives one, lies below the limit
    (False for models without a diameter)."""
    params = np.asarray(parameters, dtype=np.float64)
    d = diameter_estimates(model, params)
    if d is None:
        return np.zeros(params.shape[0], dtype=bool)
    if uncertainty is not None:
        sd = _diameter_spread(model, uncertainty)
        if sd is not None:
            d = d - FLAG_SPREAD * sd
    limit = diameter_resolution_limit(scheme, np.asarray(snr, dtype=np.float64))
    with np.errstate(invalid="ignore"):
        return np.asarray(np.isfinite(d) & np.isfinite(limit) & (d < limit), dtype=bool)
