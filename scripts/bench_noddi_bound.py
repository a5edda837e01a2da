"""How accurate can any NODDI fit be on the uniform benchmark phantom? An oracle bound.

    python scripts/bench_noddi_bound.py [--voxels 2000] [--grid 2000] [--threads 2]
        [--scheme tests/data/reference/schemes/hcp] [--json out.json]

``scripts/bench_noddi.py``'s uniform phantom (same seed, same 10,000 voxels: odi ~
U(0.03, 0.95), icvf ~ U(0.1, 0.95), isovf ~ U(0, 0.5), random orientations, Rician noise
at SNR 30 on the HCP scheme) is fitted three ways on a random subset of ``--voxels``
voxels:

* **fingerprint**: the engine with its defaults (recipe dictionary, its own prior);
* **oracle, axis marginalised**: the posterior mean (and median) of each parameter under
  the phantom's *own* prior (the dictionary's atoms restricted to the phantom's box,
  which the Sobol design samples uniformly, as the phantom does), with the likelihood
  integrated over the unknown fibre axis on a ``--grid``-point hemisphere;
* **oracle, true axis**: the same posterior with the true fibre axis given.

The posterior mean under the true prior minimises the expected squared error of *any*
estimator and the posterior median the expected absolute error, so the oracle's MAE is
(up to the likelihood below and Monte-Carlo error) the best that any method can reach on
this phantom; a method that does not know the phantom's prior can only do worse.

Likelihood: Gaussian with the engine's per-voxel noise estimate, on the Rician-corrected
b0-normalised signal, through the per-shell zonal Legendre features (l <= 6) of the
voxel at each candidate axis plus the residual of that zonal fit -- the signal residual
of each atom up to the whitening. Candidates per voxel: the nearest in-prior atoms
(``--neighbors`` each) of the voxel's features with their anisotropic part scaled by 1,
0.7, 0.4 and 0 (so nearly isotropic atoms are always among them).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCHEME = REPO / "tests" / "data" / "reference" / "schemes" / "hcp"
BINS = (0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 0.96)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", type=Path, default=DEFAULT_SCHEME,
                   help="FSL scheme: path prefix of <scheme>.bval/.bvec")
    p.add_argument("--phantom-voxels", type=int, default=10_000,
                   help="voxels of the simulated phantom (bench_noddi.py's default)")
    p.add_argument("--voxels", type=int, default=2000, help="random voxels evaluated")
    p.add_argument("--grid", type=int, default=2000, help="axes on the hemisphere")
    p.add_argument("--neighbors", type=int, default=64, help="candidates per query")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, str(ARGS.threads))

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_noddi  # noqa: E402


def weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def posterior(log_like: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Posterior means and medians (3,) of ``values`` (m, 3) under log-weights (m,)."""
    w = np.exp(log_like - log_like.max())
    w /= w.sum()
    return w @ values, np.array([weighted_median(values[:, j], w) for j in range(3)])


def per_bin(est: np.ndarray, truth: np.ndarray) -> list[dict[str, float]]:
    out = []
    for lo, hi in zip(BINS[:-1], BINS[1:], strict=True):
        m = (truth >= lo) & (truth < hi)
        out.append({"bin": f"{lo}-{hi}", "mae": float(np.abs(est[m] - truth[m]).mean()),
                    "bias": float((est[m] - truth[m]).mean())})
    return out


def main(args: argparse.Namespace) -> dict[str, object]:
    import faiss
    from scipy.special import logsumexp

    from fingerprint.fitting.estimator import FingerprintEstimator
    from fingerprint.fitting.frame import angles_to_frames
    from fingerprint.io.gradients import read_bvals_bvecs
    from fingerprint.io.nifti import mu_to_vectors
    from fingerprint.kernels import run_parallel
    from fingerprint.kernels.features import rician_correct
    from fingerprint.models import get_model
    from fingerprint.phantoms import add_rician_noise, fibonacci_hemisphere

    bval, bvec = bench_noddi.scheme_paths(args.scheme)
    scheme = read_bvals_bvecs(bval, bvec)
    rng = np.random.default_rng(args.seed)  # bench_noddi.py's uniform case
    truth = bench_noddi.sample_parameters("uniform", args.phantom_voxels, rng)
    signals = bench_noddi.simulate(scheme, truth)
    data = add_rician_noise(signals * 1000.0, 1000.0 / 30.0, rng).astype(np.float32)

    est = FingerprintEstimator.from_model(get_model("noddi"), scheme, n_jobs=args.threads)
    names = {"odi": "SD1WatsonDistributed_1_SD1Watson_1_odi",
             "icvf": "SD1WatsonDistributed_1_partial_volume_0", "isovf": "partial_volume_0"}
    col = [est._slices[names[k]].start for k in ("odi", "icvf", "isovf")]
    t = time.perf_counter()
    ve = est.estimate(data)
    engine_seconds = time.perf_counter() - t

    sub = np.sort(np.random.default_rng(args.seed + 7).choice(
        args.phantom_voxels, size=min(args.voxels, args.phantom_voxels), replace=False))
    true = np.column_stack([truth["odi"], truth["icvf"], truth["isovf"]])[sub]

    # the phantom's prior: atoms inside its box (the Sobol design is uniform there)
    params = est.atom_parameters
    inside = np.flatnonzero((params[:, col[0]] >= 0.03) & (params[:, col[0]] <= 0.95)
                            & (params[:, col[1]] >= 0.1) & (params[:, col[1]] <= 0.95)
                            & (params[:, col[2]] <= 0.5))
    atoms = est.atom_features[inside]
    values = params[inside][:, col]
    index = faiss.IndexFlatL2(atoms.shape[1])
    index.add(np.ascontiguousarray(atoms, dtype=np.float32))

    fmap = est.feature_map
    b0 = np.asarray(scheme.b0_mask, dtype=bool)
    s0, sigma = ve.s0[sub], ve.sigma[sub]
    plain = data[sub].astype(np.float64) / s0[:, None]
    ynorm = run_parallel(rician_correct, plain, sigma / s0, b0)
    sig2 = (sigma / s0) ** 2
    ell = np.concatenate([2 * np.arange(int(nc)) for nc in fmap.n_coefficients])
    frames_engine = angles_to_frames(ve.parameters[sub][:, est._orientation_columns])
    frames_true = mu_to_vectors(truth["mu"][sub])
    grid = fibonacci_hemisphere(args.grid)

    out = {k: np.zeros((sub.size, 3)) for k in ("marg_mean", "marg_median", "axis_mean",
                                                "axis_median")}
    t = time.perf_counter()
    for v in range(sub.size):
        f0 = fmap.voxel_features(ynorm[v:v + 1], frames_engine[v:v + 1])
        queries = np.vstack([np.where(ell > 0, f0 * s, f0) for s in (1.0, 0.7, 0.4, 0.0)])
        cand = np.unique(index.search(queries.astype(np.float32), args.neighbors)[1])
        cand = cand[cand >= 0]
        a = atoms[cand]
        a2 = (a ** 2).sum(axis=1)
        for key, axes in (("marg", grid), ("axis", frames_true[v:v + 1])):
            f, rss = fmap.voxel_features(np.repeat(ynorm[v:v + 1], axes.shape[0], axis=0),
                                         axes, return_rss=True)
            f = f.astype(np.float64)
            d2 = a2[:, None] - 2.0 * a @ f.T + (f ** 2).sum(axis=1)[None, :] + rss[None, :]
            log_like = logsumexp(-d2 / (2.0 * sig2[v]), axis=1)
            mean, median = posterior(log_like, values[cand])
            out[f"{key}_mean"][v] = mean
            out[f"{key}_median"][v] = median
    oracle_seconds = time.perf_counter() - t

    engine = ve.parameters[sub][:, col]
    rows = {"fingerprint (default)": engine,
            "oracle, axis marginalised, posterior mean": out["marg_mean"],
            "oracle, axis marginalised, posterior median": out["marg_median"],
            "oracle, true axis, posterior mean": out["axis_mean"],
            "oracle, true axis, posterior median": out["axis_median"]}
    full = np.column_stack([truth["odi"], truth["icvf"], truth["isovf"]])
    results: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "phantom_voxels": args.phantom_voxels, "voxels": int(sub.size), "grid": args.grid,
        "prior_atoms": int(inside.size), "engine_seconds": engine_seconds,
        "oracle_seconds": oracle_seconds,
        "fingerprint_all_voxels_mae": dict(zip(("odi", "icvf", "isovf"), map(
            float, np.abs(ve.parameters[:, col] - full).mean(axis=0)), strict=True)),
        "rows": {}}
    for name, e in rows.items():
        mae = np.abs(e - true).mean(axis=0)
        results["rows"][name] = {"odi": float(mae[0]), "icvf": float(mae[1]),
                                 "isovf": float(mae[2]),
                                 "odi_bins": per_bin(e[:, 0], true[:, 0])}
    return results


def report(results: dict[str, object]) -> str:
    lines = [f"{results['date']}: {results['voxels']} of {results['phantom_voxels']} voxels, "
             f"{results['grid']} axes, {results['prior_atoms']} prior atoms",
             "| method | odi MAE | icvf MAE | isovf MAE | odi MAE (bias) per odi bin "
             + " / ".join(b["bin"] for b in next(iter(results["rows"].values()))["odi_bins"])
             + " |", "|---|---|---|---|---|"]
    for name, r in results["rows"].items():
        bins = " / ".join(f"{b['mae']:.3f} ({b['bias']:+.3f})" for b in r["odi_bins"])
        lines.append(f"| {name} | {r['odi']:.4f} | {r['icvf']:.4f} | {r['isovf']:.4f} | "
                     f"{bins} |")
    allv = results["fingerprint_all_voxels_mae"]
    lines.append(f"fingerprint on all {results['phantom_voxels']} voxels: odi {allv['odi']:.4f}, "
                 f"icvf {allv['icvf']:.4f}, isovf {allv['isovf']:.4f}")
    return "\n".join(lines)


if __name__ == "__main__":
    res = main(ARGS)
    print(report(res))
    if ARGS.json:
        ARGS.json.write_text(json.dumps(res, indent=2))
