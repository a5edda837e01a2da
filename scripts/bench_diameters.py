"""Axon-diameter recovery of the restricted models on the strong-gradient fixture scheme.

    python scripts/bench_diameters.py [--voxels 60] [--snr 0 30 15] [--size N]
        [--bound-models activeax charmed] [--dictionary-dir DIR] [--write-docs]

ActiveAx, AxCaliber (mean diameter 2 alpha beta of its Gamma distribution) and CHARMED
phantoms (``fingerprint.phantoms.model_phantom``: diameters 2-10 um, AxCaliber alpha 2-8
and beta 0.3-1.5 um) on the ``activeax`` scheme of the reference fixtures (four shells,
G up to 200 mT/m, delta 5-20 ms), fitted by dictionary matching (the recipe's dictionary
size unless ``--size`` is given; the recipes' default fit, which for these models is the
Rician posterior over many neighbours, ``fingerprint.fitting.posterior``) with and
without the non-linear polish. Reports the resolution limit d_min of the scheme at each
SNR (``fingerprint.fitting.resolution``, Nilsson et al. 2017), MAE and correlation over
all voxels and over the voxels whose true diameter lies above d_min, and the share of
voxels flagged ``below_resolution`` (estimated diameter under d_min at the phantom's
SNR, counting half the fit's posterior spread of the diameter as the fitting core's flag
does), with the share of the voxels truly below d_min that are flagged and the share of
flagged voxels truly below it. At each noisy SNR it also reports the Bayes bound of
``scripts/bench_diameter_bound.py`` (the lowest MAE any estimator can reach on the
phantom) and the same oracle with the fit's own parameter ranges as prior. With
``--write-docs`` the table goes into docs/benchmarks.md between the ``bench_diameters``
markers.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from bench_diameter_bound import diameter_bound  # noqa: E402
from docs_section import write_section  # noqa: E402
from reference_helpers import default_reference_dir, reference_scheme  # noqa: E402

from fingerprint.fitting.resolution import (  # noqa: E402
    below_resolution,
    diameter_estimates,
    diameter_resolution_limit,
)
from fingerprint.models import get_model, get_recipe  # noqa: E402
from fingerprint.phantoms import model_phantom  # noqa: E402

BEGIN, END = "<!-- bench_diameters:begin -->", "<!-- bench_diameters:end -->"
MODELS = ("activeax", "axcaliber", "charmed")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan")


def _row(name: str, snr: float, fit: str, d_min: float, d_fit: np.ndarray,
         d_true: np.ndarray, flagged: np.ndarray, cpu_ms: float) -> tuple:
    above = d_true > d_min
    err = np.abs(d_fit - d_true) * 1e6
    flagged = np.asarray(flagged, dtype=bool)
    recall = flagged[~above].mean() if (~above).any() else float("nan")
    precision = (~above)[flagged].mean() if flagged.any() else float("nan")
    return (name, "noise-free" if not snr else f"{snr:g}", fit, d_min * 1e6, err.mean(),
            _corr(d_fit, d_true), err[above].mean() if above.any() else float("nan"),
            _corr(d_fit[above], d_true[above]),
            err[~above].mean() if (~above).any() else float("nan"), int(above.sum()),
            flagged.mean(), recall, precision, cpu_ms)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=60)
    parser.add_argument("--snr", type=float, nargs="+", default=[0.0, 30.0, 15.0],
                        help="b=0 SNR (0: noise-free)")
    parser.add_argument("--size", type=int, default=None,
                        help="dictionary atoms (default: each recipe's size)")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--bound-models", nargs="+", default=None,
                        help="models whose Bayes bounds are computed (default: all)")
    parser.add_argument("--dictionary-dir", default=None,
                        help="keep the dictionaries here (default: a temporary directory)")
    parser.add_argument("--bound-samples", type=int, default=4000,
                        help="draws per importance-sampling stage of the Bayes bound "
                             "(0: no bound)")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    scheme = reference_scheme(default_reference_dir(), "activeax")
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()[0]
    rows, ess_notes = [], []
    bound_models = set(args.models if args.bound_models is None else args.bound_models)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = args.dictionary_dir or tmp_dir
        for name in args.models:
            model = get_model(name)
            for snr in args.snr:
                ph = model_phantom(name, scheme, args.voxels, seed=5, snr=snr or None)
                limit_snr = snr or 30.0
                d_min = float(diameter_resolution_limit(scheme, limit_snr))
                d_true = diameter_estimates(model, ph["parameters"])
                for refine in (True, "nonlinear"):
                    model.fit(scheme, ph["signals"][:2], dictionary_size=args.size,
                              dictionary_dir=tmp, refine=refine)  # warm-up: build, compile
                    t0 = time.process_time()
                    fitted = model.fit(scheme, ph["signals"], dictionary_size=args.size,
                                       dictionary_dir=tmp, refine=refine)
                    cpu = (time.process_time() - t0) / args.voxels * 1e3
                    vec = np.asarray(fitted.fitted_parameters_vector, dtype=np.float64)
                    flagged = below_resolution(model, scheme, vec,
                                               np.full(args.voxels, limit_snr),
                                               fitted.uncertainty)
                    rows.append(_row(name, snr, "matching + polish" if refine == "nonlinear"
                                     else "matching", d_min, diameter_estimates(model, vec),
                                     d_true, flagged, cpu))
                    print(rows[-1], flush=True)
                if not snr or not args.bound_samples or name not in bound_models:
                    continue
                for recipe_ranges, label in ((False, "Bayes bound, phantom's prior"),
                                             (True, "Bayes bound, fit's ranges")):
                    t0 = time.process_time()
                    res = diameter_bound(name, scheme, ph, snr, samples=args.bound_samples,
                                         recipe_ranges=recipe_ranges)
                    cpu = (time.process_time() - t0) / args.voxels * 1e3
                    flagged = res["median"] < d_min
                    rows.append(_row(name, snr, label, d_min, res["median"], d_true,
                                     flagged, cpu))
                    ess_notes.append(f"{name} SNR {snr:g} {label.split(', ')[1]}: median "
                                     f"{np.median(res['ess']):.0f}, lowest "
                                     f"{res['ess'].min():.0f}")
                    print(rows[-1], ess_notes[-1], flush=True)
    load_end = os.getloadavg()[0]
    table = ["| model | SNR | fit | d_min (um) | MAE all (um) | r all | MAE above d_min (um) "
             "| r above | MAE below d_min (um) | voxels above | flagged below_resolution "
             "| truly below: flagged | flagged: truly below | CPU ms / voxel |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- "
             "| --- |"]
    table += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | "
              f"{r[6]:.2f} | {r[7]:.2f} | {r[8]:.2f} | {r[9]} | {r[10]:.0%} | {r[11]:.0%} | "
              f"{r[12]:.0%} | {r[13]:.3g} |" for r in rows]
    shown = list(argv if argv is not None else sys.argv[1:])
    if "--dictionary-dir" in shown[:-1]:  # no machine paths in the docs
        shown[shown.index("--dictionary-dir") + 1] = "DIR"
    cmd = "python scripts/bench_diameters.py " + " ".join(shown)
    text = "\n".join([
        BEGIN, "## Restricted models: axon diameters", "",
        f"Command: `{cmd.strip()}`. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"shared with other jobs (load average {load:.1f} at the start, {load_end:.1f} at "
        f"the end: CPU times are comparable only within this table). Date: "
        f"{started:%Y-%m-%d %H:%M} UTC.", "",
        "Phantoms on the `activeax` fixture scheme (4 shells, G 60-200 mT/m, delta 5-20 ms, "
        "32 directions each); true diameters uniform over 2-10 um (AxCaliber: mean diameter "
        "2 alpha beta, alpha 2-8, beta 0.3-1.5 um), volume fractions from a flat Dirichlet "
        "(each at least 0.1). d_min is the resolution limit of the scheme (Nilsson et al. "
        "2017, best shell, every measurement counted as perpendicular: a lower bound) at the "
        "phantom's SNR (SNR 30 for the noise-free rows); diameters below it are "
        "indistinguishable, and fitted voxels whose estimate is not clearly above it (below "
        "it after subtracting half the fit's posterior spread of the diameter; AxCaliber's "
        "mean diameter without the spread) carry the `below_resolution` quality flag. "
        "Dictionaries of "
        + (f"{args.size:,} atoms" if args.size else "each recipe's size ("
           + ", ".join(f"{m} {get_recipe(m).sampling.get('size', 0):,}" for m in args.models)
           + " atoms)")
        + "; `matching` is the default fit (for these models the scalars are the posterior "
        "mean over each recipe's `posterior_neighbors` nearest atoms under the exact Rician "
        "likelihood, `fingerprint.fitting.posterior`), `matching + polish` adds "
        "`refine='nonlinear'`. 'truly below: flagged' is the share of the voxels whose true "
        "diameter lies below d_min that carry the flag, 'flagged: truly below' the share "
        "of flagged voxels whose true diameter lies below d_min.", "",
        "The Bayes bounds (`scripts/bench_diameter_bound.py`) are the posterior medians of "
        "each voxel's diameter with the exact Rician likelihood, knowing S0, the noise level "
        "and the true fibre axis, under the phantom's own prior (the lowest MAE any "
        "estimator can reach on this phantom) or with the scalars' prior widened to the "
        "ranges the fit itself searches (the recipe's dictionary ranges: what a method "
        "that does not know the phantom's box can reach). Their 'flagged' column counts "
        "posterior medians below d_min. Effective sample sizes of the importance "
        "sampling: " + ("; ".join(ess_notes) or "none computed in this run") + ".", "",
        *table, "", END])
    print(text)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
