"""Accuracy and speed of every named model on its own phantoms: MAE per parameter and
time per voxel, by dictionary matching and (where it applies) dmipy's brute2fine.

    python scripts/bench_models.py [--voxels 200] [--classical-voxels 20] [--size 20000]
        [--snr 30 15] [--models noddi smt ...] [--write-docs]

Each named model gets ``--voxels`` random voxels (``fingerprint.phantoms.model_phantom``:
orientations uniform, fractions from a flat Dirichlet, scalars in the model's phantom
ranges) on a scheme that meets its requirements: a three-shell scheme (b = 1000, 2000,
3000 s/mm², 30/60/60 directions, delta/Delta 10.6/43.1 ms) for most models, the
strong-gradient ``activeax`` fixture scheme for the restricted ones (ActiveAx, AxCaliber,
CHARMED, sphere-ball) and a seven-shell scheme up to b = 10,000 s/mm² for SANDI. Rician
noise at each ``--snr`` (b=0 SNR). Dictionaries have ``--size`` atoms at most (the
recipe's size when smaller); the polish runs where the fit does it by default (several
orientations, Bingham) and for ``sandi`` (``refine='nonlinear'``, its recommended use).
Orientation errors are median angles in degrees, diameters are reported in um,
diffusivities in um²/ms. The table is printed, and with ``--write-docs`` written into
docs/benchmarks.md between the ``bench_models`` markers.
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

from docs_section import write_section  # noqa: E402

from fingerprint.core.orientations import angular_error_deg  # noqa: E402
from fingerprint.core.units import DIFFUSIVITY, LENGTH  # noqa: E402
from fingerprint.models import available_models, get_model, get_recipe  # noqa: E402
from fingerprint.phantoms import default_scheme, model_phantom  # noqa: E402

BEGIN, END = "<!-- bench_models:begin -->", "<!-- bench_models:end -->"
RESTRICTED_SCHEME = {"activeax", "axcaliber", "charmed", "sphere_ball"}
NONLINEAR = {"sandi"}
SLOW_BUILD = {"noddi_bingham": 5000}  # Bingham atoms cost a 2-D quadrature each


def _schemes() -> dict[str, object]:
    from reference_helpers import default_reference_dir, reference_scheme

    return {
        "three_shell": default_scheme(shells=((1000.0, 30), (2000.0, 60), (3000.0, 60)),
                                      delta=0.0106, Delta=0.0431),
        "activeax": reference_scheme(default_reference_dir(), "activeax"),
        "seven_shell": default_scheme(shells=((500.0, 20), (1000.0, 30), (2000.0, 30),
                                              (3000.0, 30), (5000.0, 40), (7500.0, 40),
                                              (10000.0, 40)), delta=0.0106, Delta=0.0431),
    }


def scheme_for(name: str) -> str:
    if name in RESTRICTED_SCHEME:
        return "activeax"
    if name == "sandi":
        return "seven_shell"
    return "three_shell"


def _errors(model, recipe, truth, fitted) -> dict[str, str]:
    from fingerprint.models import derived_maps

    units = dict(model.parameter_units)
    fp = model.parameter_vector_to_parameters(fitted)
    tp = model.parameter_vector_to_parameters(truth)
    ok = np.all(np.isfinite(fitted), axis=1)
    out = {}
    if recipe.derived:
        dt = derived_maps(recipe.name, tp)
        df = derived_maps(recipe.name, fp)
        for label in dt:
            if dt[label].ndim == 2:
                cos = np.abs(np.sum(dt[label][ok] * df[label][ok], axis=1))
                out[label] = f"{np.degrees(np.median(np.arccos(np.clip(cos, 0, 1)))):.2f}°"
            else:
                scale = 1e9 if label in ("md", "ad", "rd") else 1.0
                out[label] = f"{np.mean(np.abs(dt[label] - df[label])[ok]) * scale:.3g}"
        return out
    for label, pname in recipe.maps.items():
        a, b = np.asarray(fp[pname])[ok], np.asarray(tp[pname])[ok]
        if a.ndim == 2:
            out[label] = f"{np.median(angular_error_deg(a, b)):.2f}°"
            continue
        scale = {DIFFUSIVITY: 1e9, LENGTH: 1e6}.get(units.get(pname, ""), 1.0)
        out[label] = f"{np.mean(np.abs(a - b)) * scale:.3g}"
    return out


def run(name: str, scheme, snr: float | None, n: int, solver: str, size: int,
        dictionary_dir: str, seed: int) -> tuple[dict[str, str], float, int, str]:
    recipe = get_recipe(name)
    model = get_model(name)
    ph = model_phantom(name, scheme, n, seed=seed, snr=snr)
    kwargs: dict = {"dictionary_dir": dictionary_dir}
    if solver == "fingerprint" and recipe.solver != "dti":
        kwargs["dictionary_size"] = min(size, SLOW_BUILD.get(name, size),
                                        int(recipe.sampling.get("size", size)))
        if name in NONLINEAR:
            kwargs["refine"] = "nonlinear"
    if solver != "fingerprint":
        kwargs["solver"] = solver
    # warm-up (dictionary build, compilation) on two voxels, then the timed fit
    model.fit(scheme, ph["signals"][:2], **kwargs)
    t0 = time.perf_counter()
    fitted = model.fit(scheme, ph["signals"], **kwargs)
    dt = (time.perf_counter() - t0) / n
    vec = np.asarray(fitted.fitted_parameters_vector, dtype=np.float64)
    return _errors(model, recipe, ph["parameters"], vec), dt, \
        int(kwargs.get("dictionary_size", 0)), str(fitted.solver)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=200)
    parser.add_argument("--classical-voxels", type=int, default=20,
                        help="voxels for brute2fine (0: skip it)")
    parser.add_argument("--classical-models", nargs="+", default=None,
                        help="models fitted by brute2fine too (default: all but dti)")
    parser.add_argument("--size", type=int, default=20000, help="atoms at most")
    parser.add_argument("--snr", type=float, nargs="+", default=[30.0, 15.0])
    parser.add_argument("--models", nargs="+", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    schemes = _schemes()
    names = args.models or sorted(available_models())
    rows = []
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            scheme = schemes[scheme_for(name)]
            solvers = ["fingerprint"]
            if args.classical_voxels and get_recipe(name).solver != "dti" and (
                    args.classical_models is None or name in args.classical_models):
                solvers.append("brute2fine")
            for snr in args.snr:
                for solver in solvers:
                    n = args.voxels if solver == "fingerprint" else args.classical_voxels
                    try:
                        errs, per_voxel, atoms, ran = run(name, scheme, snr, n, solver,
                                                          args.size, tmp, args.seed)
                    except Exception as exc:  # report and go on with the other models
                        errs, per_voxel, atoms = {"error": str(exc)[:80]}, float("nan"), 0
                        ran = solver
                    row = (name, scheme_for(name), f"{snr:g}", ran if not atoms else
                           f"{ran} ({atoms} atoms)", n, per_voxel * 1e3,
                           ", ".join(f"{k} {v}" for k, v in errs.items()))
                    rows.append(row)
                    print(" | ".join(str(c) if not isinstance(c, float) else f"{c:.3g}"
                                     for c in row), flush=True)
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    table = ["| model | scheme | SNR | solver | voxels | ms / voxel | MAE per map |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]} | {r[5]:.3g} | {r[6]} |"
              for r in rows]
    cmd = "python scripts/bench_models.py " + " ".join(argv if argv is not None
                                                         else sys.argv[1:])
    text = "\n".join([
        BEGIN, "## Model catalogue: accuracy per named model", "",
        f"Command: `{cmd.strip()}`. Machine: {platform.machine()}, {os.cpu_count()} cores "
        f"({platform.system()}), shared with other jobs: load average {load:.1f} at the "
        f"start and {load_end:.1f} at the end, so times per voxel are only comparable "
        f"within this table (same run). Date: {started:%Y-%m-%d %H:%M} UTC.", "",
        "Each model is simulated on its own phantom (`fingerprint.phantoms.model_phantom`, "
        "Rician noise at the b=0 SNR shown) and fitted by dictionary matching (default "
        "options; dictionary sizes capped as shown, the polish where the fit runs it by "
        "default and for `sandi`) and by dmipy's `brute2fine` on fewer voxels. Errors are "
        "mean absolute errors in the maps' units, diffusivities in um²/ms and diameters "
        "in um; directions are median angular errors. Times include everything "
        "`model.fit` does after the dictionary is built (warm run).", "",
        *table, "", END])
    print(text)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
