"""``fingerprint compare``: fit several models to a DWI volume and pick one per voxel.

    fingerprint compare --models ball_stick noddi --dwi dwi.nii.gz --bval dwi.bval \\
        --bvec dwi.bvec [--mask mask.nii.gz] --out DIR [--criterion bic] \\
        [--solver fingerprint|brute2fine|mix] [--threads N] [--prefix P]

Writes the winning-model index map with its JSON legend, one criterion map per model and
a PNG preview (see :func:`fingerprint.fitting.solvers.selection.compare_volume`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fingerprint.cli.flags import check_timing_flags, quiet_third_party_logs
from fingerprint.errors import InputError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint compare``."""
    parser = subparsers.add_parser(
        "compare", help="fit several models and pick the best per voxel (BIC/AIC/AICc)",
        description="Fit each named model to every voxel of a DWI volume (within the mask) "
                    "and compare them voxel by voxel by an information criterion (Gaussian "
                    "noise of unknown variance per voxel; lower is better).",
        epilog="Outputs in DIR: <prefix>_model-comparison_desc-<criterion>Winner_dwimap.nii.gz "
               "(index of the winning model, -1 outside the mask; its .json sidecar maps "
               "indices to models), <prefix>_model-<model>_param-<criterion>_dwimap.nii.gz "
               "per model, and a PNG preview.")
    parser.add_argument("--models", required=True, nargs="+", metavar="MODEL",
                        help="two or more named models (see `fingerprint dictionary models`)")
    parser.add_argument("--dwi", required=True, type=Path, help="4-D DWI NIfTI (.nii/.nii.gz)")
    parser.add_argument("--bval", required=True, type=Path, help="FSL bval file (s/mm²)")
    parser.add_argument("--bvec", required=True, type=Path, help="FSL bvec file")
    parser.add_argument("--mask", type=Path,
                        help="3-D mask NIfTI (default: voxels with a positive b=0 signal)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--criterion", default="bic", choices=("bic", "aic", "aicc"),
                        help="information criterion (default: bic)")
    parser.add_argument("--solver", default="fingerprint",
                        choices=("fingerprint", "brute2fine", "mix"),
                        help="solver of every fit (default: fingerprint)")
    parser.add_argument("--prefix", help="output file prefix (default: the DWI name's BIDS "
                                         "entities)")
    parser.add_argument("--threads", type=int, metavar="N", help="threads (default: all cores)")
    parser.add_argument("--delta", type=float, metavar="S", help="gradient pulse duration (s)")
    parser.add_argument("--Delta", type=float, metavar="S", help="gradient pulse separation (s)")
    parser.add_argument("--TE", type=float, metavar="S", help="echo time (s)")
    parser.add_argument("--no-preview", action="store_true", help="no PNG preview")
    parser.set_defaults(func=_cmd_compare)


def _cmd_compare(args: argparse.Namespace) -> int:
    # lazy: keeps numba off import; CLI start-up builds the parsers only
    from fingerprint.fitting.pipeline import prefix_from_filename
    from fingerprint.fitting.solvers.selection import compare_volume

    quiet_third_party_logs(args)
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be at least 1")
    if (args.delta is None) != (args.Delta is None):
        raise InputError("give both --delta and --Delta (seconds), or neither")
    check_timing_flags(args)
    for flag, path in (("--dwi", args.dwi), ("--bval", args.bval), ("--bvec", args.bvec),
                       ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise InputError(f"{flag} file {path} "
                             f"{'is not a file' if path.exists() else 'does not exist'}")
    prefix = args.prefix if args.prefix is not None else prefix_from_filename(args.dwi)
    result = compare_volume(args.models, args.dwi, args.bval, args.bvec, args.out,
                            mask=args.mask, criterion=args.criterion, solver=args.solver,
                            threads=args.threads, prefix=prefix, delta=args.delta,
                            Delta=args.Delta, TE=args.TE, preview=not args.no_preview)
    out = sys.stdout
    shares = result.comparison.fractions()
    out.write(f"compared {', '.join(result.comparison.names)} by "
              f"{args.criterion.upper()} in {result.seconds:.1f} s: "
              + ", ".join(f"{n} best in {100 * p:.1f} % of voxels" for n, p in shares.items())
              + "\n")
    out.write(f"maps in {result.out_dir}:\n")
    for path in result.files:
        if path.suffix != ".json":
            out.write(f"  {path.name}\n")
    return 0
