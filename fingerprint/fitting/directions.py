"""Fascicle directions per voxel from constrained spherical deconvolution.

>>> from fingerprint.fitting.directions import fascicle_directions
>>> dirs, amps, count = fascicle_directions(scheme, data, max_fascicles=3)
>>> dirs.shape, amps.shape, count.shape          # (N, 3, 3), (N, 3), (N,)

The data (..., M) are divided by their mean b=0 signal and deconvolved, a chunk of
voxels at a time, with one white-matter response (by default an axially symmetric
tensor, :data:`DEFAULT_WM_DIFFUSIVITIES`) and isotropic responses (free water, plus a
grey-matter-like one with three or more distinct b-values) by the batched MSMT-CSD of
:mod:`fingerprint.core.msmt_csd` (FOD non-negative, SH order 8); the FOD maxima found on
a dense grid and refined by Newton steps are the fascicle directions.

Peak threshold rule: a maximum counts as a fascicle when its FOD amplitude is at least
``relative_peak_threshold`` (default 0.25) times the voxel's largest and at least
``absolute_peak_threshold`` (default 0.1, in units of a normalised single-fibre FOD
whose peak is ~3.6 at order 8), and it lies more than ``min_separation_angle`` (default
25°) from every larger one. At most ``max_fascicles`` are kept, largest first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike
from scipy.special import eval_legendre

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.csd_peaks import fod_peaks_batched
from fingerprint.core.msmt_csd import MsmtCsd, TissueResponses
from fingerprint.errors import InputError

__all__ = ["DEFAULT_ISOTROPIC_DIFFUSIVITIES", "DEFAULT_WM_DIFFUSIVITIES",
           "FascicleDirections", "default_responses", "fascicle_directions"]

logger = logging.getLogger(__name__)

#: (parallel, perpendicular) diffusivities of the default white-matter response, m²/s
DEFAULT_WM_DIFFUSIVITIES = (1.7e-9, 0.2e-9)
#: diffusivities of the default isotropic responses (free water, grey-matter-like), m²/s
DEFAULT_ISOTROPIC_DIFFUSIVITIES = {"csf": 3.0e-9, "gm": 0.8e-9}
#: voxels deconvolved per batch
CHUNK = 4096
_METHODS = ("csd",)

FascicleDirections = tuple[np.ndarray, np.ndarray, np.ndarray]


def _zonal_tensor(b: float, d_par: float, d_perp: float, sh_order: int) -> np.ndarray:
    """Zonal SH coefficients (sh_order / 2 + 1,) of ``exp(-b (d_perp + (d_par - d_perp)
    t^2))`` (t the cosine to the axis): ``2 pi int E(t) Y_l0(t) dt``, Gauss-Legendre."""
    nodes, weights = np.polynomial.legendre.leggauss(64)
    signal = np.exp(-b * (d_perp + (d_par - d_perp) * nodes ** 2))
    ell = np.arange(0, sh_order + 1, 2)
    y_l0 = np.sqrt((2 * ell + 1) / (4 * np.pi))[:, None] * eval_legendre(ell[:, None],
                                                                        nodes[None, :])
    return 2.0 * np.pi * (y_l0 * signal * weights).sum(axis=1)


def default_responses(scheme: AcquisitionScheme, sh_order: int = 8,
                      wm_diffusivities: tuple[float, float] = DEFAULT_WM_DIFFUSIVITIES
                      ) -> TissueResponses:
    """Responses (signal attenuations, S0 = 1) on the scheme's shells: an axially
    symmetric tensor for white matter and ``exp(-b D)`` isotropic responses, free water
    always, grey-matter-like when the scheme has three or more distinct b-values (one
    tissue per distinct b-value at most)."""
    shells = np.unique(np.asarray(scheme.shell_bvalues, dtype=float))
    d_par, d_perp = (float(v) for v in wm_diffusivities)
    if not (0 <= d_perp <= d_par) or not math.isfinite(d_par):
        raise InputError("wm_diffusivities must be (parallel, perpendicular) with "
                         f"0 <= perpendicular <= parallel (m²/s), got {wm_diffusivities!r}")
    wm = np.stack([_zonal_tensor(b, d_par, d_perp, sh_order) for b in shells])
    names = ["csf"] if shells.size >= 2 else []
    if shells.size >= 3:
        names.append("gm")
    iso = [math.sqrt(4 * math.pi) * np.exp(-shells * DEFAULT_ISOTROPIC_DIFFUSIVITIES[n])
           for n in names]
    return TissueResponses.from_arrays(shells, wm, iso, names)


def fascicle_directions(scheme: AcquisitionScheme, data: ArrayLike, max_fascicles: int = 3,
                        method: str = "csd", *, mask: ArrayLike | None = None,
                        sh_order: int = 8, responses: TissueResponses | None = None,
                        relative_peak_threshold: float = 0.25,
                        absolute_peak_threshold: float = 0.1,
                        min_separation_angle: float = 25.0,
                        progress: Callable[[float], object] | None = None
                        ) -> FascicleDirections:
    """Per-voxel fascicle directions of ``data`` (..., M) acquired with ``scheme``.

    Parameters
    ----------
    scheme : the acquisition scheme (b-values in s/m², at least one b=0).
    data : signals (..., M), any positive scale (each voxel is divided by its mean b=0).
    max_fascicles : largest number of fascicles per voxel (1 to 6).
    method : ``'csd'`` (multi-shell constrained spherical deconvolution).
    mask : optional boolean (...,): voxels outside get count 0.
    sh_order : even SH order of the FOD (default 8).
    responses : :class:`~fingerprint.core.msmt_csd.TissueResponses` in units of the
        normalised signal (S0 = 1); default :func:`default_responses`.
    relative_peak_threshold, absolute_peak_threshold, min_separation_angle : the peak
        threshold rule of this module's docstring (dimensionless, FOD units, degrees).
    progress : optional callable receiving the fraction done (0 to 1).

    Returns
    -------
    directions : (..., max_fascicles, 3) unit vectors (z >= 0), largest FOD peak first,
        zero rows past the count.
    amplitudes : (..., max_fascicles) FOD amplitude of each peak (0 past the count).
    count : (...,) int, number of fascicles found.
    """
    if method not in _METHODS:
        raise InputError(f"method must be one of {_METHODS}, got {method!r}")
    if isinstance(max_fascicles, bool) or int(max_fascicles) != max_fascicles \
            or not 1 <= int(max_fascicles) <= 6:
        raise InputError(f"max_fascicles must be an integer from 1 to 6, got "
                         f"{max_fascicles!r}")
    arr = np.asarray(data, dtype=float)
    n_meas = scheme.number_of_measurements
    if arr.ndim == 0 or arr.shape[-1] != n_meas:
        raise InputError(f"data has shape {arr.shape}; expected (..., {n_meas}) for a "
                         f"scheme of {n_meas} measurements")
    b0 = np.asarray(scheme.b0_mask, dtype=bool)
    if not b0.any():
        raise InputError("fascicle_directions needs b=0 measurements to normalise the "
                         "signal; the scheme has none")
    if b0.all():
        raise InputError("fascicle_directions needs diffusion-weighted measurements; the "
                         "scheme has only b=0")
    shape = arr.shape[:-1]
    flat = arr.reshape(-1, n_meas)
    s0 = flat[:, b0].mean(axis=1)
    use = np.isfinite(s0) & (s0 > 0) & np.all(np.isfinite(flat), axis=1)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != shape:
            raise InputError(f"mask has shape {m.shape}; expected {shape}")
        use &= m.reshape(-1)
    resp = default_responses(scheme, sh_order) if responses is None else responses
    solver = MsmtCsd(scheme.bvalues, scheme.gradient_directions, resp, sh_order)
    k = int(max_fascicles)
    dirs = np.zeros((flat.shape[0], k, 3))
    amps = np.zeros((flat.shape[0], k))
    count = np.zeros(flat.shape[0], dtype=np.int64)
    index = np.nonzero(use)[0]
    for start in range(0, index.size, CHUNK):
        sel = index[start:start + CHUNK]
        fod, _ = solver.solve(flat[sel] / s0[sel, None])
        d, a, c = fod_peaks_batched(fod, sh_order, k, relative_peak_threshold,
                                    absolute_peak_threshold, min_separation_angle)
        dirs[sel], amps[sel], count[sel] = d, a, c
        if progress is not None:
            progress(min(1.0, (start + sel.size) / index.size))
    return (dirs.reshape(shape + (k, 3)), amps.reshape(shape + (k,)),
            count.reshape(shape))
