"""Gradient-table I/O: FSL bval/bvec, Camino .scheme, MRtrix -grad; round trips and errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from fingerprint.core.acquisition_scheme import (
    AcquisitionScheme,
    acquisition_scheme_from_bvalues,
)
from fingerprint.errors import InputError
from fingerprint.io.gradients import (
    read_bvals_bvecs,
    read_camino_scheme,
    read_mrtrix_grad,
    write_bvals_bvecs,
    write_camino_scheme,
    write_mrtrix_grad,
)


def _json(reference_dir: Path, name: str) -> dict:
    return json.loads((reference_dir / "schemes" / f"{name}.json").read_text())


def _scheme_from_json(data: dict, timing: bool = True, TE=None) -> AcquisitionScheme:
    kwargs = {"delta": np.asarray(data["delta_s"]), "Delta": np.asarray(data["Delta_s"])} \
        if timing else {}
    return acquisition_scheme_from_bvalues(np.asarray(data["bvalues_s_per_m2"]),
                                           np.asarray(data["gradient_directions"]),
                                           TE=TE, **kwargs)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture
def fsl_pair(tmp_path: Path) -> tuple[Path, Path]:
    bval = _write(tmp_path / "dwi.bval", "0 1000 2000 5\n")
    bvec = _write(tmp_path / "dwi.bvec", "0 1 0 0.3\n0 0 0.6 0\n0 0 0.8 0\n")
    return bval, bvec


# --------------------------------------------------------------------------- FSL reading
@pytest.mark.parametrize("name", ["hcp", "activeax"])
def test_reference_fsl_files(reference_dir: Path, name: str) -> None:
    data = _json(reference_dir, name)
    d = reference_dir / "schemes"
    scheme = read_bvals_bvecs(d / f"{name}.bval", d / f"{name}.bvec",
                              delta=np.asarray(data["delta_s"]),
                              Delta=np.asarray(data["Delta_s"]))
    np.testing.assert_array_equal(scheme.shell_indices, data["shell_indices"])
    np.testing.assert_allclose(scheme.shell_bvalues, data["shell_bvalues_s_per_m2"], rtol=1e-5)
    np.testing.assert_allclose(scheme.bvalues, data["bvalues_s_per_m2"], rtol=1e-5)
    ref_dirs = np.asarray(data["gradient_directions"])
    dwi = ~scheme.b0_mask
    np.testing.assert_allclose(scheme.gradient_directions[dwi], ref_dirs[dwi], atol=1e-5)
    np.testing.assert_array_equal(scheme.gradient_directions[scheme.bvalues == 0], 0.0)
    # the same scheme, whichever way it was given
    assert scheme.hash == _scheme_from_json(data).hash


def test_fsl_basic_units_and_normalisation(fsl_pair: tuple[Path, Path]) -> None:
    s = read_bvals_bvecs(*fsl_pair)
    np.testing.assert_array_equal(s.bvalues, [0, 1e9, 2e9, 5e6])
    np.testing.assert_array_equal(s.b0_mask, [True, False, False, True])
    # the b = 5 s/mm² measurement normalises S0 but keeps its (normalised) direction
    np.testing.assert_allclose(s.gradient_directions,
                               [[0, 0, 0], [1, 0, 0], [0, 0.6, 0.8], [1, 0, 0]])
    assert s.delta is None and s.qvalues is None


def test_fsl_layouts_are_equivalent(tmp_path: Path, fsl_pair: tuple[Path, Path]) -> None:
    ref = read_bvals_bvecs(*fsl_pair)
    column = _write(tmp_path / "col.bval", "0\n1000\n2000\n5\n")
    nx3 = _write(tmp_path / "nx3.bvec", "0 0 0\n1 0 0\n0 0.6 0.8\n0.3 0 0\n")
    tabs = _write(tmp_path / "tabs.bvec", "# comment\n0\t1\t0\t0.3\n0 0 1.2 0\r\n0 0 1.6 0\n")
    assert read_bvals_bvecs(column, nx3).hash == ref.hash
    assert read_bvals_bvecs(fsl_pair[0], tabs).hash == ref.hash  # un-normalised vector


def test_fsl_three_measurements_prefers_3xN(tmp_path: Path) -> None:
    bval = _write(tmp_path / "a.bval", "1000 1000 1000")
    bvec = _write(tmp_path / "a.bvec", "1 0 0\n0 1 0\n0 0 1\n")
    s = read_bvals_bvecs(bval, bvec)
    np.testing.assert_array_equal(s.gradient_directions, np.eye(3))
    # an N x 3 table of 3 vectors is read as 3 x N (FSL's layout): here that gives zero
    # vectors, which is reported rather than silently re-interpreted
    bvec = _write(tmp_path / "b.bvec", "1 0 0\n1 0 0\n1 0 0\n")
    with pytest.raises(InputError, match="zero gradient vector"):
        read_bvals_bvecs(bval, bvec)


def test_fsl_timing_and_scheme_kwargs(fsl_pair: tuple[Path, Path]) -> None:
    s = read_bvals_bvecs(*fsl_pair, delta=0.0106, Delta=0.0431, TE=0.089,
                         b0_threshold=1e6, min_b_shell_distance=100e6)
    assert s.b0_threshold == 1e6 and s.min_b_shell_distance == 100e6
    np.testing.assert_array_equal(s.b0_mask, [True, False, False, False])
    np.testing.assert_allclose(s.gradient_directions[3], [1, 0, 0])
    np.testing.assert_array_equal(s.TE, np.full(4, 0.089))
    assert s.qvalues is not None and s.qvalues[0] == 0
    with pytest.raises(TypeError, match="unexpected keyword"):
        read_bvals_bvecs(*fsl_pair, bthreshold=1)


def test_fsl_accepts_str_paths(fsl_pair: tuple[Path, Path]) -> None:
    assert read_bvals_bvecs(str(fsl_pair[0]), str(fsl_pair[1])).number_of_measurements == 4


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["hcp", "activeax"])
def test_hash_equal_across_formats(reference_dir: Path, tmp_path: Path, name: str) -> None:
    data = _json(reference_dir, name)
    scheme = _scheme_from_json(data)
    delta, Delta = np.asarray(data["delta_s"]), np.asarray(data["Delta_s"])

    write_bvals_bvecs(scheme, tmp_path / "x.bval", tmp_path / "x.bvec")
    fsl = read_bvals_bvecs(tmp_path / "x.bval", tmp_path / "x.bvec", delta=delta, Delta=Delta)
    write_camino_scheme(scheme, tmp_path / "x.scheme")
    assert "VERSION: STEJSKALTANNER" in (tmp_path / "x.scheme").read_text()
    camino = read_camino_scheme(tmp_path / "x.scheme")
    write_mrtrix_grad(scheme, tmp_path / "x.b")
    mrtrix = read_mrtrix_grad(tmp_path / "x.b", delta=delta, Delta=Delta)

    for other in (fsl, camino, mrtrix):
        assert other.hash == scheme.hash
        np.testing.assert_array_equal(other.shell_indices, scheme.shell_indices)
        np.testing.assert_allclose(other.bvalues, scheme.bvalues, rtol=1e-12, atol=1e-3)
        np.testing.assert_allclose(other.gradient_directions, scheme.gradient_directions,
                                   atol=1e-12)
        np.testing.assert_allclose(other.qvalues, scheme.qvalues, rtol=1e-12)
        np.testing.assert_allclose(other.gradient_strengths, scheme.gradient_strengths,
                                   rtol=1e-12)
    assert camino.TE is None  # unknown TE is written as zeros and read back as unknown


def test_round_trip_without_timing(reference_dir: Path, tmp_path: Path) -> None:
    scheme = _scheme_from_json(_json(reference_dir, "hcp"), timing=False)
    write_camino_scheme(scheme, tmp_path / "x.scheme")
    assert "VERSION: BVECTOR" in (tmp_path / "x.scheme").read_text()
    write_bvals_bvecs(scheme, tmp_path / "x.bval", tmp_path / "x.bvec")
    write_mrtrix_grad(scheme, tmp_path / "x.b")
    for other in (read_camino_scheme(tmp_path / "x.scheme"),
                  read_bvals_bvecs(tmp_path / "x.bval", tmp_path / "x.bvec"),
                  read_mrtrix_grad(tmp_path / "x.b")):
        assert other.hash == scheme.hash and other.delta is None
    with pytest.raises(InputError, match="no pulse timing"):
        write_camino_scheme(scheme, tmp_path / "y.scheme", version="STEJSKALTANNER")


def test_camino_bvector_of_a_timed_scheme_and_te(tmp_path: Path) -> None:
    b = np.array([0, 1000e6, 2000e6])
    dirs = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0.0]])
    scheme = acquisition_scheme_from_bvalues(b, dirs, delta=0.01, Delta=0.03, TE=0.07)
    write_camino_scheme(scheme, tmp_path / "te.scheme")
    back = read_camino_scheme(tmp_path / "te.scheme")
    assert back.hash == scheme.hash
    np.testing.assert_allclose(back.TE, 0.07)
    scheme.to_schemefile(tmp_path / "dmipy.scheme")
    assert read_camino_scheme(tmp_path / "dmipy.scheme").hash == scheme.hash
    write_camino_scheme(scheme, tmp_path / "bvec.scheme", version="bvector")
    back = read_camino_scheme(tmp_path / "bvec.scheme")
    assert back.delta is None
    np.testing.assert_allclose(back.bvalues, b)
    with pytest.raises(InputError, match="unknown Camino scheme version"):
        write_camino_scheme(scheme, tmp_path / "z.scheme", version="DTI")


def test_written_fsl_files_layout(tmp_path: Path) -> None:
    scheme = acquisition_scheme_from_bvalues(np.array([0, 1000e6, 2500.5e6]),
                                             np.array([[0, 0, 0], [1, 0, 0], [0, 0, 1.0]]))
    write_bvals_bvecs(scheme, tmp_path / "a.bval", tmp_path / "a.bvec")
    assert (tmp_path / "a.bval").read_text().split() == ["0", "1000", "2500.5"]
    rows = (tmp_path / "a.bvec").read_text().splitlines()
    assert [r.split() for r in rows] == [["0", "1", "0"], ["0", "0", "0"], ["0", "0", "1"]]


# --------------------------------------------------------------------------- Camino reading
def test_camino_stejskal_tanner(tmp_path: Path) -> None:
    path = _write(tmp_path / "st.scheme",
                  "# comment line\nVERSION: STEJSKALTANNER\n"
                  "0 0 0 0 0.03 0.01 0.07\n"
                  "1 0 0 0.05 0.03 0.01 0.07\n"
                  "0 0 2 0.05 0.03 0.01 0.07\n")
    s = read_camino_scheme(path)
    np.testing.assert_allclose(s.gradient_strengths, [0, 0.05, 0.05])
    np.testing.assert_allclose(s.delta, 0.01)
    np.testing.assert_allclose(s.Delta, 0.03)
    np.testing.assert_allclose(s.TE, 0.07)
    np.testing.assert_allclose(s.gradient_directions, [[0, 0, 0], [1, 0, 0], [0, 0, 1]])
    assert s.bvalues[1] == pytest.approx(s.bvalues[2]) and s.bvalues[1] > 1e8


def test_camino_bvector_and_version_aliases(tmp_path: Path) -> None:
    text = "0 0 0 0\n0.6 0.8 0 1E9\n0 0 1 2e9\n"
    a = read_camino_scheme(_write(tmp_path / "a.scheme", "VERSION: BVECTOR\n" + text))
    b = read_camino_scheme(_write(tmp_path / "b.scheme", "VERSION: 1\n" + text))
    c = read_camino_scheme(_write(tmp_path / "c.scheme", text))  # inferred from 4 columns
    assert a.hash == b.hash == c.hash
    np.testing.assert_array_equal(a.bvalues, [0, 1e9, 2e9])
    s = read_camino_scheme(_write(tmp_path / "d.scheme", "VERSION: BVECTOR\n" + text),
                           b0_threshold=0.0, min_b_shell_distance=1e6)
    assert s.b0_threshold == 0.0 and s.min_b_shell_distance == 1e6


# --------------------------------------------------------------------------- MRtrix reading
def test_mrtrix_grad(tmp_path: Path, fsl_pair: tuple[Path, Path]) -> None:
    path = _write(tmp_path / "grad.b",
                  "# command_history: something\n0 0 0 0\n1 0 0 1000\n0 0.6 0.8 2000\n"
                  "0.3 0 0 5\n")
    s = read_mrtrix_grad(path, delta=0.01, Delta=0.03)
    assert s.hash == read_bvals_bvecs(*fsl_pair, delta=0.01, Delta=0.03).hash
    assert read_mrtrix_grad(path, b0_threshold=1e6).b0_mask.sum() == 1
    with pytest.raises(TypeError, match="unexpected keyword"):
        read_mrtrix_grad(path, threshold=1)


# --------------------------------------------------------------------------- warnings
def test_wrong_unit_warnings(tmp_path: Path, fsl_pair: tuple[Path, Path], caplog) -> None:
    bval = _write(tmp_path / "si.bval", "0 1e9 2e9 5e6")
    with caplog.at_level(logging.WARNING):
        read_bvals_bvecs(bval, fsl_pair[1])
    assert "look like s/m²" in caplog.text and "si.bval" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_camino_scheme(_write(tmp_path / "mm.scheme",
                                  "VERSION: BVECTOR\n0 0 0 0\n1 0 0 1000\n"))
    assert "look like s/mm²" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_mrtrix_grad(_write(tmp_path / "si.b", "0 0 0 0\n1 0 0 1e9\n"))
    assert "look like s/m²" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        read_bvals_bvecs(*fsl_pair)
    assert caplog.text == ""


# --------------------------------------------------------------------------- errors
BVEC_OK = "0 1 0 0.3\n0 0 0.6 0\n0 0 0.8 0\n"


@pytest.mark.parametrize(
    ("bval", "bvec", "match", "culprit"),
    [
        ("0 1000 2000", BVEC_OK, "has 4 vectors but bval file .* has 3", "bvec"),
        ("0 1000 2000 5 7", BVEC_OK, "has 4 vectors but bval file .* has 5", "bvec"),
        ("0 1000 nan 5", BVEC_OK, "non-finite", "bval"),
        ("0 1000 inf 5", BVEC_OK, "non-finite", "bval"),
        ("0 -1000 2000 5", BVEC_OK, "zero or positive; -1000 at measurement 1", "bval"),
        ("0 1000 abc 5", BVEC_OK, "line 1: expected numbers", "bval"),
        ("", BVEC_OK, "contains no b-values", "bval"),
        ("# only a comment\n", BVEC_OK, "contains no b-values", "bval"),
        ("0 1000\n2000 5\n", BVEC_OK, "one row of b-values", "bval"),
        ("0 1000 2000 5", "0 1 0 0\n0 0 0 0\n", "3 rows .* found 2 rows of 4", "bvec"),
        ("0 1000 2000 5", "0 1\n0 0\n1 0\n0 1\n", "3 rows .* found 4 rows of 2", "bvec"),
        ("0 1000 2000 5", "0 1 0 0\n0 0 0.6\n0 0 0.8 0\n", "line 2: 3 values where", "bvec"),
        ("0 1000 2000 5", "0 1 0 0\n0 0 nan 0\n0 0 0.8 0\n", "non-finite", "bvec"),
        ("0 1000 2000 5", "0 1 0 0\n0 0 0 0\n0 0 0 0\n", "measurement 2 has b = 2000 s/mm² but a "
         "zero gradient vector", "bvec"),
        ("0 1000 2000 5", "", "contains no numbers", "bvec"),
        ("0 1000 2000 5", "x y z", "expected numbers", "bvec"),
    ],
)
def test_fsl_errors(tmp_path: Path, bval: str, bvec: str, match: str, culprit: str) -> None:
    bval_path = _write(tmp_path / "sub.bval", bval)
    bvec_path = _write(tmp_path / "sub.bvec", bvec)
    with pytest.raises(InputError, match=match) as info:
        read_bvals_bvecs(bval_path, bvec_path)
    assert str(bval_path if culprit == "bval" else bvec_path) in str(info.value)


def test_fsl_missing_and_unreadable_files(tmp_path: Path, fsl_pair: tuple[Path, Path]) -> None:
    bval, bvec = fsl_pair
    missing = tmp_path / "missing.bval"
    with pytest.raises(InputError, match=f"bval file {missing} does not exist"):
        read_bvals_bvecs(missing, bvec)
    with pytest.raises(InputError, match="bvec file .*nope.bvec does not exist"):
        read_bvals_bvecs(bval, tmp_path / "nope.bvec")
    with pytest.raises(InputError, match="is not a regular file"):
        read_bvals_bvecs(tmp_path, bvec)
    binary = tmp_path / "binary.bvec"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(InputError, match="binary.bvec is not a text file"):
        read_bvals_bvecs(bval, binary)


def test_fsl_bad_timing_names_the_files(fsl_pair: tuple[Path, Path]) -> None:
    with pytest.raises(InputError, match=r"dwi\.bval / .*dwi\.bvec: delta has 2 values"):
        read_bvals_bvecs(*fsl_pair, delta=np.array([0.01, 0.01]), Delta=0.03)
    with pytest.raises(InputError, match="Delta - delta/3"):
        read_bvals_bvecs(*fsl_pair, delta=0.03, Delta=0.001)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("VERSION: DTI\n0 0 0 0\n", "unsupported 'VERSION: DTI'"),
        ("VERSION: BVECTOR\n0 0 0 0 1\n", "needs 4 columns .* found 5"),
        ("VERSION: STEJSKALTANNER\n0 0 0 0\n", "needs 7 columns .* found 4"),
        ("0 0 0 0 1\n", "no VERSION line and 5 columns"),
        ("VERSION: BVECTOR\n0 0 0 0\n1 0 0 -1e9\n", "zero or positive; -1e\\+09 at measurement 1"),
        ("VERSION: BVECTOR\n0 0 0 0\n0 0 0 1e9\n", "measurement 1 has b = 1000 s/mm² but a zero"),
        ("VERSION: BVECTOR\n0 0 0 0\n1 0 0 nan\n", "non-finite"),
        ("VERSION: STEJSKALTANNER\n1 0 0 -0.05 0.03 0.01 0\n", "\\|G\\| must be zero or positive"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.05 0.002 0.01 0\n", "Delta - delta/3"),
        ("VERSION: STEJSKALTANNER\n1 0 0 0.05 0.03 0.01 -1\n", "TE must be zero or positive"),
        ("VERSION: BVECTOR\n", "contains no numbers"),
        ("VERSION: BVECTOR\n0 0 0 zero\n", "line 2: expected numbers"),
    ],
)
def test_camino_errors(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path / "bad.scheme", text)
    with pytest.raises(InputError, match=match) as info:
        read_camino_scheme(path)
    assert str(path) in str(info.value)


def test_camino_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="Camino scheme file .*none.scheme does not exist"):
        read_camino_scheme(tmp_path / "none.scheme")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("0 0 0\n1 0 0\n", "must have 4 columns .* found 3"),
        ("0 0 0 0\n1 0 0 -1000\n", "zero or positive; -1000 at measurement 1"),
        ("0 0 0 0\n0 0 0 1000\n", "zero gradient vector"),
        ("0 0 0 0\n1 0 0 nan\n", "non-finite"),
        ("0 0 0 0\n1 0 0\n", "line 2: 3 values where the first line has 4"),
    ],
)
def test_mrtrix_errors(tmp_path: Path, text: str, match: str) -> None:
    path = _write(tmp_path / "bad.b", text)
    with pytest.raises(InputError, match=match) as info:
        read_mrtrix_grad(path)
    assert str(path) in str(info.value)
    with pytest.raises(InputError, match="does not exist"):
        read_mrtrix_grad(tmp_path / "none.b")
