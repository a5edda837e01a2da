"""`fingerprint dictionary ...`: builds, listings and one-line errors with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fingerprint.cli.main import main


@pytest.fixture(scope="module")
def hcp(reference_dir):
    schemes = reference_dir / "schemes"
    info = json.loads((schemes / "hcp.json").read_text())
    return {"bval": schemes / "hcp.bval", "bvec": schemes / "hcp.bvec",
            "delta": info["delta_s"][0], "Delta": info["Delta_s"][0]}


def _run(capsys, *argv):
    code = main(["dictionary", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_list_info(capsys, tmp_path, hcp):
    code, out, err = _run(capsys, "build", "--model", "noddi", "--bval", hcp["bval"],
                          "--bvec", hcp["bvec"], "--size", 300, "--seed", 2, "--dir", tmp_path,
                          "--threads", 1)
    assert code == 0, err
    path = Path(out.strip())
    assert path.parent == tmp_path and path.suffix == ".zarr"
    assert "100%" in err  # progress bar on stderr

    code, out, _ = _run(capsys, "build", "--model", "noddi", "--bval", hcp["bval"],
                        "--bvec", hcp["bvec"], "--size", 300, "--seed", 2, "--dir", tmp_path,
                        "--no-progress")
    assert code == 0 and Path(out.strip()) == path  # cache hit

    code, out, _ = _run(capsys, "list", "--dir", tmp_path)
    assert code == 0 and path.name in out and "noddi" in out and "300 atoms" in out
    code, out, _ = _run(capsys, "list", "--dir", tmp_path, "--json")
    entries = json.loads(out)
    assert [e["atoms"] for e in entries] == [300]

    code, out, _ = _run(capsys, "info", path, "--verify")
    assert code == 0 and "SD1WatsonDistributed_1_SD1Watson_1_odi" in out and "verified" in out
    code, out, _ = _run(capsys, "info", path, "--json")
    assert json.loads(out)["name"] == "noddi"


def test_build_to_explicit_path(capsys, tmp_path, hcp):
    out_path = tmp_path / "noddi.zarr"
    code, out, err = _run(capsys, "build", "--model", "noddi", "--bval", hcp["bval"],
                          "--bvec", hcp["bvec"], "--size", 100, "--out", out_path,
                          "--no-progress")
    assert code == 0, err
    assert Path(out.strip()) == out_path and (out_path / "zarr.json").exists()
    code, _, err = _run(capsys, "build", "--model", "noddi", "--bval", hcp["bval"],
                        "--bvec", hcp["bvec"], "--size", 101, "--out", out_path,
                        "--no-progress")
    assert code == 2 and "--force" in err
    code, _, err = _run(capsys, "build", "--model", "noddi", "--bval", hcp["bval"],
                        "--bvec", hcp["bvec"], "--size", 101, "--out", out_path,
                        "--no-progress", "--force")
    assert code == 0, err


def _one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fingerprint dictionary: error:")
    return lines[0]


def test_unknown_model(capsys, hcp):
    code, _, err = _run(capsys, "build", "--model", "nodi", "--bval", hcp["bval"],
                        "--bvec", hcp["bvec"])
    line = _one_line_error(code, err)
    assert "'nodi'" in line and "noddi" in line and "ball_stick" in line


def test_model_needing_timing(capsys, hcp, tmp_path):
    code, _, err = _run(capsys, "build", "--model", "activeax", "--bval", hcp["bval"],
                        "--bvec", hcp["bvec"], "--dir", tmp_path)
    line = _one_line_error(code, err)
    assert "activeax" in line and "--delta" in line


def test_unwritable_output(capsys, hcp, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = _run(capsys, "build", "--model", "noddi", "--bval", hcp["bval"],
                        "--bvec", hcp["bvec"], "--size", 10, "--out", blocker / "d.zarr",
                        "--no-progress")
    line = _one_line_error(code, err)
    assert str(blocker) in line


def test_missing_inputs(capsys, hcp, tmp_path):
    code, _, err = _run(capsys, "build", "--model", "noddi", "--bval", tmp_path / "none.bval",
                        "--bvec", hcp["bvec"])
    assert "none.bval" in _one_line_error(code, err)
    code, _, err = _run(capsys, "build", "--model", "noddi")
    assert "--bval" in _one_line_error(code, err)
    code, _, err = _run(capsys, "build", "--model", "noddi", "--bval", hcp["bval"],
                        "--bvec", hcp["bvec"], "--delta", 0.01)
    assert "--Delta" in _one_line_error(code, err)


def test_info_on_damaged_store(capsys, tmp_path):
    (tmp_path / "x.zarr").mkdir()
    code, _, err = _run(capsys, "info", tmp_path / "x.zarr")
    assert "no zarr.json" in _one_line_error(code, err)


def test_models_listing(capsys):
    code, out, _ = _run(capsys, "models")
    assert code == 0
    names = [line.split()[0] for line in out.strip().splitlines()]
    assert "noddi" in names and "ball_stick" in names
