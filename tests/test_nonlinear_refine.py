"""Non-linear least-squares polish of dictionary matches (fingerprint.fitting.nonlinear).

Ball-Stick-Stick voxels simulated with known parameters are fitted through the dmipy API;
the polish must recover both orientations (as a pair, either order), the volume fractions
and a near-perfect R² without noise, stay within the model's bounds, and leave the
default path of single-orientation models unchanged.
"""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
from fingerprint.core.modeling_framework import MultiCompartmentModel
from fingerprint.core.orientations import angular_error_deg, mu_to_vectors
from fingerprint.errors import InputError
from fingerprint.fitting.engine import fit_model, get_estimator
from fingerprint.fitting.nonlinear import refine_nonlinear
from fingerprint.models import get_model
from fingerprint.signal_models import cylinder_models, gaussian_models

SIZE = 20_000


@pytest.fixture(scope="module")
def scheme():
    """b = 1000, 2000, 3000 s/mm² (40 directions each) and 6 b0s, SI units."""
    rng = np.random.default_rng(7)
    dirs = rng.normal(size=(120, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[np.zeros(6), np.repeat([1e9, 2e9, 3e9], 40)]
    return acquisition_scheme_from_bvalues(bvals, np.r_[np.zeros((6, 3)), dirs],
                                           delta=0.0106, Delta=0.0431)


@pytest.fixture(scope="module")
def bss():
    stick = cylinder_models.C1Stick()
    return MultiCompartmentModel(models=[gaussian_models.G1Ball(), stick, stick])


def _truth(bss, n, seed):
    """n Ball-Stick-Stick vectors, fibres crossing at 50-90 degrees."""
    rng = np.random.default_rng(seed)
    theta1, phi1 = rng.uniform(0.3, 2.8, n), rng.uniform(-np.pi, np.pi, n)
    a1 = _cart(np.c_[theta1, phi1])
    # second fibre: rotate a1 by 50-90 degrees about a random perpendicular axis
    perp = np.cross(a1, rng.normal(size=(n, 3)))
    perp /= np.linalg.norm(perp, axis=1, keepdims=True)
    ang = np.radians(rng.uniform(50, 90, n))
    a2 = np.cos(ang)[:, None] * a1 + np.sin(ang)[:, None] * perp
    mu2 = np.c_[np.arccos(np.clip(a2[:, 2], -1, 1)), np.arctan2(a2[:, 1], a2[:, 0])]
    f_ball = rng.uniform(0.1, 0.3, n)
    share = rng.uniform(0.4, 0.6, n)
    return bss.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=rng.uniform(2.0e-9, 3.0e-9, n), C1Stick_1_mu=np.c_[theta1, phi1],
        C1Stick_1_lambda_par=rng.uniform(1.5e-9, 2.2e-9, n), C1Stick_2_mu=mu2,
        C1Stick_2_lambda_par=rng.uniform(1.5e-9, 2.2e-9, n), partial_volume_0=f_ball,
        partial_volume_1=(1 - f_ball) * share, partial_volume_2=(1 - f_ball) * (1 - share))


_cart = mu_to_vectors


def _angle(a, b):
    return angular_error_deg(mu_to_vectors(a), mu_to_vectors(b))


def _pair_errors(bss, fitted, truth):
    """Angular errors (n, 2) and fraction errors (n, 3), matching the sticks as a pair."""
    f, t = bss.parameter_vector_to_parameters(fitted), bss.parameter_vector_to_parameters(truth)
    keep = (_angle(f["C1Stick_1_mu"], t["C1Stick_1_mu"])
            + _angle(f["C1Stick_2_mu"], t["C1Stick_2_mu"]))
    swap = (_angle(f["C1Stick_1_mu"], t["C1Stick_2_mu"])
            + _angle(f["C1Stick_2_mu"], t["C1Stick_1_mu"]))
    swapped = swap < keep
    m1 = np.where(swapped[:, None], t["C1Stick_2_mu"], t["C1Stick_1_mu"])
    m2 = np.where(swapped[:, None], t["C1Stick_1_mu"], t["C1Stick_2_mu"])
    p1 = np.where(swapped, t["partial_volume_2"], t["partial_volume_1"])
    p2 = np.where(swapped, t["partial_volume_1"], t["partial_volume_2"])
    ang = np.c_[_angle(f["C1Stick_1_mu"], m1), _angle(f["C1Stick_2_mu"], m2)]
    pv = np.abs(np.c_[f["partial_volume_0"] - t["partial_volume_0"],
                      f["partial_volume_1"] - p1, f["partial_volume_2"] - p2])
    return ang, pv


def _within_bounds(model, vectors):
    lo, hi = np.asarray(model.bounds_for_optimization).T * model.scales_for_optimization
    return bool(np.all((vectors >= lo - 1e-12 * np.abs(lo)) & (vectors <= hi + 1e-12 * hi)))


def test_ball_stick_stick_noiseless(bss, scheme):
    truth = _truth(bss, 6, seed=1)
    data = 500.0 * bss.simulate_signal(scheme, truth)
    fit = bss.fit(scheme, data, dictionary_size=SIZE, refine="nonlinear")
    ang, pv = _pair_errors(bss, fit.fitted_parameters_vector, truth)
    assert ang.max() < 3.0, ang
    assert pv.max() < 0.03, pv
    assert np.all(fit.R2_coefficient_of_determination(data) > 0.999)
    assert np.all(fit.r2_estimate > 0.999)
    assert _within_bounds(bss, fit.fitted_parameters_vector)
    sums = fit.fitted_parameters_vector[:, -3:].sum(axis=1)
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)


def test_ball_stick_stick_noisy(bss, scheme):
    truth = _truth(bss, 8, seed=2)
    clean = bss.simulate_signal(scheme, truth)
    rng = np.random.default_rng(3)
    sigma = 1.0 / 30.0
    data = np.hypot(clean + sigma * rng.normal(size=clean.shape),
                    sigma * rng.normal(size=clean.shape))
    fit = bss.fit(scheme, data, dictionary_size=SIZE, refine="nonlinear")
    ang, pv = _pair_errors(bss, fit.fitted_parameters_vector, truth)
    assert np.median(ang) < 6.0, ang
    assert pv.max() < 0.12, pv
    assert _within_bounds(bss, fit.fitted_parameters_vector)
    # the polish beats the dictionary match on the signal
    est = get_estimator(bss, scheme, dictionary_size=SIZE, refine=True, n_neighbors=None)
    matched = est.estimate(data)
    assert np.all(fit.r2_estimate >= matched.r2 - 1e-9)


def test_refine_nonlinear_bounds_and_starts(bss, scheme):
    truth = _truth(bss, 2, seed=4)
    y = bss.simulate_signal(scheme, truth)
    lo, hi = np.asarray(bss.bounds_for_optimization).T * bss.scales_for_optimization
    # starts outside the bounds are clipped; the result stays within them
    bad = truth.copy()
    bad[:, 0] = 10e-9
    bad[:, 3] = -1e-9
    good = truth.copy()
    good[:, [1, 4]] += 0.1
    out, cost = refine_nonlinear(bss, scheme, y, np.stack([bad, good], 1), n_jobs=1,
                                 return_cost=True)
    assert _within_bounds(bss, out)
    assert np.all(cost < 1e-8)
    ang, pv = _pair_errors(bss, out, truth)
    assert ang.max() < 0.5 and pv.max() < 0.005
    # a truth outside the lambda_iso bounds: the fit sits on the bound
    high = truth.copy()
    high[:, 0] = 4e-9
    out = refine_nonlinear(bss, scheme, bss.simulate_signal(scheme, high), truth, n_jobs=2)
    assert _within_bounds(bss, out)
    np.testing.assert_allclose(out[:, 0], hi[0])
    with pytest.raises(InputError, match="x0"):
        refine_nonlinear(bss, scheme, y, truth[:, :-1])
    with pytest.raises(InputError, match="signals"):
        refine_nonlinear(bss, scheme, y[:, :-1], truth)


def test_noddi_default_path_unchanged(scheme):
    noddi = get_model("noddi")
    rng = np.random.default_rng(5)
    n = 20
    vec = noddi.parameters_to_parameter_vector(
        SD1WatsonDistributed_1_SD1Watson_1_mu=np.c_[rng.uniform(0, np.pi, n),
                                                    rng.uniform(-np.pi, np.pi, n)],
        SD1WatsonDistributed_1_SD1Watson_1_odi=rng.uniform(0.05, 0.8, n),
        SD1WatsonDistributed_1_partial_volume_0=rng.uniform(0.3, 0.8, n),
        partial_volume_0=np.full(n, 0.1), partial_volume_1=np.full(n, 0.9))
    data = noddi.simulate_signal(scheme, vec)
    fit = fit_model(noddi, scheme, data, dictionary_size=3000)
    est = get_estimator(noddi, scheme, dictionary_size=3000, refine=True, n_neighbors=None)
    ve = est.estimate(data)
    np.testing.assert_array_equal(fit.fitted_parameters_vector, ve.parameters)
    np.testing.assert_array_equal(fit.r2_estimate, ve.r2)
    # asked for: the polish runs, stays in bounds and does not worsen the fit
    polished = fit_model(noddi, scheme, data, dictionary_size=3000, refine="nonlinear")
    assert _within_bounds(noddi, polished.fitted_parameters_vector)
    assert np.all(polished.r2_estimate >= ve.r2 - 1e-3)
    with pytest.raises(InputError, match="refine"):
        fit_model(noddi, scheme, data, dictionary_size=3000, refine="cubic")


def test_batched_matches_scipy(bss, scheme):
    """The batched Levenberg-Marquardt (default) and scipy's least_squares (reference)
    reach the same fits from the same starts, noiseless and noisy."""
    truth = _truth(bss, 6, seed=8)
    clean = bss.simulate_signal(scheme, truth)
    rng = np.random.default_rng(9)
    starts = np.repeat(truth[:, None, :], 2, axis=1)
    starts[:, :, [1, 2, 4, 5]] += rng.normal(0.0, 0.15, (6, 2, 4))
    starts[:, :, [0, 3, 6]] *= rng.uniform(0.8, 1.2, (6, 2, 3))
    sigma = 1.0 / 30.0
    noisy = np.hypot(clean + sigma * rng.normal(size=clean.shape),
                     sigma * rng.normal(size=clean.shape))
    for y in (clean, noisy):
        fast, c_fast = refine_nonlinear(bss, scheme, y, starts, return_cost=True)
        ref, c_ref = refine_nonlinear(bss, scheme, y, starts, return_cost=True,
                                      method="scipy")
        assert _within_bounds(bss, fast)
        assert np.all(c_fast <= c_ref * (1 + 1e-4) + 1e-14), (c_fast, c_ref)
        ang, pv = _pair_errors(bss, fast, ref)
        assert ang.max() < 0.05 and pv.max() < 1e-3, (ang, pv)
    ang, pv = _pair_errors(bss, refine_nonlinear(bss, scheme, clean, starts), truth)
    assert ang.max() < 1e-3 and pv.max() < 1e-5
    with pytest.raises(InputError, match="method"):
        refine_nonlinear(bss, scheme, clean, starts, method="newton")


def test_batched_nnls_and_unusable_voxels(bss, scheme):
    from scipy.optimize import nnls

    from fingerprint.fitting.nonlinear import _nnls_batch

    rng = np.random.default_rng(10)
    at = rng.uniform(0.0, 1.0, (50, 3, 20))
    y = rng.normal(0.0, 1.0, (50, 20))
    want = np.stack([nnls(at[i].T, y[i])[0] for i in range(50)])
    np.testing.assert_allclose(_nnls_batch(at, y), want, atol=1e-10)
    # a voxel with non-finite signals is returned as its start; one without a finite
    # start gets an infinite cost
    truth = _truth(bss, 3, seed=12)
    y = bss.simulate_signal(scheme, truth)
    y[1, 5] = np.nan
    x0 = truth.copy()
    x0[2, 1] = np.nan
    out, cost = refine_nonlinear(bss, scheme, y, x0, return_cost=True)
    assert cost[0] < 1e-12 and np.isnan(cost[1]) and np.isinf(cost[2])
    np.testing.assert_array_equal(out[1], x0[1])


def test_batched_budget_exhausted(bss, scheme):
    """Voxels whose best start runs out of evaluations are continued by the
    trust-region solver: within bounds and never worse than the starts."""
    from fingerprint.fitting.nonlinear import goodness_of_fit

    truth = _truth(bss, 4, seed=13)
    y = bss.simulate_signal(scheme, truth)
    start = truth.copy()
    start[:, [1, 4]] += 0.4
    out, cost = refine_nonlinear(bss, scheme, y, start, max_nfev=2, return_cost=True)
    assert _within_bounds(bss, out) and np.all(np.isfinite(cost))
    _, mse_start = goodness_of_fit(bss, scheme, y, start)
    _, mse_out = goodness_of_fit(bss, scheme, y, out)
    assert np.all(mse_out <= mse_start + 1e-12)
