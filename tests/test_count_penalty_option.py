"""The multi-fascicle count penalty as a fit option (``count_penalty``): declared once in
``FIT_OPTION_SPECS``, validated with the option named, and reaching the multi-fascicle
fit from ``model.fit``, ``fingerprint fit`` and the fitting core (the server's form is
covered with the other options in test_server_options.py)."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from fingerprint.cli.main import main
from fingerprint.fitting.engine import prepare_fitter
from fingerprint.fitting.multifascicle import MultiFascicleFitter
from fingerprint.fitting.options import (
    COUNT_PENALTY_MAX,
    FIT_OPTION_SPECS,
    FitOptions,
    OptionError,
)
from fingerprint.io.gradients import write_bvals_bvecs
from fingerprint.models import get_model, model_count_penalty
from fingerprint.phantoms import (
    add_rician_noise,
    crossing_directions,
    crossing_parameter_vectors,
    default_scheme,
)


@pytest.fixture(scope="module")
def scheme():
    return default_scheme()


@pytest.fixture(scope="module")
def crossings(scheme) -> np.ndarray:
    """Eight Ball-Stick-Stick voxels, sticks crossing at 90 degrees (fractions 0.45 and
    0.3), Rician noise at SNR 30: two fascicles each."""
    model = get_model("ball_stick_stick")
    rng = np.random.default_rng(6)
    n = 8
    u1, u2 = crossing_directions(n, 90.0, rng)
    x = crossing_parameter_vectors(
        model, directions=[u1, u2], fractions=np.tile([0.25, 0.45, 0.3], (n, 1)),
        micro=[{"lambda_par": np.full(n, 1.7e-9)}, {"lambda_par": np.full(n, 2.0e-9)}],
        iso={"G1Ball_1_lambda_iso": np.full(n, 2.5e-9)})
    return add_rician_noise(100.0 * model.simulate_signal(scheme, x), 100.0 / 30, rng)


def test_count_penalty_is_one_declared_and_validated_option():
    spec = next(s for s in FIT_OPTION_SPECS if s.name == "count_penalty")
    assert spec.kind == "float" and spec.server
    assert (spec.low, spec.high) == (0.0, COUNT_PENALTY_MAX)
    assert "count_penalty" in FitOptions.option_names()
    assert FitOptions().count_penalty is None
    assert FitOptions.from_mapping({"count_penalty": "2.5"}).count_penalty == 2.5
    assert FitOptions(count_penalty=0).to_dict()["count_penalty"] == 0.0
    for bad in (-1.0, "lots", math.nan, math.inf, COUNT_PENALTY_MAX * 2, True, [2.0]):
        with pytest.raises(OptionError, match=r"option 'count_penalty' must be a number in "
                                              r"\[0, 1000\]") as info:
            FitOptions.from_mapping({"count_penalty": bad})
        assert info.value.option == "count_penalty"


def test_count_penalty_overrides_the_model_s_in_the_fitting_core():
    scheme = default_scheme(n_b0=3, shells=((1000.0, 30), (2000.0, 30)))
    noddi2 = get_model("noddi2")  # its recipe sets [fit] count_penalty
    recipe = model_count_penalty("noddi2")
    assert recipe is not None and recipe != 4.0
    fitter = prepare_fitter(noddi2, scheme, FitOptions(count_penalty=4.0))
    assert isinstance(fitter, MultiFascicleFitter) and fitter.settings.penalty == 4.0
    bss = get_model("ball_stick_stick")  # no recipe penalty: the BIC unless given
    for given, used in ((None, None), (0.0, 0.0), (7.5, 7.5)):
        fitter = prepare_fitter(bss, scheme, FitOptions(count_penalty=given, refine=False))
        assert isinstance(fitter, MultiFascicleFitter)
        assert fitter.settings.penalty == used and fitter.settings.polish_iterations == 0


def _second_fraction(fitted) -> np.ndarray:
    return np.asarray(fitted.fitted_parameters["partial_volume_2"])


def test_model_fit_takes_count_penalty(scheme, crossings):
    """0 keeps every eligible crossing; the largest penalty always picks one fascicle."""
    model = get_model("ball_stick_stick")
    assert np.all(_second_fraction(model.fit(scheme, crossings, count_penalty=0.0)) > 0.1)
    one = model.fit(scheme, crossings, count_penalty=COUNT_PENALTY_MAX)
    assert np.all(_second_fraction(one) == 0)
    assert np.all(np.isnan(one.fitted_parameters["C1Stick_2_mu"]))
    with pytest.raises(OptionError, match="option 'count_penalty'"):
        model.fit(scheme, crossings, count_penalty=-2)


def test_cli_count_penalty_flag_reaches_the_fit(scheme, crossings, tmp_path, capsys):
    dwi = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(crossings.reshape(2, 2, 2, -1).astype(np.float32), np.eye(4)),
             dwi)
    bval, bvec = tmp_path / "sub-01_dwi.bval", tmp_path / "sub-01_dwi.bvec"
    write_bvals_bvecs(scheme, bval, bvec)
    base = ["fit", "--model", "ball_stick_stick", "--dwi", str(dwi), "--bval", str(bval),
            "--bvec", str(bvec), "--no-progress"]
    fraction = "sub-01_model-ballStickStick_param-fascicle2Fraction_dwimap.nii.gz"
    got = {}
    for penalty in ("0", "1000"):
        out = tmp_path / f"out-{penalty}"
        assert main([*base, "--out", str(out), "--count-penalty", penalty]) == 0
        got[penalty] = np.asarray(nib.load(out / fraction).dataobj)
    assert np.all(got["0"] > 0.1) and np.all(got["1000"] == 0)
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "bad"), "--count-penalty", "-1"]) != 0
    assert "option 'count_penalty' must be a number in [0, 1000]" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
