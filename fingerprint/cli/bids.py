"""``fingerprint bids``: fit whole studies (raw BIDS or QSIPrep), as a BIDS App.

    fingerprint bids BIDS_DIR OUTPUT_DIR participant --model noddi [ball_stick ...] \\
        [--participant-label 01 02] [--session-label 1] [--workers N | --dask-scheduler ADDR] \\
        [--dry-run] [--delta S --Delta S] [--dictionary-size N] [--dictionary-dir DIR] \\
        [--n-neighbors N] [--refine true|false|nonlinear] [--count-penalty X] [--seed N] \\
        [--mask-rule RULE]

``participant`` fits every series found and writes the derivatives dataset, the summary
and the group QC page; ``group`` only rewrites the summary's QC page from the outputs
already there. See :mod:`fingerprint.batch.runner` for what happens and in which order.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fingerprint.cli.flags import (
    add_b0_threshold_argument,
    add_option_flags,
    b0_threshold_si,
    check_timing_flags,
    option_values,
    quiet_third_party_logs,
)
from fingerprint.cli.progress import shown_path
from fingerprint.errors import InputError
from fingerprint.fitting.options import FIT_OPTION_SPECS, FitOptions

#: the fit options a study run offers as flags beyond --threads / --dictionary-size (from
#: FIT_OPTION_SPECS, as `fingerprint fit`'s); they are part of every job's provenance, so a
#: rerun with other values refits instead of skipping
STUDY_OPTION_SPECS = tuple(s for s in FIT_OPTION_SPECS
                           if s.name in ("n_neighbors", "refine", "count_penalty", "seed",
                                         "mask_rule"))


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint bids``."""
    parser = subparsers.add_parser(
        "bids", help="fit models to every DWI series of a BIDS or QSIPrep dataset",
        description="Fit microstructure models to every DWI series of a raw BIDS dataset or "
                    "of QSIPrep derivatives and write a BIDS derivatives dataset. Resumable: "
                    "series whose outputs are complete and were made from the same inputs "
                    "and options are skipped.",
        epilog="Outputs: OUTPUT_DIR/dataset_description.json, "
               "OUTPUT_DIR/sub-*/[ses-*/]dwi/<entities>_model-<m>_param-<p>_dwimap.nii.gz "
               "(+ .json with provenance), OUTPUT_DIR/logs/fingerprint_summary.tsv, "
               "OUTPUT_DIR/qc/index.html.")
    parser.add_argument("bids_dir", type=Path, metavar="BIDS_DIR",
                        help="raw BIDS dataset or QSIPrep output directory")
    parser.add_argument("output_dir", type=Path, metavar="OUTPUT_DIR",
                        help="derivatives dataset to write")
    parser.add_argument("analysis_level", choices=["participant", "group"],
                        help="participant: fit the series; group: rewrite the QC page only")
    parser.add_argument("--model", nargs="+", required=True, metavar="MODEL",
                        help="named models (see `fingerprint dictionary models`)")
    parser.add_argument("--participant-label", nargs="+", dest="participant_label",
                        metavar="LABEL", help="subjects to process (without 'sub-')")
    parser.add_argument("--session-label", nargs="+", dest="session_label", metavar="LABEL",
                        help="sessions to process (without 'ses-')")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="series fitted in parallel, in worker processes (default 1)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads per series (default: cores / workers)")
    parser.add_argument("--dask-scheduler", dest="dask_scheduler", metavar="ADDRESS",
                        help="run the series as tasks of this Dask scheduler (tcp://host:port);"
                             " output and dictionary directories must be shared storage")
    parser.add_argument("--dry-run", action="store_true", dest="dry_run",
                        help="print the plan (series, schemes, verdicts) and stop")
    parser.add_argument("--dictionary-size", type=int, dest="dictionary_size", metavar="N",
                        help="atoms per dictionary (default: each model's)")
    parser.add_argument("--dictionary-dir", type=Path, dest="dictionary_dir", metavar="DIR",
                        help="dictionary directory (default: $FINGERPRINT_DICTIONARY_DIR or "
                             "the user cache)")
    parser.add_argument("--delta", type=float, metavar="S",
                        help="pulse duration (s) for series whose sidecar has none")
    parser.add_argument("--Delta", type=float, metavar="S",
                        help="pulse separation (s) for series whose sidecar has none")
    parser.add_argument("--chunk-voxels", type=int, dest="chunk_voxels", metavar="N",
                        help="voxels per chunk (default 20000)")
    add_option_flags(parser, STUDY_OPTION_SPECS)
    add_b0_threshold_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-qc", action="store_true", dest="no_qc",
                        help="do not write the group QC page")
    parser.set_defaults(func=_cmd_bids)


def _cmd_bids(args: argparse.Namespace) -> int:
    # lazy: CLI start-up builds the parsers only
    from fingerprint.batch.report import (
        plan_text,
        summary_table,
        write_qc_report,
        write_summary_tsv,
    )
    from fingerprint.batch.runner import StudyOptions, plan_study, run_study

    quiet_third_party_logs(args)
    for flag in ("workers", "threads", "dictionary_size", "chunk_voxels"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be a positive integer")
    if (args.delta is None) != (args.Delta is None):
        raise InputError("give both --delta and --Delta (seconds), or neither")
    check_timing_flags(args)
    threads = args.threads
    if threads is None and not args.dask_scheduler:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    fit = option_values(args, STUDY_OPTION_SPECS)
    FitOptions.from_mapping(fit)  # a bad value fails here, naming the option
    options = StudyOptions(models=tuple(args.model), dictionary_dir=args.dictionary_dir,
                           dictionary_size=args.dictionary_size, delta=args.delta,
                           Delta=args.Delta, workers=args.workers, threads=threads,
                           chunk_voxels=args.chunk_voxels, dask_scheduler=args.dask_scheduler,
                           b0_threshold=b0_threshold_si(args), fit=tuple(sorted(fit.items())))
    plan = plan_study(args.bids_dir, args.output_dir, options,
                      participant_labels=args.participant_label,
                      session_labels=args.session_label)
    out = sys.stdout
    if args.dry_run:
        out.write(plan_text(plan) + "\n")
        return 0
    if args.analysis_level == "group":
        from fingerprint.batch.runner import Row  # lazy: CLI start-up builds the parsers only

        rows = [Row(sp.series.subject, sp.series.session or "", sp.series.name, model,
                    "done" if sp.complete.get(model) else "missing")
                for sp in plan.series for model in plan.options.models]
        out.write(f"QC page: {shown_path(write_qc_report(plan, rows))}\n")
        return 0
    if not plan.series:
        raise InputError(f"no DWI series found in {plan.root}")
    rows, totals = run_study(plan, progress=not (args.no_progress or args.quiet))
    out.write(summary_table(rows) + "\n")
    tsv = write_summary_tsv(rows, plan.output_dir)
    out.write(f"summary: {shown_path(tsv)}\n")
    if not args.no_qc:
        out.write(f"QC page: {shown_path(write_qc_report(plan, rows))}\n")
    n_dict = len(totals["dictionaries"])
    out.write(f"{n_dict} dictionaries found or built in {totals['dictionary_seconds']:.1f} s; "
              f"fits {totals['fit_seconds']:.1f} s; wall {totals['wall']:.1f} s\n")
    return 1 if any(r.status == "failed" for r in rows) else 0
