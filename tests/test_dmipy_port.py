"""dmipy scripts run after changing ``dmipy`` to ``fingerprint`` in their imports.

Each test is one of the documented dmipy usage examples (Ball-Stick, batch fitting,
Ball-Stick-Stick, NODDI with dmipy's tortuosity call, SMT, cascade initialisation, shell
subsets, solver names) written as a dmipy user writes it, with only the imports changed,
applied to voxels simulated with known parameters so the fits can be checked.
"""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
from fingerprint.core.modeling_framework import (
    MultiCompartmentModel,
    MultiCompartmentSphericalMeanModel,
)
from fingerprint.core.orientations import angular_error_deg, mu_to_vectors
from fingerprint.distributions.distribute_models import SD1WatsonDistributed
from fingerprint.signal_models import cylinder_models, gaussian_models

#: Atoms per dictionary: small, so each model's dictionary builds in about a second.
SIZE = 20_000


def _directions(n: int, twist: float) -> np.ndarray:
    """Well-spread directions, as acquisition schemes use."""
    from fingerprint.phantoms import fibonacci_hemisphere

    return fibonacci_hemisphere(n, twist=twist)


@pytest.fixture(scope="module")
def acq_scheme():
    """Three shells of 40 directions (b = 1000, 2000, 3000 s/mm²) and 6 b0s, in SI."""
    bvals = np.r_[np.zeros(6), np.repeat([1e9, 2e9, 3e9], 40)]
    bvecs = np.r_[np.zeros((6, 3)), _directions(40, 0.0), _directions(40, 0.3),
                  _directions(40, 0.6)]
    return acquisition_scheme_from_bvalues(bvals, bvecs, delta=0.0106, Delta=0.0431)


def _angle(mu_a, mu_b) -> float:
    return float(angular_error_deg(mu_to_vectors(mu_a), mu_to_vectors(mu_b)))


def test_ball_stick_single_voxel_and_batch(acq_scheme):
    stick = cylinder_models.C1Stick()
    ball = gaussian_models.G1Ball()
    ball_stick = MultiCompartmentModel(models=[ball, stick])
    assert ball_stick.parameter_names == [
        "G1Ball_1_lambda_iso", "C1Stick_1_mu", "C1Stick_1_lambda_par",
        "partial_volume_0", "partial_volume_1"]

    truth = ball_stick.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=3e-9, C1Stick_1_mu=[0.7, 1.1], C1Stick_1_lambda_par=1.7e-9,
        partial_volume_0=0.3, partial_volume_1=0.7)
    voxel_data = 1000.0 * ball_stick.simulate_signal(acq_scheme, truth)

    ball_stick_fit = ball_stick.fit(acq_scheme, voxel_data, dictionary_size=SIZE)
    fitted_params = ball_stick_fit.fitted_parameters
    assert set(fitted_params) == set(ball_stick.parameter_names)
    assert fitted_params["partial_volume_0"] == pytest.approx(0.3, abs=0.05)
    assert _angle(fitted_params["C1Stick_1_mu"], [0.7, 1.1]) < 5

    roi_data = np.repeat(voxel_data[None], 4, axis=0)
    ball_stick_fit_roi = ball_stick.fit(acq_scheme, roi_data,
                                        mask=np.ones(len(roi_data), dtype=bool),
                                        dictionary_size=SIZE)
    stick_fraction = ball_stick_fit_roi.fitted_parameters["partial_volume_1"]
    assert stick_fraction.shape == (4,)
    np.testing.assert_allclose(stick_fraction, 0.7, atol=0.05)


def test_ball_stick_stick_repeats_one_instance(acq_scheme):
    stick = cylinder_models.C1Stick()
    ball = gaussian_models.G1Ball()
    ball_stick_stick = MultiCompartmentModel(models=[ball, stick, stick])
    names = ball_stick_stick.parameter_names
    assert "C1Stick_1_mu" in names and "C1Stick_2_mu" in names
    vector = ball_stick_stick.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=3e-9, C1Stick_1_mu=[np.pi / 2, 0.0], C1Stick_2_mu=[np.pi / 2, 1.4],
        C1Stick_1_lambda_par=1.7e-9, C1Stick_2_lambda_par=1.7e-9,
        partial_volume_0=0.2, partial_volume_1=0.4, partial_volume_2=0.4)
    signal = ball_stick_stick.simulate_signal(acq_scheme, vector)
    assert signal.shape == (acq_scheme.number_of_measurements,)
    fit = ball_stick_stick.fit(acq_scheme, 1000.0 * signal, dictionary_size=SIZE)
    mu1 = fit.fitted_parameters["C1Stick_1_mu"]
    mu2 = fit.fitted_parameters["C1Stick_2_mu"]
    assert np.shape(mu1) == (2,) and np.shape(mu2) == (2,)
    assert fit.fitted_parameters["partial_volume_0"] == pytest.approx(0.2, abs=0.1)


@pytest.fixture(scope="module")
def noddi():
    """The NODDI model exactly as the dmipy documentation builds it."""
    stick = cylinder_models.C1Stick()
    zeppelin = gaussian_models.G2Zeppelin()
    ball = gaussian_models.G1Ball()
    watson_bundle = SD1WatsonDistributed(models=[stick, zeppelin])
    noddi = MultiCompartmentModel(models=[ball, watson_bundle])
    noddi.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                 "partial_volume_0", "partial_volume_1")
    noddi.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    noddi.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    # dmipy's set_equal_parameter keeps the first name and removes the second
    noddi.set_fixed_parameter("G2Zeppelin_1_lambda_par", 1.7e-9)
    return noddi


def _noddi_voxels(noddi, acq_scheme, odi, seed=0):
    rng = np.random.default_rng(seed)
    n = len(odi)
    params = {
        "SD1WatsonDistributed_1_SD1Watson_1_mu": np.c_[rng.uniform(0, np.pi, n),
                                                         rng.uniform(-np.pi, np.pi, n)],
        "SD1WatsonDistributed_1_SD1Watson_1_odi": np.asarray(odi, float),
        "SD1WatsonDistributed_1_partial_volume_0": np.full(n, 0.6),
        "partial_volume_0": np.full(n, 0.1),
        "partial_volume_1": np.full(n, 0.9),
    }
    vectors = noddi.parameters_to_parameter_vector(**params)
    return 1000.0 * noddi.simulate_signal(acq_scheme, vectors), params


def test_noddi_documented_calls_and_short_keys(noddi, acq_scheme):
    odi = [0.1, 0.3, 0.6]
    voxel_data, truth = _noddi_voxels(noddi, acq_scheme, odi)
    noddi_fit = noddi.fit(acq_scheme, voxel_data, dictionary_size=SIZE)
    noddi_params = noddi_fit.fitted_parameters
    fitted_odi = noddi_params.get("SD1Watson_1_odi", 0)
    np.testing.assert_allclose(fitted_odi, odi, atol=0.05)
    np.testing.assert_allclose(noddi_params.get("partial_volume_0", 0), 0.1, atol=0.05)
    assert noddi_params["SD1WatsonDistributed_1_SD1Watson_1_odi"] is not None
    r2 = noddi_fit.R2_coefficient_of_determination(voxel_data)
    assert np.all(r2 > 0.99)

    param_maps = {}
    for param_name in noddi.parameter_names:
        param_maps[param_name] = noddi_fit.fitted_parameters.get(param_name, 0)
    assert set(param_maps) == set(noddi.parameter_names)


def test_cascade_initialisation_from_ball_stick(noddi, acq_scheme):
    voxel_data, truth = _noddi_voxels(noddi, acq_scheme, [0.2], seed=3)
    voxel_data = voxel_data[0]
    ball_stick = MultiCompartmentModel(models=[gaussian_models.G1Ball(),
                                               cylinder_models.C1Stick()])
    ball_stick_fit = ball_stick.fit(acq_scheme, voxel_data, dictionary_size=SIZE)
    initial_params = {}
    initial_params["C1Stick_1_mu"] = ball_stick_fit.fitted_parameters["C1Stick_1_mu"]
    # the cascade hands the stick orientation to NODDI's Watson axis
    initial = {"SD1Watson_1_mu": initial_params["C1Stick_1_mu"]}
    noddi_fit_initialized = noddi.fit(acq_scheme, voxel_data, x0_vector=initial,
                                      dictionary_size=SIZE)
    mu = noddi_fit_initialized.fitted_parameters["SD1Watson_1_mu"]
    assert _angle(mu, initial["SD1Watson_1_mu"]) < 1e-6
    assert _angle(mu, truth["SD1WatsonDistributed_1_SD1Watson_1_mu"][0]) < 5


def test_shell_subsets_and_dmipy_solver_names(noddi, acq_scheme):
    voxel_data, _ = _noddi_voxels(noddi, acq_scheme, [0.25], seed=5)
    bvals = acq_scheme.bvalues
    odis = []
    for shell_combo in [[1000e6, 2000e6], [1000e6, 2000e6, 3000e6]]:
        masks = [np.abs(bvals - b) < 100e6 for b in shell_combo] + [bvals < 10e6]
        combined_mask = np.any(masks, axis=0)
        scheme = acq_scheme[combined_mask]
        assert scheme.number_of_measurements == int(combined_mask.sum())
        fit = noddi.fit(scheme, voxel_data[:, combined_mask], solver="brute2fine",
                        dictionary_size=SIZE)
        odis.append(float(fit.fitted_parameters.get("SD1Watson_1_odi", 0)[0]))
    np.testing.assert_allclose(odis, 0.25, atol=0.05)


def test_smt_spherical_mean_model(acq_scheme):
    stick_smt = cylinder_models.C1Stick()
    zeppelin_smt = gaussian_models.G2Zeppelin()
    smt_model = MultiCompartmentSphericalMeanModel(models=[stick_smt, zeppelin_smt])
    smt_model.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                     "partial_volume_0", "partial_volume_1")
    smt_model.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    assert smt_model.parameter_names == ["G2Zeppelin_1_lambda_par", "partial_volume_0",
                                         "partial_volume_1"]
    # full-scheme data of a dispersed voxel: the spherical mean does not care about mu
    noddi_like = MultiCompartmentModel(models=[cylinder_models.C1Stick(),
                                               gaussian_models.G2Zeppelin()])
    noddi_like.set_equal_parameter("G2Zeppelin_1_mu", "C1Stick_1_mu")
    noddi_like.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                      "partial_volume_0", "partial_volume_1")
    noddi_like.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    vector = noddi_like.parameters_to_parameter_vector(
        G2Zeppelin_1_mu=[1.0, 0.5], G2Zeppelin_1_lambda_par=2.0e-9, partial_volume_0=0.55,
        partial_volume_1=0.45)
    voxel_data = 500.0 * noddi_like.simulate_signal(acq_scheme, vector)
    smt_fit = smt_model.fit(acq_scheme, voxel_data, dictionary_size=SIZE)
    smt_params = smt_fit.fitted_parameters
    assert smt_params["partial_volume_0"] == pytest.approx(0.55, abs=0.05)
    assert smt_params["G2Zeppelin_1_lambda_par"] == pytest.approx(2.0e-9, rel=0.1)
