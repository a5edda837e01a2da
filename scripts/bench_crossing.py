"""Crossing-fascicle benchmark: multi-fascicle fingerprinting vs the non-linear polish
(and dmipy's brute2fine for Ball-Stick-Stick) on simulated crossings.

    python scripts/bench_crossing.py [--scheme tests/data/reference/schemes/hcp]
        [--models ball_stick_stick noddi2] [--voxels 100] [--angles 30 45 60 90]
        [--snr 30 20] [--threads 1] [--dictionary-size 50000] [--no-dmipy]
        [--dmipy-voxels 20] [--json out.json]

Phantoms come from our forward models on the given scheme (FSL ``<scheme>.bval`` /
``<scheme>.bvec``; default: the HCP scheme of the reference test data): for each crossing
angle and SNR, ``--voxels`` voxels with random first directions, the second at that angle
in a random plane, random fraction pairs (fascicle 1 ~ U(0.25, 0.5), fascicle 2 ~
U(0.15, fascicle 1), the rest isotropic) and random microstructure (Ball-Stick-Stick: each
stick's lambda_par ~ U(1.5, 2.5) µm²/ms, lambda_iso ~ U(2.5, 3); NODDI2: each bundle's
icvf ~ U(0.4, 0.8), odi ~ U(0.05, 0.3)); plus, per SNR, ``--voxels`` single-fascicle
voxels (fraction U(0.5, 0.8)) for the rate of wrong fascicle counts. Rician noise of
standard deviation S0 / SNR (S0 = 100).

Methods, all in this run on the same noisy signals:

* ``multifascicle``: the built-in solver (``FitOptions()``), i.e. rotated single-fascicle
  atoms, fascicle count by the model's information criterion (Ball-Stick-Stick: BIC;
  NODDI2: its recipe's penalty of 2 per parameter), see docs/crossing.md;
* ``multifascicle-grid``: the same without the polish (``refine=False``: directions on
  the 300-direction search grid, parameters on the atom grid), for the speed/accuracy
  trade-off;
* ``polish``: the previous path (``refine='nonlinear'``): dictionary matching on the raw
  signals (``--dictionary-size`` atoms; its build is not timed) then the bounded
  non-linear least-squares polish from the match and the 3 best atoms;
* ``dmipy``: dmipy 1.0.5's ``brute2fine`` on ``MultiCompartmentModel([G1Ball(),
  C1Stick(), C1Stick()])`` (Ball-Stick-Stick only; the first ``--dmipy-voxels`` voxels
  of the ``--dmipy-angles`` cases, in the virtual environment of
  ``scripts/bench_noddi.py``); the other methods are then also scored on those voxels
  alone (a second table).

Per case: median angular error of each fascicle (true fascicles matched to the fitted
ones by the smallest total angle; a fascicle the fit missed is scored against the nearest
fitted direction; against the polish on the same voxels, also the difference of the
medians with its 95 % paired bootstrap interval), mean absolute error of each
fascicle's fraction (a missed fascicle has fraction 0) and microstructure, and the rate
of wrong fascicle counts (the polish and dmipy always fit two sticks: their count is the
number of sticks with a signal fraction of at least 0.1, the multi-fascicle fit's
eligibility rule). Times: wall and CPU
(process) time per voxel of each method; the machine may be shared, so compare the
ratios within one run.
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
DEFAULT_SCHEME = REPO / "tests" / "data" / "reference" / "schemes" / "hcp"
DEFAULT_DMIPY_VENV = Path.home() / ".cache" / "fingerprint" / "dmipy-venv"
S0 = 100.0
MIN_FRACTION = 0.1

DMIPY_RUNNER = textwrap.dedent("""
    import json, sys, time
    # cvxpy only serves dmipy's constrained CSD; a cvxpy newer than the venv's scipy does
    # not import, so it is hidden (dmipy then skips it)
    sys.modules["cvxpy"] = None
    import numpy as np
    from dmipy.core.acquisition_scheme import acquisition_scheme_from_bvalues
    from dmipy.core.modeling_framework import MultiCompartmentModel
    from dmipy.signal_models import cylinder_models, gaussian_models

    data_path, bval, bvec, threads, out = sys.argv[1:6]
    threads = int(threads)
    bvals = np.loadtxt(bval).ravel() * 1e6
    bvecs = np.loadtxt(bvec)
    if bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    norms = np.linalg.norm(bvecs, axis=1)
    bvecs = np.where(norms[:, None] > 0, bvecs / np.where(norms > 0, norms, 1)[:, None], 0)
    scheme = acquisition_scheme_from_bvalues(bvals, bvecs)
    model = MultiCompartmentModel(models=[gaussian_models.G1Ball(), cylinder_models.C1Stick(),
                                          cylinder_models.C1Stick()])
    data = np.load(data_path).astype(np.float64)
    kw = dict(use_parallel_processing=threads > 1)
    if threads > 1:
        kw["number_of_processors"] = threads
    model.fit(scheme, data[:1], use_parallel_processing=False)  # warm-up (numba JIT)
    t, c = time.time(), time.process_time()
    fitted = model.fit(scheme, data, solver="brute2fine", **kw)
    wall, cpu = time.time() - t, time.process_time() - c
    np.save(out, fitted.fitted_parameters_vector)
    print(json.dumps({"fit_seconds": wall, "cpu_seconds": cpu,
                      "names": list(model.parameter_names)}))
""")


# ----------------------------------------------------------------------------- phantoms
def read_scheme(prefix: Path):
    from fingerprint.io.gradients import read_bvals_bvecs

    return read_bvals_bvecs(str(prefix) + ".bval", str(prefix) + ".bvec")


def make_case(model_name: str, model, n: int, angle: float | None, rng):
    """Parameter vectors (n, P) and the truth of n voxels (angle None: one fascicle)."""
    from fingerprint.phantoms import crossing_directions, crossing_parameter_vectors

    u1, u2 = crossing_directions(n, 90.0 if angle is None else angle, rng)
    if angle is None:
        f1 = rng.uniform(0.5, 0.8, n)
        f2 = np.zeros(n)
    else:
        f1 = rng.uniform(0.25, 0.5, n)
        f2 = 0.15 + rng.uniform(0.0, 1.0, n) * (f1 - 0.15)
    iso = 1.0 - f1 - f2
    truth = {"u": np.stack([u1, u2], 1), "f": np.stack([f1, f2], 1),
             "count": np.where(f2 > 0, 2, 1)}
    if model_name == "ball_stick_stick":
        d = rng.uniform(1.5e-9, 2.5e-9, (n, 2))
        x = crossing_parameter_vectors(
            model, directions=[u1, u2], fractions=np.stack([iso, f1, f2], 1),
            micro=[{"lambda_par": d[:, 0]}, {"lambda_par": d[:, 1]}],
            iso={"G1Ball_1_lambda_iso": rng.uniform(2.5e-9, 3e-9, n)})
        truth["micro"] = {"lambda_par": d}
    else:
        icvf = rng.uniform(0.4, 0.8, (n, 2))
        odi = rng.uniform(0.05, 0.3, (n, 2))
        x = crossing_parameter_vectors(
            model, directions=[u1, u2], fractions=np.stack([iso, f1, f2], 1),
            micro=[{"SD1Watson_1_odi": odi[:, k], "partial_volume_0": icvf[:, k]}
                   for k in range(2)])
        truth["micro"] = {"icvf": icvf, "odi": odi}
    return x, truth


def estimates(model_name: str, model, params: np.ndarray) -> dict[str, np.ndarray]:
    """Fitted per-fascicle directions (n, 2, 3), fractions (n, 2) and microstructure."""
    from fingerprint.core.orientations import mu_to_vectors
    from fingerprint.fitting.multifascicle import fascicle_layout

    layout = fascicle_layout(model)
    p = model.parameter_vector_to_parameters(params)
    pv = np.stack([p[f"partial_volume_{k}"] for k in range(model.N_models)], 1)
    total = np.nansum(pv, axis=1, keepdims=True)
    pv = pv / np.where(total > 0, total, 1.0)
    u = np.stack([mu_to_vectors(p[name]) for name in layout.orientation], 1)
    f = np.stack([pv[:, k] for k in layout.fascicles], 1)
    out = {"u": u, "f": np.nan_to_num(f)}
    if model_name == "ball_stick_stick":
        out["micro"] = {"lambda_par": np.stack([p[m[0]] for m in layout.micro], 1)}
    else:
        out["micro"] = {"odi": np.stack([p[m[0]] for m in layout.micro], 1),
                        "icvf": np.stack([p[m[1]] for m in layout.micro], 1)}
    return out


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.abs(np.sum(a * b, axis=-1)) / np.maximum(
        np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-300)
    return np.degrees(np.arccos(np.clip(cos, 0.0, 1.0)))


def score(truth: dict, est: dict, angles: dict | None = None) -> dict[str, float]:
    """Errors of one case (see the module docstring); ``angles``, when given, receives
    the per-voxel angular errors (n, fascicles) under the key ``'angles'``."""
    n = truth["u"].shape[0]
    present = (est["f"] >= MIN_FRACTION) & np.all(np.isfinite(est["u"]), axis=-1)
    count = present.sum(axis=1)
    out: dict[str, float] = {"wrong_count_rate": float(np.mean(count != truth["count"]))}
    crossing = truth["count"][0] == 2
    k_true = 2 if crossing else 1
    ang = np.full((n, k_true), np.nan)
    ferr = np.full((n, k_true), np.nan)
    merr = {k: np.full((n, k_true), np.nan) for k in truth["micro"]}
    for i in range(n):
        fitted = [j for j in range(2) if present[i, j]] or [int(np.argmax(est["f"][i]))]
        if k_true == 2 and len(fitted) == 2:
            straight = angle(truth["u"][i, 0], est["u"][i, fitted[0]]) + \
                angle(truth["u"][i, 1], est["u"][i, fitted[1]])
            swapped = angle(truth["u"][i, 0], est["u"][i, fitted[1]]) + \
                angle(truth["u"][i, 1], est["u"][i, fitted[0]])
            assign = fitted if straight <= swapped else fitted[::-1]
        else:
            assign = [min(fitted, key=lambda j: float(np.nan_to_num(
                angle(truth["u"][i, t], est["u"][i, j]), nan=180.0))) for t in range(k_true)]
        for t in range(k_true):
            j = assign[t]
            missed = k_true == 2 and len(set(assign)) == 1 and t == 1
            ang[i, t] = angle(truth["u"][i, t], est["u"][i, j])
            ferr[i, t] = abs((0.0 if missed else est["f"][i, j]) - truth["f"][i, t])
            for key in merr:
                if not missed:
                    merr[key][i, t] = abs(est["micro"][key][i, j] - truth["micro"][key][i, t])
    if angles is not None:
        angles["angles"] = ang
    for t in range(k_true):
        out[f"angle_median_f{t + 1}"] = float(np.nanmedian(ang[:, t]))
        out[f"fraction_mae_f{t + 1}"] = float(np.nanmean(ferr[:, t]))
        for key, v in merr.items():
            scale = 1e9 if key == "lambda_par" else 1.0
            out[f"{key}_mae_f{t + 1}"] = float(np.nanmean(v[:, t]) * scale)
    return out


# ----------------------------------------------------------------------------- methods
def median_difference(a: np.ndarray, b: np.ndarray, rng, resamples: int = 2000
                      ) -> tuple[float, float, float]:
    """Median of ``a`` minus median of ``b`` (per-voxel errors of two methods on the same
    voxels) and its 95 % paired bootstrap interval (voxels resampled with replacement)."""
    n = a.shape[0]
    idx = rng.integers(0, n, (resamples, n))
    diffs = np.nanmedian(a[idx], axis=1) - np.nanmedian(b[idx], axis=1)
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    return float(np.nanmedian(a) - np.nanmedian(b)), float(lo), float(hi)


def timed(fn, *args):
    t, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t, time.process_time() - c


def find_dmipy(venv: Path) -> tuple[Path | None, str]:
    """Python of the dmipy venv of ``scripts/bench_noddi.py`` (installed on first use)."""
    from bench_noddi import ensure_dmipy

    python = venv / "bin" / "python"
    probe = ("import sys; sys.modules['cvxpy'] = None; "
             "import dmipy.core.modeling_framework, dmipy.signal_models.cylinder_models")
    if python.exists() and subprocess.run([str(python), "-c", probe],
                                          capture_output=True).returncode == 0:
        return python, ""
    return ensure_dmipy(venv)


def run_dmipy(python: Path, signals: np.ndarray, prefix: Path, threads: int, work: Path):
    work.mkdir(parents=True, exist_ok=True)
    np.save(work / "data.npy", signals)
    (work / "run.py").write_text(DMIPY_RUNNER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    r = subprocess.run([str(python), str(work / "run.py"), str(work / "data.npy"),
                        str(prefix) + ".bval", str(prefix) + ".bvec", str(threads),
                        str(work / "out.npy")], capture_output=True, text=True, cwd=work,
                       env=env)
    if r.returncode != 0:
        raise RuntimeError(f"dmipy failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    return np.load(work / "out.npy"), info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scheme", type=Path, default=DEFAULT_SCHEME)
    ap.add_argument("--models", nargs="+", default=["ball_stick_stick"],
                    choices=["ball_stick_stick", "noddi2"])
    ap.add_argument("--voxels", type=int, default=100)
    ap.add_argument("--angles", type=float, nargs="+", default=[30.0, 45.0, 60.0, 90.0])
    ap.add_argument("--snr", type=float, nargs="+", default=[30.0, 20.0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dictionary-size", type=int, default=50000)
    ap.add_argument("--no-polish", action="store_true")
    ap.add_argument("--no-dmipy", action="store_true")
    ap.add_argument("--dmipy-voxels", type=int, default=20)
    ap.add_argument("--dmipy-angles", type=float, nargs="+", default=[60.0, 90.0],
                    help="crossing angles whose cases dmipy also fits (its brute2fine "
                         "costs seconds per Ball-Stick-Stick voxel)")
    ap.add_argument("--dmipy-venv", type=Path, default=DEFAULT_DMIPY_VENV)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import numba

    from fingerprint.fitting.engine import fit_voxels, prepare_fitter
    from fingerprint.fitting.options import FitOptions
    from fingerprint.models import get_model
    from fingerprint.phantoms import add_rician_noise

    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    scheme = read_scheme(args.scheme)
    rng = np.random.default_rng(args.seed)
    dictionary_dir = Path(tempfile.gettempdir()) / "fingerprint-bench-crossing"
    results: dict[str, object] = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "load_average": os.getloadavg(), "measurements": int(scheme.number_of_measurements),
        "threads": args.threads, "cases": []}
    dmipy_python = None
    if not args.no_dmipy and "ball_stick_stick" in args.models:
        dmipy_python, why = find_dmipy(args.dmipy_venv)
        if dmipy_python is None:
            print(f"dmipy not available: {why}", file=sys.stderr)
    for model_name in args.models:
        model = get_model(model_name)
        fitters = {"multifascicle": prepare_fitter(model, scheme,
                                                   FitOptions(threads=args.threads)),
                   "multifascicle-grid": prepare_fitter(
                       model, scheme, FitOptions(threads=args.threads, refine=False))}
        if not args.no_polish:
            t = time.perf_counter()
            fitters["polish"] = prepare_fitter(
                model, scheme, FitOptions(refine="nonlinear", threads=args.threads,
                                          dictionary_size=args.dictionary_size),
                dictionary_dir=dictionary_dir)
            print(f"{model_name}: polish dictionary ready in {time.perf_counter() - t:.0f} s",
                  file=sys.stderr)
        warm = 100.0 * model.simulate_signal(scheme, make_case(model_name, model, 4, 60.0,
                                                               rng)[0])
        for fitter in fitters.values():  # compile / load before timing
            fit_voxels(fitter, warm)
        for snr in args.snr:
            for ang in [*args.angles, None]:
                x, truth = make_case(model_name, model, args.voxels, ang, rng)
                clean = S0 * model.simulate_signal(scheme, x)
                noisy = add_rician_noise(clean, S0 / snr, rng)
                case = {"model": model_name, "snr": snr,
                        "angle": "single" if ang is None else ang, "voxels": args.voxels,
                        "methods": {}}
                fitted_params = {}
                per_voxel: dict[str, dict] = {}
                for name, fitter in fitters.items():
                    ve, wall, cpu = timed(fit_voxels, fitter, noisy)
                    fitted_params[name] = ve.parameters
                    per_voxel[name] = {}
                    case["methods"][name] = {
                        **score(truth, estimates(model_name, model, ve.parameters),
                                per_voxel[name]),
                        "us_per_voxel": wall / args.voxels * 1e6,
                        "cpu_us_per_voxel": cpu / args.voxels * 1e6}
                if "polish" in per_voxel:  # paired: the same voxels
                    boot = np.random.default_rng(args.seed + 1)
                    a, b = per_voxel["multifascicle"]["angles"], per_voxel["polish"]["angles"]
                    case["median_difference_vs_polish"] = [
                        median_difference(a[:, t], b[:, t], boot) for t in range(a.shape[1])]
                    case["cpu_ratio_vs_polish"] = (
                        case["methods"]["polish"]["cpu_us_per_voxel"]
                        / case["methods"]["multifascicle"]["cpu_us_per_voxel"])
                if dmipy_python is not None and model_name == "ball_stick_stick" and \
                        ang in args.dmipy_angles:
                    k = min(args.dmipy_voxels, args.voxels)
                    params, info = run_dmipy(dmipy_python, noisy[:k], args.scheme,
                                             args.threads, dictionary_dir / "dmipy")
                    sub = {key: (v[:k] if not isinstance(v, dict) else
                                 {m: a[:k] for m, a in v.items()})
                           for key, v in truth.items()}
                    case["methods"]["dmipy"] = {
                        **score(sub, estimates(model_name, model, params)),
                        "us_per_voxel": info["fit_seconds"] / k * 1e6,
                        "cpu_us_per_voxel": info["cpu_seconds"] / k * 1e6, "voxels": k}
                    # the other methods scored on dmipy's voxels only, for a like-for-like row
                    case["on_dmipy_voxels"] = {
                        name: {**score(sub, estimates(model_name, model, prm[:k])),
                               "voxels": k}
                        for name, prm in fitted_params.items()}
                results["cases"].append(case)  # type: ignore[union-attr]
                print(json.dumps(case), file=sys.stderr)
    results["load_average_end"] = os.getloadavg()
    print(markdown(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


def markdown(results: dict) -> str:
    lines = [f"Command: `{results['command']}`; {results['date']}; {results['machine']}; "
             f"load average {results['load_average'][0]:.1f} at start, "
             f"{results['load_average_end'][0]:.1f} at end; {results['measurements']} "
             f"measurements; {results['threads']} thread(s).", "",
             "| model | SNR | angle | method | angle f1 (°) | angle f2 (°) | fraction MAE f1 "
             "/ f2 | microstructure MAE f1 / f2 | wrong count | µs/voxel (wall) | "
             "µs/voxel (CPU) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for case in results["cases"]:
        for name, m in case["methods"].items():
            micro = sorted({k.rsplit("_mae_", 1)[0] for k in m if "_mae_f" in k
                            and not k.startswith("fraction")})
            micro_txt = "; ".join(
                f"{k} {m.get(f'{k}_mae_f1', np.nan):.3f} / {m.get(f'{k}_mae_f2', np.nan):.3f}"
                for k in micro)
            lines.append(
                f"| {case['model']} | {case['snr']:.0f} | {case['angle']} | {name}"
                f"{' (' + str(m['voxels']) + ' vox)' if 'voxels' in m else ''} | "
                f"{m.get('angle_median_f1', np.nan):.2f} | "
                f"{m.get('angle_median_f2', np.nan):.2f} | "
                f"{m.get('fraction_mae_f1', np.nan):.3f} / "
                f"{m.get('fraction_mae_f2', np.nan):.3f} | {micro_txt} | "
                f"{m['wrong_count_rate']:.2f} | {m['us_per_voxel']:.0f} | "
                f"{m['cpu_us_per_voxel']:.0f} |")
    paired = [c for c in results["cases"] if "median_difference_vs_polish" in c]
    if paired:
        lines += ["", "Multi-fascicle fit against the polish on the same voxels: difference of "
                  "the median angular errors (multifascicle minus polish; negative: better) "
                  "with its 95 % paired bootstrap interval, and the ratio of CPU times:", "",
                  "| model | SNR | angle | fascicle 1 (°) | fascicle 2 (°) | polish CPU / "
                  "multifascicle CPU |", "| --- | --- | --- | --- | --- | --- |"]
        for c in paired:
            diffs = [f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"
                     for d, lo, hi in c["median_difference_vs_polish"]]
            diffs += [""] * (2 - len(diffs))
            lines.append(f"| {c['model']} | {c['snr']:.0f} | {c['angle']} | {diffs[0]} | "
                         f"{diffs[1]} | {c['cpu_ratio_vs_polish']:.1f}× |")
    subset = [c for c in results["cases"] if "on_dmipy_voxels" in c]
    if subset:
        lines += ["", "The same runs scored on dmipy's voxels only (the first voxels of "
                  "each case; times as above):", "",
                  "| model | SNR | angle | method | angle f1 (°) | angle f2 (°) | fraction "
                  "MAE f1 / f2 | lambda_par MAE f1 / f2 (µm²/ms) | wrong count |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for case in subset:
            rows = {**case["on_dmipy_voxels"], "dmipy": case["methods"]["dmipy"]}
            for name, m in rows.items():
                lines.append(
                    f"| {case['model']} | {case['snr']:.0f} | {case['angle']} | {name} "
                    f"({m['voxels']} vox) | {m.get('angle_median_f1', np.nan):.2f} | "
                    f"{m.get('angle_median_f2', np.nan):.2f} | "
                    f"{m.get('fraction_mae_f1', np.nan):.3f} / "
                    f"{m.get('fraction_mae_f2', np.nan):.3f} | "
                    f"{m.get('lambda_par_mae_f1', np.nan):.3f} / "
                    f"{m.get('lambda_par_mae_f2', np.nan):.3f} | "
                    f"{m['wrong_count_rate']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
