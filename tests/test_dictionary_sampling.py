"""Sampling plans of the dictionary generator (abstract parameter spaces, no models)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fingerprint.dictionary.sampling import (
    ParameterInfo,
    ParameterSpace,
    SamplingSpec,
    default_transform,
    resolve_sampling,
)
from fingerprint.errors import InputError

MU = ((0.0, math.pi), (-math.pi, math.pi))


def noddi_like() -> ParameterSpace:
    return ParameterSpace((
        ParameterInfo("SD1WatsonDistributed_1_SD1Watson_1_mu", 2, MU, "orientation"),
        ParameterInfo("SD1WatsonDistributed_1_SD1Watson_1_odi", 1, ((0.02, 0.99),)),
        ParameterInfo("SD1WatsonDistributed_1_partial_volume_0", 1, ((0.0, 1.0),)),
        ParameterInfo("partial_volume_0", 1, ((0.0, 1.0),), "partial_volume"),
        ParameterInfo("partial_volume_1", 1, ((0.0, 1.0),), "partial_volume"),
    ))


def three_fractions(n_orient: int = 1) -> ParameterSpace:
    params = [ParameterInfo(f"C1Stick_{i + 1}_mu", 2, MU, "orientation")
              for i in range(n_orient)]
    params += [ParameterInfo("C1Stick_1_lambda_par", 1, ((1e-10, 3e-9),))]
    params += [ParameterInfo(f"partial_volume_{i}", 1, ((0.0, 1.0),), "partial_volume")
               for i in range(3)]
    return ParameterSpace(tuple(params))


class FakeModel:
    """Just the attributes ParameterSpace.from_model reads (dmipy conventions)."""

    parameter_names = ["G1Ball_1_lambda_iso", "C1Stick_1_mu", "C1Stick_1_lambda_par",
                       "partial_volume_0", "partial_volume_1"]
    parameter_cardinality = {"G1Ball_1_lambda_iso": 1, "C1Stick_1_mu": 2,
                             "C1Stick_1_lambda_par": 1, "partial_volume_0": 1,
                             "partial_volume_1": 1}
    parameter_ranges = {"G1Ball_1_lambda_iso": (0.1, 3), "C1Stick_1_mu": MU,
                        "C1Stick_1_lambda_par": (0.1, 3), "partial_volume_0": (0.01, 0.99),
                        "partial_volume_1": (0.01, 0.99)}
    parameter_scales = {"G1Ball_1_lambda_iso": 1e-9, "C1Stick_1_mu": np.r_[1.0, 1.0],
                        "C1Stick_1_lambda_par": 1e-9, "partial_volume_0": 1.0,
                        "partial_volume_1": 1.0}
    orientation_parameter_names = ["C1Stick_1_mu"]
    partial_volume_names = ["partial_volume_0", "partial_volume_1"]


def test_space_from_model_reads_si_bounds_and_kinds():
    space = ParameterSpace.from_model(FakeModel())
    assert space.names == FakeModel.parameter_names
    assert space.vector_length == 6
    assert space.offsets() == {"G1Ball_1_lambda_iso": 0, "C1Stick_1_mu": 1,
                               "C1Stick_1_lambda_par": 3, "partial_volume_0": 4,
                               "partial_volume_1": 5}
    info = {p.name: p for p in space.parameters}
    assert info["G1Ball_1_lambda_iso"].bounds[0] == pytest.approx((1e-10, 3e-9))
    # dmipy's default fraction range (0.01, 0.99) is read as [0, 1]
    assert info["partial_volume_0"].bounds == ((0.0, 1.0),)
    assert info["C1Stick_1_mu"].kind == "orientation"
    assert space.canonical_orientation
    assert space.resolve("lambda_iso") == "G1Ball_1_lambda_iso"
    with pytest.raises(InputError, match="not a free parameter"):
        space.resolve("odi")


def test_user_bounds_change_the_sampled_range():
    model = FakeModel()
    model.parameter_ranges = dict(FakeModel.parameter_ranges)
    model.parameter_scales = dict(FakeModel.parameter_scales)
    # what set_parameter_optimization_bounds([1e-9, 2e-9]) does in dmipy
    model.parameter_ranges["C1Stick_1_lambda_par"] = np.array([0.5, 1.0])
    model.parameter_scales["C1Stick_1_lambda_par"] = 2e-9
    plan = resolve_sampling(ParameterSpace.from_model(model), SamplingSpec(size=512))
    x = plan.sample(0, 512)
    assert x[:, 3].min() >= 1e-9 and x[:, 3].max() <= 2e-9
    assert x[:, 3].min() < 1.05e-9 and x[:, 3].max() > 1.95e-9


def test_default_transforms():
    assert default_transform("G1Ball_1_lambda_iso") == "log"
    assert default_transform("C4CylinderGaussianPhaseApproximation_1_diameter") == "log"
    assert default_transform("DD1GammaDistributed_1_DD1Gamma_1_beta") == "log"
    assert default_transform("SD2BinghamDistributed_1_SD2Bingham_1_beta_fraction") == "uniform"
    assert default_transform("SD1WatsonDistributed_1_SD1Watson_1_odi") == "uniform"
    assert default_transform("partial_volume_0") == "uniform"


def test_noddi_like_plan_is_canonical_simplex_and_reproducible():
    plan = resolve_sampling(noddi_like(), SamplingSpec(size=4096, seed=7))
    assert plan.dims == 3  # odi, icvf, one simplex dimension; orientation canonical
    x = plan.sample(0, 4096)
    assert x.shape == (4096, 6)
    np.testing.assert_array_equal(x[:, :2], 0.0)
    np.testing.assert_allclose(x[:, 4] + x[:, 5], 1.0, atol=1e-12)
    assert 0.02 <= x[:, 2].min() and x[:, 2].max() <= 0.99
    # any slice is the same as the corresponding rows of the whole
    np.testing.assert_array_equal(plan.sample(1000, 1500), x[1000:1500])
    np.testing.assert_array_equal(resolve_sampling(noddi_like(), SamplingSpec(
        size=4096, seed=7)).sample(0, 4096), x)
    other = resolve_sampling(noddi_like(), SamplingSpec(size=4096, seed=8)).sample(0, 4096)
    assert not np.allclose(other, x)
    # quasi-random: uniform marginals with tiny error
    assert abs(x[:, 2].mean() - (0.02 + 0.99) / 2) < 2e-3
    assert abs(x[:, 4].mean() - 0.5) < 2e-3


def test_three_partial_volumes_are_uniform_on_the_simplex():
    plan = resolve_sampling(three_fractions(), SamplingSpec(size=2 ** 14, seed=1))
    x = plan.sample(0, 2 ** 14)
    v = x[:, 3:6]
    np.testing.assert_allclose(v.sum(axis=1), 1.0, atol=1e-12)
    assert (v >= 0).all()
    # Dirichlet(1,1,1): each marginal is Beta(1, 2): mean 1/3, P(v > 1/2) = 1/4
    np.testing.assert_allclose(v.mean(axis=0), 1 / 3, atol=3e-3)
    np.testing.assert_allclose((v > 0.5).mean(axis=0), 0.25, atol=5e-3)


def test_log_spacing_is_uniform_in_log():
    plan = resolve_sampling(three_fractions(), SamplingSpec(size=4096))
    lam = plan.sample(0, 4096)[:, 2]
    assert lam.min() >= 1e-10 and lam.max() <= 3e-9
    mid = np.exp((np.log(1e-10) + np.log(3e-9)) / 2)
    assert abs((lam < mid).mean() - 0.5) < 5e-3
    linear = resolve_sampling(three_fractions(), SamplingSpec(
        size=4096, transforms={"lambda_par": "uniform"})).sample(0, 4096)[:, 2]
    assert abs((linear < (1e-10 + 3e-9) / 2).mean() - 0.5) < 5e-3


def test_several_orientations_are_uniform_on_the_sphere():
    plan = resolve_sampling(three_fractions(n_orient=2), SamplingSpec(size=8192, seed=3))
    assert plan.dims == 2 * 2 + 1 + 2
    x = plan.sample(0, 8192)
    for col in (0, 2):
        theta, phi = x[:, col], x[:, col + 1]
        assert theta.min() >= 0 and theta.max() <= math.pi
        assert phi.min() >= -math.pi and phi.max() <= math.pi
        # uniform on the sphere: cos(theta) uniform on [-1, 1], phi uniform
        assert abs(np.cos(theta).mean()) < 5e-3
        assert abs((np.cos(theta) > 0.5).mean() - 0.25) < 5e-3
        assert abs(phi.mean()) < 2e-2


def test_ranges_override_and_validation():
    plan = resolve_sampling(noddi_like(), SamplingSpec(size=256, ranges={"odi": (0.1, 0.2)}))
    odi = plan.sample(0, 256)[:, 2]
    assert odi.min() >= 0.1 and odi.max() <= 0.2
    with pytest.raises(InputError, match="outside the model's bounds"):
        resolve_sampling(noddi_like(), SamplingSpec(size=8, ranges={"odi": (0.0, 0.5)}))
    with pytest.raises(InputError, match="not a free parameter"):
        resolve_sampling(noddi_like(), SamplingSpec(size=8, ranges={"diameter": (1, 2)}))
    with pytest.raises(InputError, match="positive lower bound"):
        resolve_sampling(noddi_like(), SamplingSpec(
            size=8, transforms={"SD1WatsonDistributed_1_partial_volume_0": "log"}))
    with pytest.raises(InputError, match="orientation"):
        resolve_sampling(noddi_like(), SamplingSpec(size=8, transforms={"mu": "log"}))
    with pytest.raises(InputError):
        SamplingSpec(size=0)
    with pytest.raises(InputError):
        SamplingSpec(method="random")
    with pytest.raises(InputError):
        SamplingSpec(transforms={"odi": "cubic"})


def test_partial_volume_bounds():
    # two volumes: an upper bound on one is a lower bound on the other
    plan = resolve_sampling(noddi_like(), SamplingSpec(
        size=1024, ranges={"partial_volume_0": (0.0, 0.3)}))
    x = plan.sample(0, 1024)
    assert x[:, 4].max() <= 0.3 + 1e-12 and x[:, 4].max() > 0.29
    np.testing.assert_allclose(x[:, 4] + x[:, 5], 1.0)
    # three volumes: lower bounds honoured exactly
    plan = resolve_sampling(three_fractions(), SamplingSpec(
        size=1024, ranges={"partial_volume_2": (0.2, 1.0)}))
    v = plan.sample(0, 1024)[:, 3:6]
    assert v[:, 2].min() >= 0.2 - 1e-12
    np.testing.assert_allclose(v.sum(axis=1), 1.0)
    with pytest.raises(InputError, match="only supported for two"):
        resolve_sampling(three_fractions(), SamplingSpec(
            size=8, ranges={"partial_volume_2": (0.0, 0.5)}))


def test_grid_sampling():
    plan = resolve_sampling(noddi_like(), SamplingSpec(size=1000, method="grid"))
    assert plan.grid_shape == (10, 10, 10) and plan.size == 1000
    x = plan.sample(0, plan.size)
    assert len(np.unique(x[:, 2])) == 10
    assert x[:, 2].min() == pytest.approx(0.02) and x[:, 2].max() == pytest.approx(0.99)
    np.testing.assert_array_equal(plan.sample(10, 20), x[10:20])
    plan = resolve_sampling(noddi_like(), SamplingSpec(
        size=1000, method="grid", points={"odi": 4}))
    assert plan.grid_shape == (4, 10, 10)


def test_plan_description_is_canonical():
    a = resolve_sampling(noddi_like(), SamplingSpec(size=100, seed=1))
    b = resolve_sampling(noddi_like(), SamplingSpec(size=100, seed=1,
                                                    ranges={"odi": (0.02, 0.99)}))
    assert a.canonical_json() == b.canonical_json()
    c = resolve_sampling(noddi_like(), SamplingSpec(size=101, seed=1))
    assert a.canonical_json() != c.canonical_json()
    assert a.to_dict()["parameters"][0] == {
        "name": "SD1WatsonDistributed_1_SD1Watson_1_mu", "kind": "canonical"}


def test_fixed_top_level_fraction_falls_back_to_independent_ranges():
    space = ParameterSpace(three_fractions().parameters[:-1], n_partial_volumes=3)
    plan = resolve_sampling(space, SamplingSpec(size=64))
    assert plan.dims == 3
    kinds = [p["kind"] for p in plan.to_dict()["parameters"]]
    assert "simplex" not in kinds


def gamma_like() -> ParameterSpace:
    return ParameterSpace((
        ParameterInfo("DD1GammaDistributed_1_DD1Gamma_1_alpha", 1, ((0.1, 30.0),)),
        ParameterInfo("DD1GammaDistributed_1_DD1Gamma_1_beta", 1, ((1e-9, 2e-6),)),
        ParameterInfo("G2Zeppelin_1_lambda_perp", 1, ((1e-10, 3e-9),)),
    ))


def test_gamma_sampled_by_mean_diameter():
    """``mean_diameter``: the mean diameters 2 alpha beta spread evenly over the range,
    shape and scale inside their bounds, the shape log-spaced within what keeps the
    scale in bounds; other parameters and the plan's determinism are unchanged."""
    space = gamma_like()
    spec = SamplingSpec(size=4096, seed=2, mean_diameter={"beta": (1e-7, 2e-5)})
    plan = resolve_sampling(space, spec)
    assert plan.dims == 3
    x = plan.sample(0, 4096)
    alpha, beta = x[:, 0], x[:, 1]
    assert np.all((alpha >= 0.1) & (alpha <= 30.0) & (beta >= 1e-9) & (beta <= 2e-6))
    mean = 2 * alpha * beta
    counts, _ = np.histogram(mean, bins=8, range=(1e-7, 2e-5))
    assert counts.min() >= 0.95 * 4096 / 8
    # a large mean diameter needs a large shape (beta <= 2 um): alpha >= mean / 4 um
    assert np.all(alpha >= mean / 4e-6 * (1 - 1e-9))
    np.testing.assert_array_equal(x[100:200], plan.sample(100, 200))
    plain = resolve_sampling(space, SamplingSpec(size=4096, seed=2)).sample(0, 4096)
    np.testing.assert_array_equal(x[:, 2], plain[:, 2])
    entry = plan.to_dict()["parameters"][1]
    assert entry["kind"] == "mean_diameter" and entry["mean_diameter"] == [1e-7, 2e-5]
    assert SamplingSpec.from_dict({"mean_diameter": {"beta": [1e-7, 2e-5]}}).mean_diameter \
        == {"beta": (1e-7, 2e-5)}


def test_mean_diameter_validation():
    with pytest.raises(InputError, match="mean_diameter of 'beta' must satisfy 0 < low"):
        SamplingSpec(mean_diameter={"beta": (0.0, 1e-5)})
    with pytest.raises(InputError, match="mean_diameter applies to a Gamma"):
        resolve_sampling(gamma_like(), SamplingSpec(mean_diameter={"lambda_perp": (1e-7, 2e-5)}))
