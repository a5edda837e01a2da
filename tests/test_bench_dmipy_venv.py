"""``scripts/bench_noddi.ensure_dmipy``: the benchmarks' dmipy venv is used only when dmipy
and its solvers import, and is repaired (a breaking cvxpy removed) or rebuilt otherwise.
Fake interpreters stand in for the venv: nothing is installed."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_noddi  # noqa: E402

#: a venv's python whose dmipy import fails on cvxpy until ``pip uninstall cvxpy`` ran
_CVXPY_BROKEN = """#!/bin/sh
here="$(dirname "$0")"
if [ "$1" = "-c" ]; then
  [ -f "$here/../cvxpy-removed" ] && exit 0
  echo "AttributeError: module 'scipy.sparse' has no attribute 'coo_array' (in cvxpy)" >&2
  exit 1
fi
if [ "$1 $2 $3" = "-m pip uninstall" ]; then touch "$here/../cvxpy-removed"; exit 0; fi
exit 2
"""


def _fake_venv(root: Path, script: str) -> Path:
    python = root / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(script)
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return python


def test_the_probe_imports_dmipy_and_its_solvers():
    for module in ("dmipy.core.modeling_framework", "dmipy.optimizers.brute2fine",
                   "dmipy.optimizers.mix", "dmipy.optimizers_fod.csd_cvxpy"):
        assert module in bench_noddi.DMIPY_PROBE


def test_a_working_venv_is_used_as_is(tmp_path):
    python = _fake_venv(tmp_path / "venv", "#!/bin/sh\nexit 0\n")
    assert bench_noddi.ensure_dmipy(tmp_path / "venv") == (python, "")


def test_a_cvxpy_that_breaks_dmipy_is_removed(tmp_path):
    venv = tmp_path / "venv"
    python = _fake_venv(venv, _CVXPY_BROKEN)
    assert "cvxpy" in bench_noddi.dmipy_problem(python)
    assert bench_noddi.ensure_dmipy(venv) == (python, "")
    assert (venv / "cvxpy-removed").exists()  # repaired in place, not rebuilt
    assert bench_noddi.dmipy_problem(python) is None


def test_a_broken_venv_is_rebuilt(tmp_path, monkeypatch):
    venv = tmp_path / "venv"
    _fake_venv(venv, "#!/bin/sh\necho 'ModuleNotFoundError: numba' >&2\nexit 1\n")
    (venv / "stale").write_text("left by the broken venv")
    calls: list[list[str]] = []
    real_run = subprocess.run

    def run(cmd, **kwargs):
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:  # a fresh venv whose python imports everything
            assert not venv.exists(), "the broken venv must be deleted first"
            _fake_venv(venv, "#!/bin/sh\nexit 0\n")
            return subprocess.CompletedProcess(cmd, 0, "", "")
        if cmd[1:4] == ["-m", "pip", "install"]:
            return subprocess.CompletedProcess(cmd, 0, "", "")
        return real_run(cmd, **kwargs)

    monkeypatch.setattr(bench_noddi.subprocess, "run", run)
    python, reason = bench_noddi.ensure_dmipy(venv)
    assert (python, reason) == (venv / "bin" / "python", "")
    assert not (venv / "stale").exists()
    installs = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    assert any(bench_noddi.DMIPY_PACKAGE in c for c in installs)
    assert any(all(d in c for d in bench_noddi.DMIPY_BINARY_DEPS) for c in installs)
