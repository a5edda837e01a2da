"""One fitting core: ``model.fit``, ``fit_volume`` (``fingerprint fit``) and a server job give
the same maps on the same data, for every named model and a crossing-fibre model, and
treat unusable voxels the same way (left out, reported, NaN)."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint import phantoms
from fingerprint.cli.main import main as cli_main
from fingerprint.core.modeling_framework import MultiCompartmentModel
from fingerprint.fitting.engine import clear_estimator_cache
from fingerprint.fitting.pipeline import fit_volume
from fingerprint.io.gradients import write_bvals_bvecs
from fingerprint.io.nifti import bids_map_name, mu_to_vectors
from fingerprint.models import available_models, get_model, map_labels
from fingerprint.signal_models import cylinder_models, gaussian_models

SIZE = 1500
SHAPE = (3, 2, 2)
DELTA, BIG_DELTA = 0.015, 0.035
BAD_NAN = (0, 0, 0)
BAD_NEGATIVE = (1, 1, 1)


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny NODDI-like volume (float32, as NIfTI stores it) with one NaN voxel and one
    voxel holding a negative signal, on a two-shell scheme with pulse timing."""
    directory = tmp_path_factory.mktemp("one_core")
    scheme = phantoms.default_scheme(n_b0=4, shells=((1000.0, 20), (2500.0, 30)),
                                     delta=DELTA, Delta=BIG_DELTA)
    ph = phantoms.noddi_phantom(shape=SHAPE, seed=3, snr=40, scheme=scheme)
    data = np.asarray(ph["dwi"], dtype=np.float32).copy()
    data[BAD_NAN + (7,)] = np.nan
    data[BAD_NEGATIVE + (9,)] = -5.0
    dwi = directory / "sub-01_dwi.nii.gz"
    nib.save(nib.Nifti1Image(data, np.eye(4)), dwi)
    bval, bvec = directory / "sub-01_dwi.bval", directory / "sub-01_dwi.bvec"
    write_bvals_bvecs(scheme, bval, bvec)
    return {"dir": directory, "data": data, "scheme": scheme, "dwi": dwi, "bval": Path(bval),
            "bvec": Path(bvec)}


def _crossing_model() -> MultiCompartmentModel:
    model = MultiCompartmentModel(models=[gaussian_models.G1Ball(), cylinder_models.C1Stick(),
                                          cylinder_models.C1Stick()])
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    model.set_fixed_parameter("C1Stick_2_lambda_par", 1.7e-9)
    return model


def _expected_maps(model, fitted) -> dict[str, np.ndarray]:
    """model.fit's parameters as fit_volume writes them (float32; orientations as unit
    vectors)."""
    out = {}
    orientation = set(model.orientation_parameter_names)
    for label, name in map_labels(model).items():
        value = np.asarray(fitted.fitted_parameters[name])
        if name in orientation:
            flat = value.reshape(-1, 2)  # no direction (NaN) -> zero vector
            value = mu_to_vectors(flat).reshape(value.shape[:-1] + (3,))
            value[~fitted.valid] = np.nan
        out[label] = value.astype(np.float32)
    return out


def _file_label(label: str) -> str:
    """The ``param`` entity a map label gets in file names (``fascicle1_icvf`` ->
    ``fascicle1Icvf``)."""
    return bids_map_name("", "m", label).split("param-")[1].split("_dwimap")[0]


def _read_maps(result) -> dict[str, np.ndarray]:
    return {label: np.asarray(nib.load(path).dataobj) for label, path in result.maps.items()}


def _compare(expected: dict[str, np.ndarray], maps: dict[str, np.ndarray], what: str) -> None:
    for label, value in expected.items():
        got = maps[label]
        assert got.shape == value.shape, (what, label)
        if label.endswith("direction") or value.ndim == 4:  # unit vectors: sign is free
            got = got * np.where(np.sum(got * value, axis=-1, keepdims=True) < 0, -1, 1)
        scale = np.max(np.abs(value), initial=0.0, where=np.isfinite(value))
        np.testing.assert_allclose(got, value, rtol=2e-6, atol=1e-7 * scale, equal_nan=True,
                                   err_msg=f"{what}: {label}")


#: Named models whose scheme requirements this module's two-shell volume does not meet
#: (their refusal is tested in tests/test_catalogue_models.py).
NEEDS_OTHER_SCHEME = {"sandi"}


def _models() -> list[tuple[str, object]]:
    return [(name, name) for name in available_models() if name not in NEEDS_OTHER_SCHEME] \
        + [("crossing", "crossing")]


@pytest.mark.parametrize("name", [n for n, _ in _models()])
def test_model_fit_and_fit_volume_give_the_same_maps(volume, tmp_path, name, caplog):
    model = _crossing_model() if name == "crossing" else get_model(name)
    dictionary_dir = volume["dir"] / "dictionaries"
    caplog.set_level(logging.WARNING)
    clear_estimator_cache()
    fitted = model.fit(volume["scheme"], volume["data"], dictionary_size=SIZE,
                       dictionary_dir=dictionary_dir)
    lib_warning = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(lib_warning) == 1 and str(BAD_NAN) in lib_warning[0] \
        and str(BAD_NEGATIVE) in lib_warning[0], lib_warning
    assert not fitted.valid[BAD_NAN] and not fitted.valid[BAD_NEGATIVE]
    expected = _expected_maps(model, fitted)
    for label in expected:  # unusable voxels are NaN, the others fitted
        assert np.isnan(expected[label][BAD_NAN]).all()
        finite = np.isfinite(expected[label][fitted.valid])
        fascicle = label.split("_")[0]
        if fascicle.startswith("fascicle"):  # beyond a voxel's fascicle count: NaN
            absent = expected[f"{fascicle}_fraction"][fitted.valid] == 0
            finite |= absent.reshape(absent.shape + (1,) * (finite.ndim - 1))
        assert finite.all(), label
    assert fitted.valid.sum() == np.prod(SHAPE) - 2

    caplog.clear()
    clear_estimator_cache()  # the volume runner loads its own estimator
    result = fit_volume(model if name == "crossing" else name, volume["dwi"], volume["bval"],
                        volume["bvec"], tmp_path / "out", delta=DELTA, Delta=BIG_DELTA,
                        dictionary_size=SIZE, dictionary_dir=dictionary_dir, chunk_voxels=5)
    vol_warning = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert len(vol_warning) == 1 and str(BAD_NAN) in vol_warning[0], vol_warning
    assert result.n_unusable == 2 and result.n_invalid == 2
    _compare(expected, _read_maps(result), f"{name} fit_volume")


@pytest.mark.parametrize("name", ["noddi", "activeax", "ball_stick_stick"])
def test_cli_and_server_job_give_model_fit_maps(volume, tmp_path, name):
    """``fingerprint fit`` and the server's job runner (the function its worker processes
    run) write the maps ``model.fit`` gives."""
    from server.executor import JobSpec, run_job

    model = get_model(name)
    dictionary_dir = volume["dir"] / "dictionaries"
    fitted = model.fit(volume["scheme"], volume["data"], dictionary_size=SIZE,
                       dictionary_dir=dictionary_dir)
    expected = _expected_maps(model, fitted)

    out = tmp_path / "cli"
    code = cli_main(["fit", "--model", name, "--dwi", str(volume["dwi"]),
                     "--bval", str(volume["bval"]), "--bvec", str(volume["bvec"]),
                     "--out", str(out), "--delta", str(DELTA), "--Delta", str(BIG_DELTA),
                     "--dictionary-size", str(SIZE), "--dictionary-dir", str(dictionary_dir),
                     "--no-progress"])
    assert code == 0
    cli_maps = {}
    for label in expected:
        (path,) = out.glob(f"*_param-{_file_label(label)}_dwimap.nii.gz")
        cli_maps[label] = np.asarray(nib.load(path).dataobj)
    _compare(expected, cli_maps, f"{name} CLI")

    job_dir = tmp_path / "job"
    (job_dir / "inputs").mkdir(parents=True)
    inputs = {}
    for key in ("dwi", "bval", "bvec"):
        target = job_dir / "inputs" / volume[key].name
        target.write_bytes(volume[key].read_bytes())
        inputs[key] = target.name
    spec = JobSpec(job_id="j1", kind="fit", model=name,
                   options={"dictionary_size": SIZE, "delta": DELTA, "Delta": BIG_DELTA},
                   inputs=inputs, job_dir=str(job_dir), db_path=str(tmp_path / "db.sqlite"),
                   dictionary_dir=str(dictionary_dir), threads=1, attempt=1)
    outcome = run_job(spec)
    assert outcome["status"] == "succeeded", outcome
    job_maps = {}
    for label in expected:
        (path,) = (job_dir / "outputs").glob(f"*_param-{_file_label(label)}_dwimap.nii.gz")
        job_maps[label] = np.asarray(nib.load(path).dataobj)
    _compare(expected, job_maps, f"{name} server job")


def test_cli_fit_options_are_validated_by_the_options_object(volume, tmp_path, capsys):
    """`fingerprint fit` flags become one FitOptions; a bad value is an error naming the
    option, before any work."""
    code = cli_main(["fit", "--model", "ball_stick", "--dwi", str(volume["dwi"]),
                     "--bval", str(volume["bval"]), "--bvec", str(volume["bvec"]),
                     "--out", str(tmp_path / "o"), "--n-neighbors", "0", "--no-progress"])
    assert code != 0
    assert "n_neighbors" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_fit_options_validate_once_with_the_option_named():
    from fingerprint.errors import InputError
    from fingerprint.fitting.options import FitOptions, PolishSettings
    from fingerprint.fitting.registry import available_solvers

    assert "fingerprint" in available_solvers()
    opts = FitOptions.from_mapping({"n_jobs": 2, "refine": "NonLinear",
                                    "nonlinear_starts": 5})
    assert opts.threads == 2 and opts.refine == "nonlinear"
    assert opts.polish == PolishSettings(starts=5)
    assert opts.nonlinear_for(1) and FitOptions().nonlinear_for(2)
    assert not FitOptions(refine=False).nonlinear_for(2)
    for values, name in (({"n_neighbors": 0}, "n_neighbors"), ({"refine": "yes!"}, "refine"),
                         ({"solver": "nope"}, "solver"), ({"mask_rule": "x"}, "mask_rule"),
                         ({"dictionary_size": 1.5}, "dictionary_size"),
                         ({"nonlinear_method": "fast"}, "nonlinear_method"),
                         ({"bogus": 1}, "bogus")):
        with pytest.raises(InputError, match=name):
            FitOptions.from_mapping(values)
