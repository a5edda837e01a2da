"""Bad input, fed the way users feed it: every case must end in a clear error naming the
file, field or parameter (InputError in the library, one line and exit 2 in the CLI, 422 in
the server) -- never a traceback, a silent success or a job that fails later.

None of these tests builds a dictionary: each error is raised before any fitting work.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fingerprint.cli.main import main
from fingerprint.core.fitted_model import FittedMultiCompartmentModel
from fingerprint.errors import InputError
from fingerprint.fitting.engine import fit_model
from fingerprint.fitting.pipeline import fit_volume, read_fsl_scheme, validate_inputs
from fingerprint.io.nifti import load_mask
from fingerprint.models import get_model
from fingerprint.phantoms import noddi_phantom, write_phantom


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    phantom = noddi_phantom(shape=(3, 3, 2), seed=3, snr=None)
    return write_phantom(phantom, tmp_path_factory.mktemp("phantom"), prefix="sub-01")


@pytest.fixture(scope="module")
def dwi(files) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(files["dwi"])
    return np.asarray(img.dataobj, dtype=np.float64), img.affine


@pytest.fixture(scope="module")
def scheme(files):
    return read_fsl_scheme(files["bval"], files["bvec"])


@pytest.fixture(scope="module")
def ball_stick():
    return get_model("ball_stick")


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def _si_bval(files, tmp_path: Path) -> Path:
    path = tmp_path / "si.bval"
    np.savetxt(path, np.loadtxt(files["bval"])[None] * 1e6, fmt="%g")
    return path


# ---------------------------------------------------------------------------- CLI
def _cli(*argv: object) -> subprocess.CompletedProcess:
    """The real console entry point (logging configured as users see it)."""
    return subprocess.run([sys.executable, "-m", "fingerprint", *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def test_cli_fit_output_under_a_file_is_one_line_before_any_work(files, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    dictionaries = tmp_path / "dicts"
    run = _cli("fit", "--model", "noddi", "--dwi", files["dwi"], "--bval", files["bval"],
               "--bvec", files["bvec"], "--out", blocker / "maps", "--dictionary-dir",
               dictionaries)
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert "output directory" in run.stderr and "is a file" in run.stderr
    assert not dictionaries.exists()  # failed before the dictionary was built


def test_cli_fit_bvals_in_si_units_print_exactly_one_line(files, tmp_path):
    run = _cli("fit", "--model", "noddi", "--dwi", files["dwi"], "--bval",
               _si_bval(files, tmp_path), "--bvec", files["bvec"], "--out", tmp_path / "o")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr  # no extra 'looks like s/m²' warning line
    assert "si.bval" in lines[0] and "s/mm²" in lines[0]


def test_cli_dictionary_build_rejects_bvals_in_si_units(files, tmp_path, capsys):
    code = main(["dictionary", "build", "--model", "noddi", "--bval",
                 str(_si_bval(files, tmp_path)), "--bvec", str(files["bvec"]), "--size", "2000",
                 "--out", str(tmp_path / "d.zarr"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "si.bval" in err and "divide them by 1e6" in err
    assert not (tmp_path / "d.zarr").exists()


def test_cli_fit_empty_bval_file_prints_one_line(files, tmp_path):
    empty = tmp_path / "empty.bval"
    empty.write_text("")
    run = _cli("fit", "--model", "noddi", "--dwi", files["dwi"], "--bval", empty,
               "--bvec", files["bvec"], "--out", tmp_path / "o")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"fingerprint fit: error: bval file {empty} contains no b-values"]


@pytest.mark.parametrize("flags, expected", [
    (["--delta", "10", "--Delta", "30"], "--delta must be in seconds, between 0 and 1; got 10 "
                                         "(milliseconds? 10 ms is 0.01 s)"),
    (["--delta", "0.01", "--Delta", "nan"], "--Delta must be in seconds"),
    (["--TE", "80"], "--TE must be in seconds"),
])
def test_cli_timing_flags_in_milliseconds_or_nan(files, tmp_path, capsys, flags, expected):
    for command in (["fit", "--dwi", str(files["dwi"]), "--out", str(tmp_path / "o")],
                    ["dictionary", "build", "--out", str(tmp_path / "d.zarr")]):
        code = main([*command, "--model", "noddi", "--bval", str(files["bval"]), "--bvec",
                     str(files["bvec"]), "--no-progress", *flags])
        err = capsys.readouterr().err
        assert code == 2 and expected in err, err
    assert not (tmp_path / "o").exists() and not (tmp_path / "d.zarr").exists()


def test_cli_fit_names_a_directory_given_as_a_file(files, tmp_path, capsys):
    code = main(["fit", "--model", "noddi", "--dwi", str(tmp_path), "--bval",
                 str(files["bval"]), "--bvec", str(files["bvec"]), "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"--dwi file {tmp_path} is not a file" in capsys.readouterr().err


@pytest.mark.parametrize("flags, expected", [
    (["--snr", "nan"], "--snr must be positive"),
    (["--seed", "-1"], "--seed must be a non-negative integer"),
    (["--shape", "100000", "100000", "100000"], "too large for a demo phantom"),
    (["--out", "{file}"], "exists and is not a directory"),
    (["--out", "{file}/sub"], "is a file"),
])
def test_cli_demo_bad_options_fail_before_any_work(tmp_path, capsys, flags, expected):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    flags = [f.format(file=blocker) for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(tmp_path / "demo")]
    code = main(["demo", "--no-progress", "--dictionary-dir", str(tmp_path / "dicts"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and expected in err, err
    assert not (tmp_path / "demo").exists() and not (tmp_path / "dicts").exists()


# ---------------------------------------------------------------------------- pipeline
def test_fit_volume_checks_the_output_directory_first(files, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(InputError, match="output directory .* exists and is not a directory"):
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], blocker,
                   dictionary_dir=tmp_path / "dicts")
    with pytest.raises(InputError, match="is a file"):
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], blocker / "a" / "b",
                   dictionary_dir=tmp_path / "dicts")
    assert not (tmp_path / "dicts").exists()


def test_validate_inputs_rejects_a_dwi_without_any_b0_signal(files, dwi, tmp_path):
    data, affine = dwi
    path = _save(tmp_path / "zero_dwi.nii.gz", np.zeros_like(data, dtype=np.float32), affine)
    with pytest.raises(InputError, match=r"zero_dwi\.nii\.gz: no voxel has a positive b=0"):
        validate_inputs(path, files["bval"], files["bvec"])


def test_float64_dwi_beyond_float32_range_is_named_not_reported_as_nan(files, dwi, tmp_path):
    data, affine = dwi
    path = _save(tmp_path / "huge_dwi.nii.gz", data * 1e300, affine)
    with pytest.raises(InputError, match=r"huge_dwi\.nii\.gz holds values up to .*float32"):
        validate_inputs(path, files["bval"], files["bvec"])


def test_nifti_with_the_wrong_compression_suffix_gets_a_hint(files, tmp_path):
    raw = tmp_path / "plain.nii"
    nib.save(nib.load(files["dwi"]), str(raw))
    misnamed = tmp_path / "plain_dwi.nii.gz"
    misnamed.write_bytes(raw.read_bytes())
    with pytest.raises(InputError, match=r"plain_dwi\.nii\.gz .*uncompressed NIfTI: name it "
                                         r"\.nii\)"):
        validate_inputs(misnamed, files["bval"], files["bvec"])
    gz_as_plain = tmp_path / "gz_dwi.nii"
    gz_as_plain.write_bytes(Path(files["dwi"]).read_bytes())
    with pytest.raises(InputError, match=r"gz_dwi\.nii .*gzip-compressed: name it \.nii\.gz"):
        validate_inputs(gz_as_plain, files["bval"], files["bvec"])


def test_mask_with_negative_values_is_rejected(dwi, tmp_path):
    data, affine = dwi
    mask = np.ones(data.shape[:3], dtype=np.float32)
    mask[0, 0, 0] = -1
    path = _save(tmp_path / "mask_neg.nii.gz", mask, affine)
    with pytest.raises(InputError, match=r"mask_neg\.nii\.gz has negative values"):
        load_mask(path, data.shape[:3])
    mask[0, 0, 0] = 0.5  # fractional values are inside (nonzero = inside)
    path = _save(tmp_path / "mask_frac.nii.gz", mask, affine)
    assert load_mask(path, data.shape[:3]).all()


def test_read_fsl_scheme_is_strict_about_units_without_logging_twice(files, tmp_path, caplog):
    with caplog.at_level(logging.WARNING), \
            pytest.raises(InputError, match=r"si\.bval: b-values reach 2e\+09"):
        read_fsl_scheme(_si_bval(files, tmp_path), files["bvec"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ---------------------------------------------------------------------------- model.fit
@pytest.mark.parametrize("bad_scheme", [None, np.zeros(10)])
def test_fit_with_something_else_than_a_scheme(ball_stick, dwi, bad_scheme):
    with pytest.raises(InputError, match="acquisition_scheme must be an AcquisitionScheme"):
        ball_stick.fit(bad_scheme, dwi[0])
    with pytest.raises(InputError, match="acquisition_scheme must be an AcquisitionScheme"):
        ball_stick.simulate_signal(bad_scheme, np.ones(6))


def test_fit_rejects_complex_and_text_data(ball_stick, scheme, dwi):
    with pytest.raises(InputError, match="real-valued .* complex128"):
        ball_stick.fit(scheme, dwi[0].astype(complex))
    with pytest.raises(InputError, match="real-valued"):
        ball_stick.fit(scheme, np.array(["a"] * scheme.number_of_measurements))


def test_fit_rejects_float64_data_beyond_float32(ball_stick, scheme, dwi):
    with pytest.raises(InputError, match="beyond the float32 range"):
        ball_stick.fit(scheme, dwi[0] * 1e300)


def test_fit_rejects_nan_and_empty_masks(ball_stick, scheme, dwi):
    data = dwi[0]
    with pytest.raises(InputError, match="mask contains NaN"):
        ball_stick.fit(scheme, data, mask=np.full(data.shape[:3], np.nan))
    with pytest.raises(InputError, match="mask is empty"):
        ball_stick.fit(scheme, data, mask=np.zeros(data.shape[:3], dtype=bool))


def test_fit_of_all_zero_data_says_there_is_nothing_to_fit(ball_stick, scheme, dwi):
    with pytest.raises(InputError, match="no voxel of data has a positive mean b=0"):
        ball_stick.fit(scheme, np.zeros_like(dwi[0]))


@pytest.mark.parametrize("n_jobs", [0, -1, -3])
def test_fit_rejects_non_positive_n_jobs(ball_stick, scheme, dwi, n_jobs):
    with pytest.raises(InputError, match="option 'n_jobs' must be an integer >= 1"):
        fit_model(ball_stick, scheme, dwi[0], n_jobs=n_jobs)


# ---------------------------------------------------------------------------- fitted model
@pytest.fixture()
def fitted(ball_stick, scheme, dwi):
    """A fitted model built directly (no dictionary): two voxels, parameters at the middle
    of their ranges."""
    vec = ball_stick.parameters_to_parameter_vector(
        G1Ball_1_lambda_iso=2e-9, C1Stick_1_mu=[0.5, 0.5], C1Stick_1_lambda_par=1.7e-9,
        partial_volume_0=0.4, partial_volume_1=0.6)
    return FittedMultiCompartmentModel(ball_stick, scheme, np.tile(vec, (2, 1)),
                                       mask=np.ones(2, dtype=bool), S0=np.ones(2))


def test_unknown_fitted_parameter_is_an_input_error_and_a_key_error(fitted):
    with pytest.raises(InputError, match="'nope' is not a fitted parameter") as info:
        fitted.fitted_parameters["nope"]
    assert isinstance(info.value, KeyError)
    assert "nope" not in fitted.fitted_parameters
    assert fitted.fitted_parameters.get("nope") is None


def test_predict_and_goodness_of_fit_check_shapes(fitted, scheme):
    n = scheme.number_of_measurements
    with pytest.raises(InputError, match="S0 must be a number or an array of the fitted shape"):
        fitted.predict(S0=np.ones(3))
    with pytest.raises(InputError, match=rf"data has shape \(2, {n - 1}\)"):
        fitted.R2_coefficient_of_determination(np.ones((2, n - 1)))
    with pytest.raises(InputError, match="data has shape"):
        fitted.mean_squared_error(np.ones((3, n)))
    assert fitted.predict(S0=2.0).shape == (2, n)


# ---------------------------------------------------------------------------- model API
def test_set_fixed_parameter_values_are_checked(ball_stick, caplog):
    model = ball_stick.copy()
    with pytest.raises(InputError, match="fixed value of G1Ball_1_lambda_iso must be numeric"):
        model.set_fixed_parameter("G1Ball_1_lambda_iso", "3e-9 m2/s")
    with pytest.raises(InputError, match=r"partial_volume_0 must be a volume fraction in \[0, 1\]"):
        model.set_fixed_parameter("partial_volume_0", 1.5)
    with caplog.at_level(logging.WARNING):
        model.set_fixed_parameter("G1Ball_1_lambda_iso", 3.0)  # µm²/ms given as SI
    assert "G1Ball_1_lambda_iso fixed to 3, outside its range" in caplog.text


def test_simulate_signal_with_a_non_numeric_vector(ball_stick, scheme):
    with pytest.raises(InputError, match="parameter vector must be numeric"):
        ball_stick.simulate_signal(scheme, ["a"] * 6)


# ---------------------------------------------------------------------------- server checks
def test_server_rejects_a_timing_model_without_timing_before_queueing():
    pytest.importorskip("fastapi")
    from server.dependencies import ApiError
    from server.validation import check_timing

    with pytest.raises(ApiError) as info:
        check_timing("activeax", {})
    assert info.value.status_code == 422 and info.value.field == "delta"
    assert "'delta' and 'Delta' form fields" in info.value.detail
    check_timing("activeax", {"delta": 0.01, "Delta": 0.03})
    check_timing("noddi", {})


def test_server_dictionary_scheme_in_si_units_is_a_422(files, tmp_path):
    pytest.importorskip("fastapi")
    from server.dependencies import ApiError
    from server.validation import validate_scheme

    with pytest.raises(ApiError) as info:
        validate_scheme({"bval": _si_bval(files, tmp_path), "bvec": Path(files["bvec"])})
    assert info.value.status_code == 422 and info.value.field == "bval"
    assert "'bval'" in info.value.detail and "s/mm²" in info.value.detail


# ---------------------------------------------------------------------------- schemes
def test_swapped_pulse_timing_is_rejected():
    from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues

    b = np.array([0.0, 1e9, 1e9, 2e9])
    g = np.vstack([np.zeros(3), np.eye(3)])
    with pytest.raises(InputError, match="Delta must be at least the pulse duration delta"):
        acquisition_scheme_from_bvalues(b, g, delta=0.03, Delta=0.02)
    assert acquisition_scheme_from_bvalues(b, g, delta=0.02, Delta=0.03).delta is not None


def test_write_bvals_bvecs_needs_a_scheme(tmp_path):
    from fingerprint.io.gradients import write_bvals_bvecs

    with pytest.raises(InputError, match="needs an AcquisitionScheme, got NoneType"):
        write_bvals_bvecs(None, tmp_path / "a.bval", tmp_path / "a.bvec")


def test_a_dictionary_larger_than_the_free_disk_is_refused_before_building(
        files, tmp_path, capsys, monkeypatch):
    import collections

    import fingerprint.fitting.pipeline as pipeline

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**9, 0, 10**6))
    code = main(["dictionary", "build", "--model", "noddi", "--bval", str(files["bval"]),
                 "--bvec", str(files["bvec"]), "--size", "100000", "--dir",
                 str(tmp_path / "dicts"), "--no-progress"])
    assert code == 2
    assert "a dictionary of 100,000 atoms needs about" in capsys.readouterr().err
    with pytest.raises(InputError, match="give a smaller dictionary size"):
        fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path / "maps",
                   dictionary_dir=tmp_path / "dicts", dictionary_size=100_000)
    assert not (tmp_path / "dicts").exists()


def test_the_disk_check_lets_an_existing_dictionary_through(files, tmp_path, monkeypatch):
    import collections

    import fingerprint.fitting.pipeline as pipeline

    dicts = tmp_path / "dicts"
    assert main(["dictionary", "build", "--model", "noddi", "--bval", str(files["bval"]),
                 "--bvec", str(files["bvec"]), "--size", "2000", "--dir", str(dicts),
                 "--no-progress"]) == 0
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda path: usage(10**9, 0, 10))
    assert main(["dictionary", "build", "--model", "noddi", "--bval", str(files["bval"]),
                 "--bvec", str(files["bvec"]), "--size", "2000", "--dir", str(dicts),
                 "--no-progress"]) == 0
    result = fit_volume("noddi", files["dwi"], files["bval"], files["bvec"], tmp_path / "maps",
                        dictionary_dir=dicts, dictionary_size=2000)
    assert result.n_voxels > 0
