"""Invariants of the fast Watson dispersion path (fused kernel of
fingerprint.kernels.dispersion): each shortcut must give the plain computation's result."""

from __future__ import annotations

import numpy as np
import pytest
from reference_helpers import noddi_watson
from scipy.integrate import quad
from scipy.special import eval_legendre

from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
from fingerprint.distributions.distribute_models import odi2kappa
from fingerprint.kernels.dispersion import (
    _watson_ratios,
    _watson_sum_parallel,
    _watson_sum_serial,
    chebyshev_from_legendre_even,
    dispersed_legendre_sum,
    gauss_legendre_unit,
    legendre_even_matrix,
    watson_dispersed_sum,
    watson_legendre_coefficients,
    watson_recurrence_start,
    watson_recurrence_terms,
)


def _ratios(kappa: float, n_even: int) -> np.ndarray:
    alpha, beta, gamma = watson_recurrence_terms(watson_recurrence_start(kappa))
    out = np.empty(n_even)
    _watson_ratios(kappa, alpha, beta, gamma, out)
    return out


@pytest.mark.parametrize("n_even", [1, 2, 7, 29, 80])
def test_chebyshev_conversion_reproduces_even_legendre(n_even):
    conv = chebyshev_from_legendre_even(n_even)
    t = np.linspace(-1.0, 1.0, 401)
    cheb = np.polynomial.chebyshev.chebvander(2 * t * t - 1, n_even - 1)
    np.testing.assert_allclose(cheb @ conv.T, legendre_even_matrix(t, 2 * (n_even - 1)),
                               atol=1e-13)
    assert conv.min() >= 0.0
    np.testing.assert_allclose(conv.sum(axis=1), 1.0, atol=1e-14)
    assert np.all(np.triu(conv, 1) == 0.0)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")
@pytest.mark.parametrize("kappa", [0.0, 1e-6, 0.5, 5.0, 31.8, 127.0])
def test_watson_continued_fraction_matches_integration(kappa):
    coeffs = _ratios(kappa, 40)
    norm = quad(lambda t: np.exp(kappa * (t * t - 1)), 0, 1, epsabs=1e-15)[0]
    for m in range(0, 12):
        num = quad(lambda t, l=2 * m: np.exp(kappa * (t * t - 1)) * eval_legendre(l, t), 0, 1,
                   limit=400, epsabs=1e-15)[0]
        assert coeffs[m] == pytest.approx(num / norm, abs=1e-12)
    quadrature = watson_legendre_coefficients(np.array([kappa]), 78)[0]
    np.testing.assert_allclose(coeffs, quadrature, atol=2e-12)


def _case(seed: int = 3, n: int = 40):
    rng = np.random.default_rng(seed)
    n_unique, q_half, l_max = 3, 30, 40
    n_even = l_max // 2 + 1
    nodes, weights = gauss_legendre_unit(q_half)
    proj = legendre_even_matrix(nodes, l_max) * (weights[:, None]
                                                 * (4.0 * np.arange(n_even) + 1.0))
    bvals = np.array([0.0, 1e9, 3e9])
    lam = rng.uniform(0.5e-9, 2e-9, n)
    # zeppelin-like kernels at the nodes of each unique b (unique-major)
    values = np.exp(-bvals[None, :, None] * lam[:, None, None]
                    * (0.3 + 0.7 * nodes[None, None, :] ** 2)).reshape(n, -1)
    shared = np.exp(-bvals[:, None] * 1.7e-9 * nodes[None, :] ** 2) @ proj  # (U, L2)
    kappa = odi2kappa(rng.uniform(0.02, 0.99, n))
    v = rng.normal(size=(n, 3))
    axes = v / np.linalg.norm(v, axis=1, keepdims=True)
    d = rng.normal(size=(25, 3))
    directions = d / np.linalg.norm(d, axis=1, keepdims=True)
    inverse = rng.integers(0, n_unique, 25)
    inverse[:3] = [0, 1, 2]
    weights_v = rng.uniform(0.1, 0.9, n)
    weights_s = 1.0 - weights_v
    return dict(values=values, shared=shared, proj=proj, kappa=kappa, axes=axes,
                directions=directions, inverse=inverse, wv=weights_v, ws=weights_s,
                n_even=n_even)


def test_fused_sum_matches_plain_legendre_sum():
    c = _case()
    n = c["kappa"].size
    fused = watson_dispersed_sum(c["kappa"], c["axes"], c["directions"], c["inverse"],
                                 c["proj"], kernel_values=c["values"], kernel_weights=c["wv"],
                                 shared_coefficients=c["shared"][None],
                                 shared_weights=c["ws"][:, None], tolerance=1e-13)
    kcoef = (c["wv"][:, None, None] * (c["values"].reshape(n * 3, -1) @ c["proj"]
                                        ).reshape(n, 3, -1)
             + c["ws"][:, None, None] * c["shared"][None])
    watson = np.stack([_ratios(k, c["n_even"]) for k in c["kappa"]])
    plain = dispersed_legendre_sum(kcoef * watson[:, None, :], c["axes"] @ c["directions"].T,
                                   c["inverse"])
    np.testing.assert_allclose(fused, plain, atol=1e-12, rtol=0)


def test_shared_and_per_atom_kernels_agree_and_serial_equals_parallel():
    c = _case(seed=5)
    n = c["kappa"].size
    shared_values = np.tile(np.concatenate([
        np.exp(-b * 1.7e-9 * gauss_legendre_unit(30)[0] ** 2) for b in (0.0, 1e9, 3e9)]),
        (n, 1))
    as_values = watson_dispersed_sum(c["kappa"], c["axes"], c["directions"], c["inverse"],
                                     c["proj"], kernel_values=shared_values,
                                     kernel_weights=c["ws"], tolerance=1e-13)
    as_shared = watson_dispersed_sum(c["kappa"], c["axes"], c["directions"], c["inverse"],
                                     c["proj"], shared_coefficients=c["shared"][None],
                                     shared_weights=c["ws"][:, None], tolerance=1e-13)
    np.testing.assert_allclose(as_values, as_shared, atol=1e-14, rtol=0)

    order = np.argsort(c["inverse"], kind="stable").astype(np.int64)
    starts = np.searchsorted(c["inverse"][order], np.arange(4)).astype(np.int64)
    dirs = c["directions"][order]
    terms = watson_recurrence_terms(watson_recurrence_start(float(c["kappa"].max())))
    args = (c["values"], c["wv"], c["proj"], c["shared"][None].copy(),
            c["ws"][:, None].copy(), c["kappa"], c["axes"], dirs[:, 0].copy(),
            dirs[:, 1].copy(), dirs[:, 2].copy(), order, starts, *terms,
            chebyshev_from_legendre_even(c["n_even"]), 1e-13)
    out_s = np.empty((n, 25))
    out_p = np.empty((n, 25))
    _watson_sum_serial(7, *args, out_s)
    _watson_sum_parallel(7, *args, out_p)
    np.testing.assert_array_equal(out_s, out_p)


def test_truncation_is_bounded_by_the_tolerance():
    c = _case(seed=11)
    kwargs = dict(kernel_values=c["values"], kernel_weights=c["wv"],
                  shared_coefficients=c["shared"][None], shared_weights=c["ws"][:, None])
    tight = watson_dispersed_sum(c["kappa"], c["axes"], c["directions"], c["inverse"],
                                 c["proj"], tolerance=0.0, **kwargs)
    loose = watson_dispersed_sum(c["kappa"], c["axes"], c["directions"], c["inverse"],
                                 c["proj"], tolerance=1e-6, **kwargs)
    diff = np.abs(tight - loose).max()
    assert 0.0 < diff <= 1e-6 + 1e-14


_noddi = noddi_watson


def test_batched_noddi_equals_one_atom_at_a_time():
    """A batch shares the stick's coefficients and one Legendre order (largest kappa);
    one atom alone takes the per-atom path with its own order: same signals."""
    rng = np.random.default_rng(2)
    dirs = rng.normal(size=(30, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    b = np.r_[0.0, 0.0, np.full(14, 1e9), np.full(14, 3e9)]
    scheme = acquisition_scheme_from_bvalues(b, dirs, delta=0.0106, Delta=0.0431)
    model = _noddi()
    n = 12
    odi = np.r_[0.02, rng.uniform(0.03, 0.99, n - 1)]
    mu = np.stack([rng.uniform(0, np.pi, n), rng.uniform(-np.pi, np.pi, n)], axis=1)
    iso = rng.uniform(0.0, 0.5, n)
    vectors = model.parameters_to_parameter_vector(
        SD1WatsonDistributed_1_SD1Watson_1_mu=mu, SD1WatsonDistributed_1_SD1Watson_1_odi=odi,
        SD1WatsonDistributed_1_partial_volume_0=rng.uniform(0.1, 0.9, n),
        partial_volume_0=iso, partial_volume_1=1.0 - iso)
    batch = model.simulate_signal(scheme, vectors)
    single = np.stack([model.simulate_signal(scheme, v) for v in vectors])
    np.testing.assert_allclose(batch, single, atol=1e-12, rtol=0)
    np.testing.assert_allclose(batch[:, :2], 1.0, atol=1e-13)  # b = 0: fractions sum to 1
    # antipodal gradients give the same signal (Watson densities are even)
    flipped = acquisition_scheme_from_bvalues(b, -dirs, delta=0.0106, Delta=0.0431)
    np.testing.assert_allclose(model.simulate_signal(flipped, vectors), batch, atol=1e-13,
                               rtol=0)
