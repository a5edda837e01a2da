"""NODDI benchmark: accuracy and speed of fingerprint vs AMICO on simulated phantoms.

    python scripts/bench_noddi.py [--scheme tests/data/reference/schemes/hcp] [--voxels 10000]
        [--threads 2] [--dictionary-size N] [--no-amico] [--no-dmipy] [--dmipy-voxels 1000]
        [--profile] [--whole-brain [--baseline-checkout DIR] [--repeats N]
        [--scaling-threads 1 2] [--scaling-voxels N]] [--json out.json]

Phantoms come from our NODDI forward model on the given scheme (FSL ``<scheme>.bval`` /
``<scheme>.bvec``; default: the HCP scheme of the reference test data in
``tests/data/reference``):

* ``uniform``: random orientations, odi ~ U(0.03, 0.95), icvf ~ U(0.1, 0.95),
  isovf ~ U(0, 0.5) (lambda_par 1.7e-9, lambda_iso 3e-9 m²/s, as in the recipe),
  Rician noise with SNR 30 on b=0;
* ``wm-gm``: SNR 20, half white-matter-like (icvf 0.5-0.8, odi 0.03-0.3, isovf 0-0.15),
  half grey-matter-like (icvf 0.25-0.5, odi 0.3-0.7, isovf 0-0.25).

Each phantom is fitted by ``fingerprint.fitting.pipeline.fit_volume`` (NIfTI in, maps
out; once to build or load the dictionary, once timed) and, unless ``--no-amico``, by
AMICO's NODDI (PyPI package ``dmri-amico``, installed by this script into its own virtual
environment, by default ``~/.cache/fingerprint/amico-venv``; never a dependency of
fingerprint) in a subprocess on the same files. Reported: mean absolute error of icvf,
odi, isovf, median angular error of the fibre direction, and µs per voxel.

Unless ``--no-dmipy``, dmipy 1.0.5 (the reference implementation, PyPI ``dmipy``) fits a
random subset of ``--dmipy-voxels`` voxels of each phantom (default 1,000: its
brute2fine solver costs tens of ms per voxel) in a subprocess, with NODDI-Watson built as
in its documentation (G1Ball lambda_iso fixed 3e-9; SD1WatsonDistributed(C1Stick,
G2Zeppelin), tortuous lambda_perp, equal lambda_par fixed 1.7e-9 m²/s; default solver
brute2fine, ``number_of_processors`` = ``--threads``). dmipy pins ``scipy==1.4.1``, which
has no wheel for current Pythons, so the script installs it into its own virtual
environment (by default ``~/.cache/fingerprint/dmipy-venv``; never a dependency of
fingerprint) from binary wheels of older numpy / scipy / dipy / numba, then dmipy itself
without its declared dependencies. fingerprint's (and AMICO's) errors on the very same
subset are reported beside dmipy's.

``--profile`` prints the stage profile (:mod:`fingerprint.stages`) of each phantom's
timed fit.

``--whole-brain`` also fits ``--whole-brain-voxels`` voxels (default 1,000,000, signals
of the uniform phantom with fresh Rician noise, a gzip NIfTI with a mask) through the
``fingerprint fit`` command, end to end in a fresh interpreter (reading, mask, fit, all
maps and sidecars), at ``--threads``; and a ``--scaling-voxels`` volume at each of
``--scaling-threads`` (the speed-up per core). With ``--baseline-checkout DIR`` (a
checkout of a previous version) the same runs are made with that code back to back,
alternating which runs first, ``--repeats`` times. Reported per run: wall time, µs per
voxel, peak RSS of the process, the load average before it, and the stage profile
(checkouts without :mod:`fingerprint.stages`: the fit's dictionary / fit / write times).
Each checkout first fits a small volume once per thread count, untimed (compiled
kernels, HNSW graph). The volumes are kept in ``--work`` and reused when present.

    python scripts/bench_noddi.py --only-whole-brain --work /tmp/wb \
        --baseline-checkout ../previous --repeats 2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SCHEME = REPO / "tests" / "data" / "reference" / "schemes" / "hcp"
DEFAULT_AMICO_VENV = Path.home() / ".cache" / "fingerprint" / "amico-venv"
DEFAULT_DMIPY_VENV = Path.home() / ".cache" / "fingerprint" / "dmipy-venv"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scheme", type=Path, default=DEFAULT_SCHEME,
                   help="FSL scheme: path prefix of <scheme>.bval/.bvec, or the .bval file")
    p.add_argument("--voxels", type=int, default=10_000, help="voxels per phantom")
    p.add_argument("--threads", type=int, default=2, help="threads for both methods")
    p.add_argument("--dictionary-size", type=int, default=None,
                   help="atoms of our dictionary (default: the recipe's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, default=None, help="working directory (default: temp)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--no-amico", action="store_true", help="skip AMICO")
    p.add_argument("--amico-venv", type=Path, default=DEFAULT_AMICO_VENV)
    p.add_argument("--no-dmipy", action="store_true", help="skip dmipy")
    p.add_argument("--dmipy-voxels", type=int, default=1_000,
                   help="random voxels of each phantom fitted by dmipy (and compared like "
                        "for like with the others on the same subset)")
    p.add_argument("--dmipy-venv", type=Path, default=DEFAULT_DMIPY_VENV)
    p.add_argument("--whole-brain", action="store_true",
                   help="also run the whole-brain CLI benchmark")
    p.add_argument("--whole-brain-voxels", type=int, default=1_000_000)
    p.add_argument("--whole-brain-box", type=int, nargs=3, metavar=("X", "Y", "Z"),
                   help="put the whole-brain voxels in an ellipsoidal mask inside a box of "
                        "this size (e.g. 145 174 145, the HCP grid); default: a full cube")
    p.add_argument("--only-whole-brain", action="store_true",
                   help="run only the whole-brain CLI benchmark (implies --whole-brain)")
    p.add_argument("--baseline-checkout", type=Path, metavar="DIR",
                   help="a checkout of a previous version (e.g. `git worktree add --detach "
                        "DIR <commit>`): its `fingerprint fit` runs the same whole-brain "
                        "volumes back to back with this checkout's")
    p.add_argument("--repeats", type=int, default=1,
                   help="whole-brain runs per code, volume and thread count (alternating "
                        "which code runs first)")
    p.add_argument("--scaling-threads", type=int, nargs="*", default=[1, 2], metavar="N",
                   help="thread counts of the scaling runs (default 1 2; none: skip them)")
    p.add_argument("--scaling-voxels", type=int, default=250_000,
                   help="voxels of the (cube, gzip) volume of the scaling runs")
    p.add_argument("--profile", action="store_true",
                   help="print the stage profile of the timed fit of each phantom")
    p.add_argument("--json", type=Path, help="write the results as JSON here")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:  # thread counts must be set before numpy / numba are imported
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(ARGS.threads))

import numpy as np  # noqa: E402

# --------------------------------------------------------------------------- phantoms


def scheme_paths(scheme: Path) -> tuple[Path, Path]:
    if scheme.suffix == ".bval":
        return scheme, scheme.with_suffix(".bvec")
    return scheme.with_name(scheme.name + ".bval"), scheme.with_name(scheme.name + ".bvec")


def sample_parameters(kind: str, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from fingerprint.phantoms import random_orientations

    if kind == "uniform":
        icvf = rng.uniform(0.1, 0.95, n)
        odi = rng.uniform(0.03, 0.95, n)
        isovf = rng.uniform(0.0, 0.5, n)
    elif kind == "wm-gm":
        wm = np.arange(n) < n // 2
        icvf = np.where(wm, rng.uniform(0.5, 0.8, n), rng.uniform(0.25, 0.5, n))
        odi = np.where(wm, rng.uniform(0.03, 0.3, n), rng.uniform(0.3, 0.7, n))
        isovf = np.where(wm, rng.uniform(0.0, 0.15, n), rng.uniform(0.0, 0.25, n))
    else:
        raise ValueError(kind)
    return {"icvf": icvf, "odi": odi, "isovf": isovf, "mu": random_orientations(n, rng)}


def simulate(scheme, params: dict[str, np.ndarray], batch: int = 50_000) -> np.ndarray:
    """Noise-free signals (S0 = 1), (n, N) float64."""
    from fingerprint.models import get_model
    from fingerprint.phantoms import noddi_parameter_vectors

    model = get_model("noddi")
    n = params["icvf"].size
    out = np.empty((n, scheme.number_of_measurements))
    for a in range(0, n, batch):
        b = min(n, a + batch)
        vec = noddi_parameter_vectors(model, icvf=params["icvf"][a:b], odi=params["odi"][a:b],
                                      isovf=params["isovf"][a:b], mu=params["mu"][a:b])
        out[a:b] = model.simulate_signal(scheme, vec)
    return out


def grid_shape(n: int) -> tuple[int, int, int]:
    side = int(np.ceil(np.sqrt(n)))
    return side, int(np.ceil(n / side)), 1


def write_case(directory: Path, signals: np.ndarray, bval: Path, bvec: Path, s0: float,
               snr: float, rng: np.random.Generator, shape: tuple[int, int, int] | None = None,
               mask_flat: np.ndarray | None = None) -> dict[str, Path]:
    """Noisy NIfTI (x, y, z, N) of the n voxels: voxel i at flat (x fastest) index i, or at
    the i-th True position of ``mask_flat``; zero signal outside the mask."""
    import nibabel as nib

    from fingerprint.phantoms import add_rician_noise

    directory.mkdir(parents=True, exist_ok=True)
    n, N = signals.shape
    shape = shape or grid_shape(n)
    data = np.zeros((int(np.prod(shape)), N), np.float32)
    if mask_flat is None:
        where = np.arange(n)
    else:
        where = np.flatnonzero(mask_flat)
        assert where.size == n
    for a in range(0, n, 100_000):  # blockwise: bounded float64 temporaries
        b = min(n, a + 100_000)
        data[where[a:b]] = add_rician_noise(signals[a:b] * s0, s0 / snr, rng)
    mask = np.zeros(int(np.prod(shape)), np.uint8)
    mask[where] = 1
    affine = np.diag([1.25, 1.25, 1.25, 1.0])
    order = "F"  # voxel i <-> flat index i in (x fastest) order, matching coords below
    dwi = nib.Nifti1Image(data.reshape(shape + (N,), order=order), affine)
    m = nib.Nifti1Image(mask.reshape(shape, order=order), affine)
    paths = {"dwi": directory / "dwi.nii.gz", "mask": directory / "mask.nii.gz",
             "bval": directory / "dwi.bval", "bvec": directory / "dwi.bvec"}
    nib.save(dwi, paths["dwi"])
    nib.save(m, paths["mask"])
    shutil.copy(bval, paths["bval"])
    shutil.copy(bvec, paths["bvec"])
    return paths


def to_flat(volume: np.ndarray, n: int) -> np.ndarray:
    spatial = int(np.prod(volume.shape[:3]))
    if volume.ndim == 3:
        return volume.reshape(spatial, order="F")[:n]
    return np.stack([volume[..., k].reshape(spatial, order="F")[:n]
                     for k in range(volume.shape[3])], axis=1)


def errors(est: dict[str, np.ndarray], truth: dict[str, np.ndarray]) -> dict[str, float]:
    from fingerprint.io.nifti import mu_to_vectors
    from fingerprint.phantoms import angular_error_deg

    out = {f"{k}_mae": float(np.mean(np.abs(est[k] - truth[k]))) for k in ("icvf", "odi", "isovf")}
    ang = angular_error_deg(est["direction"], mu_to_vectors(truth["mu"]))
    out["direction_median_deg"] = float(np.nanmedian(ang))
    return out


# --------------------------------------------------------------------------- ours
def run_ours(paths: dict[str, Path], out: Path, n: int, threads: int, size: int | None
             ) -> dict[str, object]:
    import nibabel as nib

    from fingerprint.fitting.pipeline import fit_volume

    t = time.perf_counter()
    first = fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"], out / "cold",
                       mask=paths["mask"], threads=threads, dictionary_size=size)
    cold = time.perf_counter() - t
    from fingerprint.stages import profile_stages

    t = time.perf_counter()
    with profile_stages() as prof:
        res = fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"], out / "warm",
                         mask=paths["mask"], threads=threads, dictionary_size=size)
    warm = time.perf_counter() - t
    maps = {k: to_flat(np.asarray(nib.load(res.maps[k]).dataobj), n)
            for k in ("icvf", "odi", "isovf", "direction")}
    from fingerprint.dictionary import open_dictionary

    atoms = open_dictionary(res.dictionary).n_atoms if res.dictionary else None
    return {"maps": maps, "cold_seconds": cold, "warm_seconds": warm,
            "dictionary_seconds_cold": first.timings.get("dictionary"),
            "fit_seconds": res.timings["fit"], "us_per_voxel_fit": res.timings["fit"] / n * 1e6,
            "us_per_voxel_total": warm / n * 1e6, "atoms": atoms,
            "profile": {**prof.to_dict(), "table": prof.table()}}


def run_estimator_only(paths: dict[str, Path], n: int, threads: int, size: int | None
                       ) -> dict[str, float]:
    """In-memory matching speed (no NIfTI I/O): estimate() on the (n, N) array."""
    from fingerprint.fitting.estimator import FingerprintEstimator
    from fingerprint.io.gradients import read_bvals_bvecs
    from fingerprint.io.nifti import DWIImage, load_mask
    from fingerprint.models import get_model

    img = DWIImage(paths["dwi"])
    mask = load_mask(paths["mask"], img.spatial_shape)
    data = np.concatenate([s.data for s in img.iter_slabs(mask)])
    scheme = read_bvals_bvecs(paths["bval"], paths["bvec"])
    est = FingerprintEstimator.from_model(get_model("noddi"), scheme, dictionary_size=size,
                                          n_jobs=threads)
    est.estimate(data[:100])  # warm-up (JIT, index load)
    t = time.perf_counter()
    est.estimate(data)
    sec = time.perf_counter() - t
    return {"estimate_seconds": sec, "us_per_voxel_estimate": sec / data.shape[0] * 1e6}


# --------------------------------------------------------------------------- AMICO
AMICO_RUNNER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import amico
    dwi, bval, bvec, mask, work, threads, out = sys.argv[1:8]
    amico.setup()
    scheme = work + "/dwi.scheme"
    amico.util.fsl2scheme(bval, bvec, scheme)
    ae = amico.Evaluation(study_path=work, subject=".", output_path=work + "/AMICO")
    ae.load_data(dwi, scheme, mask_filename=mask, b0_thr=10)
    ae.set_model("NODDI")
    t = time.time(); ae.generate_kernels(regenerate=True); kernels = time.time() - t
    t = time.time(); ae.load_kernels(); load = time.time() - t
    ae.set_config("nthreads", int(threads))
    ae.set_config("BLAS_nthreads", 1)
    t = time.time(); ae.fit(); fit = time.time() - t
    m = ae.RESULTS["MAPs"]
    np.savez(out, maps=m, names=np.array(ae.model.maps_name), dirs=ae.RESULTS["DIRs"])
    print(json.dumps({"kernels_seconds": kernels, "load_kernels_seconds": load,
                      "fit_seconds": fit,
                      "dirs_seconds": ae.get_config("dirs_precomputing_time"),
                      "model_fit_seconds": ae.get_config("fit_time"),
                      "version": getattr(amico, "__version__", "?")}))
""")


def ensure_amico(venv: Path) -> tuple[Path | None, str]:
    """Python of a venv with dmri-amico (installed on first use), or (None, reason)."""
    python = venv / "bin" / "python"
    if python.exists():
        ok = subprocess.run([str(python), "-c", "import amico"], capture_output=True)
        if ok.returncode == 0:
            return python, ""
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True)
        r = subprocess.run([str(python), "-m", "pip", "install", "-q", "dmri-amico"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            return None, f"pip install dmri-amico failed: {r.stderr.strip()[-500:]}"
        ok = subprocess.run([str(python), "-c", "import amico"], capture_output=True,
                            text=True)
        if ok.returncode != 0:
            return None, f"amico does not import: {ok.stderr.strip()[-500:]}"
        return python, ""
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"cannot create the AMICO venv: {exc}"


def run_amico(python: Path, paths: dict[str, Path], work: Path, n: int, threads: int
              ) -> dict[str, object]:
    work.mkdir(parents=True, exist_ok=True)
    runner = work / "run_amico.py"
    runner.write_text(AMICO_RUNNER)
    out = work / "amico.npz"
    t = time.perf_counter()
    r = subprocess.run([str(python), str(runner), str(paths["dwi"]), str(paths["bval"]),
                        str(paths["bvec"]), str(paths["mask"]), str(work), str(threads),
                        str(out)], capture_output=True, text=True, cwd=work)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"AMICO failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    z = np.load(out)
    names = [str(x).upper() for x in z["names"]]

    def pick(*options: str) -> np.ndarray:
        for o in options:
            if o in names:
                return to_flat(z["maps"][..., names.index(o)], n)
        raise KeyError(f"AMICO maps {names} have none of {options}")

    maps = {"icvf": pick("NDI", "ICVF"), "odi": pick("ODI", "OD"),
            "isovf": pick("FWF", "ISOVF"), "direction": to_flat(z["dirs"], n)}
    fit = float(info["fit_seconds"])
    return {"maps": maps, "wall_seconds": wall, **info,
            "us_per_voxel_fit": fit / n * 1e6}


# --------------------------------------------------------------------------- dmipy
# Versions with CPython 3.11 binary wheels that dmipy 1.0.5 still works with (it uses
# pkg_resources, hence an older setuptools); dmipy itself is installed without its
# declared dependencies (it pins scipy==1.4.1, which would be built from source).
DMIPY_BINARY_DEPS = ["numpy==1.23.5", "scipy==1.10.1", "dipy==1.7.0", "numba==0.58.1",
                     "pathos", "setuptools<70"]
DMIPY_PACKAGE = "dmipy==1.0.5"

DMIPY_RUNNER = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    import dmipy
    from dmipy.core.acquisition_scheme import acquisition_scheme_from_bvalues
    from dmipy.core.modeling_framework import MultiCompartmentModel
    from dmipy.distributions.distribute_models import SD1WatsonDistributed
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
    ball = gaussian_models.G1Ball()
    stick = cylinder_models.C1Stick()
    zeppelin = gaussian_models.G2Zeppelin()
    watson = SD1WatsonDistributed(models=[stick, zeppelin])
    watson.set_tortuous_parameter("G2Zeppelin_1_lambda_perp", "C1Stick_1_lambda_par",
                                  "partial_volume_0")
    watson.set_equal_parameter("G2Zeppelin_1_lambda_par", "C1Stick_1_lambda_par")
    watson.set_fixed_parameter("G2Zeppelin_1_lambda_par", 1.7e-9)
    model = MultiCompartmentModel(models=[ball, watson])
    model.set_fixed_parameter("G1Ball_1_lambda_iso", 3e-9)
    data = np.load(data_path).astype(np.float64)
    parallel = threads > 1
    kw = dict(use_parallel_processing=parallel)
    if parallel:
        kw["number_of_processors"] = threads
    t = time.time()
    model.fit(scheme, data[:2], use_parallel_processing=False)  # warm-up (numba JIT)
    warm = time.time() - t
    t = time.time()
    fitted = model.fit(scheme, data, **kw)
    fit = time.time() - t
    p = fitted.fitted_parameters
    np.savez(out, icvf=p["SD1WatsonDistributed_1_partial_volume_0"],
             odi=p["SD1WatsonDistributed_1_SD1Watson_1_odi"],
             isovf=p["partial_volume_0"], mu=p["SD1WatsonDistributed_1_SD1Watson_1_mu"])
    print(json.dumps({"fit_seconds": fit, "warmup_seconds": warm,
                      "version": getattr(dmipy, "__version__", "1.0.5"),
                      "numpy": np.__version__, "parallel": parallel, "processes": threads}))
""")


#: What the benchmarks use of dmipy: the package, its framework and its solvers
#: (brute2fine, MIX, the CSD optimisers, the multi-tissue one). A cvxpy that does not import
#: with the venv's scipy once broke these imports; the probe runs them all.
DMIPY_PROBE = ("import dmipy, dmipy.core.modeling_framework, "
               "dmipy.core.fitted_modeling_framework, dmipy.distributions.distribute_models, "
               "dmipy.signal_models.cylinder_models, dmipy.signal_models.gaussian_models, "
               "dmipy.optimizers.brute2fine, dmipy.optimizers.mix, "
               "dmipy.optimizers.multi_tissue_convex_optimizer, "
               "dmipy.optimizers_fod.csd_tournier, dmipy.optimizers_fod.csd_cvxpy")


def dmipy_problem(python: Path) -> str | None:
    """Why dmipy (with its solvers) does not import with ``python``, or None when it
    does."""
    try:
        r = subprocess.run([str(python), "-c", DMIPY_PROBE], capture_output=True, text=True,
                           timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return None if r.returncode == 0 else (r.stderr.strip()[-500:] or f"exit {r.returncode}")


def ensure_dmipy(venv: Path) -> tuple[Path | None, str]:
    """Python of a venv with dmipy (installed on first use), or (None, reason).

    An existing venv is used when dmipy and its solvers import (:data:`DMIPY_PROBE`).
    Otherwise it is repaired: a cvxpy that breaks the imports is uninstalled (dmipy only
    uses it for one optional CSD solver), and when that is not enough the venv is deleted
    and rebuilt from the pinned binary wheels."""
    python = venv / "bin" / "python"
    if python.exists():
        problem = dmipy_problem(python)
        if problem is None:
            return python, ""
        print(f"dmipy venv {venv} does not import dmipy's solvers ({problem.splitlines()[-1]})"
              "; repairing it", file=sys.stderr)
        if "cvxpy" in problem:
            subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", "cvxpy"],
                           capture_output=True)
            if dmipy_problem(python) is None:
                return python, ""
        shutil.rmtree(venv, ignore_errors=True)
    elif venv.exists():  # a half-made venv (no interpreter)
        shutil.rmtree(venv, ignore_errors=True)
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True,
                       capture_output=True)
        pip = [str(python), "-m", "pip", "install", "-q"]
        steps = [[*pip, "--only-binary=:all:", *DMIPY_BINARY_DEPS],
                 [*pip, "--no-deps", DMIPY_PACKAGE]]
        for cmd in steps:
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                return None, f"{' '.join(cmd[3:])} failed: {r.stderr.strip()[-500:]}"
        problem = dmipy_problem(python)
        if problem is not None:
            return None, f"dmipy does not import: {problem}"
        return python, ""
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"cannot create the dmipy venv: {exc}"


def dmipy_subset(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted random voxel indices (k of n) fitted by dmipy."""
    rng = np.random.default_rng(seed + 1000)
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


def run_dmipy(python: Path, paths: dict[str, Path], work: Path, n: int, subset: np.ndarray,
              threads: int) -> dict[str, object]:
    import nibabel as nib

    from fingerprint.io.nifti import mu_to_vectors

    work.mkdir(parents=True, exist_ok=True)
    volume = np.asarray(nib.load(paths["dwi"]).dataobj, dtype=np.float32)
    data = to_flat(volume, n)[subset]  # the very voxels (noise included) the others fit
    del volume
    np.save(work / "data.npy", data)
    runner = work / "run_dmipy.py"
    runner.write_text(DMIPY_RUNNER)
    out = work / "dmipy.npz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}  # parallel over processes
    t = time.perf_counter()
    r = subprocess.run([str(python), str(runner), str(work / "data.npy"), str(paths["bval"]),
                        str(paths["bvec"]), str(threads), str(out)],
                       capture_output=True, text=True, cwd=work, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"dmipy failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    info = json.loads(r.stdout.strip().splitlines()[-1])
    z = np.load(out)
    maps = {k: z[k] for k in ("icvf", "odi", "isovf")}
    maps["direction"] = mu_to_vectors(z["mu"])
    fit = float(info["fit_seconds"])
    return {"maps": maps, "wall_seconds": wall, **info, "voxels": int(subset.size),
            "us_per_voxel_fit": fit / subset.size * 1e6}


def subset_of(values: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[idx] for k, v in values.items()}


# --------------------------------------------------------------------------- whole brain
def ellipsoid_mask(box: tuple[int, int, int], voxels: int) -> np.ndarray:
    """Flat (x fastest) mask of an ellipsoid centred in ``box`` with about ``voxels`` voxels
    (semi-axes proportional to the box's)."""
    half = np.asarray(box, dtype=float) / 2
    scale = (voxels / (4 / 3 * np.pi * np.prod(half))) ** (1 / 3)
    if scale > 1:
        raise SystemExit(f"{voxels} voxels do not fit in an ellipsoid inside {box}")
    axes = [(np.arange(n) + 0.5 - h) / (h * scale) for n, h in zip(box, half, strict=True)]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    return (x * x + y * y + z * z <= 1.0).ravel(order="F")


#: What runs ``fingerprint fit`` in a fresh interpreter for the whole-brain benchmark: the
#: checkout's own command line, its FitResult timings and, when the checkout has one, its
#: stage profile (``fingerprint.stages``), plus the process's peak RSS, as JSON.
CLI_RUNNER = textwrap.dedent("""
    import importlib.abc, importlib.util, json, resource, sys, time
    t0 = time.perf_counter()
    out_json, argv = sys.argv[1], sys.argv[2:]
    seen = {}

    def wrap(pipeline):
        original = pipeline.fit_volume
        def fit_volume(*args, **kwargs):
            result = original(*args, **kwargs)
            seen["timings"] = dict(result.timings)
            seen["n_voxels"] = int(result.n_voxels)
            return result
        pipeline.fit_volume = fit_volume

    class Hook(importlib.abc.MetaPathFinder):
        # wraps fit_volume when the command imports the pipeline, not before: importing
        # it here would hide what the command does before its heavy imports
        def find_spec(self, name, path, target=None):
            if name != "fingerprint.fitting.pipeline":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                wrap(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())
    from fingerprint.cli.main import main
    try:
        from fingerprint.stages import profile_stages
    except ImportError:  # a checkout without the stage profile
        profile_stages = None
    seen["profile_started"] = time.perf_counter() - t0  # after the interpreter's start-up
    if profile_stages is not None:
        with profile_stages() as prof:
            code = main(argv)
        seen["profile"] = prof.to_dict()
    else:
        code = main(argv)
    seen["exit"] = code
    seen["process_seconds"] = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    # VmHWM: the peak of this process image (ru_maxrss also counts the parent's memory
    # inherited at the fork before exec on Linux)
    peak = usage.ru_maxrss * 1024
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        pass
    seen["peak_rss_bytes"] = peak
    seen["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    with open(out_json, "w") as f:
        json.dump(seen, f)
    sys.exit(code)
""")


def write_whole_brain(signals: np.ndarray, bval: Path, bvec: Path, directory: Path,
                      voxels: int, seed: int, box: tuple[int, int, int] | None = None
                      ) -> tuple[dict[str, Path], dict[str, object]]:
    """The gzip NIfTI (and mask) of ``voxels`` voxels with the tiled ``signals`` and fresh
    Rician noise (SNR 30): a full cube, or an ellipsoid in ``box``; reused when
    ``directory`` already holds the same volume."""
    if box is None:  # a cube filled by the mask
        side = int(round(voxels ** (1 / 3)))
        shape = (side, side, int(np.ceil(voxels / side / side)))
        mask_flat = None
    else:  # a brain-like ellipsoid in a larger box (zero background)
        shape = tuple(int(b) for b in box)
        mask_flat = ellipsoid_mask(shape, voxels)
        voxels = int(mask_flat.sum())
    meta = {"voxels": voxels, "shape": list(shape), "measurements": int(signals.shape[1]),
            "seed": seed, "signals": float(np.sum(signals[:10]))}
    meta_path = directory / "volume.json"
    paths = {"dwi": directory / "dwi.nii.gz", "mask": directory / "mask.nii.gz",
             "bval": directory / "dwi.bval", "bvec": directory / "dwi.bvec"}
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta and \
            all(p.exists() for p in paths.values()):
        meta["write_input_seconds"] = 0.0
        return paths, meta
    rng = np.random.default_rng(seed)
    tiled = signals.astype(np.float32)[np.arange(voxels) % signals.shape[0]]
    t = time.perf_counter()
    paths = write_case(directory, tiled, bval, bvec, 1000.0, 30.0, rng, shape=shape,
                       mask_flat=mask_flat)
    meta_path.write_text(json.dumps(meta))
    meta["write_input_seconds"] = time.perf_counter() - t
    return paths, meta


def run_fit_cli(checkout: Path, paths: dict[str, Path], out: Path, threads: int,
                size: int | None) -> dict[str, object]:
    """``fingerprint fit`` of ``paths`` by the code of ``checkout`` in a fresh interpreter:
    wall time end to end (interpreter start to exit), peak RSS, the fit's own timings and
    its stage profile (when the checkout has one)."""
    shutil.rmtree(out, ignore_errors=True)
    report_json = out.with_suffix(".json")
    runner = out.parent / "run_fit_cli.py"
    runner.write_text(CLI_RUNNER)
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    for var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "MKL_NUM_THREADS"):
        env[var] = str(threads)
    cmd = [sys.executable, str(runner), str(report_json), "fit", "--model", "noddi",
           "--dwi", str(paths["dwi"]), "--bval", str(paths["bval"]), "--bvec",
           str(paths["bvec"]), "--mask", str(paths["mask"]), "--out", str(out),
           "--threads", str(threads), "--no-progress"]
    if size:
        cmd += ["--dictionary-size", str(size)]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=checkout, env=env)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"fingerprint fit ({checkout}) failed:\n{r.stdout[-2000:]}\n"
                           f"{r.stderr[-3000:]}")
    info = json.loads(report_json.read_text())
    shutil.rmtree(out, ignore_errors=True)
    n = int(info.get("n_voxels") or 0)
    return {"wall_seconds": wall, "us_per_voxel": wall / max(n, 1) * 1e6,
            "load_before": load, **info}


def run_whole_brain(signals: np.ndarray, bval: Path, bvec: Path, work: Path,
                    args: argparse.Namespace) -> dict[str, object]:
    """The whole-brain benchmark: ``fingerprint fit`` end to end on a gzip volume of
    ``--whole-brain-voxels`` voxels at ``--threads``, and on ``--scaling-voxels`` voxels
    at each of ``--scaling-threads``, for this checkout and (``--baseline-checkout``) a
    previous one, back to back (alternating which runs first), ``--repeats`` times; each
    checkout first fits a small volume once per thread count (compiled kernels, HNSW
    graph), untimed."""
    box = tuple(args.whole_brain_box) if args.whole_brain_box else None
    checkouts = {"current": REPO}
    if args.baseline_checkout:
        checkouts["baseline"] = args.baseline_checkout.resolve()
    volumes = {"brain": (args.whole_brain_voxels, box)}
    threads_of = {"brain": [args.threads]}
    if args.scaling_threads:
        volumes["scaling"] = (args.scaling_voxels, None)
        threads_of["scaling"] = list(args.scaling_threads)
    volumes["warmup"] = (min(20_000, args.scaling_voxels), None)
    written = {}
    for name, (voxels, vbox) in volumes.items():
        print(f"[whole brain] writing the {name} volume ({voxels} voxels) ...", flush=True)
        written[name] = write_whole_brain(signals, bval, bvec, work / name, voxels,
                                          args.seed + 100, vbox)
    all_threads = sorted({t for ts in threads_of.values() for t in ts})
    for label, checkout in checkouts.items():
        for t in all_threads:
            run_fit_cli(checkout, written["warmup"][0], work / f"out-warmup-{label}", t,
                        args.dictionary_size)
    runs: list[dict[str, object]] = []
    for rep in range(args.repeats):
        for name in ("brain", "scaling"):
            if name not in threads_of:
                continue
            for t in threads_of[name]:
                order = list(checkouts.items())
                if rep % 2:
                    order.reverse()
                for label, checkout in order:
                    r = run_fit_cli(checkout, written[name][0], work / f"out-{label}", t,
                                    args.dictionary_size)
                    r.update(code=label, checkout=str(checkout), volume=name, threads=t,
                             repeat=rep, voxels=written[name][1]["voxels"])
                    runs.append(r)
                    print(f"[whole brain] {label} {name} {t} thread(s): "
                          f"{r['wall_seconds']:.1f} s, {r['us_per_voxel']:.1f} us/voxel, "
                          f"CPU {r.get('cpu_seconds', float('nan')):.1f} s, peak RSS "
                          f"{r['peak_rss_bytes'] / 2**30:.2f} GiB, load "
                          f"{r['load_before']:.1f}", flush=True)
    meta = written["brain"][1]
    n_meas = int(meta["measurements"])
    float32_bytes = int(np.prod(meta["shape"])) * n_meas * 4
    return {"voxels": meta["voxels"], "shape": meta["shape"], "measurements": n_meas,
            "input_bytes_on_disk": written["brain"][0]["dwi"].stat().st_size,
            "input_float32_bytes": float32_bytes, "checkouts": {k: str(v) for k, v in
                                                                checkouts.items()},
            "runs": runs}


def whole_brain_report(wb: dict[str, object]) -> list[str]:
    """Markdown tables of the whole-brain runs: wall, µs/voxel, peak RSS per run (with the
    best of each code / volume / threads), and the stage profile of the best runs."""
    runs = list(wb["runs"])
    lines = ["", f"whole brain: {wb['voxels']} voxels (box {wb['shape']}) x "
                 f"{wb['measurements']} measurements, gzip input "
                 f"{wb['input_bytes_on_disk'] / 2**30:.2f} GiB "
                 f"({wb['input_float32_bytes'] / 2**30:.2f} GiB as float32), through "
                 f"`fingerprint fit` end to end", "",
             "| code | volume | voxels | threads | wall (s) | µs/voxel | CPU (s, all threads) "
             "| peak RSS (GiB) | load before |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['code']} | {r['volume']} | {r['voxels']} | {r['threads']} | "
                     f"{r['wall_seconds']:.1f} | {r['us_per_voxel']:.1f} | "
                     f"{r.get('cpu_seconds', float('nan')):.1f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} | {r['load_before']:.1f} |")
    best: dict[tuple[str, str, int], dict[str, object]] = {}
    for r in runs:
        key = (str(r["code"]), str(r["volume"]), int(r["threads"]))
        if key not in best or r["wall_seconds"] < best[key]["wall_seconds"]:
            best[key] = r
    base = {k[1:]: v for k, v in best.items() if k[0] == "baseline"}
    if base:
        lines += ["", "| volume | threads | current / baseline: wall (best runs) | CPU |",
                  "|---|---|---|---|"]
        for (code, volume, threads), r in sorted(best.items()):
            if code == "current" and (volume, threads) in base:
                b = base[(volume, threads)]
                ratio = r["wall_seconds"] / b["wall_seconds"]
                cpu = r.get("cpu_seconds", float("nan")) / b.get("cpu_seconds", float("nan"))
                lines.append(f"| {volume} | {threads} | {ratio:.2f} | {cpu:.2f} |")
    for (code, volume, threads), r in sorted(best.items()):
        stages = (r.get("profile") or {}).get("stages") or {}
        timings = r.get("timings") or {}
        lines += ["", f"stages of {code}, {volume}, {threads} thread(s) (best run, "
                      f"{r['wall_seconds']:.1f} s end to end; seconds summed over the "
                      f"threads that ran them; from / to: when the stage first began and "
                      f"last ended, seconds after the command started):", "",
                  "| stage | seconds | cpu seconds | from | to |", "|---|---|---|---|---|"]
        if stages:
            for name, v in stages.items():
                span = "| |"
                if v.get("began") is not None:
                    span = f"| {v['began']:.2f} | {v['ended']:.2f} |"
                lines.append(f"| {name} | {v['seconds']:.2f} | {v['cpu_seconds']:.2f} "
                             f"{span}")
        else:  # a checkout without the stage profile: the fit's own three timings
            for name, v in timings.items():
                lines.append(f"| {name} | {v:.2f} | | | |")
        lines.append(f"| outside the fit's dictionary / fit / write (start-up, imports, "
                     f"inputs, mask, exit) | {r['wall_seconds'] - sum(timings.values()):.2f} "
                     f"| | | |")
    return lines


# --------------------------------------------------------------------------- main
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return float("nan")


def main(args: argparse.Namespace) -> dict[str, object]:
    import fingerprint
    from fingerprint.io.gradients import read_bvals_bvecs

    bval, bvec = scheme_paths(args.scheme)
    if not bval.exists() or not bvec.exists():
        raise SystemExit(f"scheme files {bval} / {bvec} not found (give --scheme)")
    scheme = read_bvals_bvecs(bval, bvec)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_noddi_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} {_cpu_model()}, {os.cpu_count()} cpus, "
                   f"{_memory_gib():.0f} GiB, Python {platform.python_version()}",
        "fingerprint": fingerprint.__version__, "scheme": str(args.scheme),
        "measurements": int(scheme.number_of_measurements), "voxels": args.voxels,
        "threads": args.threads, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cases": {},
    }
    amico_python, amico_reason = (None, "skipped (--no-amico)")
    if not args.no_amico and not args.only_whole_brain:
        print("preparing AMICO venv ...", flush=True)
        amico_python, amico_reason = ensure_amico(args.amico_venv)
        if amico_python is None:
            print(f"AMICO unavailable: {amico_reason}", flush=True)
    results["amico"] = str(amico_python) if amico_python else amico_reason
    dmipy_python, dmipy_reason = (None, "skipped (--no-dmipy)")
    if not args.no_dmipy and not args.only_whole_brain and args.dmipy_voxels > 0:
        print("preparing dmipy venv ...", flush=True)
        dmipy_python, dmipy_reason = ensure_dmipy(args.dmipy_venv)
        if dmipy_python is None:
            print(f"dmipy unavailable: {dmipy_reason}", flush=True)
    results["dmipy"] = str(dmipy_python) if dmipy_python else dmipy_reason
    results["dmipy_voxels"] = min(args.dmipy_voxels, args.voxels) if dmipy_python else 0
    uniform_signals = None
    cases = [] if args.only_whole_brain else [("uniform", 30.0), ("wm-gm", 20.0)]
    for case_i, (kind, snr) in enumerate(cases):
        rng = np.random.default_rng(args.seed + case_i)
        params = sample_parameters(kind, args.voxels, rng)
        t = time.perf_counter()
        signals = simulate(scheme, params)
        sim = time.perf_counter() - t
        if kind == "uniform":
            uniform_signals = signals
        paths = write_case(work / kind, signals, bval, bvec, 1000.0, snr, rng)
        print(f"[{kind}] simulated {args.voxels} voxels in {sim:.1f} s; fitting ...",
              flush=True)
        case: dict[str, object] = {"snr": snr, "simulate_seconds": sim}
        ours = run_ours(paths, work / kind / "ours", args.voxels, args.threads,
                        args.dictionary_size)
        case["fingerprint"] = {**{k: v for k, v in ours.items() if k != "maps"},
                               **errors(ours["maps"], params)}
        if not args.profile:
            case["fingerprint"].pop("profile")
        try:
            case["fingerprint"].update(run_estimator_only(paths, args.voxels, args.threads,
                                                          args.dictionary_size))
        except Exception as exc:  # the in-memory timing is an extra
            case["fingerprint"]["estimate_error"] = str(exc)
        print(f"[{kind}] fingerprint: {json.dumps(case['fingerprint'])}", flush=True)
        if args.profile:
            print(case["fingerprint"]["profile"]["table"], flush=True)
        if amico_python is not None:
            try:
                am = run_amico(amico_python, paths, work / kind / "amico", args.voxels,
                               args.threads)
                case["amico"] = {**{k: v for k, v in am.items() if k != "maps"},
                                 **errors(am["maps"], params)}
            except Exception as exc:
                case["amico"] = {"error": str(exc)[-3000:]}
            print(f"[{kind}] AMICO: {json.dumps(case['amico'])}", flush=True)
        if dmipy_python is not None:
            idx = dmipy_subset(args.voxels, args.dmipy_voxels, args.seed + case_i)
            truth = subset_of(params, idx)
            same: dict[str, object] = {"voxels": int(idx.size),
                                       "fingerprint": errors(subset_of(ours["maps"], idx),
                                                             truth)}
            if amico_python is not None and "error" not in case.get("amico", {}):
                same["amico"] = errors(subset_of(am["maps"], idx), truth)
            try:
                print(f"[{kind}] dmipy on {idx.size} voxels ...", flush=True)
                dm = run_dmipy(dmipy_python, paths, work / kind / "dmipy", args.voxels, idx,
                               args.threads)
                case["dmipy"] = {**{k: v for k, v in dm.items() if k != "maps"},
                                 **errors(dm["maps"], truth)}
                same["dmipy"] = errors(dm["maps"], truth)
            except Exception as exc:
                case["dmipy"] = {"error": str(exc)[-3000:]}
            case["subset"] = same
            print(f"[{kind}] dmipy: {json.dumps(case['dmipy'])}", flush=True)
            print(f"[{kind}] same subset: {json.dumps(same)}", flush=True)
        results["cases"][kind] = case
    if args.whole_brain or args.only_whole_brain:
        rng = np.random.default_rng(args.seed + 100)
        if uniform_signals is None:
            params = sample_parameters("uniform", args.voxels, rng)
            uniform_signals = simulate(scheme, params)
        print(f"[whole brain] {args.whole_brain_voxels} voxels through `fingerprint fit` ...",
              flush=True)
        results["whole_brain"] = run_whole_brain(uniform_signals, bval, bvec,
                                                 work / "whole_brain", args)
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return results


def report(results: dict[str, object]) -> str:
    lines = [f"date: {results['date']}", f"machine: {results['machine']}",
             f"command: {results['command']}",
             f"scheme: {results['scheme']} ({results['measurements']} measurements), "
             f"{results['voxels']} voxels per phantom, {results['threads']} threads", ""]
    lines.append("| phantom | method | icvf MAE | odi MAE | isovf MAE | median angle (deg) | "
                 "µs/voxel |")
    lines.append("|---|---|---|---|---|---|---|")
    for kind, case in results["cases"].items():
        for method in ("fingerprint", "amico", "dmipy"):
            r = case.get(method)
            if not r or "error" in r:
                if r:
                    lines.append(f"| {kind} | {method} | failed: {r['error'][:80]} | | | | |")
                continue
            label = method if method != "dmipy" else f"dmipy ({r['voxels']} voxels)"
            lines.append(f"| {kind} (SNR {case['snr']:g}) | {label} | {r['icvf_mae']:.4f} | "
                         f"{r['odi_mae']:.4f} | {r['isovf_mae']:.4f} | "
                         f"{r['direction_median_deg']:.2f} | {r['us_per_voxel_fit']:.1f} |")
    subsets = {k: c["subset"] for k, c in results["cases"].items() if "subset" in c}
    if subsets:
        lines += ["", "Same random subset of voxels for every method (the one dmipy fits):", "",
                  "| phantom | voxels | method | icvf MAE | odi MAE | isovf MAE | "
                  "median angle (deg) |", "|---|---|---|---|---|---|---|"]
        for kind, same in subsets.items():
            for method in ("fingerprint", "amico", "dmipy"):
                r = same.get(method)
                if r:
                    lines.append(f"| {kind} | {same['voxels']} | {method} | "
                                 f"{r['icvf_mae']:.4f} | {r['odi_mae']:.4f} | "
                                 f"{r['isovf_mae']:.4f} | {r['direction_median_deg']:.2f} |")
    for kind, case in results["cases"].items():
        prof = case.get("fingerprint", {}).get("profile")
        if prof:
            lines += ["", f"stage profile of the timed fit_volume run, {kind} phantom:", "",
                      prof["table"]]
    wb = results.get("whole_brain")
    if wb:
        lines += whole_brain_report(wb)
    return "\n".join(lines)


if __name__ == "__main__":
    res = main(ARGS)
    text = report(res)
    print("\n" + text)
    if ARGS.json:
        ARGS.json.write_text(json.dumps(res, indent=2, default=str))
