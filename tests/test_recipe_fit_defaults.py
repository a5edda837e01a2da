"""A recipe's ``[fit]`` table sets the named model's default refinement: ``model.fit``,
``fit_volume`` (``fingerprint fit``) and server jobs all honour it, an explicit ``refine``
wins, and ``fingerprint models NAME`` shows it."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.cli.main import main as cli_main
from fingerprint.errors import InputError
from fingerprint.fitting.engine import clear_estimator_cache, prepare_fitter
from fingerprint.fitting.options import FitOptions
from fingerprint.fitting.pipeline import fit_volume
from fingerprint.io.gradients import write_bvals_bvecs
from fingerprint.models import describe_model, format_model, get_model, model_refine
from fingerprint.phantoms import default_scheme, model_phantom
from fingerprint.recipes import load_recipe, recipe_dir

SIZE = 800
LABELS = ("stick_fraction", "lambda_par")


@pytest.fixture()
def polished_recipes(tmp_path, monkeypatch) -> Path:
    """The repository's recipes, with ``ball_stick`` given ``[fit] refine = "nonlinear"``."""
    directory = tmp_path / "recipes"
    shutil.copytree(recipe_dir(), directory)
    path = directory / "ball_stick.toml"
    path.write_text(path.read_text() + '\n[fit]\nrefine = "nonlinear"\n')
    monkeypatch.setenv("FINGERPRINT_RECIPE_DIR", str(directory))
    clear_estimator_cache()
    yield directory
    clear_estimator_cache()


@pytest.fixture()
def volume(tmp_path):
    scheme = default_scheme(n_b0=3, shells=((1000.0, 15), (2500.0, 20)))
    ph = model_phantom("ball_stick", scheme, 6, seed=4, snr=25)
    data = ph["signals"].reshape(3, 2, 1, -1).astype(np.float32)
    dwi = tmp_path / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), dwi)
    bval, bvec = tmp_path / "sub-01_dwi.bval", tmp_path / "sub-01_dwi.bvec"
    write_bvals_bvecs(scheme, bval, bvec)
    return {"scheme": scheme, "data": data, "dwi": dwi, "bval": bval, "bvec": bvec,
            "dir": tmp_path}


def _maps(fitted) -> dict[str, np.ndarray]:
    from fingerprint.models import map_labels

    labels = map_labels("ball_stick")
    return {k: np.asarray(fitted.fitted_parameters[labels[k]], dtype=np.float32)
            for k in LABELS}


def _read(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for label in LABELS:
        camel = label.split("_")[0] + "".join(p.title() for p in label.split("_")[1:])
        (path,) = directory.glob(f"*_param-{camel}_dwimap.nii.gz")
        out[label] = np.asarray(nib.load(path).dataobj)
    return out


def test_recipe_default_refinement_on_every_path(polished_recipes, volume, tmp_path):
    from server.executor import JobSpec, run_job

    assert model_refine("ball_stick") == "nonlinear"
    model = get_model("ball_stick")
    dictionaries = tmp_path / "dictionaries"
    kw = {"dictionary_size": SIZE, "dictionary_dir": dictionaries}
    default = _maps(model.fit(volume["scheme"], volume["data"], **kw))
    polished = _maps(model.fit(volume["scheme"], volume["data"], refine="nonlinear", **kw))
    matched = _maps(model.fit(volume["scheme"], volume["data"], refine=True, **kw))
    for label in LABELS:
        np.testing.assert_array_equal(default[label], polished[label], err_msg=label)
    # an explicit refine wins: matching alone is not the polished fit
    assert any(not np.allclose(matched[k], polished[k], rtol=1e-4) for k in LABELS)
    fitter = prepare_fitter(model, volume["scheme"], FitOptions(), dictionary_dir=dictionaries)
    assert fitter.polish is not None
    explicit = prepare_fitter(model, volume["scheme"], FitOptions(refine=True),
                              dictionary_dir=dictionaries)
    assert explicit.polish is None

    clear_estimator_cache()
    result = fit_volume("ball_stick", volume["dwi"], volume["bval"], volume["bvec"],
                        tmp_path / "vol", **kw)
    got = {k: np.asarray(nib.load(result.maps[k]).dataobj) for k in LABELS}
    for label in LABELS:
        np.testing.assert_allclose(got[label], default[label], rtol=2e-6, err_msg=label)

    code = cli_main(["fit", "--model", "ball_stick", "--dwi", str(volume["dwi"]),
                     "--bval", str(volume["bval"]), "--bvec", str(volume["bvec"]),
                     "--out", str(tmp_path / "cli"), "--dictionary-size", str(SIZE),
                     "--dictionary-dir", str(dictionaries), "--no-progress"])
    assert code == 0
    for label, value in _read(tmp_path / "cli").items():
        np.testing.assert_allclose(value, default[label], rtol=2e-6, err_msg=label)

    job_dir = tmp_path / "job"
    (job_dir / "inputs").mkdir(parents=True)
    inputs = {}
    for key in ("dwi", "bval", "bvec"):
        target = job_dir / "inputs" / volume[key].name
        target.write_bytes(volume[key].read_bytes())
        inputs[key] = target.name
    spec = JobSpec(job_id="j1", kind="fit", model="ball_stick",
                   options={"dictionary_size": SIZE}, inputs=inputs, job_dir=str(job_dir),
                   db_path=str(tmp_path / "db.sqlite"), dictionary_dir=str(dictionaries),
                   threads=1, attempt=1)
    outcome = run_job(spec)
    assert outcome["status"] == "succeeded", outcome
    for label, value in _read(job_dir / "outputs").items():
        np.testing.assert_allclose(value, default[label], rtol=2e-6, err_msg=label)


def test_fit_options_resolve_the_model_default():
    assert FitOptions().refine is None
    assert FitOptions().with_model_refine(None).refine is True
    assert FitOptions().with_model_refine("nonlinear").refine == "nonlinear"
    assert FitOptions(refine=False).with_model_refine("nonlinear").refine is False
    assert FitOptions.from_mapping({"refine": "true"}).with_model_refine(
        "nonlinear").refine is True


def test_sandi_recipe_polishes_by_default_and_says_so(capsys):
    from fingerprint.fitting.engine import runs_per_voxel_fit

    assert model_refine("sandi") == "nonlinear"
    # the polish is a per-voxel fit (what servers limit): the recipe's default counts
    assert runs_per_voxel_fit("sandi", FitOptions())
    assert not runs_per_voxel_fit("sandi", FitOptions(refine=True))
    assert not runs_per_voxel_fit("smt", FitOptions())
    assert model_refine("noddi") is None
    assert "non-linear" in describe_model("sandi")["default_refine"]
    assert describe_model("noddi")["default_refine"] is None
    assert "Default fit: matching, the local-linear step and the non-linear" in \
        format_model("sandi")
    assert cli_main(["models", "sandi"]) == 0
    assert "Default fit:" in capsys.readouterr().out


def test_recipe_fit_table_is_validated(tmp_path):
    base = 'name = "bad"\ndescription = "x"\n[model]\nmodels = ["C1Stick"]\n'
    bad = tmp_path / "bad.toml"
    bad.write_text(base + '[fit]\nrefine = "sometimes"\n')
    with pytest.raises(InputError, match=r"bad.toml.*\[fit\] refine must be true, false or"):
        load_recipe(bad)
    bad.write_text(base + '[fit]\nn_neighbors = 3\n')
    with pytest.raises(InputError, match=r"\[fit\] may set only"):
        load_recipe(bad)
    bad.write_text(base + '[fit]\nrefine = false\n')
    assert load_recipe(bad).refine is False


def test_recipe_count_penalty_is_validated(tmp_path):
    base = 'name = "bad"\ndescription = "x"\n[model]\nmodels = ["C1Stick"]\n'
    bad = tmp_path / "bad.toml"
    for value in ('-1.0', '"high"', 'true', 'nan'):
        bad.write_text(base + f'[fit]\ncount_penalty = {value}\n')
        with pytest.raises(InputError, match=r"bad.toml.*\[fit\] count_penalty must be a "
                                             r"finite number >= 0"):
            load_recipe(bad)
    bad.write_text(base + '[fit]\ncount_penalty = 2\n')
    assert load_recipe(bad).count_penalty == 2.0
    bad.write_text(base)
    assert load_recipe(bad).count_penalty is None


def test_noddi2_recipe_count_penalty_reaches_the_multifascicle_fit(capsys):
    from fingerprint.fitting.multifascicle import MultiFascicleFitter
    from fingerprint.models import model_count_penalty

    scheme = default_scheme(n_b0=3, shells=((1000.0, 30), (2000.0, 30)))
    assert model_count_penalty("noddi2") == 2.0
    assert model_count_penalty("ball_stick_stick") is None  # the BIC
    for refine in (None, True, False):
        fitter = prepare_fitter(get_model("noddi2"), scheme, FitOptions(refine=refine))
        assert isinstance(fitter, MultiFascicleFitter)
        assert fitter.settings.penalty == 2.0
        assert fitter.settings.polish_iterations == (0 if refine is False else 10)
    fitter = prepare_fitter(get_model("ball_stick_stick"), scheme, FitOptions())
    assert isinstance(fitter, MultiFascicleFitter) and fitter.settings.penalty is None
    assert "penalty of 2 per parameter" in describe_model("noddi2")["count_penalty"]
    assert describe_model("ball_stick_stick")["count_penalty"] is None
    assert cli_main(["models", "noddi2"]) == 0
    assert "Fascicle count: fascicle count chosen with a penalty of 2" in \
        capsys.readouterr().out
