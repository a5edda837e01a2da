"""Benchmark forward models: full signals per second on the HCP scheme.

For each model, ``--size`` random parameter sets (inside dmipy's parameter ranges, random
orientations) are simulated on all measurements of the scheme, once with one thread and
once with all of numba's threads. Compilation is excluded (a small warm-up call first);
the best of ``--repeat`` runs is reported. Timed work for the compartments: angles ->
axes -> cosines -> signal_from_cosines; for NODDI-Watson: the framework's
``simulate_signal(scheme, parameter_vectors)``.

    python3 scripts/bench_forward.py                    # 1e5 sets, HCP (288 measurements)
    python3 scripts/bench_forward.py --size 1000000 --models stick noddi --repeat 5
    python3 scripts/bench_forward.py --json results.json

The HCP scheme defaults to the reference fixtures (``$FINGERPRINT_REFERENCE_DIR`` or
``tests/data/reference`` in the repository), read with ``read_bvals_bvecs`` and
delta = 10.6 ms, Delta = 43.1 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

MODELS = ["stick", "zeppelin", "cylinder", "noddi"]


def _reference_dir() -> Path:
    return Path(os.environ.get("FINGERPRINT_REFERENCE_DIR",
                               REPO_ROOT / "tests" / "data" / "reference"))


def _random_axes(rng: np.random.Generator, n: int) -> np.ndarray:
    theta = np.arccos(rng.uniform(-1.0, 1.0, n))
    phi = rng.uniform(-np.pi, np.pi, n)
    return np.column_stack([theta, phi])


def _compartment_case(name: str, scheme: Any, n: int, rng: np.random.Generator
                      ) -> Callable[[int], np.ndarray]:
    from fingerprint.signal_models.base import unitsphere2cart
    from fingerprint.signal_models.cylinder_models import (
        C1Stick,
        C4CylinderGaussianPhaseApproximation,
    )
    from fingerprint.signal_models.gaussian_models import G2Zeppelin

    meas = scheme.measurements
    mu = _random_axes(rng, n)
    lam = rng.uniform(0.1e-9, 3e-9, n)
    if name == "stick":
        model, params = C1Stick(), {"lambda_par": lam}
    elif name == "zeppelin":
        model, params = G2Zeppelin(), {"lambda_par": lam,
                                       "lambda_perp": rng.uniform(0.1e-9, 3e-9, n)}
    else:
        model, params = C4CylinderGaussianPhaseApproximation(), {
            "lambda_par": lam, "diameter": rng.uniform(0.1e-6, 20e-6, n)}

    def run(count: int) -> np.ndarray:
        cos = unitsphere2cart(mu[:count]) @ meas.directions.T
        return model.signal_from_cosines(meas, cos, **{k: v[:count] for k, v in
                                                       params.items()})

    return run


def _noddi_case(scheme: Any, n: int, rng: np.random.Generator) -> Callable[[int], np.ndarray]:
    from fingerprint.models import get_model

    model = get_model("noddi")
    columns = []
    for name, card in model.parameter_cardinality.items():
        lo_hi = np.atleast_2d(np.asarray(model.parameter_ranges[name], dtype=float))
        scale = np.broadcast_to(np.asarray(model.parameter_scales[name], dtype=float), (card,))
        if card == 2 and model.parameter_types.get(name) == "orientation":
            columns.append(_random_axes(rng, n))
            continue
        for c in range(card):
            columns.append((rng.uniform(lo_hi[c, 0], lo_hi[c, 1], n) * scale[c])[:, None])
    vectors = np.hstack(columns)

    def run(count: int) -> np.ndarray:
        return model.simulate_signal(scheme, vectors[:count])

    return run


def _time(run: Callable[[int], np.ndarray], n: int, repeat: int) -> tuple[float, float]:
    """Best wall time and best process CPU time (s) over ``repeat`` runs.

    On a shared machine the CPU time of a one-thread run is the better measure of the work
    per core (it excludes time spent waiting for the CPU); wall time is what a user sees.
    """
    best_wall = best_cpu = float("inf")
    for _ in range(repeat):
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = run(n)
        best_wall = min(best_wall, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        if not np.isfinite(out).all():
            raise RuntimeError("non-finite signals")
    return best_wall, best_cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=100_000, help="parameter sets per call")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=MODELS)
    parser.add_argument("--repeat", type=int, default=3, help="runs per setting (best kept)")
    parser.add_argument("--threads", type=int, nargs="+", default=None,
                        help="thread counts to time (default: 1 and all)")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    args = parser.parse_args(argv)

    import numba

    from fingerprint.io.gradients import read_bvals_bvecs

    ref = _reference_dir() / "schemes"
    info = json.loads((ref / "hcp.json").read_text())
    scheme = read_bvals_bvecs(ref / "hcp.bval", ref / "hcp.bvec",
                              delta=float(info["delta_s"][0]), Delta=float(info["Delta_s"][0]))
    m = scheme.number_of_measurements
    all_threads = numba.config.NUMBA_NUM_THREADS
    threads = args.threads or sorted({1, all_threads})
    rng = np.random.default_rng(0)
    results = []
    print(f"# {args.size} parameter sets x {m} measurements; machine: {platform.node()} "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"numba {numba.__version__}")
    print(f"# load average before: {os.getloadavg()[0]:.2f}")
    print(f"{'model':<10} {'threads':>7} {'wall s':>8} {'signals/s':>11} {'per core':>10} "
          f"{'cpu s':>8} {'signals/cpu-s':>14}")
    for name in args.models:
        try:
            run = (_noddi_case(scheme, args.size, rng) if name == "noddi"
                   else _compartment_case(name, scheme, args.size, rng))
            run(64)  # compile or load the cached kernels
        except Exception as exc:  # noqa: BLE001 - report and go on with the other models
            print(f"{name:<10} unavailable: {type(exc).__name__}: {exc}")
            continue
        for t in threads:
            numba.set_num_threads(t)
            run(64)
            seconds, cpu = _time(run, args.size, args.repeat)
            rate = args.size / seconds
            results.append({"model": name, "threads": t, "size": args.size,
                            "measurements": m, "seconds": round(seconds, 4),
                            "cpu_seconds": round(cpu, 4),
                            "signals_per_second": round(rate),
                            "signals_per_second_per_core": round(rate / t),
                            "signals_per_cpu_second": round(args.size / cpu)})
            print(f"{name:<10} {t:>7} {seconds:>8.3f} {rate:>11.3g} {rate / t:>10.3g} "
                  f"{cpu:>8.3f} {args.size / cpu:>14.3g}")
    numba.set_num_threads(all_threads)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps({
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": " ".join(["python3", "scripts/bench_forward.py", *(argv or sys.argv[1:])]),
            "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                        "processor": platform.processor() or platform.machine(),
                        "python": platform.python_version(), "numba": numba.__version__},
            "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
