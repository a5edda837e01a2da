"""Axon-diameter recovery of the restricted models on the strong-gradient fixture scheme.

    python scripts/bench_diameters.py [--voxels 100] [--snr 0 30] [--write-docs]

ActiveAx, AxCaliber (mean diameter 2 alpha beta of its Gamma distribution) and CHARMED
phantoms (``fingerprint.phantoms.model_phantom``: diameters 2-10 um, AxCaliber alpha 2-8
and beta 0.3-1.5 um) on the ``activeax`` scheme of the reference fixtures (four shells,
G up to 200 mT/m, delta 5-20 ms), fitted by dictionary matching (20,000 atoms) with and
without the non-linear polish. Reports the resolution limit d_min of the scheme at each
SNR (``fingerprint.fitting.resolution``, Nilsson et al. 2017), MAE and correlation over
all voxels and over the voxels whose true diameter lies above d_min, and the share of
voxels flagged ``below_resolution`` (estimated diameter under d_min at the phantom's
SNR). With ``--write-docs`` the table goes into docs/benchmarks.md between the
``bench_diameters`` markers.
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
from reference_helpers import default_reference_dir, reference_scheme  # noqa: E402

from fingerprint.fitting.resolution import (  # noqa: E402
    below_resolution,
    diameter_estimates,
    diameter_resolution_limit,
)
from fingerprint.models import get_model  # noqa: E402
from fingerprint.phantoms import model_phantom  # noqa: E402

BEGIN, END = "<!-- bench_diameters:begin -->", "<!-- bench_diameters:end -->"
MODELS = ("activeax", "axcaliber", "charmed")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[ok], b[ok])[0, 1]) if ok.sum() > 2 else float("nan")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=100)
    parser.add_argument("--snr", type=float, nargs="+", default=[0.0, 30.0],
                        help="b=0 SNR (0: noise-free)")
    parser.add_argument("--size", type=int, default=20000)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    scheme = reference_scheme(default_reference_dir(), "activeax")
    started = datetime.datetime.now(datetime.timezone.utc)
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in MODELS:
            model = get_model(name)
            for snr in args.snr:
                ph = model_phantom(name, scheme, args.voxels, seed=5, snr=snr or None)
                limit_snr = snr or 30.0
                d_min = float(diameter_resolution_limit(scheme, limit_snr))
                d_true = diameter_estimates(model, ph["parameters"])
                for refine in (True, "nonlinear"):
                    model.fit(scheme, ph["signals"][:2], dictionary_size=args.size,
                              dictionary_dir=tmp, refine=refine)  # warm-up: build, compile
                    t0 = time.perf_counter()
                    fitted = model.fit(scheme, ph["signals"], dictionary_size=args.size,
                                       dictionary_dir=tmp, refine=refine)
                    per_voxel = (time.perf_counter() - t0) / args.voxels
                    vec = np.asarray(fitted.fitted_parameters_vector, dtype=np.float64)
                    d_fit = diameter_estimates(model, vec)
                    above = d_true > d_min
                    flagged = below_resolution(model, scheme, vec,
                                               np.full(args.voxels, limit_snr))
                    rows.append((name, "noise-free" if not snr else f"{snr:g}",
                                 "matching + polish" if refine == "nonlinear" else "matching",
                                 d_min * 1e6, np.mean(np.abs(d_fit - d_true)) * 1e6,
                                 _corr(d_fit, d_true),
                                 np.mean(np.abs(d_fit - d_true)[above]) * 1e6,
                                 _corr(d_fit[above], d_true[above]), int(above.sum()),
                                 float(flagged.mean()), per_voxel * 1e3))
                    print(rows[-1], flush=True)
    load_end = os.getloadavg()[0]
    table = ["| model | SNR | fit | d_min (um) | MAE all (um) | r all | MAE above d_min (um) "
             "| r above | voxels above | flagged below_resolution | ms / voxel |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | "
              f"{r[6]:.2f} | {r[7]:.2f} | {r[8]} | {r[9]:.0%} | {r[10]:.3g} |" for r in rows]
    cmd = "python scripts/bench_diameters.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    text = "\n".join([
        BEGIN, "## Restricted models: axon diameters", "",
        f"Command: `{cmd.strip()}`. Machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"shared with other jobs (load average {load:.1f} at the start, {load_end:.1f} at "
        f"the end: times are comparable only within this table). Date: "
        f"{started:%Y-%m-%d %H:%M} UTC.", "",
        "Phantoms on the `activeax` fixture scheme (4 shells, G 60-200 mT/m, delta 5-20 ms, "
        "32 directions each); true diameters 2-10 um (AxCaliber: mean diameter 2 alpha "
        "beta). d_min is the resolution limit of the scheme (Nilsson et al. 2017, best "
        "shell, every measurement counted as perpendicular: a lower bound) at the "
        "phantom's SNR (SNR 30 for the noise-free rows); diameters below it are "
        "indistinguishable and fitted voxels whose estimate falls below it carry the "
        "`below_resolution` quality flag. Dictionaries of 20,000 atoms.", "",
        *table, "", END])
    print(text)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
