"""Named models: recipes load, build the dmipy models they claim, and label their maps."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fingerprint.errors import InputError, UnknownModelError
from fingerprint.models import (
    available_models,
    get_model,
    get_recipe,
    map_labels,
    recipe_for_model,
    requires_timing,
)
from fingerprint.recipes import load_recipe

# recipe name -> dmipy reference case with the same model
REFERENCE_CASES = {
    "noddi": "NODDIWatson",
    "ball_stick": "BallStick",
    "watson_stick": "WatsonStick",
    "smt_noddi": "SMT_StickZeppelin",
}


@pytest.fixture(scope="module")
def reference_names(reference_dir):
    return json.loads((reference_dir / "signals_hcp.json").read_text())


@pytest.fixture(scope="module")
def hcp_scheme(reference_dir):
    from fingerprint.io.gradients import read_bvals_bvecs

    info = json.loads((reference_dir / "schemes" / "hcp.json").read_text())
    return read_bvals_bvecs(reference_dir / "schemes" / "hcp.bval",
                            reference_dir / "schemes" / "hcp.bvec",
                            delta=info["delta_s"][0], Delta=info["Delta_s"][0])


def test_catalogue_lists_the_required_models():
    models = available_models()
    for name in ("noddi", "ball_stick", "smt_noddi", "watson_stick", "activeax", "charmed",
                 "axcaliber", "sphere_ball"):
        assert name in models and models[name]


@pytest.mark.parametrize("name", sorted(REFERENCE_CASES))
def test_recipes_reproduce_dmipy_parameter_names(name, reference_names):
    case = reference_names[REFERENCE_CASES[name]]
    model = get_model(name)
    assert list(model.parameter_names) == case["parameter_names"]
    assert dict(model.parameter_cardinality) == case["parameter_cardinality"]
    assert bool(getattr(model, "is_spherical_mean", False)) == case["spherical_mean"]


def test_noddi_recipe_simulates_the_reference_noddi(reference_dir, hcp_scheme):
    """Same parameter vector -> same signal as dmipy's NODDIWatson (fixed 3e-9 ball,
    1.7e-9 lambda_par, tortuous zeppelin); compared with the exact dispersed signal."""
    data = np.load(reference_dir / "signals_hcp.npz")
    params = data["NODDIWatson/params"]
    signals = np.asarray(get_model("noddi").simulate_signal(hcp_scheme, params))
    np.testing.assert_allclose(signals, data["NODDIWatson/signals_exact"], atol=3e-3)


def test_smt_noddi_recipe_simulates_the_reference(reference_dir, hcp_scheme):
    data = np.load(reference_dir / "signals_hcp.npz")
    params = data["SMT_StickZeppelin/params"]
    signals = np.asarray(get_model("smt_noddi").simulate_signal(hcp_scheme, params))
    np.testing.assert_allclose(signals, data["SMT_StickZeppelin/signals"], rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("name", sorted(available_models()))
def test_every_recipe_builds_and_its_maps_name_parameters(name):
    recipe = get_recipe(name)
    model = recipe.build_model()
    assert recipe.maps or recipe.derived, f"{name} has no [maps] nor [derived] maps"
    for label, parameter in recipe.maps.items():
        assert parameter in model.parameter_names, (name, label, parameter)
    # the default sampling resolves against the model (ranges inside its bounds)
    from fingerprint.dictionary.sampling import ParameterSpace, resolve_sampling

    plan = resolve_sampling(ParameterSpace.from_model(model), recipe.sampling_spec())
    x = plan.sample(0, 64)
    assert x.shape == (64, sum(model.parameter_cardinality.values()))
    assert np.isfinite(x).all()
    # each call builds a fresh, identical model
    assert get_model(name) is not model
    assert get_model(name).spec_hash == model.spec_hash
    assert recipe_for_model(model).name == name


def test_timing_requirements():
    assert requires_timing("activeax") and requires_timing("axcaliber")
    assert requires_timing("charmed") and requires_timing("sphere_ball")
    assert not requires_timing("noddi") and not requires_timing("ball_stick")


def test_noddi_map_labels():
    labels = map_labels("noddi")
    assert labels == {
        "icvf": "SD1WatsonDistributed_1_partial_volume_0",
        "odi": "SD1WatsonDistributed_1_SD1Watson_1_odi",
        "isovf": "partial_volume_0",
        "direction": "SD1WatsonDistributed_1_SD1Watson_1_mu",
    }
    # a model object equal to the named model gets the same labels
    assert map_labels(get_model("noddi")) == labels


def test_map_labels_of_a_custom_model_are_parameter_names():
    model = get_model("ball_stick")
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    assert recipe_for_model(model) is None
    assert map_labels(model) == {n: n for n in model.parameter_names}


def test_unknown_model_lists_available_names():
    with pytest.raises(UnknownModelError) as info:
        get_model("nodi")
    message = str(info.value)
    assert "'nodi'" in message and "noddi" in message and "ball_stick" in message
    assert isinstance(info.value, ValueError)
    assert get_recipe("NODDI").name == "noddi"
    assert get_recipe("ball-stick").name == "ball_stick"


def test_recipe_dir_override_and_validation(tmp_path, monkeypatch):
    good = tmp_path / "stick.toml"
    good.write_text(
        'name = "stick"\ndescription = "one stick"\n'
        '[model]\nmodels = ["C1Stick"]\n'
        '[maps]\ndirection = "C1Stick_1_mu"\n')
    monkeypatch.setenv("FINGERPRINT_RECIPE_DIR", str(tmp_path))
    assert list(available_models()) == ["stick"]
    assert get_model("stick").parameter_names == ["C1Stick_1_mu", "C1Stick_1_lambda_par"]
    with pytest.raises(UnknownModelError, match="available models: stick"):
        get_model("noddi")

    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\ndescription = "x"\n[model]\nmodels = ["C1Stick"]\n'
                   'links = [["delete_everything"]]\n')
    with pytest.raises(InputError, match="bad.toml.*delete_everything"):
        load_recipe(bad)
    bad.write_text('name = "bad"\ndescription = "x"\n[model]\nmodels = ["NoSuchModel"]\n')
    with pytest.raises(InputError, match="unknown compartment class 'NoSuchModel'"):
        load_recipe(bad).build_model()
    bad.write_text("name = [\n")
    with pytest.raises(InputError, match="bad.toml is not valid TOML"):
        load_recipe(bad)
    bad.write_text('name = "other"\ndescription = "x"\n[model]\nmodels = ["C1Stick"]\n')
    with pytest.raises(InputError, match="must match the file name"):
        load_recipe(bad)
