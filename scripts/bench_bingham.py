"""CPU time of NODDI-Bingham's forward model and of its default fit (matching + polish).

    python scripts/bench_bingham.py [--voxels 20] [--rows 200] [--size 3000]

Simulates ``--rows`` random NODDI-Bingham parameter vectors (``model_truth``) on a
three-shell scheme (b = 1000, 2000, 3000 s/mm², 30/60/60 directions) and fits a
``--voxels``-voxel phantom at SNR 30 with the default options (dictionary matching and
the non-linear polish the model runs by default) on a ``--size``-atom dictionary, after
a warm-up fit (dictionary built, kernels compiled). Prints CPU milliseconds per simulated
row and CPU seconds per fitted voxel; run it with two checkouts back to back
(``PYTHONPATH=<checkout>``) to compare them on a loaded machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

# the checkout measured is the one on PYTHONPATH (or the installed package)
from fingerprint.models import get_model
from fingerprint.phantoms import default_scheme, model_phantom, model_truth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=20)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--size", type=int, default=3000)
    args = parser.parse_args(argv)
    scheme = default_scheme(shells=((1000.0, 30), (2000.0, 60), (3000.0, 60)))
    model = get_model("noddi_bingham")
    params = model_truth("noddi_bingham", args.rows, 3)
    model.simulate_signal(scheme, params[:2])
    t0 = time.process_time()
    model.simulate_signal(scheme, params)
    sim_ms = (time.process_time() - t0) / args.rows * 1e3
    ph = model_phantom("noddi_bingham", scheme, args.voxels, seed=2, snr=30)
    with tempfile.TemporaryDirectory() as tmp:
        model.fit(scheme, ph["signals"][:2], dictionary_size=args.size, dictionary_dir=tmp)
        t0 = time.process_time()
        fitted = model.fit(scheme, ph["signals"], dictionary_size=args.size,
                           dictionary_dir=tmp)
        fit_s = (time.process_time() - t0) / args.voxels
    assert np.isfinite(np.asarray(fitted.fitted_parameters_vector)).all()
    print(f"forward model: {sim_ms:.2f} CPU ms / row; default fit: {fit_s:.3f} CPU s / voxel")
    return 0


if __name__ == "__main__":
    sys.exit(main())
