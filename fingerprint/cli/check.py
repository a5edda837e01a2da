"""``fingerprint check``: the scheme summary and the verdict for a model, before any fit.

    fingerprint check --model noddi --bval dwi.bval --bvec dwi.bvec [--dwi dwi.nii.gz] \\
        [--b0-threshold 10] [--delta S --Delta S] [--json]

Prints the shells (b-value range, directions, timing), every finding of the scheme checks
(:mod:`fingerprint.core.scheme_checks`: refuse / warn / note) and the verdict. Exit code 0
when the model can be fitted (possibly with warnings), 1 when it is refused, 2 on unreadable
input.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fingerprint.cli.flags import (
    add_b0_threshold_argument,
    b0_threshold_si,
    check_timing_flags,
)
from fingerprint.errors import InputError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint check``."""
    parser = subparsers.add_parser(
        "check", help="check an acquisition scheme against a model (no fit)",
        description="Summarise an acquisition scheme (shells, b-value spread, directions, "
                    "timing) and say whether a model can be fitted to it: refused (with the "
                    "reasons), fitted with warnings, or ok. The same checks run before every "
                    "fit.",
        epilog="Exit code 0: the model can be fitted; 1: refused; 2: unreadable input.")
    parser.add_argument("--model", help="named model (see `fingerprint dictionary models`); "
                                        "without it only the scheme is checked")
    parser.add_argument("--bval", required=True, type=Path, help="FSL bval file (s/mm²)")
    parser.add_argument("--bvec", required=True, type=Path, help="FSL bvec file")
    parser.add_argument("--dwi", type=Path, help="4-D DWI NIfTI: also check its volume count")
    parser.add_argument("--delta", type=float, metavar="S", help="gradient pulse duration (s)")
    parser.add_argument("--Delta", type=float, metavar="S", help="gradient pulse separation (s)")
    parser.add_argument("--TE", type=float, metavar="S", help="echo time (s)")
    add_b0_threshold_argument(parser)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    # lazy: CLI start-up builds the parsers only
    from fingerprint.core.scheme_checks import check_gradient_table, check_scheme
    from fingerprint.io.gradients import read_fsl_gradients
    from fingerprint.models import get_model, get_recipe, requires_timing

    model = name = None
    if args.model:
        name = get_recipe(args.model).name
        model = get_model(name)
    if (args.delta is None) != (args.Delta is None):
        raise InputError("give both --delta and --Delta (seconds), or neither")
    check_timing_flags(args)
    threshold = b0_threshold_si(args)
    # lazy: CLI start-up builds the parsers only
    from fingerprint.core.acquisition_scheme import DEFAULT_B0_THRESHOLD

    threshold = DEFAULT_B0_THRESHOLD if threshold is None else threshold
    b, vecs = read_fsl_gradients(args.bval, args.bvec)
    findings = check_gradient_table(b * 1e6, vecs, threshold, f"bvec file {args.bvec}")
    extra: list[Any] = []
    if args.dwi is not None:
        # lazy: CLI start-up builds the parsers only
        from fingerprint.core.scheme_checks import SchemeFinding
        from fingerprint.io.nifti import DWIImage

        image = DWIImage(args.dwi)
        if image.n_volumes != b.size:
            extra.append(SchemeFinding(
                "refuse", "volumes", f"DWI file {args.dwi} has {image.n_volumes} volumes but "
                                     f"bval file {args.bval} describes {b.size} measurements"))
    if any(f.level == "refuse" for f in findings):
        # lazy: CLI start-up builds the parsers only
        from fingerprint.core.scheme_checks import SchemeReport

        report = SchemeReport(findings=tuple(findings + extra), model=name,
                              n_measurements=int(b.size), b0_threshold=threshold)
    else:
        # lazy: CLI start-up builds the parsers only
        from fingerprint.io.gradients import read_bvals_bvecs

        reader_log = logging.getLogger("fingerprint.io.gradients")
        level = reader_log.level
        reader_log.setLevel(logging.WARNING)  # its notes are printed in the report below
        try:
            scheme = read_bvals_bvecs(args.bval, args.bvec, delta=args.delta,
                                      Delta=args.Delta, TE=args.TE, b0_threshold=threshold)
        finally:
            reader_log.setLevel(level)
        report = check_scheme(scheme, model, model_name=name,
                              requires_timing=requires_timing(name) if name else None)
        report = report.merged(findings + extra)
    out = sys.stdout
    if args.json:
        out.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        out.write(report.text() + "\n")
    return 1 if report.refusals else 0
