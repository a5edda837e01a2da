"""Forward models are exact at every b-value: each measurement's own b-value, direction and
timing, whatever the b=0 threshold; shell spherical means are the average of their
members' own spherical means, checked against direct integration over the sphere."""

from __future__ import annotations

import numpy as np
import pytest

from fingerprint.core.acquisition_scheme import (
    acquisition_scheme_from_bvalues,
    acquisition_scheme_from_gradient_strengths,
)
from fingerprint.core.modeling_framework import (
    MultiCompartmentModel,
    MultiCompartmentSphericalMeanModel,
)
from fingerprint.signal_models import cylinder_models, gaussian_models

LAMBDA = 1.7e-9
# Gauss-Legendre nodes on u = cos(angle to the axis): exact sphere integration of an
# axially symmetric signal, SM = 1/2 * sum w S(u)
_U, _W = np.polynomial.legendre.leggauss(96)


def _axis_dirs() -> np.ndarray:
    return np.stack([np.sqrt(1 - _U ** 2), np.zeros_like(_U), _U], axis=1)


def _sphere_mean(compartment, b: float, delta: float | None = None,
                 Delta: float | None = None) -> float:
    """Direct integration over the sphere of the compartment's signal (axis along z)."""
    n = _U.size
    dirs = _axis_dirs()
    if delta is None:
        scheme = acquisition_scheme_from_bvalues(np.r_[0.0, np.full(n, b)], np.r_[[[0, 0, 0]],
                                                                                 dirs])
    else:
        scheme = acquisition_scheme_from_bvalues(np.r_[0.0, np.full(n, b)],
                                                 np.r_[[[0, 0, 0]], dirs], delta=delta,
                                                 Delta=Delta)
    signal = compartment(scheme, mu=[0.0, 0.0])[1:]
    return float(0.5 * np.sum(_W * signal))


def _dirs(n: int, seed: int = 0) -> np.ndarray:
    d = np.random.default_rng(seed).normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def test_low_b_measurements_keep_their_physics():
    # b = 9.2 s/mm² along the stick: exp(-b lambda) = 0.9845, not 1 (it is still a b0 for
    # the S0 normalisation)
    b = np.array([0.0, 9.2e6, 9.2e6, 1e9])
    dirs = np.array([[0, 0, 0], [0, 0, 1.0], [1.0, 0, 0], [0, 0, 1.0]])
    scheme = acquisition_scheme_from_bvalues(b, dirs)
    assert scheme.b0_mask.tolist() == [True, True, True, False]
    stick = cylinder_models.C1Stick(mu=[0.0, 0.0], lambda_par=LAMBDA)
    np.testing.assert_allclose(stick(scheme), np.exp(-b * LAMBDA * [0, 1, 0, 1]), rtol=1e-12)
    model = MultiCompartmentModel([cylinder_models.C1Stick()])
    sim = model.simulate_signal(scheme, model.parameters_to_parameter_vector(
        C1Stick_1_mu=[0.0, 0.0], C1Stick_1_lambda_par=LAMBDA))
    assert sim[1] == pytest.approx(np.exp(-9.2e6 * LAMBDA), rel=1e-12)
    # whatever the threshold: the same physics
    wide = scheme.with_b0_threshold(100e6)
    np.testing.assert_array_equal(stick(wide), stick(scheme))


def test_jittered_and_mixed_shells_average_their_members_exactly():
    # one shell mixing 60 and 110 s/mm² (single linkage at 50 s/mm²), one jittered around
    # 1000, and a b=0 shell holding b = 5 s/mm² measurements
    rng = np.random.default_rng(4)
    b_low = np.repeat([60e6, 110e6], 30)
    b_jit = 995e6 + 10e6 * rng.random(40)
    b = np.r_[0.0, 5e6, 5e6, b_low, b_jit]
    scheme = acquisition_scheme_from_bvalues(b, _dirs(b.size))
    assert scheme.number_of_shells == 3
    stick = cylinder_models.C1Stick(mu=[0.0, 0.0], lambda_par=LAMBDA)
    zeppelin = gaussian_models.G2Zeppelin(mu=[0.0, 0.0], lambda_par=LAMBDA,
                                          lambda_perp=0.6e-9)
    for compartment in (stick, zeppelin):
        got = compartment.spherical_mean(scheme)
        expected = [
            np.mean([_sphere_mean(compartment, x) for x in (0.0, 5e6, 5e6)]),
            np.mean([_sphere_mean(compartment, x) for x in b_low]),
            np.mean([_sphere_mean(compartment, x) for x in b_jit]),
        ]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
        assert got[0] < 1.0  # exact at b = 5 s/mm², not forced to 1
    # the spherical-mean model simulates the same numbers
    smt = MultiCompartmentSphericalMeanModel([cylinder_models.C1Stick()])
    sim = smt.simulate_signal(scheme, smt.parameters_to_parameter_vector(
        C1Stick_1_lambda_par=LAMBDA))
    np.testing.assert_allclose(sim, stick.spherical_mean(scheme), atol=1e-14)


def test_mixed_timings_are_exact_per_timing():
    # the same b-value reached with two timings (and a restricted cylinder, whose signal
    # depends on the timing): each timing's shell matches direct integration
    g = np.r_[0.0, np.full(30, 0.06), 0.0, np.full(30, 0.06)]
    delta = np.r_[np.full(31, 0.010), np.full(31, 0.020)]
    Delta = np.r_[np.full(31, 0.030), np.full(31, 0.040)]
    dirs = _dirs(62)
    dirs[[0, 31]] = 0.0
    scheme = acquisition_scheme_from_gradient_strengths(g, dirs, delta, Delta)
    cyl = cylinder_models.C4CylinderGaussianPhaseApproximation(
        mu=[0.0, 0.0], lambda_par=LAMBDA, diameter=6e-6)
    got = cyl.spherical_mean(scheme)
    for s in range(scheme.number_of_shells):
        members = np.flatnonzero(scheme.shell_indices == s)
        i = members[0]
        expected = np.mean([_sphere_mean(cyl, float(scheme.bvalues[j]), float(scheme.delta[j]),
                                         float(scheme.Delta[j])) for j in members])
        assert got[s] == pytest.approx(expected, abs=1e-10), (s, scheme.delta[i])
    assert scheme.number_of_shells == 4
