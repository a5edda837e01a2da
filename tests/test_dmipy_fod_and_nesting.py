"""Fitted-model FODs and peaks, parametric FOD models from spherical-mean fits, and
nested distributions (a Gamma distribution of Watson-dispersed cylinders and the
reverse), checked against exact values and each other."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from fingerprint.core.fitted_model import FittedMultiCompartmentModel
from fingerprint.core.modeling_framework import (
    MultiCompartmentModel,
    MultiCompartmentSphericalMeanModel,
)
from fingerprint.core.orientations import mu_to_vectors
from fingerprint.data.saved_acquisition_schemes import wu_minn_hcp_acquisition_scheme
from fingerprint.distributions.distribute_models import (
    DD1GammaDistributed,
    SD1WatsonDistributed,
    SD2BinghamDistributed,
)
from fingerprint.distributions.distributions import SD1Watson
from fingerprint.errors import InputError
from fingerprint.signal_models.cylinder_models import (
    C1Stick,
    C2CylinderStejskalTannerApproximation,
)
from fingerprint.signal_models.gaussian_models import G1Ball, G2Zeppelin


@pytest.fixture(scope="module")
def scheme():
    return wu_minn_hcp_acquisition_scheme()


def _fitted(model, scheme, vectors) -> FittedMultiCompartmentModel:
    """A fitted model holding ``vectors`` (n, P) (no fit needed for these properties)."""
    n = vectors.shape[0]
    return FittedMultiCompartmentModel(model, scheme, vectors, mask=np.ones(n, bool),
                                       S0=np.ones(n))


# ------------------------------------------------------------------ fitted parameters
def test_fitted_parameters_is_a_read_only_dict(scheme):
    model = MultiCompartmentModel(models=[G1Ball(), C1Stick()])
    vec = model.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=3e-9, C1Stick_1_mu=[0.3, 0.2], C1Stick_1_lambda_par=1.7e-9,
        partial_volume_0=0.4, partial_volume_1=0.6)[None]
    params = _fitted(model, scheme, vec).fitted_parameters
    assert isinstance(params, dict)
    assert params["lambda_iso"] == params["G1Ball_1_lambda_iso"] == 3e-9  # suffixes resolve
    assert params.get("lambda_par") == 1.7e-9 and params.get("nope", 5) == 5
    with pytest.raises(TypeError, match="read-only"):
        params["G1Ball_1_lambda_iso"] = 1.0
    with pytest.raises(TypeError, match="read-only"):
        params.update(x=1)
    again = pickle.loads(pickle.dumps(params))
    assert type(again) is type(params) and again["partial_volume_0"] == 0.4


# ------------------------------------------------------------------ FODs and peaks
def test_fod_fod_sh_and_peaks_of_a_watson_fit(scheme):
    bundle = SD1WatsonDistributed(models=[C1Stick()])
    model = MultiCompartmentModel(models=[G1Ball(), bundle])
    mus = np.array([[0.4, 0.3], [1.2, -2.0]])
    vec = model.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=3e-9, SD1WatsonDistributed_1_C1Stick_1_lambda_par=1.7e-9,
        SD1WatsonDistributed_1_SD1Watson_1_mu=mus,
        SD1WatsonDistributed_1_SD1Watson_1_odi=np.array([0.1, 0.35]),
        partial_volume_0=np.array([0.2, 0.5]), partial_volume_1=np.array([0.8, 0.5]))
    fitted = _fitted(model, scheme, vec)
    vertices = mu_to_vectors(np.array([[0.4, 0.3], [0.0, 0.0], [1.5, 1.0]]))
    fod = fitted.fod(vertices)
    for i, (mu, odi, f) in enumerate(zip(mus, [0.1, 0.35], [0.8, 0.5], strict=True)):
        np.testing.assert_allclose(fod[i], f * SD1Watson(mu=mu, odi=odi)(vertices),
                                   rtol=1e-12)
    # the ODI floor for display widens the sharp FOD
    assert fitted.fod(vertices, visual_odi_lower_bound=0.3)[0, 0] < fod[0, 0]
    sh = fitted.fod_sh(sh_order=8)
    assert sh.shape == (2, 45)
    # c_00 = fraction / (2 sqrt(pi)) exactly (the density integrates to one)
    np.testing.assert_allclose(sh[:, 0], np.array([0.8, 0.5]) / (2 * np.sqrt(np.pi)),
                               rtol=1e-12)
    # the exact Watson SH coefficients (Legendre coefficients rotated to mu)
    exact = SD1Watson(mu=mus[1], odi=0.35).spherical_harmonics_representation(sh_order=8)
    np.testing.assert_allclose(sh[1], 0.5 * np.asarray(exact), atol=1e-10)
    np.testing.assert_array_equal(fitted.peaks_spherical(), mus[:, None, :])
    np.testing.assert_allclose(fitted.peaks_cartesian()[:, 0], mu_to_vectors(mus))
    with pytest.raises(InputError, match="basis_type"):
        fitted.fod_sh(basis_type="descoteaux07")
    with pytest.raises(InputError, match=r"\(K, 3\)"):
        fitted.fod(np.ones(3))


def test_fod_refused_without_a_distribution(scheme):
    model = MultiCompartmentModel(models=[G1Ball()])
    fitted = _fitted(model, scheme, np.array([[2e-9]]))
    with pytest.raises(ValueError, match="FODs are not available"):
        fitted.fod(np.eye(3))
    with pytest.raises(ValueError, match="peaks are not available"):
        fitted.peaks_spherical()


# ------------------------------------------------------------------ parametric FOD models
def _smt(scheme):
    smt = MultiCompartmentSphericalMeanModel(models=[C1Stick(), G2Zeppelin()])
    smt.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                               "partial_volume_0", "partial_volume_1")
    smt.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    vec = smt.parameters_to_parameter_vector(
        G2Zeppelin_1_lambda_par=np.array([1.7e-9, 2.0e-9]),
        partial_volume_0=np.array([0.6, 0.3]), partial_volume_1=np.array([0.4, 0.7]))
    return smt, _fitted(smt, scheme, vec)


def test_parametric_fod_model_fixes_the_spherical_mean_kernel(scheme):
    smt, fitted = _smt(scheme)
    model = fitted.return_parametric_fod_model(distribution="watson", Ncompartments=2)
    p = "SD1WatsonDistributed_1_"
    # dmipy's layout: the per-voxel kernel stays in the vector, not optimised; the
    # second bundle's kernel is linked to the first's
    flags = model.parameter_optimization_flags
    assert [n for n, free in flags.items() if free] == [
        p + "SD1Watson_1_mu", p + "SD1Watson_1_odi", "SD1WatsonDistributed_2_SD1Watson_1_mu",
        "SD1WatsonDistributed_2_SD1Watson_1_odi", "partial_volume_0", "partial_volume_1"]
    assert model.parameter_optimization_flags[p + "G2Zeppelin_1_lambda_par"] is False
    kernel = model.x0_parameters
    np.testing.assert_array_equal(kernel[p + "G2Zeppelin_1_lambda_par"], [1.7e-9, 2.0e-9])
    # two compartments: the bundle's nested intra fraction is the spherical mean's
    np.testing.assert_array_equal(kernel[p + "partial_volume_0"], [0.6, 0.3])
    one = fitted.return_parametric_fod_model(distribution="bingham")
    assert isinstance(one.models[0], SD2BinghamDistributed)
    for bad in ({"Ncompartments": 1.5}, {"Ncompartments": 0}, {"distribution": "bla"}):
        with pytest.raises(ValueError):
            fitted.return_parametric_fod_model(**bad)
    plain = MultiCompartmentModel(models=[G1Ball()])
    with pytest.raises(InputError, match="spherical-mean"):
        _fitted(plain, scheme, np.array([[2e-9]])).return_parametric_fod_model()


# ------------------------------------------------------------------ nested distributions
def test_gamma_of_watson_equals_watson_of_gamma(scheme):
    cylinder = C2CylinderStejskalTannerApproximation()
    watson_cyl = SD1WatsonDistributed([cylinder])
    gamma_watson = DD1GammaDistributed(
        [watson_cyl], target_parameter="C2CylinderStejskalTannerApproximation_1_diameter")
    lam = "C2CylinderStejskalTannerApproximation_1_lambda_par"
    assert gamma_watson.parameter_names == [
        "SD1WatsonDistributed_1_" + lam, "SD1WatsonDistributed_1_SD1Watson_1_mu",
        "SD1WatsonDistributed_1_SD1Watson_1_odi", "DD1Gamma_1_alpha", "DD1Gamma_1_beta"]
    watson_gamma = SD1WatsonDistributed([DD1GammaDistributed([cylinder])])
    assert watson_gamma.parameter_names == [
        "DD1GammaDistributed_1_" + lam, "DD1GammaDistributed_1_DD1Gamma_1_alpha",
        "DD1GammaDistributed_1_DD1Gamma_1_beta", "SD1Watson_1_mu", "SD1Watson_1_odi"]
    a = gamma_watson(scheme, **{"SD1WatsonDistributed_1_" + lam: 1.7e-9,
                                "DD1Gamma_1_alpha": 2.0, "DD1Gamma_1_beta": 4e-6,
                                "odi": 0.4, "mu": [0.3, 0.5]})
    b = watson_gamma(scheme, **{"DD1GammaDistributed_1_" + lam: 1.7e-9,
                                "alpha": 2.0, "beta": 4e-6, "odi": 0.4,
                                "mu": [0.3, 0.5]})
    np.testing.assert_allclose(a, b, atol=1e-9)
    # a very narrow Gamma is the Watson cylinder at the mean (area-weighted) radius
    alpha, radius = 4000.0, 3e-6
    narrow = gamma_watson(scheme, **{"SD1WatsonDistributed_1_" + lam: 1.7e-9,
                                     "DD1Gamma_1_alpha": alpha,
                                     "DD1Gamma_1_beta": radius / (alpha + 2.0),
                                     "odi": 0.4, "mu": [0.3, 0.5]})
    single = watson_cyl(scheme, **{lam: 1.7e-9,
                                   "C2CylinderStejskalTannerApproximation_1_diameter":
                                   2 * radius, "odi": 0.4, "mu": [0.3, 0.5]})
    np.testing.assert_allclose(narrow, single, atol=2e-3)
    # spherical means agree too, and with the mean over a dense shell
    sm_a = gamma_watson.spherical_mean(scheme, **{"SD1WatsonDistributed_1_" + lam: 1.7e-9,
                                                  "alpha": 2.0, "beta": 4e-6, "odi": 0.4})
    sm_b = watson_gamma.spherical_mean(scheme, **{"DD1GammaDistributed_1_" + lam: 1.7e-9,
                                                  "alpha": 2.0, "beta": 4e-6, "odi": 0.4})
    np.testing.assert_allclose(sm_a, sm_b, atol=1e-9)
    # nesting survives the spec round trip inside a multi-compartment model
    model = MultiCompartmentModel(models=[gamma_watson])
    from fingerprint.core.modeling_framework import model_from_spec

    again = model_from_spec(model.to_spec())
    assert again.parameter_names == model.parameter_names


def test_nesting_is_validated():
    cylinder = C2CylinderStejskalTannerApproximation()
    watson_cyl = SD1WatsonDistributed([cylinder])
    with pytest.raises(InputError, match="cannot be distributed by it"):
        SD1WatsonDistributed([watson_cyl])
    with pytest.raises(InputError, match="is not a free diameter"):
        DD1GammaDistributed([watson_cyl], target_parameter="C2Cylinder_1_diameter")
    inner = SD1WatsonDistributed([DD1GammaDistributed([cylinder])])
    with pytest.raises(InputError, match="one level of nesting"):
        DD1GammaDistributed([inner])


def test_orientation_distribution_needs_an_oriented_model():
    from fingerprint.signal_models.sphere_models import S1Dot

    for isotropic in (G1Ball(), S1Dot()):
        for cls in (SD1WatsonDistributed, SD2BinghamDistributed):
            with pytest.raises(ValueError, match="all isotropic"):
                cls([isotropic])
    # an isotropic compartment next to an oriented one is left undispersed
    bundle = SD1WatsonDistributed([C1Stick(), G1Ball()])
    assert "G1Ball_1_lambda_iso" in bundle.parameter_names
