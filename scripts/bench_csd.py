"""Multi-compartment CSD against dmipy: time per voxel and FOD peak angles.

Usage::

    python3 scripts/bench_csd.py [--voxels 200] [--snr 30] [--seed 0] [--no-dmipy]

A phantom on the WU-Minn HCP scheme: each voxel has one bundle or two crossing bundles
(crossing angle drawn in 45-90 degrees) of Watson-dispersed sticks (odi 0.05-0.15,
lambda_par 1.7e-9 m²/s) plus 20 % free water (3e-9 m²/s), Rician noise at the given b0
SNR. Both libraries deconvolve with the same stick kernel at SH order 8 without
Laplace-Beltrami regularisation: fingerprint solves the exact non-negativity QP
(Clarabel), dmipy 1.0.5 its ``csd_tournier07`` iteration (the solver dmipy picks for
fixed volume fractions). Peaks are extracted from both FODs by the same peak finder
(:func:`fingerprint.core.csd_peaks.fod_peaks`), so the comparison is about the
deconvolution only: the angle between each true bundle and the closest found peak, and
the fraction of crossing voxels where two peaks are found.

dmipy runs in the separate environment that ``scripts/bench_noddi.py`` prepares
(``~/.cache/fingerprint/dmipy-venv``); it is never a dependency of fingerprint.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEFAULT_DMIPY_VENV = Path.home() / ".cache" / "fingerprint" / "dmipy-venv"

DMIPY_SCRIPT = r"""
import json, sys, time
import numpy as np
from dmipy.core.acquisition_scheme import acquisition_scheme_from_bvalues
from dmipy.core.modeling_framework import MultiCompartmentSphericalHarmonicsModel
from dmipy.signal_models import cylinder_models
blob = np.load(sys.argv[1])
scheme = acquisition_scheme_from_bvalues(blob["bvals"], blob["bvecs"], 0.0106, 0.0431)
stick = cylinder_models.C1Stick()
model = MultiCompartmentSphericalHarmonicsModel([stick], sh_order=8)
model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
start = time.perf_counter()
fit = model.fit(scheme, blob["data"], solver="csd_tournier07", lambda_lb=0.0,
                use_parallel_processing=False, verbose=False)
seconds = time.perf_counter() - start
np.save(sys.argv[2], fit.fitted_parameters["sh_coeff"])
print(json.dumps({"seconds": seconds}))
"""


def phantom(n: int, snr: float, seed: int) -> dict[str, np.ndarray]:
    from fingerprint.data.saved_acquisition_schemes import wu_minn_hcp_acquisition_scheme
    from fingerprint.distributions import distribute_models
    from fingerprint.signal_models import cylinder_models, gaussian_models
    from fingerprint.utils.utils import cart2mu, perpendicular_vector

    rng = np.random.default_rng(seed)
    scheme = wu_minn_hcp_acquisition_scheme()
    watson = distribute_models.SD1WatsonDistributed([cylinder_models.C1Stick()])
    ball = gaussian_models.G1Ball(lambda_iso=3e-9)(scheme)
    data = np.empty((n, scheme.number_of_measurements))
    truth = np.zeros((n, 2, 3))
    crossing = rng.random(n) < 0.5
    for i in range(n):
        a = rng.normal(size=3)
        a /= np.linalg.norm(a)
        angle = np.deg2rad(rng.uniform(45, 90))
        p = perpendicular_vector(a)
        b = np.cos(angle) * a + np.sin(angle) * p
        dirs = [a, b] if crossing[i] else [a]
        signal = np.zeros(scheme.number_of_measurements)
        for d in dirs:
            signal += watson(scheme, SD1Watson_1_mu=cart2mu(d),
                             SD1Watson_1_odi=rng.uniform(0.05, 0.15),
                             C1Stick_1_lambda_par=1.7e-9) / len(dirs)
        signal = 0.8 * signal + 0.2 * ball
        sigma = 1.0 / snr
        noisy = np.hypot(signal + sigma * rng.normal(size=signal.size),
                         sigma * rng.normal(size=signal.size))
        data[i] = noisy
        truth[i, :len(dirs)] = dirs
    return {"data": data, "truth": truth, "crossing": crossing,
            "bvals": scheme.bvalues, "bvecs": scheme.gradient_directions}


def peak_errors(sh: np.ndarray, truth: np.ndarray, crossing: np.ndarray
                ) -> dict[str, float]:
    from fingerprint.core.csd_peaks import fod_peaks

    peaks, heights = fod_peaks(sh, 8, max_peaks=3, relative_peak_threshold=0.25,
                               min_separation_angle=25.0)
    errors = []
    found_two = []
    for i in range(sh.shape[0]):
        n_true = 2 if crossing[i] else 1
        found = peaks[i][heights[i] > 0]
        for t in truth[i, :n_true]:
            if found.size == 0:
                errors.append(90.0)
                continue
            errors.append(float(np.degrees(np.arccos(np.clip(np.max(np.abs(found @ t)), 0,
                                                             1)))))
        if crossing[i]:
            found_two.append(found.shape[0] >= 2)
    err = np.array(errors)
    return {"median_angle_deg": float(np.median(err)),
            "p90_angle_deg": float(np.percentile(err, 90)),
            "crossings_resolved": float(np.mean(found_two)) if found_two else float("nan")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=200)
    parser.add_argument("--snr", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-dmipy", action="store_true")
    parser.add_argument("--dmipy-venv", type=Path, default=DEFAULT_DMIPY_VENV)
    args = parser.parse_args()

    from fingerprint.core.acquisition_scheme import acquisition_scheme_from_bvalues
    from fingerprint.core.modeling_framework import MultiCompartmentSphericalHarmonicsModel
    from fingerprint.signal_models import cylinder_models

    blob = phantom(args.voxels, args.snr, args.seed)
    scheme = acquisition_scheme_from_bvalues(blob["bvals"], blob["bvecs"], 0.0106, 0.0431)
    model = MultiCompartmentSphericalHarmonicsModel([cylinder_models.C1Stick()], sh_order=8)
    model.set_fixed_parameter("C1Stick_1_lambda_par", 1.7e-9)
    model.fit(scheme, blob["data"][:2], lambda_lb=0.0)  # warm-up (numba kernels)
    start = time.perf_counter()
    fit = model.fit(scheme, blob["data"], lambda_lb=0.0)
    ours = time.perf_counter() - start
    result = {"voxels": args.voxels, "snr": args.snr,
              "fingerprint": {"ms_per_voxel": 1e3 * ours / args.voxels,
                              **peak_errors(fit.fitted_parameters["sh_coeff"], blob["truth"],
                                            blob["crossing"])}}
    python = args.dmipy_venv / "bin" / "python"
    if not args.no_dmipy:
        if not python.exists():
            result["dmipy"] = f"no dmipy environment at {args.dmipy_venv} (create it with " \
                              "scripts/bench_noddi.py)"
        else:
            with tempfile.TemporaryDirectory() as tmp:
                inp = Path(tmp) / "in.npz"
                out = Path(tmp) / "sh.npy"
                np.savez(inp, data=blob["data"], bvals=blob["bvals"], bvecs=blob["bvecs"])
                run = subprocess.run([str(python), "-c", DMIPY_SCRIPT, str(inp), str(out)],
                                     capture_output=True, text=True, check=False)
                if run.returncode != 0:
                    result["dmipy"] = "failed: " + run.stderr[-800:]
                else:
                    seconds = json.loads(run.stdout.strip().splitlines()[-1])["seconds"]
                    result["dmipy"] = {"ms_per_voxel": 1e3 * seconds / args.voxels,
                                       **peak_errors(np.load(out), blob["truth"],
                                                     blob["crossing"])}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
