"""``fingerprint demo``: simulate a small NODDI phantom, fit it and report the accuracy.

    fingerprint demo [--out DIR] [--shape X Y Z] [--snr 30] [--dictionary-size N]

Writes the phantom (``phantom/``: DWI, bval/bvec, mask, ground-truth maps), the fitted
maps (``fit/``) and a PNG comparing fitted and true maps, then prints where they are and
the mean absolute errors. The dictionary is built once into the dictionary directory and
reused by later runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from fingerprint.cli.flags import quiet_third_party_logs
from fingerprint.cli.main import CLIError
from fingerprint.cli.progress import progress_bar, shown_path
from fingerprint.errors import CancelledError, DictionaryError, InputError

#: Atoms of the demo's dictionary: small enough to build in seconds on a laptop.
DEMO_DICTIONARY_SIZE = 20_000
#: Largest demo phantom (voxels); ~0.8 GB of float32 signals at the demo's 96 measurements.
MAX_DEMO_VOXELS = 2_000_000


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint demo``."""
    parser = subparsers.add_parser(
        "demo", help="simulate a NODDI phantom, fit it and report the accuracy",
        description="Simulate a small NODDI phantom with the package's built-in multi-shell "
                    "scheme, fit it by dictionary matching, write the maps and a PNG "
                    "preview, and report the accuracy against the ground truth.")
    parser.add_argument("--out", type=Path, default=Path("fingerprint-demo"),
                        help="output directory (default: ./fingerprint-demo)")
    parser.add_argument("--shape", type=int, nargs=3, default=(16, 16, 4),
                        metavar=("X", "Y", "Z"), help="phantom size (default 16 16 4)")
    parser.add_argument("--snr", type=float, default=30.0, help="SNR of b=0 (default 30)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--dictionary-size", type=int, dest="dictionary_size",
                        default=DEMO_DICTIONARY_SIZE,
                        help=f"atoms of the dictionary (default {DEMO_DICTIONARY_SIZE})")
    parser.add_argument("--dictionary-dir", type=Path, dest="dictionary_dir",
                        help="dictionary directory (default: the user cache)")
    parser.add_argument("--threads", type=int, help="threads (default: all cores)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    import nibabel as nib  # lazy: keeps nibabel off import

    # lazy: keeps numba off import; CLI start-up builds the parsers only
    from fingerprint.fitting.pipeline import check_output_directory, fit_volume
    from fingerprint.phantoms import noddi_errors, noddi_phantom, write_phantom
    from fingerprint.preview import write_preview

    if min(args.shape) < 1:
        raise InputError("--shape needs three positive sizes")
    if int(np.prod(args.shape, dtype=np.int64)) > MAX_DEMO_VOXELS:
        raise InputError(f"--shape {' '.join(map(str, args.shape))} is too large for a demo "
                         f"phantom (at most {MAX_DEMO_VOXELS:,} voxels)")
    if not np.isfinite(args.snr) or args.snr < 0:
        raise InputError("--snr must be positive (0: no noise)")
    if args.seed < 0:
        raise InputError("--seed must be a non-negative integer")
    if args.dictionary_size < 1:
        raise InputError("--dictionary-size must be a positive integer")
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be at least 1")
    check_output_directory(args.out)  # before the phantom is simulated and written
    quiet_third_party_logs(args)
    out = sys.stdout
    t0 = time.perf_counter()
    phantom = noddi_phantom(shape=tuple(args.shape), seed=args.seed, snr=args.snr or None)
    paths = write_phantom(phantom, args.out / "phantom", prefix="sub-demo")
    n_vox = int(np.prod(args.shape))
    out.write(f"phantom: {n_vox} voxels, {phantom['dwi'].shape[3]} measurements, SNR "
              f"{args.snr:g} -> {shown_path(paths['dwi'].parent)}\n")
    bar, progress = progress_bar("demo", not (args.no_progress or
                                              getattr(args, "quiet", False)))
    try:
        result = fit_volume("noddi", paths["dwi"], paths["bval"], paths["bvec"],
                            args.out / "fit", mask=paths["mask"], prefix="sub-demo",
                            threads=args.threads, progress=progress,
                            dictionary_dir=args.dictionary_dir,
                            dictionary_size=args.dictionary_size)
    except (DictionaryError, CancelledError) as exc:
        raise CLIError(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    labels = ("icvf", "odi", "isovf", "direction")
    estimated = {k: np.asarray(nib.load(result.maps[k]).dataobj) for k in labels
                 if k in result.maps}
    errors = noddi_errors(estimated, phantom["truth"], phantom["mask"])
    preview = write_preview({k: estimated[k] for k in labels if k in estimated},
                            args.out / "sub-demo_model-noddi_desc-preview.png",
                            title="fingerprint demo: NODDI fit (top) vs ground truth (bottom)",
                            truth={k: phantom["truth"][k] for k in labels})
    dictionary = f" (dictionary {shown_path(result.dictionary)})" if result.dictionary else ""
    out.write(f"fitted {result.n_voxels} voxels in {result.seconds:.1f} s: dictionary "
              f"{result.timings.get('dictionary', 0):.1f} s, matching "
              f"{result.timings.get('fit', 0):.2f} s{dictionary}\n")
    out.write(f"maps:    {shown_path(result.out_dir)}\npreview: {shown_path(preview)}\n")
    out.write("accuracy vs ground truth (mean absolute error):\n")
    for label in ("icvf", "odi", "isovf"):
        if f"{label}_mae" in errors:
            out.write(f"  {label:6s} {errors[f'{label}_mae']:.3f}\n")
    if "direction_median_deg" in errors:
        out.write(f"  direction median angular error {errors['direction_median_deg']:.1f} deg\n")
    out.write(f"total {time.perf_counter() - t0:.1f} s\n")
    return 0
