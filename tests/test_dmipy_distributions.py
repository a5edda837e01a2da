"""Stand-alone distributions (dmipy's distributions module): normalisation, closed forms,
SH representations and the Gamma radii."""

import numpy as np
import pytest
from scipy import special, stats

from fingerprint.distributions import distribute_models
from fingerprint.distributions.distributions import (
    DD1Gamma,
    SD1Watson,
    SD2Bingham,
    SD3SphericalHarmonics,
    get_sh_order_from_odi,
    sh_coefficients_by_quadrature,
    sphere_quadrature,
)
from fingerprint.errors import InputError
from fingerprint.signal_models import cylinder_models
from fingerprint.utils import utils

POINTS, WEIGHTS = sphere_quadrature()


@pytest.mark.parametrize("odi", [0.02, 0.1, 0.3, 0.7, 1.0])
def test_watson_integrates_to_one(odi):
    watson = SD1Watson(mu=[0.7, -1.2], odi=odi)
    assert np.isclose(watson(POINTS) @ WEIGHTS, 1.0, atol=1e-10)


def test_watson_closed_form_value():
    kappa = 1 / np.tan(0.2 * np.pi / 2)
    mu = [0.3, 0.5]
    axis = utils.unitsphere2cart_1d(mu)
    n = utils.unitsphere2cart_1d([1.0, 2.0])
    expected = np.exp(kappa * (n @ axis) ** 2) / (4 * np.pi * special.hyp1f1(0.5, 1.5, kappa))
    assert np.isclose(SD1Watson(mu=mu)(n, odi=0.2), expected, rtol=1e-12)
    assert SD1Watson(mu=mu, odi=1.0)(n) * 4 * np.pi == 1.0


def test_watson_sh_representation_exact():
    watson = SD1Watson(mu=[1.1, 0.4], odi=0.15)
    sh = watson.spherical_harmonics_representation(10)
    assert sh.shape == (66,)
    assert np.isclose(sh[0], 1 / (2 * np.sqrt(np.pi)))
    by_quadrature = sh_coefficients_by_quadrature(watson(POINTS), POINTS, WEIGHTS, 10)
    np.testing.assert_allclose(sh, by_quadrature, atol=1e-12)
    # the expansion reproduces the density where it has converged (high order)
    full = watson.spherical_harmonics_representation(40)
    back = SD3SphericalHarmonics(40, full)(POINTS[::97])
    np.testing.assert_allclose(back, watson(POINTS[::97]), atol=1e-6)


def test_watson_matches_distributed_model_fod():
    stick = cylinder_models.C1Stick()
    dist = distribute_models.SD1WatsonDistributed([stick])
    fod = dist.fod(POINTS[::50], SD1Watson_1_mu=[0.5, 0.2], SD1Watson_1_odi=0.25)
    np.testing.assert_allclose(SD1Watson(mu=[0.5, 0.2], odi=0.25)(POINTS[::50]), fod,
                               rtol=1e-10)


def test_bingham_normalised_and_reduces_to_watson():
    bingham = SD2Bingham(mu=[0.9, 2.0], psi=0.3, odi=0.2, beta_fraction=0.6)
    assert np.isclose(bingham(POINTS) @ WEIGHTS, 1.0, atol=1e-10)
    flat = SD2Bingham(mu=[0.9, 2.0], psi=0.3, odi=0.2, beta_fraction=0.0)
    np.testing.assert_allclose(flat(POINTS[::40]), SD1Watson(mu=[0.9, 2.0], odi=0.2)(
        POINTS[::40]), rtol=1e-10)
    sh = bingham.spherical_harmonics_representation(8)
    assert np.isclose(sh[0], 1 / (2 * np.sqrt(np.pi)), atol=1e-12)
    # the second axis carries more density than the third
    e1, e2 = distribute_models.bingham_frame(np.array([[0.9, 2.0]]), np.array([0.3]))
    e3 = np.cross(e1[0], e2[0])
    assert bingham(e2[0]) > bingham(e3)
    with pytest.raises(InputError, match="beta_fraction"):
        bingham(POINTS[:2], beta_fraction=1.5)


def test_gamma_radii_and_normalisations():
    for normalization, power in (("standard", 0), ("plane", 1), ("cylinder", 2),
                                 ("sphere", 3)):
        gamma = DD1Gamma(alpha=3.0, beta=1.5e-6, Nsteps=200, normalization=normalization)
        radii, density = gamma()
        weighted = stats.gamma(3.0 + power, scale=1.5e-6)
        np.testing.assert_allclose(radii[[0, -1]], weighted.ppf([0.005, 0.995]))
        assert np.isclose(np.trapezoid(density, radii), 1.0)
        # on the sampled support the density is the weighted Gamma density up to the mass
        # it leaves out (1 %) and trapezoid error
        np.testing.assert_allclose(density, weighted.pdf(radii) / 0.99, rtol=2e-3)
    with pytest.raises(InputError, match="normalization"):
        DD1Gamma(normalization="cube")


def test_sh_order_from_odi_monotone():
    orders = [get_sh_order_from_odi(o) for o in (0.9, 0.5, 0.25, 0.1, 0.03)]
    assert orders == sorted(orders)
    assert orders[0] >= 2 and orders[-1] == 14


def test_distribution_parameters_and_immutability():
    watson = SD1Watson(mu=[0.1, 0.2], odi=0.3)
    assert watson.parameter_names == ["mu", "odi"]
    assert watson.parameter_cardinality == {"mu": 2, "odi": 1}
    with pytest.raises(AttributeError):
        watson.odi = 0.5
    with pytest.raises(InputError, match="no parameter"):
        watson(POINTS[:1], kappa=3)
    with pytest.raises(InputError, match="odi"):
        watson(POINTS[:1], odi=1.5)
