"""Benchmark dictionary builds: wall time and peak memory per dictionary size.

Each size is built in a fresh subprocess (so peak RSS is that build's alone), after a
tiny warm-up build in the same process (Numba compilation / cache load), into a
temporary directory that is removed afterwards.

    python3 scripts/bench_dictionary.py                       # NODDI, HCP, 1e5 atoms
    python3 scripts/bench_dictionary.py --sizes 100000 1000000 --threads 2
    python3 scripts/bench_dictionary.py --bval dwi.bval --bvec dwi.bvec --model ball_stick

The HCP scheme defaults to the reference test data (``tests/data/reference``, or
``$FINGERPRINT_REFERENCE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _reference_scheme() -> tuple[Path, Path, float, float]:
    default = REPO_ROOT / "tests" / "data" / "reference"
    ref = Path(os.environ.get("FINGERPRINT_REFERENCE_DIR", default))
    info = json.loads((ref / "schemes" / "hcp.json").read_text())
    return (ref / "schemes" / "hcp.bval", ref / "schemes" / "hcp.bvec",
            float(info["delta_s"][0]), float(info["Delta_s"][0]))


def child(args: argparse.Namespace) -> None:
    from fingerprint.dictionary import build_dictionary
    from fingerprint.io.gradients import read_bvals_bvecs

    scheme = read_bvals_bvecs(args.bval, args.bvec, delta=args.delta, Delta=args.Delta)
    with tempfile.TemporaryDirectory(prefix="fp-bench-") as tmp:
        t0 = time.perf_counter()
        build_dictionary(args.model, scheme, Path(tmp) / "warmup.zarr", size=256,
                         n_jobs=args.threads)
        warmup = time.perf_counter() - t0
        rss_after_warmup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        d = build_dictionary(args.model, scheme, Path(tmp) / "bench.zarr", size=args.size,
                             n_jobs=args.threads)
        seconds = time.perf_counter() - t0
        size_mb = sum(f.stat().st_size for f in Path(d.path).rglob("*") if f.is_file()) / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    json.dump({"size": args.size, "seconds": round(seconds, 3),
               "atoms_per_second": round(args.size / seconds),
               "warmup_seconds": round(warmup, 3),
               "peak_rss_mib": round(peak, 1),
               "rss_after_warmup_mib": round(rss_after_warmup, 1),
               "store_mb": round(size_mb, 1),
               "measurements": int(scheme.number_of_measurements)}, sys.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="noddi")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bval", type=Path)
    parser.add_argument("--bvec", type=Path)
    parser.add_argument("--delta", type=float)
    parser.add_argument("--Delta", type=float)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print results as JSON")
    args = parser.parse_args()
    if args.bval is None:
        args.bval, args.bvec, d, D = _reference_scheme()
        args.delta = args.delta if args.delta is not None else d
        args.Delta = args.Delta if args.Delta is not None else D
    if args.child:
        child(args)
        return
    results = []
    for size in args.sizes:
        cmd = [sys.executable, __file__, "--child", "--size", str(size), "--model", args.model,
               "--bval", str(args.bval), "--bvec", str(args.bvec)]
        if args.delta is not None:
            cmd += ["--delta", str(args.delta), "--Delta", str(args.Delta)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        result = json.loads(out.stdout)
        results.append(result)
        if not args.json:
            print(f"{args.model} {size:>9d} atoms x {result['measurements']} meas.: "
                  f"{result['seconds']:7.2f} s ({result['atoms_per_second']:,} atoms/s), "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB "
                  f"(after warm-up {result['rss_after_warmup_mib']:.0f} MiB), "
                  f"store {result['store_mb']:.0f} MB, warm-up {result['warmup_seconds']:.1f} s",
                  flush=True)
    if args.json:
        print(json.dumps({"model": args.model, "threads": args.threads,
                          "cpus": os.cpu_count(), "machine": platform.platform(),
                          "python": platform.python_version(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
