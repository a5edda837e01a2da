"""Multi-compartment CSD, tissue responses, plane compartments and the observation
matrix (dmipy's MultiCompartmentSphericalHarmonicsModel and friends)."""

import numpy as np
import pytest

from fingerprint.core.acquisition_scheme import acquisition_scheme_from_qvalues
from fingerprint.core.modeling_framework import (
    MultiCompartmentModel,
    MultiCompartmentSphericalHarmonicsModel,
    MultiCompartmentSphericalMeanModel,
)
from fingerprint.data.saved_acquisition_schemes import (
    panagiotaki_verdict_acquisition_scheme,
    wu_minn_hcp_acquisition_scheme,
)
from fingerprint.distributions import distribute_models
from fingerprint.distributions.distributions import SD1Watson
from fingerprint.errors import InputError
from fingerprint.signal_models import cylinder_models, gaussian_models, plane_models
from fingerprint.signal_models.tissue_response_models import (
    estimate_TR1_isotropic_tissue_response_model,
    estimate_TR2_anisotropic_tissue_response_model,
)
from fingerprint.tissue_response.three_tissue_response import (
    optimal_threshold,
    signal_decay_metric,
)
from fingerprint.tissue_response.white_matter_response import (
    white_matter_response_tournier07,
)
from fingerprint.utils.construct_observation_matrix import construct_model_based_A_matrix

SCHEME = wu_minn_hcp_acquisition_scheme()
PERP = np.array([[1.0, 0.0, 0.0]])


def _qscheme(q, delta, Delta):
    q = np.atleast_1d(np.asarray(q, dtype=float))
    return acquisition_scheme_from_qvalues(q, np.repeat(PERP, q.size, axis=0), delta, Delta)


def _watson_stick(odi=0.15, mu=(0.0, 0.0)):
    stick = cylinder_models.C1Stick()
    model = distribute_models.SD1WatsonDistributed([stick])
    data = model(SCHEME, SD1Watson_1_odi=odi, SD1Watson_1_mu=list(mu),
                 C1Stick_1_lambda_par=1.7e-9)
    return stick, data


# ----------------------------------------------------------------------------- planes
def test_plane_stejskal_tanner_closed_form():
    length = 8e-6
    q = np.array([0.0, 0.5 / length, 1.0 / length, 0.25 / length])
    signal = plane_models.P2PlaneStejskalTannerApproximation(diameter=length)(
        _qscheme(q, 1e-3, 1.0))
    x = 2 * np.pi * q * length
    with np.errstate(invalid="ignore", divide="ignore"):
        expected = np.where(x > 0, 2 * (1 - np.cos(x)) / x ** 2, 1.0)
    np.testing.assert_allclose(signal, expected, rtol=1e-12, atol=1e-30)
    assert signal[2] < 1e-30  # first zero at q = 1 / L


def test_plane_return_to_plane_probability():
    q = np.linspace(0, 10e6, 4000)
    for cls in (plane_models.P2PlaneStejskalTannerApproximation,
                plane_models.P3PlaneCallaghanApproximation):
        signal = cls(diameter=10e-6)(_qscheme(q, 1e-10, 1e10))
        assert np.isclose(1 / (2 * np.trapezoid(signal, q)), 10e-6, rtol=1e-3)


def test_plane_callaghan_limits():
    q = np.linspace(0, 2e5, 50)
    long_time = plane_models.P3PlaneCallaghanApproximation(diameter=5e-6)(
        _qscheme(q, 1e-6, 10.0))
    sgp = plane_models.P2PlaneStejskalTannerApproximation(diameter=5e-6)(
        _qscheme(q, 1e-6, 10.0))
    np.testing.assert_allclose(long_time, sgp, atol=1e-12)
    # short times between far planes: free diffusion, exp(-b D)
    scheme = _qscheme(q, 1e-4, 2e-4)
    free = plane_models.P3PlaneCallaghanApproximation(diameter=1e-4, number_of_roots=200)(
        scheme)
    np.testing.assert_allclose(free, np.exp(-scheme.bvalues * 1.7e-9), atol=5e-3)


def test_planes_are_one_dimensional_models():
    plane = plane_models.P3PlaneCallaghanApproximation()
    with pytest.raises(InputError, match="NMR"):
        MultiCompartmentModel([gaussian_models.G1Ball(), plane])
    with pytest.raises(InputError, match="NMR"):
        MultiCompartmentSphericalMeanModel([plane])
    gamma = distribute_models.DD1GammaDistributed(
        [plane_models.P2PlaneStejskalTannerApproximation()])
    signal = gamma(_qscheme([0.0, 5e4], 1e-3, 0.02), DD1Gamma_1_alpha=4.0,
                   DD1Gamma_1_beta=1e-6)
    assert np.isclose(signal[0], 1.0) and 0 < signal[1] < 0.99


# ----------------------------------------------------------------------------- kernels
def test_rotational_harmonics_and_observation_matrix():
    ball = gaussian_models.G1Ball(lambda_iso=2e-9)
    rh_ball = ball.rotational_harmonics_representation(SCHEME)
    np.testing.assert_allclose(rh_ball[:, 0], 2 * np.sqrt(np.pi) * np.exp(
        -SCHEME.shell_bvalues[1:] * 2e-9), rtol=1e-12)
    a_ball = construct_model_based_A_matrix(SCHEME, rh_ball, 0)
    np.testing.assert_allclose(a_ball[:, 0] / (2 * np.sqrt(np.pi)), ball(SCHEME), rtol=1e-12)
    stick, data = _watson_stick(odi=0.3, mu=(0.7, 1.9))
    rh = stick.rotational_harmonics_representation(SCHEME, lambda_par=1.7e-9)
    sh = SD1Watson(mu=[0.7, 1.9], odi=0.3).spherical_harmonics_representation(14)
    np.testing.assert_allclose(construct_model_based_A_matrix(SCHEME, rh, 14) @ sh, data,
                               atol=1e-6)


# ----------------------------------------------------------------------------- MC-CSD
def test_csd_recovers_watson_fod_and_signal():
    stick, data = _watson_stick()
    model = MultiCompartmentSphericalHarmonicsModel([stick], sh_order=8)
    model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    assert model.parameter_names == ["sh_coeff"]
    fit = model.fit(SCHEME, data, lambda_lb=0.0)
    np.testing.assert_allclose(fit.predict()[0], data, atol=2e-3)
    assert fit.R2_coefficient_of_determination(data)[0] > 0.999
    peak = fit.peaks_cartesian()[0, 0]
    assert abs(peak[2]) > np.cos(np.deg2rad(1.0))
    # the FOD and its SH: unconstrained (no unity) c_00 is the fitted scale, close to Y_00
    assert np.isclose(fit.fitted_parameters["sh_coeff"][0, 0], 0.5 / np.sqrt(np.pi),
                      rtol=0.02)
    # simulate_signal with the exact Watson SH reproduces the dispersed stick
    sh = SD1Watson(mu=[0.0, 0.0], odi=0.15).spherical_harmonics_representation(8)
    sim = model.simulate_signal(SCHEME, {"sh_coeff": sh})
    assert np.max(np.abs(sim - data)) < 0.02


def test_csd_fits_volume_fractions_and_multi_tissue_responses():
    stick = cylinder_models.C1Stick()
    ball = gaussian_models.G1Ball()
    watson = distribute_models.SD1WatsonDistributed([stick])
    aniso = watson(SCHEME, SD1Watson_1_odi=0.2, SD1Watson_1_mu=[1.0, 0.5],
                   C1Stick_1_lambda_par=1.7e-9)
    iso = ball(SCHEME, lambda_iso=3e-9)
    model = MultiCompartmentSphericalHarmonicsModel([stick, ball])
    model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    fit = model.fit(SCHEME, 0.7 * aniso + 0.3 * iso, lambda_lb=0.0)
    assert np.isclose(fit.fitted_parameters["partial_volume_0"][0], 0.7, atol=5e-3)
    assert np.isclose(fit.fitted_parameters["partial_volume_1"][0], 0.3, atol=5e-3)
    # multi-tissue: S0 of the isotropic tissue 5x that of the fibres
    mt = MultiCompartmentSphericalHarmonicsModel([stick, ball], S0_tissue_responses=[1.0, 5.0])
    mt.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    mt.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    fit_mt = mt.fit(SCHEME, 100 * (0.7 * aniso + 0.3 * 5.0 * iso), lambda_lb=0.0)
    # the data are 100 x (0.7 S0_fibre K_fibre + 0.3 S0_iso K_iso): fractions 70 and 30 of
    # the responses (no unity constraint with S0 responses)
    np.testing.assert_allclose([fit_mt.fitted_parameters["partial_volume_0"][0],
                                fit_mt.fitted_parameters["partial_volume_1"][0]], [70, 30],
                               rtol=5e-3)


def test_csd_input_errors():
    stick, data = _watson_stick()
    with pytest.raises(InputError, match="anisotropic"):
        MultiCompartmentSphericalHarmonicsModel([gaussian_models.G1Ball()])
    model = MultiCompartmentSphericalHarmonicsModel([stick])
    with pytest.raises(InputError, match="not fixed"):
        model.fit(SCHEME, data)
    both = MultiCompartmentSphericalHarmonicsModel([stick, gaussian_models.G1Ball()])
    both.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    both.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    with pytest.raises(InputError, match="csd_tournier07"):
        both.fit(SCHEME, data, solver="csd_tournier07")
    with pytest.raises(InputError, match="S0_tissue_responses"):
        MultiCompartmentSphericalHarmonicsModel([stick], S0_tissue_responses=[1.0, 2.0])
    with pytest.raises(InputError, match="solver"):
        both.fit(SCHEME, data, solver="magic")


# ----------------------------------------------------------------------------- responses
def test_tissue_responses_from_exact_signals():
    ball = gaussian_models.G1Ball(lambda_iso=2.5e-9)
    s0, iso = estimate_TR1_isotropic_tissue_response_model(SCHEME, 50 * ball(SCHEME)[None])
    assert np.isclose(s0, 50.0)
    np.testing.assert_allclose(iso(SCHEME), ball(SCHEME), atol=1e-12)
    zeppelin = gaussian_models.G2Zeppelin(lambda_par=1.7e-9, lambda_perp=0.6e-9,
                                          mu=[0.4, 2.0])
    s0, aniso = estimate_TR2_anisotropic_tissue_response_model(
        SCHEME, 10 * zeppelin(SCHEME)[None])
    assert np.isclose(s0, 10.0)
    np.testing.assert_allclose(aniso(SCHEME, mu=[0.4, 2.0]), zeppelin(SCHEME), atol=1e-4)
    np.testing.assert_allclose(aniso.rotational_harmonics_representation(SCHEME),
                               zeppelin.rotational_harmonics_representation(SCHEME),
                               atol=1e-5)
    with pytest.raises(InputError, match="not among the response's shells"):
        aniso(panagiotaki_verdict_acquisition_scheme(), mu=[0.0, 0.0])


def test_tournier07_picks_the_most_anisotropic_voxels():
    zeppelin = gaussian_models.G2Zeppelin(mu=[0.3, 0.3])
    data = np.array([zeppelin(SCHEME, lambda_par=1.7e-9, lambda_perp=p)
                     for p in (1.5e-9, 0.3e-9, 1.0e-9, 0.2e-9)])
    s0, model, picked = white_matter_response_tournier07(SCHEME, data, N_candidate_voxels=2)
    assert sorted(picked.tolist()) == [1, 3]
    assert np.isclose(s0, 1.0)


def test_signal_decay_metric_and_optimal_threshold():
    ball = gaussian_models.G1Ball()
    data = np.array([ball(SCHEME, lambda_iso=d) for d in (1e-9, 3e-9)])
    dwi_b = SCHEME.shell_bvalues[~SCHEME.shell_b0_mask]
    np.testing.assert_allclose(signal_decay_metric(SCHEME, data),
                               [1e-9 * dwi_b.mean(), 3e-9 * dwi_b.mean()], rtol=1e-10)
    two_levels = np.r_[np.full(30, 1.0), np.full(70, 5.0)]
    assert 1.0 <= optimal_threshold(two_levels) < 5.0
    with pytest.raises(InputError):
        optimal_threshold(np.ones(5))


def test_capped_cylinders_factorise():
    from fingerprint.signal_models.capped_cylinder_models import (
        CC2CappedCylinderStejskalTannerApproximation,
        CC3CappedCylinderCallaghanApproximation,
    )

    q = np.linspace(0, 3e5, 25)
    direction = np.array([0.6, 0.0, 0.8])
    scheme = acquisition_scheme_from_qvalues(q, np.tile(direction, (q.size, 1)), 1e-3, 0.03)
    capped = CC2CappedCylinderStejskalTannerApproximation(mu=[0, 0], diameter=6e-6,
                                                           length=20e-6)(scheme)
    x_perp = 2 * np.pi * q * 0.6 * 3e-6
    from scipy.special import j1

    with np.errstate(invalid="ignore", divide="ignore"):
        across = np.where(x_perp > 0, (2 * j1(x_perp) / x_perp) ** 2, 1.0)
    along = np.sinc(q * 0.8 * 20e-6) ** 2
    np.testing.assert_allclose(capped, across * along, atol=1e-10)
    long_time = acquisition_scheme_from_qvalues(q, np.tile(direction, (q.size, 1)), 1e-6, 50.0)
    np.testing.assert_allclose(
        CC3CappedCylinderCallaghanApproximation(mu=[0, 0], diameter=6e-6, length=20e-6)(
            long_time),
        CC2CappedCylinderStejskalTannerApproximation(mu=[0, 0], diameter=6e-6, length=20e-6)(
            long_time), atol=2e-3)


@pytest.mark.parametrize("unity", [False, True])
def test_least_distance_solver_matches_interior_point(unity):
    from fingerprint.core.spherical_harmonics_model import _CsdProblem

    stick, _ = _watson_stick()
    model = MultiCompartmentSphericalHarmonicsModel([stick])
    model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    design, _ = model._design(SCHEME)
    rng = np.random.default_rng(3)
    watson = distribute_models.SD1WatsonDistributed([stick])
    signals = np.array([watson(SCHEME, SD1Watson_1_mu=rng.uniform(0, 3, 2),
                               SD1Watson_1_odi=0.1, C1Stick_1_lambda_par=1.7e-9)
                        + 0.03 * rng.normal(size=SCHEME.number_of_measurements)
                        for _ in range(4)])
    exact = _CsdProblem(design, 8, 1e-5, unity, np.ones(1), [False])
    interior = _CsdProblem(design, 8, 1e-5, unity, np.ones(1), [False])
    interior._ldp = None  # force Clarabel
    x_exact = exact.solve_many(signals)[0]
    x_interior = interior.solve_many(signals)[0]
    np.testing.assert_allclose(x_exact, x_interior, atol=1e-3)
    reg = 1e-5 * np.concatenate([np.full(2 * ell + 1, (ell * (ell + 1.0)) ** 2)
                                 for ell in range(0, 9, 2)])

    def objective(x):
        return np.sum((x @ design[0].T - signals) ** 2, axis=1) + (x ** 2 * reg).sum(axis=1)

    # the active-set solution is at least as good as the interior-point one
    assert np.all(objective(x_exact) <= objective(x_interior) + 1e-12)
    from fingerprint.core.spherical_harmonics_model import hemisphere_grid, sh_basis

    assert (sh_basis(8, hemisphere_grid()) @ x_exact.T).min() > -1e-10
    if unity:
        np.testing.assert_allclose(x_exact[:, 0], 0.5 / np.sqrt(np.pi))
