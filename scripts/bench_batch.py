"""Benchmark whole-study runs: a synthetic 10-subject study end to end.

The study (:func:`fingerprint.batch.synthetic.write_study`) alternates two acquisition
schemes, so two dictionaries per model are needed whatever the number of subjects. Each
configuration runs in a fresh subprocess, into a fresh output directory and a fresh
dictionary directory (so every run builds its dictionaries):

* ``loop``   -- the single-series command, ``fingerprint fit``, once per series (the
  peer: what a lab script does without ``fingerprint bids``);
* ``local``  -- ``fingerprint bids`` with ``--workers N`` processes;
* ``dask``   -- ``fingerprint bids --dask-scheduler`` on a Dask ``LocalCluster`` of N
  single-threaded worker processes started by this script.

Reported: wall time, time per subject, and the share of worker time spent finding or
building dictionaries (from the run's totals).

    python3 scripts/bench_batch.py                    # 10 subjects of 12x12x8 voxels
    python3 scripts/bench_batch.py --subjects 10 --workers 2 --size 20000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT)}


def _bids(study: Path, out: Path, dicts: Path, args: argparse.Namespace,
          extra: list[str]) -> dict:
    argv = [sys.executable, "-m", "fingerprint", "bids", str(study), str(out), "participant",
            "--model", args.model, "--dictionary-size", str(args.size), "--dictionary-dir",
            str(dicts), "--no-progress", "--no-qc", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fingerprint bids failed:\n{proc.stdout}\n{proc.stderr}")
    m = re.search(r"(\d+) dictionaries found or built in ([\d.]+) s; fits ([\d.]+) s", proc.stdout)
    assert m, proc.stdout
    dict_s, fit_s = float(m.group(2)), float(m.group(3))
    return {"wall_s": round(wall, 2), "dictionaries": int(m.group(1)),
            "dictionary_s": dict_s, "fit_s": fit_s,
            "dictionary_share": round(dict_s / max(dict_s + fit_s, 1e-9), 3)}


def _loop(study: Path, out: Path, dicts: Path, args: argparse.Namespace) -> dict:
    from fingerprint.batch.layout import find_series
    from fingerprint.batch.runner import _fsl_files

    series, _ = find_series(study)
    t0 = time.perf_counter()
    for s in series:
        meta = s.metadata()
        timing = []
        if "DiffusionGradientDuration" in meta:
            timing = ["--delta", str(meta["DiffusionGradientDuration"]),
                      "--Delta", str(meta["DiffusionGradientSeparation"])]
        with _fsl_files(str(s.dwi), str(s.bval), str(s.bvec), None) as (dwi, bval, bvec):
            argv = [sys.executable, "-m", "fingerprint", "fit", "--model", args.model,
                    "--dwi", dwi, "--bval", bval, "--bvec", bvec,
                    "--out", str(out / s.relative_dir), "--dictionary-size", str(args.size),
                    "--dictionary-dir", str(dicts), "--no-progress",
                    "--threads", str(args.threads), *timing]
            subprocess.run(argv, env=_env(), check=True, capture_output=True)
    return {"wall_s": round(time.perf_counter() - t0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=10)
    parser.add_argument("--shape", type=int, nargs=3, default=(12, 12, 8))
    parser.add_argument("--model", default="noddi")
    parser.add_argument("--size", type=int, default=20000, help="dictionary atoms")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads per series")
    parser.add_argument("--only", nargs="+", choices=["loop", "local", "dask"],
                        default=["loop", "local", "dask"])
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    from fingerprint.batch.synthetic import write_study

    results: dict = {"subjects": args.subjects, "shape": list(args.shape),
                     "model": args.model, "size": args.size, "workers": args.workers,
                     "threads": args.threads, "cpus": os.cpu_count(),
                     "machine": platform.platform(), "python": platform.python_version(),
                     "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory(prefix="fp-bench-batch-") as tmp:
        tmp = Path(tmp)
        study = tmp / "study"
        write_study(study, subjects=args.subjects, shape=tuple(args.shape), mif=False)
        # warm the Numba caches once, outside the timings
        _bids(study, tmp / "warm", tmp / "warm-dicts", argparse.Namespace(
            model=args.model, size=256), ["--participant-label", "01", "02", "--threads", "1"])
        for name in args.only:
            out, dicts = tmp / f"out-{name}", tmp / f"dicts-{name}"
            if name == "loop":
                res = _loop(study, out, dicts, args)
            elif name == "local":
                res = _bids(study, out, dicts, args, ["--workers", str(args.workers),
                                                      "--threads", str(args.threads)])
            else:
                from distributed import LocalCluster

                with LocalCluster(n_workers=args.workers, threads_per_worker=1,
                                  processes=True, dashboard_address=None) as cluster:
                    res = _bids(study, out, dicts, args,
                                ["--dask-scheduler", cluster.scheduler_address,
                                 "--threads", str(args.threads)])
            res["per_subject_s"] = round(res["wall_s"] / args.subjects, 2)
            results[name] = res
            print(name, json.dumps(res), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
