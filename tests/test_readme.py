"""The README's examples run as written on the demo's files.

The demo (the README's first command) writes a BIDS-named phantom; the quick start's Python
block and the command-line block are then run, unchanged, in the folder the README names,
and the output names the README promises are checked."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(section: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section headed ``## section``."""
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README has no section {section!r}"
    return re.findall(rf"```{language}\n(.*?)```", match.group(1), re.S)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["FINGERPRINT_PROGRESS"] = "never"
    return env


def _run(args: list[str], cwd: Path, timeout: float = 900) -> str:
    proc = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    first = _blocks("Two commands", "bash")[0]
    command = [line for line in first.splitlines() if "fingerprint demo" in line][0]
    demo = command.split("&&")[-1].split()  # the README's command after the install
    assert demo[:3] == ["python3", "-m", "fingerprint"]
    cwd = tmp_path_factory.mktemp("readme")
    out = _run([sys.executable, *demo[1:], "--no-progress"], cwd)
    assert "first run" not in out or "one-off" in out
    return cwd / "fingerprint-demo"


def test_readme_names_the_demo_files(demo_dir: Path) -> None:
    phantom = demo_dir / "phantom"
    for name in re.findall(r"`(sub-demo_[A-Za-z_-]+\.(?:nii\.gz|bval|bvec))`", README):
        if "model-" not in name:
            assert (phantom / name).is_file(), f"README names {name}; the demo did not write it"


@pytest.mark.slow
def test_readme_quick_start_runs_as_written(demo_dir: Path) -> None:
    (code,) = _blocks("Quick start: a dmipy script, ported", "python")
    out = _run([sys.executable, "-c", code], demo_dir / "phantom")
    r2 = float(out.strip().splitlines()[-1])
    assert 0.5 < r2 <= 1.0


@pytest.mark.slow
def test_readme_command_line_runs_as_written(demo_dir: Path) -> None:
    (code,) = _blocks("Command line", "bash")
    phantom = demo_dir / "phantom"
    script = (f'fingerprint() {{ "{sys.executable}" -m fingerprint "$@"; }}\n'
              "set -euo pipefail\n" + code)
    _run(["bash", "-c", script], phantom)
    maps = phantom / "derivatives" / "fingerprint" / "sub-demo" / "dwi"
    promised = re.search(r"\(`(sub-demo_model-noddi_param-odi_dwimap\.nii\.gz)`", README)
    assert promised and (maps / promised.group(1)).is_file()
    assert (maps / "sub-demo_model-noddi_param-odi_dwimap.json").is_file()
    assert (phantom / "ball_stick.zarr").is_dir()
