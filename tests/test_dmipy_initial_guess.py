"""dmipy's initial guesses (``set_initial_guess_parameter``), per-voxel fixed maps
(``set_fixed_parameter`` with one value per voxel) and the fit refusals dmipy has.

Signals are noise-free simulations of the model itself on the HCP scheme, so an exact
guess is an exact solution (mean squared error 0) and must come back bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.core.initial_guess import MAX_FIXED_GROUPS, merge_x0
from fingerprint.core.modeling_framework import (
    MultiCompartmentModel,
    MultiCompartmentSphericalMeanModel,
)
from fingerprint.data.saved_acquisition_schemes import wu_minn_hcp_acquisition_scheme
from fingerprint.distributions.distribute_models import SD1WatsonDistributed
from fingerprint.errors import InputError
from fingerprint.signal_models.cylinder_models import C1Stick
from fingerprint.signal_models.gaussian_models import G1Ball, G2Zeppelin


@pytest.fixture(scope="module")
def scheme():
    return wu_minn_hcp_acquisition_scheme()


def ball_stick() -> MultiCompartmentModel:
    return MultiCompartmentModel(models=[G1Ball(), C1Stick()])


def two_balls() -> MultiCompartmentModel:
    """Two balls, the first fixed at free water: one free diffusivity and the fractions."""
    model = MultiCompartmentModel(models=[G1Ball(), G1Ball()])
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    return model


# ------------------------------------------------------------------ validation
def test_initial_guess_is_validated():
    model = ball_stick()
    with pytest.raises(InputError, match="unknown parameter"):
        model.set_initial_guess_parameter("C1Stick_1_nope", 1e-9)
    with pytest.raises(ValueError, match="must end in 2 values"):
        model.set_initial_guess_parameter("C1Stick_1_mu", [0.1, 0.2, 0.3])
    with pytest.raises(InputError, match="finite"):
        model.set_initial_guess_parameter("C1Stick_1_lambda_par", np.inf)
    with pytest.raises(InputError, match=r"must lie in \[1e-10, 3e-09\]"):
        model.set_initial_guess_parameter("C1Stick_1_lambda_par", 1.7)  # not in SI units
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        model.set_initial_guess_parameter("partial_volume_0", 1.5)
    model.set_initial_guess_parameter("C1Stick_1_mu", np.zeros((3, 4, 2)))
    with pytest.raises(InputError, match=r"shape \(2,\).*shape \(3, 4\)"):
        model.set_initial_guess_parameter("lambda_par", np.full(2, 1e-9))
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    with pytest.raises(InputError, match="fixed or linked already"):
        model.set_initial_guess_parameter("G1Ball_1_lambda_iso", 3e-9)


def test_initial_guess_state_is_replaced_not_edited():
    model = ball_stick()
    copy = model.copy()
    model.set_initial_guess_parameter("lambda_par", 1.5e-9)
    model.set_initial_guess_parameter("lambda_par", 1.2e-9)  # replaces
    x0 = model.x0_parameters
    assert list(x0) == ["C1Stick_1_lambda_par"] and float(x0["C1Stick_1_lambda_par"]) == 1.2e-9
    assert copy.x0_parameters == {}
    with pytest.raises(ValueError):
        x0["C1Stick_1_lambda_par"][...] = 0.0  # read-only
    assert model.parameter_optimization_flags == {n: True for n in model.parameter_names}
    # the guess is a fit input, not part of the model: the spec (and dictionary) is shared
    assert model.spec_hash == copy.spec_hash


def test_merge_x0_explicit_entries_win():
    model = ball_stick()
    guesses = {"C1Stick_1_lambda_par": np.float64(1.5e-9), "partial_volume_0": np.float64(0.3)}
    merged = merge_x0(model, guesses, {"lambda_par": 2e-9})
    assert merged == {"C1Stick_1_lambda_par": 2e-9, "partial_volume_0": 0.3}
    vec = np.full(6, np.nan)
    vec[0] = 2.5e-9
    out = merge_x0(model, guesses, vec)
    # G1Ball_1_lambda_iso, C1Stick_1_mu (2), C1Stick_1_lambda_par, partial_volume_0/1
    np.testing.assert_array_equal(out[[0, 3, 4]], [2.5e-9, 1.5e-9, 0.3])
    assert np.isnan(out[[1, 2, 5]]).all()
    assert merge_x0(model, {}, None) is None


# ------------------------------------------------------------------ fitting with guesses
def test_exact_guess_is_returned_exactly_and_wrong_guess_is_not(scheme):
    model = two_balls()
    truth = model.parameters_to_parameter_vector(
        G1Ball_2_lambda_iso=np.array([0.8e-9, 1.4e-9]),
        partial_volume_0=np.array([0.25, 0.6]), partial_volume_1=np.array([0.75, 0.4]))
    data = model.simulate_signal(scheme, truth)
    exact = model.copy()
    for name, value in model.parameter_vector_to_parameters(truth).items():
        exact.set_initial_guess_parameter(name, value)
    fitted = exact.fit(scheme, data, solver="brute2fine", Ns=3)
    np.testing.assert_array_equal(fitted.fitted_parameters_vector, truth)

    wrong = model.copy()
    wrong.set_initial_guess_parameter("G1Ball_2_lambda_iso", 2.9e-9)
    # dictionary matching: the guess is not kept
    fitted = wrong.fit(scheme, data, dictionary_size=3000)
    np.testing.assert_allclose(fitted.fitted_parameters["G1Ball_2_lambda_iso"],
                               truth[:, 0], rtol=0.02)


def test_classical_solver_starts_from_the_guess(scheme):
    """brute2fine with every parameter guessed has no grid left: the refinement starts
    at the guess and converges to the truth (dmipy's behaviour)."""
    model = ball_stick()
    truth = model.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=2.5e-9, C1Stick_1_mu=[0.6, 0.4], C1Stick_1_lambda_par=1.7e-9,
        partial_volume_0=0.3, partial_volume_1=0.7)
    data = model.simulate_signal(scheme, truth)
    model.set_initial_guess_parameter("G1Ball_1_lambda_iso", 2.0e-9)
    model.set_initial_guess_parameter("C1Stick_1_mu", [0.5, 0.5])
    model.set_initial_guess_parameter("C1Stick_1_lambda_par", 1.2e-9)
    model.set_initial_guess_parameter("partial_volume_0", 0.5)
    model.set_initial_guess_parameter("partial_volume_1", 0.5)
    fitted = model.fit(scheme, data, solver="brute2fine")
    np.testing.assert_allclose(fitted.fitted_parameters_vector, truth, rtol=1e-4)


def test_guess_of_wrong_voxel_shape_is_refused(scheme):
    model = two_balls()
    model.set_initial_guess_parameter("G1Ball_2_lambda_iso", np.full((2, 2), 1e-9))
    data = np.ones((3, scheme.number_of_measurements))
    with pytest.raises(InputError, match=r"shape \(2, 2\).*shape \(3,\)"):
        model.fit(scheme, data, solver="brute2fine")


# ------------------------------------------------------------------ per-voxel fixed maps
def test_per_voxel_fixed_fractions(scheme):
    model = two_balls()
    f0 = np.array([0.2, 0.2, 0.6, 0.6, 0.6])
    lam = np.array([0.5e-9, 1.0e-9, 1.5e-9, 2.0e-9, 0.7e-9])
    truth = model.parameters_to_parameter_vector(
        G1Ball_2_lambda_iso=lam, partial_volume_0=f0, partial_volume_1=1 - f0)
    data = model.simulate_signal(scheme, truth)
    model.set_fixed_parameter("partial_volume_0", f0)
    model.set_fixed_parameter("partial_volume_1", 1 - f0)
    # dmipy's layout: the fixed maps stay in the parameter vector, not optimised
    assert model.parameter_names == ["G1Ball_2_lambda_iso", "partial_volume_0",
                                     "partial_volume_1"]
    assert model.parameter_optimization_flags == {
        "G1Ball_2_lambda_iso": True, "partial_volume_0": False, "partial_volume_1": False}
    np.testing.assert_array_equal(model.x0_parameters["partial_volume_0"], f0)
    for solver in ("brute2fine", "fingerprint"):
        fitted = model.fit(scheme, data, solver=solver, dictionary_size=3000)
        params = fitted.fitted_parameters
        np.testing.assert_array_equal(params["partial_volume_0"], f0)
        np.testing.assert_array_equal(params["partial_volume_1"], 1 - f0)
        np.testing.assert_allclose(params["G1Ball_2_lambda_iso"], lam, rtol=0.02)
        np.testing.assert_allclose(fitted.R2_coefficient_of_determination(data), 1.0,
                                   atol=1e-3)


def test_per_voxel_fixed_maps_are_validated(scheme):
    model = two_balls()
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        model.set_fixed_parameter("partial_volume_0", np.array([0.2, 1.2]))
    with pytest.raises(InputError, match="finite"):
        model.set_fixed_parameter("partial_volume_0", np.array([0.2, np.inf]))
    with pytest.raises(InputError, match="all NaN"):
        model.set_fixed_parameter("partial_volume_0", np.array([np.nan, np.nan]))
    model.set_fixed_parameter("partial_volume_0", np.array([0.2, 0.3]))
    with pytest.raises(InputError, match="fixed voxel by voxel"):
        model.set_initial_guess_parameter("partial_volume_0", 0.5)
    with pytest.raises(InputError, match="fixed voxel by voxel"):
        model.set_fixed_parameter("partial_volume_0", 0.5)
    with pytest.raises(InputError, match=r"shape \(3,\).*shape \(2,\)"):
        model.set_fixed_parameter("partial_volume_1", np.array([0.2, 0.3, 0.4]))
    data = np.ones((3, scheme.number_of_measurements))
    with pytest.raises(InputError, match=r"fixed map of partial_volume_0.*\(2,\).*\(3,\)"):
        model.fit(scheme, data, solver="brute2fine")
    many = two_balls()
    n = MAX_FIXED_GROUPS + 1
    many.set_fixed_parameter("partial_volume_0", np.linspace(0.1, 0.9, n))
    with pytest.raises(InputError, match=f"{n} distinct combinations"):
        many.fit(scheme, np.ones((n, scheme.number_of_measurements)))


def test_mix_accepts_tortuosity_inside_a_distribution(scheme):
    bundle = SD1WatsonDistributed(models=[C1Stick(), G2Zeppelin()])
    bundle.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                  "partial_volume_0")
    bundle.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    bundle.set_fixed_parameter("G2Zeppelin_1_lambda_par", 1.7e-9)
    model = MultiCompartmentModel(models=[G1Ball(), bundle])
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    truth = model.parameters_to_parameter_vector(
        SD1WatsonDistributed_1_SD1Watson_1_mu=[0.4, 0.3],
        SD1WatsonDistributed_1_SD1Watson_1_odi=0.2,
        SD1WatsonDistributed_1_partial_volume_0=0.6, partial_volume_0=0.2,
        partial_volume_1=0.8)
    data = model.simulate_signal(scheme, truth)[None]
    fitted = model.fit(scheme, data, solver="mix")
    np.testing.assert_allclose(fitted.fitted_parameters["partial_volume_0"], 0.2, atol=0.01)


def test_spherical_mean_model_ignores_the_orientation_it_drops(scheme):
    """dmipy scripts give a model and its spherical-mean sibling the same parameters;
    the orientation the spherical mean drops is ignored, other unknown names refused."""
    sm = MultiCompartmentSphericalMeanModel(models=[G1Ball(), C1Stick()])
    assert sm.dropped_orientations == ("C1Stick_1_mu",)
    named = dict(G1Ball_1_lambda_iso=3e-9, C1Stick_1_lambda_par=1.7e-9,
                 partial_volume_0=0.3, partial_volume_1=0.7)
    np.testing.assert_array_equal(
        sm.parameters_to_parameter_vector(**named, C1Stick_1_mu=[0.1, 0.2]),
        sm.parameters_to_parameter_vector(**named))
    with pytest.raises(InputError, match="unknown parameter"):
        sm.parameters_to_parameter_vector(**named, C1Stick_1_nu=[0.1, 0.2])
