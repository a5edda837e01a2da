"""The first hour of a new user, timed: a cold first run and a cold first fit.

    python3 scripts/bench_first_run.py [--python VENV/bin/python] [--repeat 2] \\
        [--compare OTHER_CHECKOUT] [--json out.json]

For each checkout (this repository, and ``--compare`` another one, e.g. a previous
release, run with the same interpreter and alternately with this one) and each repetition:

1. **cold demo**: the README's first command without the install,
   ``python3 -m fingerprint demo``, with an empty Numba cache (the checkout's compiled
   kernels are deleted) and an empty dictionary directory;
2. **cold fit**: ``fingerprint fit`` of the demo's volume (1,024 voxels) with its model's
   default dictionary built anew (kernels now cached, as after a first demo); the
   dictionary build time the command logs is reported apart.

Wall, user and system seconds come from ``os.wait4``; on a loaded machine compare the
checkouts within one run, and the CPU seconds rather than the wall time. Use a fresh
virtual environment (``python3 -m venv v && v/bin/pip install -e .``) for ``--python``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _clear_kernels(checkout: Path) -> None:
    for pattern in ("*.nbi", "*.nbc", ".fingerprint-kernels-compiled"):
        for path in (checkout / "fingerprint").rglob(pattern):
            path.unlink()


def _timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[dict[str, float], str]:
    t0 = time.perf_counter()
    with open(cwd / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = (cwd / "log.txt").read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{text}")
    return {"wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2),
            "sys_s": round(usage.ru_stime, 2),
            "load": round(os.getloadavg()[0], 1)}, text


def run(checkout: Path, python: str, work: Path) -> dict[str, object]:
    _clear_kernels(checkout)
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "FINGERPRINT_PROGRESS": "never",
           "FINGERPRINT_DICTIONARY_DIR": str(work / "dictionaries-demo")}
    env.pop("NUMBA_CACHE_DIR", None)
    demo, _ = _timed([python, "-m", "fingerprint", "demo", "--no-progress"], work, env)
    phantom = work / "fingerprint-demo" / "phantom"
    env["FINGERPRINT_DICTIONARY_DIR"] = str(work / "dictionaries-fit")
    fit, text = _timed([python, "-m", "fingerprint", "fit", "--model", "noddi",
                        "--dwi", str(phantom / "sub-demo_dwi.nii.gz"),
                        "--bval", str(phantom / "sub-demo_dwi.bval"),
                        "--bvec", str(phantom / "sub-demo_dwi.bvec"),
                        "--mask", str(phantom / "sub-demo_desc-brain_mask.nii.gz"),
                        "--out", str(work / "fit"), "--no-progress"], work, env)
    build = re.search(r"built dictionary .*?(\d+) atoms in ([0-9.]+) s", text)
    fit["dictionary_atoms"] = int(build.group(1)) if build else None
    fit["dictionary_build_s"] = float(build.group(2)) if build else None
    if build:
        fit["wall_without_build_s"] = round(fit["wall_s"] - float(build.group(2)), 2)
    return {"checkout": str(checkout), "demo": demo, "fit": fit}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable,
                        help="interpreter of a fresh virtual environment (default: this one)")
    parser.add_argument("--compare", type=Path, help="another checkout to time alternately")
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (default 1)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    checkouts = [REPO] + ([args.compare.resolve()] if args.compare else [])
    results = []
    base = Path(tempfile.mkdtemp(prefix="fingerprint-first-run-"))
    try:
        for rep in range(args.repeat):
            for i, checkout in enumerate(checkouts):
                result = run(checkout, args.python, base / f"{rep}-{i}")
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
