"""MultiCompartmentModel / MultiCompartmentSphericalMeanModel: dmipy reference signals and
names, short names, links, bounds, parameter vectors, specs, copies and thread safety."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from reference_helpers import load_reference, noddi_watson, reference_scheme

from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
from fingerprint.core.modeling_framework import (
    MultiCompartmentModel,
    MultiCompartmentSphericalMeanModel,
    model_from_spec,
    tortuosity,
)
from fingerprint.distributions import DD1GammaDistributed, SD1WatsonDistributed
from fingerprint.errors import InputError
from fingerprint.models import available_models, get_model
from fingerprint.signal_models.cylinder_models import (
    C1Stick,
    C4CylinderGaussianPhaseApproximation,
)
from fingerprint.signal_models.gaussian_models import G1Ball, G2Zeppelin

# The HCP fixture's bvecs are not exactly unit vectors (|g| - 1 ~ 1e-6) and dmipy used
# them as they are, while our scheme normalises them: relative differences ~1e-5 on hcp.
RTOL = {"hcp": 3e-5, "activeax": 1e-6}
SM_CYLINDER_TOL = 1e-3  # dmipy's numerical spherical mean of cylinders




@pytest.fixture(scope="module", params=["hcp", "activeax"])
def reference(request, reference_dir):
    return load_reference(reference_dir, request.param)


@pytest.fixture(scope="module")
def scheme(reference_dir):
    return reference_scheme(reference_dir, "activeax")


noddi = noddi_watson


def build(case):
    if case == "BallStick":
        return MultiCompartmentModel(models=[G1Ball(), C1Stick()])
    if case == "BallStickStick":
        stick = C1Stick()
        return MultiCompartmentModel(models=[G1Ball(), stick, stick])  # same instance twice
    if case == "SMT_StickZeppelin":
        model = MultiCompartmentSphericalMeanModel(models=[C1Stick(), G2Zeppelin()])
        model.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                     "partial_volume_0", "partial_volume_1")
        model.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
        return model
    if case == "SM_C1Stick":
        return MultiCompartmentSphericalMeanModel(models=[C1Stick()])
    if case == "SM_G2Zeppelin":
        return MultiCompartmentSphericalMeanModel(models=[G2Zeppelin()])
    if case == "SM_C4Cylinder":
        return MultiCompartmentSphericalMeanModel(
            models=[C4CylinderGaussianPhaseApproximation()])
    raise KeyError(case)


def random_vectors(model, n, seed=0):
    """Random parameter vectors inside the model's ranges."""
    rng = np.random.default_rng(seed)
    cols = []
    for name, card in model.parameter_cardinality.items():
        rng_ = np.atleast_2d(np.asarray(model.parameter_ranges[name], dtype=float))
        scale = np.broadcast_to(np.asarray(model.parameter_scales[name], dtype=float), (card,))
        for i in range(card):
            lo, hi = rng_[i]
            cols.append(rng.uniform(lo, hi, n) * scale[i])
    return np.column_stack(cols)


# --------------------------------------------------------------------------- references
@pytest.mark.parametrize("case", ["BallStick", "BallStickStick", "SMT_StickZeppelin",
                                  "SM_C1Stick", "SM_G2Zeppelin", "SM_C4Cylinder"])
def test_reference_models(case, reference):
    name, scheme, signals, names = reference
    model = build(case)
    assert model.parameter_names == names[case]["parameter_names"]
    assert dict(model.parameter_cardinality) == names[case]["parameter_cardinality"]
    assert model.is_spherical_mean == names[case]["spherical_mean"]
    simulated = model.simulate_signal(scheme, signals[f"{case}/params"])
    expected = signals[f"{case}/signals"]
    assert simulated.shape == expected.shape
    if case == "SM_C4Cylinder":
        np.testing.assert_allclose(simulated, expected, atol=SM_CYLINDER_TOL, rtol=0)
    else:
        np.testing.assert_allclose(simulated, expected, rtol=RTOL[name], atol=1e-12)


# --------------------------------------------------------------------------- naming
def test_repeated_instances_and_partial_volumes():
    stick = C1Stick()
    model = MultiCompartmentModel(models=[stick, stick, G1Ball()])
    assert model.parameter_names == [
        "C1Stick_1_mu", "C1Stick_1_lambda_par", "C1Stick_2_mu", "C1Stick_2_lambda_par",
        "G1Ball_1_lambda_iso", "partial_volume_0", "partial_volume_1", "partial_volume_2"]
    assert model.partial_volume_names == ["partial_volume_0", "partial_volume_1",
                                          "partial_volume_2"]
    assert model.orientation_parameter_names == ["C1Stick_1_mu", "C1Stick_2_mu"]
    single = MultiCompartmentModel(models=[C1Stick()])
    assert single.partial_volume_names == []
    assert single.parameter_names == ["C1Stick_1_mu", "C1Stick_1_lambda_par"]


def test_nested_names_and_ranges():
    model = noddi()
    assert model.parameter_names == [
        "SD1WatsonDistributed_1_SD1Watson_1_mu", "SD1WatsonDistributed_1_SD1Watson_1_odi",
        "SD1WatsonDistributed_1_partial_volume_0", "partial_volume_0", "partial_volume_1"]
    assert model.parameter_ranges["SD1WatsonDistributed_1_SD1Watson_1_odi"] == (0.02, 0.99)
    assert model.parameter_types["SD1WatsonDistributed_1_SD1Watson_1_mu"] == "orientation"
    assert model.orientation_parameter_names == ["SD1WatsonDistributed_1_SD1Watson_1_mu"]
    assert "G1Ball_1_lambda_iso" in model.all_parameter_names
    assert model.partial_volume_names == ["partial_volume_0", "partial_volume_1"]


def test_short_names_resolve_and_errors_list_candidates():
    model = noddi()
    assert model.resolve_parameter_name("odi") == "SD1WatsonDistributed_1_SD1Watson_1_odi"
    assert model.resolve_parameter_name("partial_volume_0") == "partial_volume_0"
    assert model.resolve_parameter_name("lambda_iso") == "G1Ball_1_lambda_iso"
    two = build("BallStickStick")
    with pytest.raises(InputError) as err:
        two.resolve_parameter_name("lambda_par")
    assert "C1Stick_1_lambda_par" in str(err.value) and "C1Stick_2_lambda_par" in str(err.value)
    with pytest.raises(InputError, match="unknown parameter 'kappa'.*G1Ball_1_lambda_iso"):
        two.resolve_parameter_name("kappa")
    with pytest.raises(InputError, match="ambiguous"):
        two.set_fixed_parameter("mu", [0.0, 0.0])
    two.set_fixed_parameter("C1Stick_2_mu", [0.5, 0.5])
    assert "C1Stick_2_mu" not in two.parameter_names


# --------------------------------------------------------------------------- links
def test_fixed_equal_tortuous_links(scheme):
    model = MultiCompartmentModel(models=[C1Stick(), G2Zeppelin(), G1Ball()])
    model.set_equal_parameter("C1Stick_1_mu", "G2Zeppelin_1_mu")
    model.set_tortuous_parameter("lambda_perp", "C1Stick_1_lambda_par", "partial_volume_0",
                                 "partial_volume_1")
    model.set_equal_parameter("C1Stick_1_lambda_par", "G2Zeppelin_1_lambda_par")
    model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    model.set_fixed_parameter("lambda_iso", 3e-9)
    assert model.parameter_names == ["C1Stick_1_mu", "partial_volume_0", "partial_volume_1",
                                     "partial_volume_2"]
    values = model.add_linked_parameters_to_parameters(dict(
        C1Stick_1_mu=[0.3, 0.4], partial_volume_0=0.5, partial_volume_1=0.3,
        partial_volume_2=0.2))
    assert values["G2Zeppelin_1_lambda_par"] == pytest.approx(1.7e-9)
    np.testing.assert_allclose(values["G2Zeppelin_1_mu"], [0.3, 0.4])
    assert values["G2Zeppelin_1_lambda_perp"] == pytest.approx(
        float(tortuosity(1.7e-9, 0.5, 0.3)))
    # same signal as the unconstrained model given the linked values by hand
    free = MultiCompartmentModel(models=[C1Stick(), G2Zeppelin(), G1Ball()])
    full = free.parameters_to_parameter_vector(**{k: v for k, v in values.items()})
    np.testing.assert_allclose(
        model.simulate_signal(scheme, model.parameters_to_parameter_vector(
            mu=[0.3, 0.4], partial_volume_0=0.5, partial_volume_1=0.3, partial_volume_2=0.2)),
        free.simulate_signal(scheme, full), rtol=1e-12)


def test_tortuosity_formula():
    assert float(tortuosity(2e-9, 0.6)) == pytest.approx(0.8e-9)
    # fractions summing to one: lambda_perp = vf_extra / (vf_intra + vf_extra) * lambda_par
    assert float(tortuosity(2e-9, 0.6, 0.4)) == pytest.approx(0.8e-9)


def test_link_errors():
    model = build("BallStick")
    model.set_fixed_parameter("lambda_iso", 3e-9)
    with pytest.raises(InputError, match="fixed or linked"):
        model.set_fixed_parameter("G1Ball_1_lambda_iso", 2e-9)
    with pytest.raises(InputError, match="2 values"):
        model.set_fixed_parameter("C1Stick_1_mu", 0.3)
    with pytest.raises(InputError, match="one number"):
        model.set_fixed_parameter("C1Stick_1_lambda_par", [1e-9, 2e-9])
    with pytest.raises(InputError, match="cardinality"):
        model.set_equal_parameter("C1Stick_1_mu", "C1Stick_1_lambda_par")
    with pytest.raises(InputError, match="itself"):
        model.set_equal_parameter("partial_volume_0", "partial_volume_0")


def test_optimization_bounds():
    model = build("BallStick")
    model.set_parameter_optimization_bounds("lambda_iso", [1e-9, 2e-9])
    assert model.parameter_scales["G1Ball_1_lambda_iso"] == pytest.approx(2e-9)
    np.testing.assert_allclose(model.parameter_ranges["G1Ball_1_lambda_iso"], (0.5, 1.0))
    model.set_parameter_optimization_bounds("C1Stick_1_mu", [[0, 1], [-1, 1]])
    np.testing.assert_allclose(model.parameter_ranges["C1Stick_1_mu"], [[0, 1], [-1, 1]])
    with pytest.raises(InputError, match="shape"):
        model.set_parameter_optimization_bounds("C1Stick_1_mu", [0, 1])
    with pytest.raises(InputError, match="lower"):
        model.set_parameter_optimization_bounds("lambda_par", [2e-9, 1e-9])
    assert len(model.bounds_for_optimization) == 6


# --------------------------------------------------------------------------- vectors
def test_parameter_vector_round_trips():
    model = noddi()
    rng = np.random.default_rng(1)
    vec = random_vectors(model, 12).reshape(3, 4, -1)
    params = model.parameter_vector_to_parameters(vec)
    assert params["SD1WatsonDistributed_1_SD1Watson_1_mu"].shape == (3, 4, 2)
    assert params["partial_volume_0"].shape == (3, 4)
    np.testing.assert_array_equal(model.parameters_to_parameter_vector(**params), vec)
    single = model.parameter_vector_to_parameters(vec[0, 0])
    assert np.ndim(single["partial_volume_0"]) == 0
    np.testing.assert_array_equal(model.parameters_to_parameter_vector(**single), vec[0, 0])
    # scalars broadcast over the others' shape; short names accepted
    odi = rng.uniform(0.1, 0.9, 5)
    out = model.parameters_to_parameter_vector(mu=[0.1, 0.2], odi=odi,
                                               SD1WatsonDistributed_1_partial_volume_0=0.5,
                                               partial_volume_0=0.2, partial_volume_1=0.8)
    assert out.shape == (5, 6)
    np.testing.assert_array_equal(out[:, 2], odi)
    np.testing.assert_array_equal(out[:, 0:2], np.tile([0.1, 0.2], (5, 1)))
    with pytest.raises(InputError, match="missing"):
        model.parameters_to_parameter_vector(odi=0.3)
    with pytest.raises(InputError, match="inconsistent"):
        model.parameters_to_parameter_vector(mu=[0.1, 0.2], odi=np.ones(3),
                                             SD1WatsonDistributed_1_partial_volume_0=np.ones(4),
                                             partial_volume_0=0.2, partial_volume_1=0.8)


def test_simulate_shapes_and_inputs(scheme):
    model = build("BallStick")
    vec = random_vectors(model, 6, seed=2)
    flat = model.simulate_signal(scheme, vec)
    assert flat.shape == (6, scheme.number_of_measurements)
    assert model.simulate_signal(scheme, vec[0]).shape == (scheme.number_of_measurements,)
    np.testing.assert_array_equal(model.simulate_signal(scheme, vec.reshape(2, 3, -1)),
                                  flat.reshape(2, 3, -1))
    as_dict = model.simulate_signal(scheme, model.parameter_vector_to_parameters(vec))
    np.testing.assert_array_equal(as_dict, flat)
    np.testing.assert_allclose(model(scheme, **model.parameter_vector_to_parameters(vec[1])),
                               flat[1])
    with pytest.raises(InputError, match="last dimension 6"):
        model.simulate_signal(scheme, np.ones(5))
    sm = build("SMT_StickZeppelin")
    assert sm.simulate_signal(scheme, random_vectors(sm, 4)).shape == (
        4, scheme.number_of_shells)


def test_timing_required(reference_dir):
    info = json.loads((reference_dir / "schemes" / "hcp.json").read_text())
    no_timing = acquisition_scheme_from_bvalues(np.array(info["bvalues_s_per_m2"]),
                                                np.array(info["gradient_directions"]))
    model = MultiCompartmentModel(models=[C4CylinderGaussianPhaseApproximation(), G1Ball()])
    assert "delta" in model._required_acquisition_parameters
    with pytest.raises(InputError, match="delta"):
        model.simulate_signal(no_timing, random_vectors(model, 1)[0])


def test_large_batch_matches_small_batches(scheme):
    model = noddi()
    vec = random_vectors(model, 20000, seed=3)
    big = model.simulate_signal(scheme, vec)
    assert big.shape == (20000, scheme.number_of_measurements)
    assert np.all(np.isfinite(big))
    np.testing.assert_allclose(big[::997], model.simulate_signal(scheme, vec[::997]),
                               atol=1e-12)


# --------------------------------------------------------------------------- specs
def _activeax_like():
    model = MultiCompartmentModel(models=[C4CylinderGaussianPhaseApproximation(), G2Zeppelin(),
                                          G1Ball()])
    model.set_equal_parameter("C4CylinderGaussianPhaseApproximation_1_mu", "G2Zeppelin_1_mu")
    model.set_tortuous_parameter("G2Zeppelin_1_lambda_perp",
                                 "C4CylinderGaussianPhaseApproximation_1_lambda_par",
                                 "partial_volume_0", "partial_volume_1")
    model.set_parameter_optimization_bounds("diameter", [1e-7, 2e-5])
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    return model


@pytest.mark.parametrize("factory", [noddi, _activeax_like, lambda: build("SMT_StickZeppelin"),
                                     lambda: MultiCompartmentModel(models=[
                                         DD1GammaDistributed(models=[
                                             C4CylinderGaussianPhaseApproximation()]),
                                         G2Zeppelin()])])
def test_spec_round_trip(factory, scheme):
    model = factory()
    spec = model.to_spec()
    text = json.dumps(spec)  # JSON-able
    rebuilt = model_from_spec(json.loads(text))
    assert type(rebuilt) is type(model)
    assert rebuilt.parameter_names == model.parameter_names
    assert rebuilt.all_parameter_names == model.all_parameter_names
    assert dict(rebuilt.parameter_ranges) == dict(model.parameter_ranges)
    assert rebuilt.spec_hash == model.spec_hash
    assert model_from_spec(text).spec_hash == model.spec_hash
    vec = random_vectors(model, 5, seed=4)
    np.testing.assert_array_equal(rebuilt.simulate_signal(scheme, vec),
                                  model.simulate_signal(scheme, vec))


def test_spec_hash_distinguishes_models():
    a, b = noddi(), noddi()
    assert a.spec_hash == b.spec_hash
    b.set_fixed_parameter("odi", 0.3)
    assert a.spec_hash != b.spec_hash
    assert build("BallStick").spec_hash != MultiCompartmentModel(
        models=[C1Stick(), G1Ball()]).spec_hash


def test_model_from_spec_rejects_bad_specs():
    spec = build("BallStick").to_spec()
    with pytest.raises(InputError, match="format"):
        model_from_spec({**spec, "format": "other"})
    with pytest.raises(InputError, match="class"):
        model_from_spec({**spec, "class": "Nope"})
    bad = json.loads(json.dumps(spec))
    bad["models"][0]["module"] = "os"
    with pytest.raises(InputError, match="module"):
        model_from_spec(bad)
    bad = json.loads(json.dumps(spec))
    bad["calls"] = [["delete_everything"]]
    with pytest.raises(InputError, match="invalid call"):
        model_from_spec(bad)
    with pytest.raises(InputError, match="JSON"):
        model_from_spec("{not json")


def test_copy_and_snapshot_are_independent(scheme):
    model = noddi()
    clone = model.copy()
    clone.set_fixed_parameter("odi", 0.2)
    assert "SD1WatsonDistributed_1_SD1Watson_1_odi" in model.parameter_names
    assert "SD1WatsonDistributed_1_SD1Watson_1_odi" not in clone.parameter_names
    bundle = SD1WatsonDistributed(models=[C1Stick()])
    outer = MultiCompartmentModel(models=[bundle])
    bundle.set_fixed_parameter("odi", 0.5)  # after building: the model keeps its snapshot
    assert "SD1WatsonDistributed_1_SD1Watson_1_odi" in outer.parameter_names


# --------------------------------------------------------------------------- concurrency
def test_concurrent_simulation_is_identical(scheme):
    model = noddi()
    vec = random_vectors(model, 3000, seed=5)
    serial = model.simulate_signal(scheme, vec)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: model.simulate_signal(scheme, vec), range(6)))
    for result in results:
        np.testing.assert_array_equal(result, serial)


# --------------------------------------------------------------------------- catalogue, fit
def test_every_recipe_builds_and_simulates(scheme):
    for name in available_models():
        model = get_model(name)
        vec = random_vectors(model, 50, seed=6)
        signal = model.simulate_signal(scheme, vec)
        assert np.all(np.isfinite(signal)), name
        assert model_from_spec(model.to_spec()).spec_hash == model.spec_hash


def test_fit_delegates_to_the_engine(monkeypatch, scheme):
    calls = {}

    def fake_fit_model(model, acquisition_scheme, data, mask=None, solver="fingerprint",
                       **kwargs):
        calls.update(model=model, scheme=acquisition_scheme, mask=mask, solver=solver,
                     kwargs=kwargs)
        return "fitted"

    from fingerprint.core import backends

    # model.fit reaches the fitting core through the backend registry (core does not
    # import fitting)
    monkeypatch.setitem(backends._BACKENDS, "fit", fake_fit_model)
    model = build("BallStick")
    data = np.ones((2, scheme.number_of_measurements))
    assert model.fit(scheme, data, mask=None, n_jobs=1) == "fitted"
    assert calls["model"] is model and calls["solver"] == "fingerprint"
    assert calls["kwargs"] == {"n_jobs": 1}


def test_model_input_errors():
    with pytest.raises(InputError):
        MultiCompartmentModel(models=[])
    with pytest.raises(InputError, match="not a compartment"):
        MultiCompartmentModel(models=[object()])
