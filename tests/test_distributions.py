"""Distributed models: dmipy reference signals, exactness against brute-force integration
over the sphere (Watson, Bingham) and over radii (Gamma), naming and links."""

from __future__ import annotations

import numpy as np
import pytest
from reference_helpers import load_reference
from scipy import stats
from scipy.integrate import quad
from scipy.special import eval_legendre

from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
from fingerprint.core.modeling_framework import MultiCompartmentModel, mu_to_axes
from fingerprint.distributions import (
    DD1GammaDistributed,
    SD1WatsonDistributed,
    SD2BinghamDistributed,
    kappa2odi,
    odi2kappa,
)
from fingerprint.distributions.distribute_models import bingham_frame
from fingerprint.errors import InputError
from fingerprint.kernels.dispersion import watson_legendre_coefficients, watson_order
from fingerprint.signal_models.cylinder_models import (
    C1Stick,
    C4CylinderGaussianPhaseApproximation,
)
from fingerprint.signal_models.gaussian_models import G1Ball, G2Zeppelin
from fingerprint.signal_models.sphere_models import S4SphereGaussianPhaseApproximation

DISTRIBUTED_TOL = 3e-3  # dmipy's own SH / Gamma discretisation error (reference README)
EXACT_TOL = 1e-5


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=["hcp", "activeax"])
def reference(request, reference_dir):
    return load_reference(reference_dir, request.param)


@pytest.fixture(scope="module")
def irregular_scheme():
    """Few directions per shell, b-values and timings that vary within a shell."""
    rng = np.random.default_rng(7)
    n = 22
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    b = np.r_[0.0, rng.uniform(0.8e9, 1.2e9, 7), rng.uniform(2.7e9, 3.3e9, 7),
              rng.uniform(5e9, 9e9, 7)]
    delta = rng.uniform(0.008, 0.02, n)
    Delta = delta + rng.uniform(0.015, 0.04, n)
    return acquisition_scheme_from_bvalues(b, dirs, delta=delta, Delta=Delta)


def _sphere_grid(n_theta=160, n_phi=320):
    """Dense product quadrature of the unit sphere (Gauss-Legendre x trapezoid)."""
    x, w = np.polynomial.legendre.leggauss(n_theta)
    phi = 2 * np.pi * np.arange(n_phi) / n_phi
    ct = np.repeat(x, n_phi)
    st = np.sqrt(1 - ct ** 2)
    ph = np.tile(phi, n_theta)
    pts = np.stack([st * np.cos(ph), st * np.sin(ph), ct], axis=1)
    return pts, np.repeat(w, n_phi) * 2 * np.pi / n_phi


def _tiled(meas, k):
    """Each measurement repeated k times (row j*k + i)."""
    def rep(arr):
        return None if arr is None else np.repeat(arr, k)

    return type(meas)(b=rep(meas.b), q=rep(meas.q), G=rep(meas.G), delta=rep(meas.delta),
                      Delta=rep(meas.Delta), directions=np.zeros((meas.b.size * k, 3)))


def _brute_force(compartments_and_params, scheme, density):
    """Integrate sum_k f_k K_k(g . n) W(n) over 51,200 points of the sphere for every
    measurement (each with its own b, delta, Delta)."""
    pts, w = _sphere_grid()
    weights = density(pts) * w
    weights /= weights.sum()
    n_meas, k = scheme.number_of_measurements, pts.shape[0]
    tiled = _tiled(scheme.measurements, k)
    cos = (scheme.gradient_directions @ pts.T).reshape(1, -1)  # (1, N*K)
    out = np.zeros(n_meas)
    for fraction, comp, params in compartments_and_params:
        kern = comp.signal_from_cosines(tiled, cos, **params)[0].reshape(n_meas, k)
        out += fraction * kern @ weights
    return out


def _noddi_bundle():
    bundle = SD1WatsonDistributed(models=[C1Stick(), G2Zeppelin()])
    bundle.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                  "partial_volume_0")
    bundle.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    bundle.set_fixed_parameter("G2Zeppelin_1_lambda_par", 1.7e-9)
    return bundle


def _reference_model(case):
    if case == "NODDIWatson":
        model = MultiCompartmentModel(models=[G1Ball(), _noddi_bundle()])
        model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
        return model
    if case == "WatsonStick":
        return MultiCompartmentModel(models=[SD1WatsonDistributed(models=[C1Stick()])])
    if case == "BinghamStickBall":
        return MultiCompartmentModel(models=[SD2BinghamDistributed(models=[C1Stick()]),
                                             G1Ball()])
    if case == "GammaCylinderZeppelin":
        return MultiCompartmentModel(models=[
            DD1GammaDistributed(models=[C4CylinderGaussianPhaseApproximation()]), G2Zeppelin()])
    raise KeyError(case)


# --------------------------------------------------------------------------- reference
@pytest.mark.parametrize("case", ["NODDIWatson", "WatsonStick", "BinghamStickBall",
                                  "GammaCylinderZeppelin"])
def test_reference_distributed_models(case, reference):
    name, scheme, signals, names = reference
    model = _reference_model(case)
    assert model.parameter_names == names[case]["parameter_names"]
    assert dict(model.parameter_cardinality) == names[case]["parameter_cardinality"]
    assert model.is_spherical_mean is False
    params = signals[f"{case}/params"]
    simulated = model.simulate_signal(scheme, params)
    assert simulated.shape == signals[f"{case}/signals"].shape
    np.testing.assert_allclose(simulated, signals[f"{case}/signals"], atol=DISTRIBUTED_TOL,
                               rtol=0)
    if f"{case}/signals_exact" in signals.files:
        np.testing.assert_allclose(simulated, signals[f"{case}/signals_exact"], atol=EXACT_TOL,
                                   rtol=0)


# --------------------------------------------------------------------------- Watson maths
@pytest.mark.parametrize("odi", [0.99, 0.4, 0.1, 0.02, 0.01])
def test_watson_legendre_coefficients_match_direct_integration(odi):
    kappa = float(odi2kappa(odi))
    l_max = watson_order(kappa)
    coeffs = watson_legendre_coefficients(np.array([kappa]), l_max)[0]
    norm = quad(lambda t: np.exp(kappa * (t * t - 1)), 0, 1, epsabs=1e-14)[0]
    for m, a in enumerate(coeffs[:12]):
        num = quad(lambda t, l=2 * m: np.exp(kappa * (t * t - 1)) * eval_legendre(l, t), 0, 1,
                   limit=400, epsabs=1e-14)[0]
        assert a == pytest.approx(num / norm, abs=1e-11)
    assert coeffs[0] == pytest.approx(1.0)
    # truncation: the dropped terms are negligible
    ls = 2 * np.arange(coeffs.size)
    assert abs(coeffs[-1]) * (2 * ls[-1] + 1) < 1e-6


def test_odi_kappa_round_trip():
    odi = np.array([0.02, 0.3, 0.99])
    np.testing.assert_allclose(kappa2odi(odi2kappa(odi)), odi)


@pytest.mark.parametrize("odi", [0.01, 0.03, 0.2, 0.97])
def test_watson_exact_on_irregular_scheme(odi, irregular_scheme):
    """Stick + zeppelin + cylinder under Watson dispersion against brute-force
    integration over 51,200 points of the sphere, on a scheme where dmipy's per-shell
    spherical harmonics fail (few directions, varying b, delta and Delta)."""
    stick, zep, cyl = C1Stick(), G2Zeppelin(), C4CylinderGaussianPhaseApproximation()
    bundle = SD1WatsonDistributed(models=[stick, zep, cyl])
    model = MultiCompartmentModel(models=[bundle])
    rng = np.random.default_rng(int(odi * 1000))
    mu = np.array([rng.uniform(0.2, np.pi - 0.2), rng.uniform(-np.pi, np.pi)])
    values = dict(C1Stick_1_lambda_par=2.1e-9, G2Zeppelin_1_lambda_par=1.9e-9,
                  G2Zeppelin_1_lambda_perp=0.6e-9,
                  C4CylinderGaussianPhaseApproximation_1_lambda_par=1.5e-9,
                  diameter=6e-6, SD1Watson_1_mu=mu, odi=odi,
                  SD1WatsonDistributed_1_partial_volume_0=0.5,
                  SD1WatsonDistributed_1_partial_volume_1=0.6)
    simulated = model.simulate_signal(irregular_scheme,
                                      model.parameters_to_parameter_vector(**values))
    kappa = float(odi2kappa(odi))
    axis = mu_to_axes(mu[None])[0]
    expected = _brute_force([
        (0.5, stick, {"lambda_par": 2.1e-9}),
        (0.5 * 0.6, zep, {"lambda_par": 1.9e-9, "lambda_perp": 0.6e-9}),
        (0.5 * 0.4, cyl, {"lambda_par": 1.5e-9, "diameter": 6e-6}),
    ], irregular_scheme, lambda pts: np.exp(kappa * ((pts @ axis) ** 2 - 1)))
    np.testing.assert_allclose(simulated, expected, atol=1e-6, rtol=0)


def test_watson_isotropic_limit_is_the_spherical_mean(irregular_scheme):
    """odi = 1 (kappa = 0): the dispersed signal is the kernel's orientation average at
    each measurement's own b, delta and Delta."""
    model = MultiCompartmentModel(models=[SD1WatsonDistributed(models=[C1Stick()])])
    vec = model.parameters_to_parameter_vector(lambda_par=2e-9, mu=[0.3, 0.2], odi=1.0)
    simulated = model.simulate_signal(irregular_scheme, vec)
    meas = irregular_scheme.measurements
    mean = C1Stick().spherical_mean_batch(meas, lambda_par=np.array([2e-9]))[0]
    np.testing.assert_allclose(simulated, mean, atol=1e-9)


def test_watson_batches_agree_with_single_atoms(irregular_scheme):
    model = MultiCompartmentModel(models=[G1Ball(), _noddi_bundle()])
    rng = np.random.default_rng(3)
    n = 40
    vec = np.column_stack([
        rng.uniform(1e-9, 3e-9, n), rng.uniform(0, np.pi, n), rng.uniform(-np.pi, np.pi, n),
        rng.uniform(0.02, 0.99, n), rng.uniform(0, 1, n), rng.uniform(0, 1, n)])
    vec = np.column_stack([vec, 1 - vec[:, -1]])
    batch = model.simulate_signal(irregular_scheme, vec)
    singles = np.array([model.simulate_signal(irregular_scheme, v) for v in vec[::7]])
    np.testing.assert_allclose(batch[::7], singles, atol=1e-12)


def test_watson_rejects_invalid_odi(irregular_scheme):
    model = MultiCompartmentModel(models=[SD1WatsonDistributed(models=[C1Stick()])])
    for odi in (0.0, -0.1, 1.5, np.nan):
        vec = model.parameters_to_parameter_vector(lambda_par=2e-9, mu=[0.3, 0.2], odi=odi)
        with pytest.raises(InputError, match="odi"):
            model.simulate_signal(irregular_scheme, vec)


# --------------------------------------------------------------------------- Bingham
@pytest.mark.parametrize("odi,beta_fraction", [(0.03, 0.9), (0.1, 0.5), (0.4, 0.2)])
def test_bingham_exact_on_irregular_scheme(odi, beta_fraction, irregular_scheme):
    stick = C1Stick()
    model = MultiCompartmentModel(models=[SD2BinghamDistributed(models=[stick])])
    mu = np.array([1.1, -0.7])
    psi = 0.9
    vec = model.parameters_to_parameter_vector(lambda_par=2.2e-9, mu=mu, psi=psi, odi=odi,
                                               beta_fraction=beta_fraction)
    simulated = model.simulate_signal(irregular_scheme, vec)
    kappa = float(odi2kappa(odi))
    e1, e2 = bingham_frame(mu[None], np.array([psi]))
    expected = _brute_force(
        [(1.0, stick, {"lambda_par": 2.2e-9})], irregular_scheme,
        lambda pts: np.exp(kappa * ((pts @ e1[0]) ** 2 - 1)
                           + beta_fraction * kappa * (pts @ e2[0]) ** 2))
    np.testing.assert_allclose(simulated, expected, atol=1e-6, rtol=0)


def test_bingham_with_zero_beta_is_watson(irregular_scheme):
    watson = MultiCompartmentModel(models=[SD1WatsonDistributed(models=[C1Stick()])])
    bingham = MultiCompartmentModel(models=[SD2BinghamDistributed(models=[C1Stick()])])
    w = watson.simulate_signal(irregular_scheme, watson.parameters_to_parameter_vector(
        lambda_par=1.8e-9, mu=[0.7, 2.0], odi=0.15))
    b = bingham.simulate_signal(irregular_scheme, bingham.parameters_to_parameter_vector(
        lambda_par=1.8e-9, mu=[0.7, 2.0], psi=1.0, odi=0.15, beta_fraction=0.0))
    np.testing.assert_allclose(b, w, atol=1e-8)


# --------------------------------------------------------------------------- Gamma
@pytest.mark.parametrize("compartment,power", [
    (C4CylinderGaussianPhaseApproximation(), 2), (S4SphereGaussianPhaseApproximation(), 3)])
def test_gamma_matches_dense_radius_integration(compartment, power, irregular_scheme):
    dist = DD1GammaDistributed(models=[compartment])
    model = MultiCompartmentModel(models=[dist])
    alpha, beta = 3.5, 1.2e-6
    values = {"DD1Gamma_1_alpha": alpha, "DD1Gamma_1_beta": beta}
    params = {}
    if power == 2:
        values.update(mu=[0.4, 1.0], lambda_par=1.7e-9)
        params["lambda_par"] = np.full(1, 1.7e-9)
    simulated = model.simulate_signal(irregular_scheme,
                                      model.parameters_to_parameter_vector(**values))
    # area (cylinders) / volume (spheres) weighted Gamma density of the radius
    radii = np.linspace(1e-9, stats.gamma(alpha, scale=beta).ppf(1 - 1e-12), 20000)
    weight = stats.gamma(alpha, scale=beta).pdf(radii) * radii ** power
    meas = irregular_scheme.measurements
    cos = None
    if power == 2:
        cos = np.repeat((irregular_scheme.gradient_directions @ mu_to_axes(
            np.array([[0.4, 1.0]]))[0])[None, :], radii.size, axis=0)
        params = {"lambda_par": np.full(radii.size, 1.7e-9)}
    kern = compartment.signal_from_cosines(meas, cos, diameter=2 * radii, **params)
    expected = np.trapezoid(weight[:, None] * kern, radii, axis=0) / np.trapezoid(weight, radii)
    np.testing.assert_allclose(simulated, expected, atol=1e-5, rtol=0)


def test_gamma_requires_a_diameter_and_one_kind():
    with pytest.raises(InputError, match="diameter"):
        DD1GammaDistributed(models=[C1Stick()])
    with pytest.raises(InputError, match="mix"):
        DD1GammaDistributed(models=[C4CylinderGaussianPhaseApproximation(),
                                    S4SphereGaussianPhaseApproximation()])
    assert DD1GammaDistributed(models=[S4SphereGaussianPhaseApproximation()]).normalization \
        == "sphere"


# --------------------------------------------------------------------------- naming, links
def test_distributed_names_follow_dmipy():
    bundle = SD1WatsonDistributed(models=[C1Stick(), G2Zeppelin()])
    assert bundle.parameter_names == [
        "C1Stick_1_lambda_par", "G2Zeppelin_1_lambda_par", "G2Zeppelin_1_lambda_perp",
        "SD1Watson_1_mu", "SD1Watson_1_odi", "partial_volume_0"]
    assert bundle.parameter_cardinality["SD1Watson_1_mu"] == 2
    assert bundle.parameter_types["SD1Watson_1_mu"] == "orientation"
    bingham = SD2BinghamDistributed(models=[C1Stick()])
    assert bingham.parameter_names == ["C1Stick_1_lambda_par", "SD2Bingham_1_mu",
                                       "SD2Bingham_1_psi", "SD2Bingham_1_odi",
                                       "SD2Bingham_1_beta_fraction"]
    gamma = DD1GammaDistributed(models=[C4CylinderGaussianPhaseApproximation()])
    assert gamma.parameter_names == ["C4CylinderGaussianPhaseApproximation_1_mu",
                                     "C4CylinderGaussianPhaseApproximation_1_lambda_par",
                                     "DD1Gamma_1_alpha", "DD1Gamma_1_beta"]
    assert gamma.parameter_scales["DD1Gamma_1_beta"] == 1e-6


def test_distributed_links_and_errors():
    bundle = _noddi_bundle()
    assert bundle.parameter_names == ["SD1Watson_1_mu", "SD1Watson_1_odi", "partial_volume_0"]
    assert [link.kind for link in bundle.parameter_links] == ["tortuous", "equal", "fixed"]
    with pytest.raises(InputError, match="fixed or linked"):
        bundle.set_fixed_parameter("G2Zeppelin_1_lambda_perp", 1e-9)
    with pytest.raises(InputError, match="unknown parameter"):
        bundle.set_fixed_parameter("nonexistent", 1.0)
    other = SD1WatsonDistributed(models=[C1Stick(), G2Zeppelin()])
    with pytest.raises(InputError, match="ambiguous"):
        other.set_fixed_parameter("lambda_par", 1e-9)
    other.set_fixed_parameter("odi", 0.3)  # unique suffix
    assert "SD1Watson_1_odi" not in other.parameter_names
    with pytest.raises(InputError, match="cannot be distributed by it"):
        SD1WatsonDistributed(models=[bundle])  # an orientation distribution of one
    with pytest.raises(InputError):
        SD1WatsonDistributed(models=[])


def test_nested_volume_fractions(irregular_scheme):
    """partial_volume_0 = 1 keeps only the first compartment."""
    both = MultiCompartmentModel(models=[SD1WatsonDistributed(models=[C1Stick(),
                                                                      G2Zeppelin()])])
    stick = MultiCompartmentModel(models=[SD1WatsonDistributed(models=[C1Stick()])])
    common = dict(mu=[0.5, 0.5], odi=0.2)
    a = both.simulate_signal(irregular_scheme, both.parameters_to_parameter_vector(
        C1Stick_1_lambda_par=2e-9, G2Zeppelin_1_lambda_par=1e-9, lambda_perp=0.5e-9,
        partial_volume_0=1.0, **common))
    b = stick.simulate_signal(irregular_scheme, stick.parameters_to_parameter_vector(
        lambda_par=2e-9, **common))
    np.testing.assert_allclose(a, b, atol=1e-12)


def test_distributed_call_style(irregular_scheme):
    bundle = SD1WatsonDistributed(models=[C1Stick()])
    model = MultiCompartmentModel(models=[bundle])
    direct = bundle(irregular_scheme, C1Stick_1_lambda_par=2e-9, SD1Watson_1_mu=[0.3, 0.1],
                    SD1Watson_1_odi=0.2)
    via = model(irregular_scheme, lambda_par=2e-9, mu=[0.3, 0.1], odi=0.2)
    np.testing.assert_allclose(direct, via)


def test_distributed_spherical_mean_ignores_dispersion(irregular_scheme):
    from fingerprint.core.modeling_framework import MultiCompartmentSphericalMeanModel

    model = MultiCompartmentSphericalMeanModel(models=[
        SD1WatsonDistributed(models=[C1Stick()])])
    assert model.parameter_names == ["SD1WatsonDistributed_1_C1Stick_1_lambda_par",
                                     "SD1WatsonDistributed_1_SD1Watson_1_odi"]
    sm = model.simulate_signal(irregular_scheme, [2e-9, 0.3])
    plain = MultiCompartmentSphericalMeanModel(models=[C1Stick()])
    np.testing.assert_allclose(sm, plain.simulate_signal(irregular_scheme, [2e-9]))


def test_gamma_spherical_mean_is_the_orientation_average():
    """Spherical-mean model of Gamma-distributed cylinders against the average of the
    directional model over 4,000 near-uniform directions of each shell."""
    from fingerprint.core.modeling_framework import MultiCompartmentSphericalMeanModel

    n_dir = 4000
    k = np.arange(n_dir) + 0.5
    theta = np.arccos(1 - 2 * k / n_dir)
    phi = np.pi * (1 + 5 ** 0.5) * k
    dirs = np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1)
    b = np.r_[0.0, np.full(n_dir, 1e9), np.full(n_dir, 3e9)]
    scheme = acquisition_scheme_from_bvalues(b, np.r_[[[0.0, 0.0, 0.0]], dirs, dirs],
                                             delta=0.012, Delta=0.03)
    cyl = C4CylinderGaussianPhaseApproximation()
    sm = MultiCompartmentSphericalMeanModel(models=[DD1GammaDistributed(models=[cyl])])
    assert sm.parameter_names == [
        "DD1GammaDistributed_1_C4CylinderGaussianPhaseApproximation_1_lambda_par",
        "DD1GammaDistributed_1_DD1Gamma_1_alpha", "DD1GammaDistributed_1_DD1Gamma_1_beta"]
    directional = MultiCompartmentModel(models=[DD1GammaDistributed(models=[cyl])])
    means = sm.simulate_signal(scheme, [1.7e-9, 2.5, 1.5e-6])
    signal = directional.simulate_signal(scheme, [0.4, 0.9, 1.7e-9, 2.5, 1.5e-6])
    averages = [signal[scheme.shell_indices == s].mean() for s in range(scheme.number_of_shells)]
    np.testing.assert_allclose(means, averages, atol=2e-4)


def test_initial_guess_vector():
    model = MultiCompartmentModel(models=[G1Ball(), _noddi_bundle()])
    vec = model.parameter_initial_guess_to_parameter_vector(odi=0.3)
    assert vec.shape == (7,)  # lambda_iso, mu (2), odi, three volume fractions
    assert vec[3] == 0.3 and np.isnan(vec[[0, 1, 2, 4, 5, 6]]).all()


def test_fod_densities():
    from scipy.special import hyp1f1

    pts, w = _sphere_grid()
    model = MultiCompartmentModel(models=[G1Ball(), _noddi_bundle()])
    fod = model.fod(pts, lambda_iso=3e-9, mu=[0.3, 0.4], odi=0.1,
                    SD1WatsonDistributed_1_partial_volume_0=0.5, partial_volume_0=0.3,
                    partial_volume_1=0.7)
    assert (fod * w).sum() == pytest.approx(0.7, rel=1e-9)
    kappa = float(odi2kappa(0.1))
    axis = mu_to_axes(np.array([[0.3, 0.4]]))[0]
    assert fod.max() == pytest.approx(0.7 * np.exp(kappa) / (4 * np.pi * hyp1f1(0.5, 1.5, kappa)),
                                      rel=1e-3)
    assert abs(pts[np.argmax(fod)] @ axis) == pytest.approx(1.0, abs=2e-3)  # axial
    bingham = MultiCompartmentModel(models=[SD2BinghamDistributed(models=[C1Stick()])])
    dens = bingham.fod(pts, lambda_par=1e-9, mu=[1.0, 2.0], psi=0.5, odi=0.05,
                       beta_fraction=0.7)
    assert (dens * w).sum() == pytest.approx(1.0, rel=1e-8)
    with pytest.raises(InputError, match="orientation distribution"):
        MultiCompartmentModel(models=[C1Stick()]).fod(pts, mu=[0, 0], lambda_par=1e-9)


@pytest.mark.parametrize("odi", [0.005, 0.3])
def test_watson_exact_at_very_high_b(odi):
    """b up to 30 ms/um^2 (sharp kernels) and a very concentrated distribution."""
    rng = np.random.default_rng(11)
    dirs = rng.normal(size=(16, 3))
    dirs /= np.linalg.norm(dirs, axis=1)[:, None]
    scheme = acquisition_scheme_from_bvalues(rng.uniform(1e8, 3e10, 16), dirs,
                                             delta=rng.uniform(0.005, 0.03, 16), Delta=0.04)
    stick, cyl = C1Stick(), C4CylinderGaussianPhaseApproximation()
    model = MultiCompartmentModel(models=[SD1WatsonDistributed(models=[stick, cyl])])
    vec = model.parameters_to_parameter_vector(
        C1Stick_1_lambda_par=3e-9, C4CylinderGaussianPhaseApproximation_1_lambda_par=3e-9,
        diameter=1e-5, mu=[0.7, 0.2], odi=odi, partial_volume_0=0.4)
    kappa = float(odi2kappa(odi))
    axis = mu_to_axes(np.array([[0.7, 0.2]]))[0]
    expected = _brute_force([(0.4, stick, {"lambda_par": 3e-9}),
                             (0.6, cyl, {"lambda_par": 3e-9, "diameter": 1e-5})],
                            scheme, lambda pts: np.exp(kappa * ((pts @ axis) ** 2 - 1)))
    np.testing.assert_allclose(model.simulate_signal(scheme, vec), expected, atol=1e-8, rtol=0)
