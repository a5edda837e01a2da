"""Which fits run a non-linear fit per voxel (what servers limit): the library's one
predicate, :func:`fingerprint.fitting.engine.runs_per_voxel_fit`."""

from __future__ import annotations

import pytest

from fingerprint.fitting.engine import runs_per_voxel_fit
from fingerprint.fitting.options import FitOptions
from fingerprint.models import get_model


@pytest.mark.parametrize("model, options, expected", [
    # dictionary matching with the local-linear step: no per-voxel fit
    ("noddi", {}, False),
    ("noddi", {"refine": False}, False),
    # ... the non-linear polish is one
    ("noddi", {"refine": "nonlinear"}, True),
    # the classical solvers are
    ("noddi", {"solver": "brute2fine"}, True),
    ("noddi", {"solver": "mix"}, True),
    # a Bingham distribution's psi: the polish is the default, refine=False turns it off
    ("noddi_bingham", {}, True),
    ("noddi_bingham", {"refine": True}, True),
    ("noddi_bingham", {"refine": False}, False),
    # a recipe's default refinement (sandi polishes unless the user asks otherwise)
    ("sandi", {}, True),
    ("sandi", {"refine": True}, False),
    # multi-fascicle fingerprinting (its own joint fit), unless refine='nonlinear'
    ("ball_stick_stick", {}, False),
    ("ball_stick_stick", {"refine": "nonlinear"}, True),
    ("ball_stick_stick", {"solver": "mix"}, True),
    # the recipe's solver counts: dti is a linear fit whatever is asked for
    ("dti", {"solver": "mix"}, False),
    # volume models
    ("mc_csd", {"solver": "mix"}, False),
])
def test_runs_per_voxel_fit(model, options, expected):
    assert runs_per_voxel_fit(model, FitOptions.from_mapping(options)) is expected


def test_a_model_object_is_judged_like_its_name():
    for options in ({}, {"refine": "nonlinear"}, {"solver": "brute2fine"}):
        opts = FitOptions.from_mapping(options)
        for name in ("noddi", "noddi_bingham", "ball_stick_stick"):
            assert runs_per_voxel_fit(get_model(name), opts) is runs_per_voxel_fit(name, opts)


def test_the_predicate_agrees_with_the_fitter_the_engine_prepares(monkeypatch):
    """For every named model and refinement, the predicate says "per-voxel fit" exactly
    when the fitter the engine prepares (recipe defaults and solver included) ends with
    the non-linear polish or is a classical solver (the estimator and the multi-fascicle
    fitter are stubbed: nothing is built)."""
    from types import SimpleNamespace

    from fingerprint.data.saved_acquisition_schemes import wu_minn_hcp_acquisition_scheme
    from fingerprint.fitting import engine
    from fingerprint.models import load_recipes
    from fingerprint.volume_models import is_volume_model

    monkeypatch.setattr(engine, "get_estimator", lambda model, scheme, **kw: SimpleNamespace(
        model=model, scheme=scheme))
    monkeypatch.setattr(engine, "MultiFascicleFitter", lambda *a, **kw: "multi-fascicle")
    scheme = wu_minn_hcp_acquisition_scheme()
    for name in sorted(load_recipes()):
        if is_volume_model(name):
            continue
        for options in ({}, {"refine": True}, {"refine": False}, {"refine": "nonlinear"}):
            opts = FitOptions.from_mapping(options)
            fitter = engine.prepare_fitter(get_model(name), scheme, opts)
            if isinstance(fitter, engine.FingerprintFitter):
                expected = fitter.polish is not None
            else:  # multi-fascicle fingerprinting, or the linear tensor fit
                expected = False
            assert runs_per_voxel_fit(name, opts) is expected, (name, options)
