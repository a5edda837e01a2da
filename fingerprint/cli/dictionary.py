"""``fingerprint dictionary``: build, list and inspect dictionaries.

    fingerprint dictionary build --model noddi --bval dwi.bval --bvec dwi.bvec [--size N]
    fingerprint dictionary build --model activeax --scheme acq.scheme --out activeax.zarr
    fingerprint dictionary list [--dir DIR]
    fingerprint dictionary info PATH [--verify]
    fingerprint dictionary models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fingerprint.cli.flags import add_b0_threshold_argument, b0_threshold_si, check_timing_flags
from fingerprint.cli.main import CLIError
from fingerprint.cli.progress import progress_bar
from fingerprint.errors import DictionaryError, InputError


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint dictionary`` and its sub-commands."""
    parser = subparsers.add_parser(
        "dictionary", help="build, list and inspect dictionaries of simulated signals",
        description="Build, list and inspect dictionaries of simulated signals.")
    sub = parser.add_subparsers(dest="dictionary_command", metavar="ACTION")
    parser.set_defaults(func=lambda args: _no_action(parser))

    build = sub.add_parser("build", help="build (or find in the cache) a model's dictionary",
                           description="Build the dictionary of a named model for an "
                                       "acquisition scheme; reuses a cached one if present.")
    build.add_argument("--model", required=True,
                       help="named model (see `fingerprint dictionary models`)")
    build.add_argument("--bval", type=Path, help="FSL bval file (s/mm²)")
    build.add_argument("--bvec", type=Path, help="FSL bvec file")
    build.add_argument("--scheme", type=Path,
                       help="Camino .scheme file (instead of --bval/--bvec)")
    build.add_argument("--delta", type=float, help="gradient pulse duration (s)")
    build.add_argument("--Delta", type=float, help="gradient pulse separation (s)")
    build.add_argument("--TE", type=float, help="echo time (s)")
    add_b0_threshold_argument(build)
    build.add_argument("--size", type=int, help="number of atoms (default: the model's)")
    build.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    build.add_argument("--out", type=Path,
                       help="write the dictionary here instead of the dictionary directory")
    build.add_argument("--dir", type=Path,
                       help="dictionary directory (default: $FINGERPRINT_DICTIONARY_DIR or "
                            "the user cache)")
    build.add_argument("--threads", type=int, help="threads for the simulation (default: all)")
    build.add_argument("--force", action="store_true",
                       help="with --out: replace a different or damaged dictionary there")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_cmd_build)

    lst = sub.add_parser(
        "list", help="list the dictionaries of a directory",
        description="List the dictionaries in the dictionary directory (prints its path "
                    "first): --dir, else $FINGERPRINT_DICTIONARY_DIR, else the user cache "
                    "(e.g. ~/.cache/fingerprint/dictionaries on Linux).")
    lst.add_argument("--dir", type=Path,
                     help="dictionary directory (default: $FINGERPRINT_DICTIONARY_DIR or the "
                          "user cache)")
    lst.add_argument("--json", action="store_true", help="machine-readable output")
    lst.set_defaults(func=_cmd_list)

    info = sub.add_parser(
        "info", help="validate a dictionary and describe it",
        description="Check that a dictionary store opens and is consistent, and describe "
                    "it: model, parameters and their ranges, atoms, scheme, features, size.")
    info.add_argument("path", type=Path, metavar="PATH",
                      help="a dictionary store (a .zarr directory), e.g. one listed by "
                           "`fingerprint dictionary list` or written by `build --out`")
    info.add_argument("--verify", action="store_true",
                      help="also read every chunk and check its checksum")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(func=_cmd_info)

    models = sub.add_parser(
        "models", help="list the named models",
        description="List the named models (for --model of `fit`, `dictionary build` and "
                    "the server), one per line with a short description, from the TOML "
                    "recipes.")
    models.set_defaults(func=_cmd_models)


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


def _cli_error(message: str) -> Exception:
    return CLIError(message)


def _load_scheme(args: argparse.Namespace) -> Any:
    # lazy: keeps numba off import; CLI start-up builds the parsers only
    from fingerprint.fitting.pipeline import read_fsl_scheme
    from fingerprint.io import gradients

    if args.scheme is not None:
        if args.bval is not None or args.bvec is not None:
            raise InputError("give either --scheme or --bval/--bvec, not both")
        if not args.scheme.is_file():
            raise InputError(f"scheme file {args.scheme} does not exist")
        return gradients.read_camino_scheme(args.scheme)
    if args.bval is None or args.bvec is None:
        raise InputError("an acquisition scheme is needed: --bval and --bvec, or --scheme")
    for flag, path in (("--bval", args.bval), ("--bvec", args.bvec)):
        if not path.is_file():
            raise InputError(f"{flag} file {path} does not exist")
    if (args.delta is None) != (args.Delta is None):
        raise InputError("give both --delta and --Delta (seconds), or neither")
    check_timing_flags(args)

    return read_fsl_scheme(args.bval, args.bvec, delta=args.delta, Delta=args.Delta,
                           TE=args.TE, b0_threshold=b0_threshold_si(args))


def _cmd_build(args: argparse.Namespace) -> int:
    # lazy: keeps numba off import; CLI start-up builds the parsers only
    from fingerprint.dictionary import build_dictionary, get_or_build_dictionary
    from fingerprint.models import get_recipe

    recipe = get_recipe(args.model)  # unknown names fail before any file is read
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be at least 1")
    if args.size is not None and args.size < 1:
        raise InputError("--size must be a positive integer")
    if args.out is not None and args.dir is not None:
        raise InputError("give either --out or --dir, not both")
    scheme = _load_scheme(args)
    from fingerprint.fitting.pipeline import check_dictionary_space  # lazy: keeps numba off import

    if args.out is None or not args.out.exists():
        check_dictionary_space(args.size, scheme.number_of_measurements,
                               args.out.parent if args.out is not None else args.dir,
                               model=recipe.name, scheme=scheme, seed=args.seed)
    bar, progress = _progress_bar(args)
    try:
        if args.out is not None:
            d = build_dictionary(recipe.name, scheme, args.out, size=args.size, seed=args.seed,
                                 progress=progress, n_jobs=args.threads, overwrite=args.force)
        else:
            d = get_or_build_dictionary(recipe.name, scheme, size=args.size, seed=args.seed,
                                        directory=args.dir, progress=progress,
                                        n_jobs=args.threads)
    except DictionaryError as exc:
        raise _cli_error(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    sys.stdout.write(f"{d.path}\n")
    return 0


def _progress_bar(args: argparse.Namespace):
    """A lazily created tqdm bar (nothing is drawn before the build starts) and its
    fraction callback."""
    return progress_bar("dictionary", enabled=not (args.no_progress or
                                                   getattr(args, "quiet", False)))


def _cmd_list(args: argparse.Namespace) -> int:
    # lazy: keeps numba off import
    from fingerprint.dictionary import default_dictionary_dir, list_dictionaries

    directory = args.dir if args.dir is not None else default_dictionary_dir()
    if args.dir is not None and not args.dir.is_dir():
        problem = "is not a directory" if args.dir.exists() else "does not exist"
        raise InputError(f"dictionary directory {args.dir} {problem}")
    entries = list_dictionaries(directory)
    if args.json:
        sys.stdout.write(json.dumps(entries, indent=2) + "\n")
        return 0
    if not entries:
        sys.stdout.write(f"no dictionaries in {directory}\n")
        return 0
    sys.stdout.write(f"dictionaries in {directory}:\n")
    for e in entries:
        if e["valid"]:
            sys.stdout.write(
                f"{Path(e['path']).name}  {e.get('name') or e.get('model_class')}  "
                f"{e['atoms']} atoms x {e['measurements']} meas.  "
                f"{e['size_bytes'] / 1e6:.1f} MB  {e.get('created', '')}\n")
        else:
            sys.stdout.write(f"{Path(e['path']).name}  INVALID: {e['error']}\n")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    # lazy: keeps numba off import
    from fingerprint.dictionary import open_dictionary
    from fingerprint.dictionary.cache import describe

    try:
        d = open_dictionary(args.path)
        if args.verify:
            d.verify()
    except DictionaryError as exc:
        raise _cli_error(str(exc)) from exc
    entry = describe(args.path)
    m = d.metadata
    entry.update(sampling=m.get("sampling"), package_version=m.get("package_version"),
                 build_seconds=m.get("build_seconds"), spherical_mean=m.get("spherical_mean"),
                 canonical_orientation=m.get("canonical_orientation"))
    if args.json:
        sys.stdout.write(json.dumps(entry, indent=2) + "\n")
        return 0
    lines = [
        f"path:            {d.path}",
        f"model:           {entry.get('name') or '(custom)'} ({entry.get('model_class')})",
        f"parameters:      {', '.join(d.parameter_names)}",
        f"atoms:           {d.n_atoms}",
        f"signals:         {d.signals.shape[1]} {m.get('signal_kind', 'measurements')}",
        f"features:        {d.features.shape[1]} (version {m.get('features_version')})",
        f"sampling:        {m['sampling']['method']}, seed {m['sampling']['seed']}, "
        f"{m['sampling']['dimensions']} dimensions",
        f"scheme hash:     {m.get('scheme_hash')}",
        f"key:             {d.key}",
        f"created:         {m.get('created')} (fingerprint {m.get('package_version')}, "
        f"{m.get('build_seconds')} s)",
        f"size on disk:    {entry.get('size_bytes', 0) / 1e6:.1f} MB",
        f"status:          {'verified' if args.verify else 'valid'}",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from fingerprint.models import available_models  # lazy: CLI start-up builds the parsers only

    for name, description in available_models().items():
        sys.stdout.write(f"{name:14s} {description}\n")
    return 0
