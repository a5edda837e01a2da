"""Scheme checks before any fit: the rules of fingerprint.core.scheme_checks and their use
by the library (model.fit), the readers, ``fingerprint check`` and ``fingerprint fit``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fingerprint.cli.main import main
from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
from fingerprint.core.scheme_checks import (
    check_gradient_table,
    check_scheme,
    distinct_directions,
    prepare_scheme,
)
from fingerprint.errors import InputError
from fingerprint.io.gradients import read_bvals_bvecs
from fingerprint.models import get_model


def _dirs(n: int, seed: int = 0) -> np.ndarray:
    d = np.random.default_rng(seed).normal(size=(n, 3))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def _scheme(bvals_s_per_mm2, seed: int = 0, **kw):
    b = np.asarray(bvals_s_per_mm2, dtype=float)
    return acquisition_scheme_from_bvalues(b * 1e6, _dirs(b.size, seed), **kw)


def _codes(report, level=None):
    return {f.code for f in report.findings if level is None or f.level == level}


SINGLE = np.r_[0, 0, 995 + 10 * np.random.default_rng(3).random(64)]
TWO = np.r_[0, 0, np.repeat([1000.0, 2000.0], 32)]


def test_jittered_shell_is_one_shell_with_its_spread_reported():
    report = check_scheme(_scheme(SINGLE))
    dwi = [s for s in report.shells if not s.b0]
    assert len(dwi) == 1
    assert dwi[0].b_min == pytest.approx(SINGLE[2:].min() * 1e6)
    assert dwi[0].b_max == pytest.approx(SINGLE[2:].max() * 1e6)
    assert dwi[0].n_directions == 64
    assert "995" in report.text() and report.verdict == "ok"
    assert "shell-spread" not in _codes(report)  # 1% spread is within tolerance


def test_shell_mixing_distant_bvalues_is_reported():
    report = check_scheme(_scheme(np.r_[0, np.repeat([60.0, 110.0], 20), [1000] * 30]))
    assert "shell-spread" in _codes(report, "warn")
    assert "60-110 s/mm²" in report.text()


@pytest.mark.parametrize(("model", "bvals", "code"), [
    ("noddi", SINGLE, "single-shell"),
    ("smt_noddi", SINGLE, "single-shell"),
    ("activeax", TWO, "timing"),
    ("noddi", np.r_[0, [1000.0] * 2, [2000.0] * 2], "directions"),
])
def test_models_are_refused_where_the_scheme_cannot_support_them(model, bvals, code):
    report = check_scheme(_scheme(bvals), get_model(model), model_name=model)
    assert code in _codes(report, "refuse"), report.text()
    assert report.verdict == "refused"
    with pytest.raises(InputError, match=model):
        report.raise_if_refused()


def test_matters_of_degree_are_warnings():
    report = check_scheme(_scheme(SINGLE), get_model("ball_stick"), model_name="ball_stick")
    assert report.ok and _codes(report, "warn") == {"single-shell"}
    few = _scheme(np.r_[0, [1000.0] * 6, [2000.0] * 6])
    report = check_scheme(few, get_model("noddi"))
    assert report.ok and "directions" in _codes(report, "warn")
    low = _scheme(np.r_[0, [200.0] * 30, [400.0] * 30])
    assert "low-bmax" in _codes(check_scheme(low, get_model("noddi")), "warn")
    assert check_scheme(_scheme(TWO), get_model("noddi")).verdict == "ok"


def test_bvalues_in_the_wrong_unit_and_missing_b0():
    wrong = acquisition_scheme_from_bvalues(np.r_[0, [1000.0] * 30], _dirs(31))
    assert "units" in _codes(check_scheme(wrong, get_model("noddi")), "refuse")
    report = check_scheme(_scheme(np.r_[15, 15, [1000.0] * 30, [2000.0] * 30]))
    refusal = report.refusals[0]
    assert refusal.code == "no-b0"
    assert "lowest b-value is 15 s/mm²" in refusal.message
    assert "--b0-threshold 15" in refusal.message
    # the suggested threshold makes it fit, with a note about the low-b measurements
    scheme, report = prepare_scheme(_scheme(np.r_[15, 15, [1000.0] * 30, [2000.0] * 30]),
                                    get_model("noddi"), b0_threshold=15e6)
    assert scheme.number_of_b0s == 2 and "low-b" in _codes(report, "note")
    assert "only-b0" in _codes(check_scheme(_scheme([0, 5, 0])), "refuse")


def test_raw_gradient_tables():
    b = np.array([0, 0, 5e6, 1e9, 1e9, 1e9])
    v = np.array([[np.nan] * 3, [0, 0, 0], [0, 0, 0], [2, 0, 0], [0, 1, 0], [0, 0, 1]])
    codes = {f.code: f.level for f in check_gradient_table(b, v)}
    assert codes == {"bvec-nan-b0": "note", "bvec-zero-low-b": "note", "bvec-norm": "note"}
    v[4] = 0.0
    v[5] = np.nan
    codes = {f.code: f.level for f in check_gradient_table(b, v)}
    assert codes["bvec-zero"] == "refuse" and codes["bvec-nan"] == "refuse"


def test_distinct_directions_merges_antipodes():
    d = _dirs(10)
    assert distinct_directions(np.vstack([d, -d, np.zeros((2, 3))])) == 10


def _write_fsl(tmp: Path, name: str, b, v) -> tuple[Path, Path]:
    bval, bvec = tmp / f"{name}.bval", tmp / f"{name}.bvec"
    bval.write_text(" ".join(f"{x:g}" for x in b) + "\n")
    bvec.write_text("\n".join(" ".join(f"{x:g}" for x in row) for row in np.asarray(v).T) + "\n")
    return bval, bvec


def test_reader_accepts_nan_direction_of_b0(tmp_path):
    v = _dirs(SINGLE.size)
    v[:2] = np.nan
    scheme = read_bvals_bvecs(*_write_fsl(tmp_path, "s", SINGLE, v))
    np.testing.assert_array_equal(scheme.gradient_directions[:2], 0.0)
    v[5] = np.nan
    with pytest.raises(InputError, match="measurement 5 has b = .* non-finite"):
        read_bvals_bvecs(*_write_fsl(tmp_path, "t", SINGLE, v))


def test_library_fit_refuses_with_the_reason():
    model = get_model("noddi")
    scheme = _scheme(SINGLE)
    data = np.ones((2, SINGLE.size))
    with pytest.raises(InputError, match="model.fit: noddi|model.fit: .*2 diffusion-weighted"):
        model.fit(scheme, data)
    nob0 = _scheme(np.r_[15, 15, [1000.0] * 30, [2000.0] * 30])
    with pytest.raises(InputError, match="b0_threshold"):
        model.fit(nob0, np.ones((2, 62)))


def test_cli_check_prints_summary_and_verdict(tmp_path, capsys):
    v = _dirs(SINGLE.size)
    v[0] = np.nan
    bval, bvec = _write_fsl(tmp_path, "single", SINGLE, v)
    code = main(["check", "--model", "noddi", "--bval", str(bval), "--bvec", str(bvec)])
    out = capsys.readouterr().out
    assert code == 1
    assert "verdict for noddi: refused" in out and "2 diffusion-weighted shells" in out
    assert "NaN gradient vectors" in out  # the note about the b=0 direction
    code = main(["check", "--model", "ball_stick", "--bval", str(bval), "--bvec", str(bvec),
                 "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0 and report["verdict"] == "fit with warnings"
    assert report["shells"][1]["b_min_s_per_mm2"] == pytest.approx(SINGLE[2:].min())

    dsi = np.r_[15, 15, [1000.0] * 32, [2000.0] * 32]
    bval, bvec = _write_fsl(tmp_path, "dsi", dsi, _dirs(dsi.size))
    assert main(["check", "--model", "noddi", "--bval", str(bval), "--bvec", str(bvec)]) == 1
    assert "--b0-threshold 15" in capsys.readouterr().out
    assert main(["check", "--model", "noddi", "--bval", str(bval), "--bvec", str(bvec),
                 "--b0-threshold", "15"]) == 0
    assert "verdict for noddi: ok" in capsys.readouterr().out


def test_study_runs_use_the_same_checks():
    from fingerprint.batch.checks import check_model, summarise_scheme
    from fingerprint.batch.runner import StudyOptions

    scheme = _scheme(SINGLE)
    verdict = check_model("noddi", summarise_scheme(scheme), scheme)
    assert verdict.status == "skip"
    assert any("2 diffusion-weighted shells" in r for r in verdict.reasons)
    assert check_model("noddi", summarise_scheme(_scheme(TWO)), _scheme(TWO)).status == "run"
    # the study's b0_threshold reaches the fit options (s/m²)
    assert StudyOptions(models=("noddi",), b0_threshold=15e6).fit_options().b0_threshold \
        == 15e6
