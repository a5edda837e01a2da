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

The same run also times the whole-volume ``mc_csd`` path (``fit_volume('mc_csd')``, what
``fingerprint fit --model mc_csd`` runs: NIfTI in, MRtrix-convention maps out) on the
same voxels written as a volume, with the stick kernel and free water given as MRtrix3
response files (2 tissues); its peaks are read back from its sh2peaks map. ``--volume-voxels``
repeats that path on a larger volume of the same phantom (ours only).
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
    parser.add_argument("--volume-voxels", type=int, default=0,
                        help="also time the mc_csd volume path on this many voxels")
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
    mc_csd_volume(phantom(4, args.snr, args.seed + 2), 4)  # warm-up (peak grid, imports)
    result["fingerprint_mc_csd_volume"] = mc_csd_volume(blob, args.voxels)
    if args.volume_voxels:
        big = phantom(args.volume_voxels, args.snr, args.seed + 1)
        result["fingerprint_mc_csd_volume_large"] = mc_csd_volume(big, args.volume_voxels)
    print(json.dumps(result, indent=2))
    return 0


def _stick_response(shells: np.ndarray, order: int = 8) -> np.ndarray:
    """Zonal SH coefficients (shells, order / 2 + 1) of the stick kernel (1.7e-9 m²/s)."""
    from scipy.special import eval_legendre

    nodes, weights = np.polynomial.legendre.leggauss(64)
    ell = np.arange(0, order + 1, 2)
    y = np.sqrt((2 * ell + 1) / (4 * np.pi))[:, None] * eval_legendre(ell[:, None], nodes)
    return np.stack([2 * np.pi * (y * np.exp(-b * 1.7e-9 * nodes ** 2) * weights).sum(1)
                     for b in shells])


def mc_csd_volume(blob: dict[str, np.ndarray], n: int) -> dict[str, float]:
    """Time per voxel of fit_volume('mc_csd') on the phantom written as a volume, and the
    peak errors of its peak map."""
    import nibabel as nib

    from fingerprint.fitting.csd_volume import fsl_to_scanner_directions, write_mrtrix_response
    from fingerprint.fitting.pipeline import fit_volume

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        shape = (n, 1, 1)
        affine = np.diag([2.0, 2.0, 2.0, 1.0])
        nib.save(nib.Nifti1Image((1000 * blob["data"]).reshape(shape + (-1,))
                                 .astype(np.float32), affine), d / "dwi.nii.gz")
        np.savetxt(d / "dwi.bval", (blob["bvals"] / 1e6)[None], fmt="%g")
        np.savetxt(d / "dwi.bvec", blob["bvecs"].T, fmt="%.8f")
        shells = np.unique(np.round(blob["bvals"] / 1e8) * 1e8)
        wm = write_mrtrix_response(d / "wm.txt", 1000 * _stick_response(shells), shells)
        csf = write_mrtrix_response(
            d / "csf.txt", (1000 * np.sqrt(4 * np.pi) * np.exp(-shells * 3e-9))[:, None],
            shells)
        start = time.perf_counter()
        res = fit_volume("mc_csd", d / "dwi.nii.gz", d / "dwi.bval", d / "dwi.bvec",
                         d / "out", model_options={"responses": (str(wm), str(csf))})
        wall = time.perf_counter() - start
        peaks = np.asarray(nib.load(res.maps["peaks"]).dataobj).reshape(n, -1, 3)
    amps = np.linalg.norm(np.nan_to_num(peaks), axis=2)
    dirs = np.where(amps[..., None] > 0, np.nan_to_num(peaks) / np.maximum(amps, 1e-30)
                    [..., None], 0.0)
    truth = fsl_to_scanner_directions(blob["truth"].reshape(-1, 3), affine).reshape(
        blob["truth"].shape)
    errors, found_two = [], []
    for i in range(n):
        n_true = 2 if blob["crossing"][i] else 1
        found = dirs[i][amps[i] >= 0.25 * amps[i].max()] if amps[i].max() > 0 else dirs[i][:0]
        for t in truth[i, :n_true]:
            errors.append(90.0 if found.size == 0 else float(np.degrees(np.arccos(
                np.clip(np.max(np.abs(found @ t)), 0, 1)))))
        if blob["crossing"][i]:
            found_two.append(found.shape[0] >= 2)
    err = np.array(errors)
    return {"voxels": n, "ms_per_voxel_wall": 1e3 * wall / n,
            "ms_per_voxel_fit": 1e3 * res.timings["fit"] / n,
            "median_angle_deg": float(np.median(err)),
            "p90_angle_deg": float(np.percentile(err, 90)),
            "crossings_resolved": float(np.mean(found_two)) if found_two else float("nan")}


if __name__ == "__main__":
    sys.exit(main())
