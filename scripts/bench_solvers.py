"""Classical solvers benchmark: fingerprint's brute2fine and mix against dmipy 1.0.5's.

    python scripts/bench_solvers.py [--scheme tests/data/reference/schemes/hcp]
        [--voxels 100] [--dmipy-voxels 100] [--dmipy-mix-voxels 30] [--snr 30]
        [--no-dmipy] [--fingerprint] [--json out.json]

A NODDI phantom (``--kind``: ``wm-gm`` or ``uniform``, as in ``bench_noddi.py``) is
simulated on the scheme (default: the HCP scheme of the reference test data) with Rician
noise (``--snr`` on b=0). On the same voxels, single-threaded (one process, one Numba
thread: the figures are per core):

* fingerprint ``model.fit(..., solver='brute2fine')`` and ``solver='mix'`` (dmipy's
  default options: Ns=5, N_sphere_samples=30, maxiter=300), and with ``--fingerprint``
  the default dictionary-matching solver (its dictionary built before timing);
* dmipy 1.0.5 ``brute2fine`` and ``mix`` (NODDI-Watson built as in its documentation),
  installed into its own virtual environment exactly as ``bench_noddi.py`` does
  (``~/.cache/fingerprint/dmipy-venv``), in a subprocess; dmipy fits the first
  ``--dmipy-voxels`` (brute2fine) and ``--dmipy-mix-voxels`` (mix) voxels, and every
  method's errors are also reported on those subsets.

Reported: µs per voxel per core (wall-clock fit time after a warm-up fit of two
voxels) and CPU µs per voxel (the process's CPU time: less sensitive to other load on
a shared machine), mean
absolute error of icvf, odi and isovf, median angular error of the fibre direction.
For each solver, on the voxels dmipy fitted, its final cost is compared with dmipy's on
the same objective (half the residual sum of squares of the b0-normalised signals, the
fractions summing to one: the problem both solve): the share of voxels where ours is
lower or equal (relative tolerance 1e-9), and the paired difference of the absolute
errors (ours - dmipy's, mean and 95 % interval) per parameter; then dmipy's own
solutions are refined to convergence on that objective by fingerprint's refinement
(``refine_nonlinear(..., sum_to_one=True)``) and the paired differences are reported
again (near zero when both land on the same optima).
The machine may be shared: compare ratios measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
             "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # per-core figures: one thread everywhere

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
DEFAULT_SCHEME = REPO / "tests" / "data" / "reference" / "schemes" / "hcp"

DMIPY_RUNNER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import dmipy
    from dmipy.core.acquisition_scheme import acquisition_scheme_from_bvalues
    from dmipy.core.modeling_framework import MultiCompartmentModel
    from dmipy.distributions.distribute_models import SD1WatsonDistributed
    from dmipy.signal_models import cylinder_models, gaussian_models

    data_path, bval, bvec, solver, out = sys.argv[1:6]
    bvals = np.loadtxt(bval).ravel() * 1e6
    bvecs = np.loadtxt(bvec)
    if bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    norms = np.linalg.norm(bvecs, axis=1)
    bvecs = np.where(norms[:, None] > 0, bvecs / np.where(norms > 0, norms, 1)[:, None], 0)
    scheme = acquisition_scheme_from_bvalues(bvals, bvecs)
    watson = SD1WatsonDistributed(models=[cylinder_models.C1Stick(),
                                          gaussian_models.G2Zeppelin()])
    watson.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                  "partial_volume_0")
    watson.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    watson.set_fixed_parameter("G2Zeppelin_1_lambda_par", 1.7e-9)
    model = MultiCompartmentModel(models=[gaussian_models.G1Ball(), watson])
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    data = np.load(data_path).astype(np.float64)
    t = time.time()
    model.fit(scheme, data[:2], solver=solver, use_parallel_processing=False)
    warm = time.time() - t
    t, c = time.time(), time.process_time()
    fitted = model.fit(scheme, data, solver=solver, use_parallel_processing=False)
    fit, cpu = time.time() - t, time.process_time() - c
    p = fitted.fitted_parameters
    np.savez(out, icvf=p["SD1WatsonDistributed_1_partial_volume_0"],
             odi=p["SD1WatsonDistributed_1_SD1Watson_1_odi"],
             isovf=p["partial_volume_0"], mu=p["SD1WatsonDistributed_1_SD1Watson_1_mu"])
    print(json.dumps({"fit_seconds": fit, "fit_cpu_seconds": cpu, "warmup_seconds": warm,
                      "version": getattr(dmipy, "__version__", "1.0.5")}))
""")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", type=Path, default=DEFAULT_SCHEME)
    p.add_argument("--kind", default="wm-gm", choices=("wm-gm", "uniform"))
    p.add_argument("--voxels", type=int, default=100, help="voxels fitted by fingerprint")
    p.add_argument("--dmipy-voxels", type=int, default=100,
                   help="first voxels fitted by dmipy's brute2fine")
    p.add_argument("--dmipy-mix-voxels", type=int, default=30,
                   help="first voxels fitted by dmipy's mix")
    p.add_argument("--snr", type=float, default=30.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-dmipy", action="store_true", help="skip dmipy")
    p.add_argument("--fingerprint", action="store_true",
                   help="also time the default dictionary-matching solver")
    p.add_argument("--dmipy-venv", type=Path, default=None)
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


def errors(maps: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    from fingerprint.core.modeling_framework import mu_to_axes

    out = {f"{k}_mae": float(np.mean(np.abs(maps[k] - truth[k])))
           for k in ("icvf", "odi", "isovf")}
    cos = np.abs(np.sum(mu_to_axes(maps["mu"]) * mu_to_axes(truth["mu"]), axis=1))
    out["direction_median_deg"] = float(np.median(np.degrees(np.arccos(np.clip(cos, 0, 1)))))
    return out


def costs(model: object, scheme: object, data: np.ndarray, maps: dict[str, np.ndarray]
          ) -> np.ndarray:
    """Half the residual sum of squares of the b0-normalised signals at ``maps``."""
    from fingerprint.phantoms import noddi_parameter_vectors

    k = maps["icvf"].size
    b0 = np.asarray(scheme.b0_mask, dtype=bool)  # type: ignore[attr-defined]
    y = data[:k] / data[:k, b0].mean(axis=1, keepdims=True)
    vec = noddi_parameter_vectors(model, icvf=maps["icvf"], odi=maps["odi"],
                                  isovf=maps["isovf"], mu=maps["mu"])
    pred = model.simulate_signal(scheme, vec)  # type: ignore[attr-defined]
    return 0.5 * np.sum((y - pred) ** 2, axis=1)


def refine_from(model: object, scheme: object, data: np.ndarray,
                maps: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``maps`` (another solver's solutions) refined to convergence on the objective of
    :func:`costs` by fingerprint's refinement."""
    from fingerprint.fitting.nonlinear import refine_nonlinear
    from fingerprint.phantoms import noddi_parameter_vectors

    k = maps["icvf"].size
    b0 = np.asarray(scheme.b0_mask, dtype=bool)  # type: ignore[attr-defined]
    y = data[:k] / data[:k, b0].mean(axis=1, keepdims=True)
    vec = noddi_parameter_vectors(model, icvf=maps["icvf"], odi=maps["odi"],
                                  isovf=maps["isovf"], mu=maps["mu"])
    out = refine_nonlinear(model, scheme, y, vec, n_jobs=1, max_nfev=300, sum_to_one=True)
    cols, pos = {}, 0
    for name, card in model.parameter_cardinality.items():  # type: ignore[attr-defined]
        cols[name] = slice(pos, pos + card)
        pos += card
    return {"icvf": out[:, cols["SD1WatsonDistributed_1_partial_volume_0"]][:, 0],
            "odi": out[:, cols["SD1WatsonDistributed_1_SD1Watson_1_odi"]][:, 0],
            "isovf": out[:, cols["partial_volume_0"]][:, 0],
            "mu": out[:, cols["SD1WatsonDistributed_1_SD1Watson_1_mu"]]}


def paired(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray],
           truth: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """Per parameter: mean and 95 % interval of |ours - truth| - |theirs - truth|."""
    out = {}
    for key in ("icvf", "odi", "isovf"):
        k = theirs[key].size
        d = np.abs(ours[key][:k] - truth[key][:k]) - np.abs(theirs[key] - truth[key][:k])
        half = 1.96 * float(np.std(d, ddof=1)) / np.sqrt(k) if k > 1 else float("nan")
        out[key] = [float(d.mean()), float(d.mean()) - half, float(d.mean()) + half]
    return out


def maps_of(fitted: object) -> dict[str, np.ndarray]:
    p = fitted.fitted_parameters  # type: ignore[attr-defined]
    return {"icvf": p["SD1WatsonDistributed_1_partial_volume_0"],
            "odi": p["SD1WatsonDistributed_1_SD1Watson_1_odi"],
            "isovf": p["partial_volume_0"], "mu": p["SD1WatsonDistributed_1_SD1Watson_1_mu"]}


def run_ours(model: object, scheme: object, data: np.ndarray, solver: str
             ) -> tuple[dict[str, np.ndarray], float, float]:
    """Maps, wall-clock and CPU seconds of the fit (after a warm-up on two voxels)."""
    model.fit(scheme, data[:2], solver=solver, n_jobs=1)  # type: ignore[attr-defined]
    t, c = time.perf_counter(), time.process_time()
    fitted = model.fit(scheme, data, solver=solver, n_jobs=1)  # type: ignore[attr-defined]
    return maps_of(fitted), time.perf_counter() - t, time.process_time() - c


def run_dmipy(python: Path, data: np.ndarray, bval: Path, bvec: Path, solver: str,
              work: Path) -> tuple[dict[str, np.ndarray], float, float, str]:
    np.save(work / "data.npy", data)
    runner = work / "run_dmipy_solvers.py"
    runner.write_text(DMIPY_RUNNER)
    out = work / f"dmipy_{solver}.npz"
    r = subprocess.run([str(python), str(runner), str(work / "data.npy"), str(bval),
                        str(bvec), solver, str(out)], capture_output=True, text=True,
                       cwd=work, env={**os.environ})
    if r.returncode != 0:
        raise RuntimeError(f"dmipy {solver} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    z = np.load(out)
    return ({k: z[k] for k in ("icvf", "odi", "isovf", "mu")}, float(info["fit_seconds"]),
            float(info["fit_cpu_seconds"]), str(info["version"]))


def main(argv: list[str] | None = None) -> int:
    import bench_noddi

    from fingerprint.io.gradients import read_bvals_bvecs
    from fingerprint.models import get_model
    from fingerprint.phantoms import add_rician_noise

    args = parse_args(argv)
    bval, bvec = bench_noddi.scheme_paths(args.scheme)
    scheme = read_bvals_bvecs(bval, bvec)
    rng = np.random.default_rng(args.seed)
    n = args.voxels
    truth = bench_noddi.sample_parameters(args.kind, n, rng)
    data = add_rician_noise(bench_noddi.simulate(scheme, truth) * 100.0, 100.0 / args.snr,
                            rng)
    model = get_model("noddi")
    rows: list[dict[str, object]] = []

    def record(method: str, maps: dict[str, np.ndarray], seconds: float, cpu: float,
               voxels: int) -> None:
        row = {"method": method, "voxels": voxels,
               "us_per_voxel_per_core": seconds / voxels * 1e6,
               "cpu_us_per_voxel": cpu / voxels * 1e6}
        for label, k in (("all", voxels), ("dmipy_b2f_subset", args.dmipy_voxels),
                         ("dmipy_mix_subset", args.dmipy_mix_voxels)):
            if k <= voxels:
                sub = {key: v[:k] for key, v in maps.items()}
                row[label] = errors(sub, {key: v[:k] for key, v in truth.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)

    ours: dict[str, dict[str, np.ndarray]] = {}
    for solver in ("brute2fine", "mix"):
        maps, sec, cpu = run_ours(model, scheme, data, solver)
        ours[solver] = maps
        record(f"fingerprint {solver}", maps, sec, cpu, n)
    if args.fingerprint:
        model.fit(scheme, data[:2])  # builds or loads the dictionary
        maps, sec, cpu = run_ours(model, scheme, data, "fingerprint")
        record("fingerprint (dictionary)", maps, sec, cpu, n)
    version = None
    if not args.no_dmipy:
        venv = args.dmipy_venv or bench_noddi.DEFAULT_DMIPY_VENV
        python, reason = bench_noddi.ensure_dmipy(venv)
        if python is None:
            print(f"dmipy skipped: {reason}", file=sys.stderr)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                for solver, k in (("brute2fine", args.dmipy_voxels),
                                  ("mix", args.dmipy_mix_voxels)):
                    k = min(k, n)
                    maps, sec, cpu, version = run_dmipy(python, data[:k], bval, bvec,
                                                        solver, Path(tmp))
                    record(f"dmipy {version} {solver}", maps, sec, cpu, k)
                    mine = {key: v[:k] for key, v in ours[solver].items()}
                    c_ours, c_dmipy = (costs(model, scheme, data, mine),
                                       costs(model, scheme, data, maps))
                    rel = (c_ours - c_dmipy) / c_dmipy
                    rows[-1]["versus_ours"] = {
                        "voxels": k,
                        "ours_cost_lower_or_equal": float(np.mean(rel <= 1e-9)),
                        "ours_cost_lower_by_1e-6": float(np.mean(rel < -1e-6)),
                        "largest_relative_excess": float(rel.max()),
                        "abs_error_difference_mean_ci95": paired(mine, maps, truth),
                        "vs_dmipy_refined_abs_error_difference_mean_ci95": paired(
                            mine, refine_from(model, scheme, data, maps), truth)}
                    print(json.dumps(rows[-1]["versus_ours"]), flush=True)
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.machine()} {os.cpu_count()} cores "
                         f"({platform.processor() or platform.platform()})",
              "python": platform.python_version(), "kind": args.kind, "snr": args.snr,
              "scheme": str(args.scheme.name), "rows": rows,
              "command": "python scripts/bench_solvers.py " + " ".join(
                  sys.argv[1:] if argv is None else argv)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print("\n| method | voxels | µs/voxel/core | CPU µs/voxel | icvf MAE | odi MAE | "
          "isovf MAE | angle median (°) |\n|---|---|---|---|---|---|---|---|")
    for row in rows:
        key = "dmipy_mix_subset" if "mix" in str(row["method"]) else "dmipy_b2f_subset"
        e = row.get(key) or row["all"]
        print(f"| {row['method']} | {row['voxels']} | {row['us_per_voxel_per_core']:,.0f} | "
              f"{row['cpu_us_per_voxel']:,.0f} | "
              f"{e['icvf_mae']:.4f} | {e['odi_mae']:.4f} | {e['isovf_mae']:.4f} | "
              f"{e['direction_median_deg']:.2f} |")
    for row in rows:
        v = row.get("versus_ours")
        if v:
            diff = ", ".join(f"{k} {m:+.5f} [{lo:+.5f}, {hi:+.5f}]" for k, (m, lo, hi)
                             in v["abs_error_difference_mean_ci95"].items())
            refined = ", ".join(
                f"{k} {m:+.6f} [{lo:+.6f}, {hi:+.6f}]" for k, (m, lo, hi)
                in v["vs_dmipy_refined_abs_error_difference_mean_ci95"].items())
            print(f"{row['method']} vs ours on {v['voxels']} voxels: our cost <= dmipy's in "
                  f"{100 * v['ours_cost_lower_or_equal']:.1f} % (lower by > 1e-6 in "
                  f"{100 * v['ours_cost_lower_by_1e-6']:.1f} %); |error| ours - dmipy's: "
                  f"{diff}; ours - dmipy's refined to convergence: {refined}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
