"""Units are declared where parameters are declared (compartments, distributions), and the
map sidecars use them."""

from __future__ import annotations

import inspect
import json

import pytest

from fingerprint.core import units
from fingerprint.distributions import distribute_models
from fingerprint.models import available_models, get_model
from fingerprint.signal_models import cylinder_models, gaussian_models, sphere_models
from fingerprint.signal_models.base import CompartmentModel


def _compartment_classes() -> list[type]:
    out = []
    for module in (cylinder_models, gaussian_models, sphere_models):
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, CompartmentModel) and cls is not CompartmentModel \
                    and cls.__module__ == module.__name__:
                out.append(cls)
    return out


@pytest.mark.parametrize("cls", _compartment_classes(), ids=lambda c: c.__name__)
def test_every_compartment_parameter_has_a_declared_unit(cls):
    declared = dict(cls.parameter_units)
    assert list(declared) == list(cls.parameter_names)
    assert set(declared.values()) <= set(units.KNOWN_UNITS)
    for name, kind in cls.parameter_types.items():
        if kind == "orientation":
            assert declared[name] == units.ANGLE
    for name in declared:
        if name.startswith("lambda"):
            assert declared[name] == units.DIFFUSIVITY
        if name == "diameter":
            assert declared[name] == units.LENGTH


def test_every_distribution_parameter_has_a_declared_unit():
    for _, cls in inspect.getmembers(distribute_models, inspect.isclass):
        params = getattr(cls, "_distribution_parameters", ())
        if params:
            assert {p[0] for p in params} == set(cls._distribution_units), cls.__name__
            assert set(cls._distribution_units.values()) <= set(units.KNOWN_UNITS)


def test_a_compartment_without_units_is_refused():
    class Undeclared(gaussian_models.G1Ball):
        _parameter_units = {}

    with pytest.raises(TypeError, match="no unit"):
        Undeclared.parameter_units  # noqa: B018


@pytest.mark.parametrize("name", available_models())
def test_named_models_carry_units_for_every_parameter(name):
    model = get_model(name)
    declared = model.parameter_units
    for parameter in model.parameter_names:
        assert declared[parameter] in units.KNOWN_UNITS
    noddi = get_model("noddi").parameter_units
    assert noddi["SD1WatsonDistributed_1_SD1Watson_1_odi"] == units.DIMENSIONLESS
    assert noddi["SD1WatsonDistributed_1_SD1Watson_1_mu"] == units.ANGLE
    assert noddi["G1Ball_1_lambda_iso"] == units.DIFFUSIVITY
    assert get_model("axcaliber").parameter_units[
        "DD1GammaDistributed_1_DD1Gamma_1_beta"] == units.LENGTH


def test_sidecars_state_the_declared_units(tmp_path):
    from fingerprint import phantoms
    from fingerprint.fitting.pipeline import fit_volume

    ph = phantoms.noddi_phantom(shape=(2, 2, 1), seed=1)
    paths = phantoms.write_phantom(ph, tmp_path / "in", prefix="sub-01")
    result = fit_volume("ball_stick", paths["dwi"], paths["bval"], paths["bvec"],
                        tmp_path / "out", dictionary_size=1000,
                        dictionary_dir=tmp_path / "dictionaries")
    model = get_model("ball_stick")
    from fingerprint.models import map_labels

    for label, parameter in map_labels(model).items():
        sidecar = json.loads(result.maps[label].with_name(
            result.maps[label].name.replace(".nii.gz", ".json")).read_text())
        expected = "n/a" if parameter in model.orientation_parameter_names \
            else model.parameter_units[parameter]
        assert sidecar["Units"] == expected, label
