"""Fraction of voxels carrying each quality flag on the NODDI benchmark phantoms.

    python3 scripts/bench_quality.py [--voxels 10000] [--size 100000] [--threads 2]

The phantoms of ``scripts/bench_noddi.py`` (``uniform`` at SNR 30, ``wm-gm`` at SNR 20;
HCP scheme, random orientations, Rician noise), plus the uniform phantom without noise and
at SNR 10, are fitted with the ``noddi`` recipe's dictionary; the quality flags
(``fingerprint.fitting.quality``) are counted per phantom and printed as a Markdown table.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _bench_noddi():
    spec = importlib.util.spec_from_file_location("bench_noddi", ROOT / "scripts" /
                                                  "bench_noddi.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voxels", type=int, default=10000)
    parser.add_argument("--size", type=int, default=100000, help="dictionary atoms")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dictionary-dir", type=Path, default=None)
    args = parser.parse_args(argv)

    from fingerprint.fitting.engine import get_estimator
    from fingerprint.fitting.quality import FLAGS, flag_counts
    from fingerprint.io.gradients import read_bvals_bvecs
    from fingerprint.models import get_model
    from fingerprint.phantoms import add_rician_noise

    bench = _bench_noddi()
    ref = ROOT / "tests" / "data" / "reference" / "schemes"
    scheme = read_bvals_bvecs(ref / "hcp.bval", ref / "hcp.bvec")
    directory = args.dictionary_dir or Path(tempfile.mkdtemp())
    t0 = time.perf_counter()
    est = get_estimator(get_model("noddi"), scheme, dictionary_size=args.size,
                        dictionary_dir=directory, n_jobs=args.threads)
    print(f"dictionary: {args.size} atoms, {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    cases = [("uniform", 30.0), ("wm-gm", 20.0), ("uniform", 0.0), ("uniform", 10.0)]
    names = list(FLAGS) + ["any"]
    print("| phantom | SNR | " + " | ".join(names) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in names) + " |")
    for kind, snr in cases:
        rng = np.random.default_rng(0)
        params = bench.sample_parameters(kind, args.voxels, rng)
        clean = bench.simulate(scheme, params) * 1000.0
        data = add_rician_noise(clean, 1000.0 / snr if snr else 0.0, rng)
        ve = est.estimate(data)
        counts = flag_counts(est.quality_flags(ve))
        cells = [f"{100.0 * counts[k] / counts['total']:.1f} %" for k in names]
        print(f"| {kind} | {snr:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
