"""``fingerprint fit``: fit a model to a DWI volume and write BIDS-derivative maps.

    fingerprint fit --model noddi --dwi dwi.nii.gz --bval dwi.bval --bvec dwi.bvec \\
        [--mask mask.nii.gz] --out DIR [--threads N] [--prefix P] [--dictionary-size N] \\
        [--solver {fingerprint,brute2fine,mix}] [--Ns N] [--N-sphere-samples N] \\
        [--maxiter N] [--delta S --Delta S] [--b0-threshold B] [--preview] [--profile]

``--solver`` chooses dictionary matching (``fingerprint``, the default) or dmipy's
classical non-linear fits ``brute2fine`` / ``mix`` (no dictionary; their options
``--Ns``, ``--N-sphere-samples``, ``--grid-starts``, ``--maxiter``, ``--popsize``,
``--tol`` are dmipy's; ``--threads`` is dmipy's ``number_of_processors``). The map
sidecars record the solver (``"Solver"``).

Maps are named ``<prefix>_model-<model>_param-<label>_dwimap.nii.gz`` (+ JSON sidecars).
The prefix is ``--prefix`` when given, else the BIDS entities of the DWI file name
(``sub-01_ses-1`` for ``sub-01_ses-1_dwi.nii.gz``), else the ``sub-``/``ses-`` folders of
``--out`` (``sub-01`` for ``derivatives/fingerprint/sub-01/dwi``), else none.
An MRtrix ``--dwi x.mif[.gz]`` needs no ``--bval``/``--bvec``: its header's gradient
table is converted to FSL's convention (:mod:`fingerprint.io.mif`) and the image to a
temporary NIfTI in the output directory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from pathlib import Path

from fingerprint.cli.flags import (
    add_b0_threshold_argument,
    add_option_flags,
    b0_threshold_si,
    check_timing_flags,
    option_flag,
    quiet_third_party_logs,
)
from fingerprint.cli.main import CLIError
from fingerprint.cli.progress import progress_bar, shown_path
from fingerprint.errors import CancelledError, DictionaryError, InputError
from fingerprint.fitting.options import CLASSICAL_OPTION_NAMES, FIT_OPTION_SPECS, FitOptions
from fingerprint.stages import StageProfile
from fingerprint.volume_models import is_volume_model

#: FitOptions offered as flags beyond --threads / --dictionary-size (from FIT_OPTION_SPECS)
_EXTRA_FIT_FLAGS = ("n_neighbors", "refine", "count_penalty", "seed", "mask_rule", "solver", "Ns",
                    "N_sphere_samples", "grid_starts", "maxiter", "popsize", "tol")


def add_fit_option_flags(parser: argparse.ArgumentParser) -> None:
    """``--n-neighbors``, ``--refine``, ``--count-penalty``, ``--seed``, ``--mask-rule``,
    ``--solver`` and the classical solvers' ``--Ns``, ``--N-sphere-samples``, ``--grid-starts``,
    ``--maxiter``, ``--popsize``, ``--tol``: fit options as the library declares them
    (:data:`fingerprint.fitting.options.FIT_OPTION_SPECS`), validated by
    :class:`~fingerprint.fitting.options.FitOptions` (errors name the option)."""
    add_option_flags(parser, (s for s in FIT_OPTION_SPECS if s.name in _EXTRA_FIT_FLAGS))


def fit_options_from_args(args: argparse.Namespace) -> FitOptions:
    """The :class:`FitOptions` of the parsed flags (unset flags keep the defaults)."""
    values: dict[str, object] = {}
    for name in ("threads", "dictionary_size", *_EXTRA_FIT_FLAGS):
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    return FitOptions.from_mapping(values)


def _warn_unused_options(args: argparse.Namespace, options: FitOptions) -> None:
    """Log options the chosen solver does not use (classical options with dictionary
    matching, matching options with a classical solver)."""
    classical = options.solver != "fingerprint"
    unused = [option_flag(name) for name in _EXTRA_FIT_FLAGS + ("dictionary_size",)
              if getattr(args, name, None) is not None
              and ((name in CLASSICAL_OPTION_NAMES and not classical)
                   or (name in ("n_neighbors", "refine", "count_penalty", "dictionary_size")
                       and classical))]
    if unused:
        logging.getLogger(__name__).warning("%s not used by solver %r", ", ".join(unused),
                                            options.solver)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint fit``."""
    parser = subparsers.add_parser(
        "fit", help="fit a model to a DWI volume and write parameter maps",
        description="Fit a microstructure model to every voxel of a DWI volume (within the "
                    "mask) by dictionary matching (or, with --solver brute2fine / mix, by "
                    "dmipy's classical non-linear fits), and write BIDS-derivative parameter "
                    "maps with JSON sidecars (which record the solver).",
        epilog="Outputs in DIR: <prefix>_model-<model>_param-<label>_dwimap.nii.gz (+ .json) "
               "for each of the model's maps, param-s0, param-r2, and "
               "param-<label>_desc-uncertainty for each scalar map; direction maps hold unit "
               "vectors in the b-vector frame.")
    parser.add_argument("--model", required=True,
                        help="named model (see `fingerprint dictionary models`), e.g. noddi")
    parser.add_argument("--dwi", required=True, type=Path,
                        help="4-D DWI: NIfTI (.nii/.nii.gz) or MRtrix (.mif/.mif.gz, whose "
                             "gradient table is used unless --bval/--bvec are given)")
    parser.add_argument("--bval", type=Path,
                        help="FSL bval file (s/mm²); required for NIfTI")
    parser.add_argument("--bvec", type=Path, help="FSL bvec file; required for NIfTI")
    parser.add_argument("--mask", type=Path,
                        help="3-D mask NIfTI (default: voxels with a positive b=0 signal)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    parser.add_argument("--prefix",
                        help="output file prefix, e.g. sub-01_ses-1 (default: the BIDS "
                             "entities of the DWI file name, else the sub-/ses- folders of "
                             "--out, else none)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="threads (default: all cores); for brute2fine / mix this is "
                             "dmipy's number_of_processors")
    parser.add_argument("--dictionary-size", type=int, dest="dictionary_size", metavar="N",
                        help="atoms of the dictionary (default: the model's)")
    parser.add_argument("--dictionary-dir", type=Path, dest="dictionary_dir", metavar="DIR",
                        help="dictionary directory (default: $FINGERPRINT_DICTIONARY_DIR or "
                             "the user cache)")
    add_fit_option_flags(parser)
    parser.add_argument("--delta", type=float, metavar="S", help="gradient pulse duration (s)")
    parser.add_argument("--Delta", type=float, metavar="S", help="gradient pulse separation (s)")
    parser.add_argument("--TE", type=float, metavar="S", help="echo time (s)")
    add_b0_threshold_argument(parser)
    parser.add_argument("--chunk-voxels", type=int, dest="chunk_voxels", metavar="N",
                        help="voxels per chunk (default 20000)")
    parser.add_argument("--multi-tissue", dest="multi_tissue", metavar="RESPONSES",
                        help="also write volume fractions (<tissue>_vf maps): S0 responses "
                             "'auto' (estimated from the data's white-matter, grey-matter and "
                             "CSF voxels), 'wm=..,gm=..,csf=..' or one number per compartment "
                             "(units of the data)")
    parser.add_argument("--preview", action="store_true", help="also write a PNG preview")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--profile", action="store_true",
                        help="print the time spent in each stage of the fit (reading, mask, "
                             "frames, features, search, posterior, refinement, quality, "
                             "writing) after it")
    csd = parser.add_argument_group(
        "mc_csd (multi-tissue CSD; MRtrix3-convention SH, peaks and tissue maps)")
    csd.add_argument("--sh-order", type=int, dest="sh_order", metavar="L",
                     help="even SH order (lmax) of the white-matter FOD (default 8)")
    csd.add_argument("--response", type=Path, nargs="+", dest="response",
                     metavar="FILE", help="MRtrix3 response files: white matter [grey "
                                          "matter [CSF]] (default: estimated from the data, "
                                          "dhollander16)")
    csd.add_argument("--max-peaks", type=int, dest="max_peaks", metavar="N",
                     help="FOD peaks written per voxel (default 3)")
    parser.set_defaults(func=_cmd_fit)


def _csd_options(args: argparse.Namespace) -> dict[str, object] | None:
    """The mc_csd options given on the command line (InputError when given for another
    model)."""
    values: dict[str, object] = {}
    if getattr(args, "sh_order", None) is not None:
        values["sh_order"] = args.sh_order
    if getattr(args, "max_peaks", None) is not None:
        values["max_peaks"] = args.max_peaks
    if getattr(args, "response", None):
        for path in args.response:
            if not path.is_file():
                raise InputError(f"--response file {path} does not exist")
        values["responses"] = tuple(args.response)
    if values and not is_volume_model(args.model):
        raise InputError(f"--sh-order, --response and --max-peaks apply to --model mc_csd, "
                         f"not {args.model}")
    return values or None


_BIDS_FOLDER = re.compile(r"^(sub|ses)-[A-Za-z0-9]+$")


def prefix_from_output_dir(out: Path) -> str | None:
    """The ``sub-``/``ses-`` entities of a BIDS derivatives folder
    (``derivatives/fingerprint/sub-01/ses-2/dwi`` -> ``sub-01_ses-2``), or None."""
    parts = [p for p in Path(out).parts if _BIDS_FOLDER.match(p)]
    subjects = [i for i, p in enumerate(parts) if p.startswith("sub-")]
    if not subjects:
        return None
    last = subjects[-1]
    sessions = [p for p in parts[last + 1:] if p.startswith("ses-")]
    return "_".join([parts[last]] + sessions[:1])


def output_prefix(prefix: str | None, dwi: Path, out: Path) -> str | None:
    """``prefix`` when given, else the DWI name's BIDS entities, else ``out``'s folders."""
    from fingerprint.fitting.pipeline import prefix_from_filename  # lazy: keeps numba off import

    if prefix is not None:
        return prefix
    return prefix_from_filename(dwi) or prefix_from_output_dir(out)


def _cli_error(message: str) -> Exception:
    return CLIError(message)


def _name_sources(files: list[Path], sources: list[Path | None]) -> None:
    from fingerprint.io.nifti import atomic_write_json  # lazy: CLI start-up builds the parsers only

    names = [p.name for p in sources if p is not None]
    for path in files:
        if path.suffix == ".json":
            data = json.loads(path.read_text())
            data["Sources"] = names
            atomic_write_json(data, path)


def _cmd_fit(args: argparse.Namespace) -> int:
    with contextlib.ExitStack() as early:
        profile = None
        if getattr(args, "profile", False):
            # lazy: CLI start-up builds the parsers only
            from fingerprint.stages import profile_stages

            profile = early.enter_context(profile_stages())
        _prefetch_dwi(args, early)
        return _fit(args, profile)


def _prefetch_dwi(args: argparse.Namespace, stack: contextlib.ExitStack) -> None:
    """Start inflating a gzip NIfTI DWI into its spool in the output directory before the
    fitting code is imported (about a second of start-up, on a core that the one
    inflating thread leaves free); the fit adopts it (:func:`fingerprint.io.spool.adopt`)
    and one nobody adopted is removed when the command ends. Best effort: anything odd is
    left for the fit to report."""
    dwi = getattr(args, "dwi", None)
    if (dwi is None or args.out is None or is_volume_model(args.model)
            or not str(dwi).lower().endswith(".nii.gz")):
        return
    # lazy: light (numpy, nibabel, the decompressors), unlike the fitting code
    from fingerprint.io.nifti import DEFAULT_SLAB_BYTES, prefetch, spool_threads
    from fingerprint.io.spool import discard_prefetched

    stack.callback(discard_prefetched)
    prefetch(dwi, args.out, args.mask, threads=spool_threads(),
             max_bytes=DEFAULT_SLAB_BYTES)


def _fit(args: argparse.Namespace, profile: object | None) -> int:
    # lazy: keeps numba off import; CLI start-up builds the parsers only (and a gzip
    # DWI starts inflating before these heavy imports, see _prefetch_dwi)
    from fingerprint.fitting.multi_tissue import parse_responses
    from fingerprint.fitting.pipeline import DEFAULT_CHUNK_VOXELS, fit_volume
    from fingerprint.models import get_recipe
    if not is_volume_model(args.model):
        get_recipe(args.model)  # unknown names fail before any file is read
    model_options = _csd_options(args)
    quiet_third_party_logs(args)
    if args.threads is not None and args.threads < 1:
        raise InputError("--threads must be at least 1")
    if args.dictionary_size is not None and args.dictionary_size < 1:
        raise InputError("--dictionary-size must be a positive integer")
    fit_options = fit_options_from_args(args)
    _warn_unused_options(args, fit_options)
    if args.chunk_voxels is not None and args.chunk_voxels < 1:
        raise InputError("--chunk-voxels must be a positive integer")
    if (args.delta is None) != (args.Delta is None):
        raise InputError("give both --delta and --Delta (seconds), or neither")
    check_timing_flags(args)
    # lazy: CLI start-up builds the parsers only
    from fingerprint.io.mif import is_mif, mif_as_nifti

    mif = is_mif(args.dwi)
    if not mif and (args.bval is None or args.bvec is None):
        raise InputError("--bval and --bvec are required for a NIfTI --dwi (only an MRtrix "
                         ".mif carries its gradient table)")
    if (args.bval is None) != (args.bvec is None):
        raise InputError("give both --bval and --bvec, or neither (for a .mif --dwi)")
    b0_threshold = b0_threshold_si(args)
    for flag, path in (("--dwi", args.dwi), ("--bval", args.bval), ("--bvec", args.bvec),
                       ("--mask", args.mask)):
        if path is not None and not path.is_file():
            raise InputError(f"{flag} file {path} "
                             f"{'is not a file' if path.exists() else 'does not exist'}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} exists and is not a directory")
    prefix = output_prefix(args.prefix, args.dwi, args.out)
    bar, progress = progress_bar("fit", not (args.no_progress or getattr(args, "quiet", False)))
    try:
        with contextlib.ExitStack() as stack:
            dwi, bval, bvec = args.dwi, args.bval, args.bvec
            if mif:
                converted = stack.enter_context(mif_as_nifti(args.dwi, args.out))
                dwi = converted["dwi"]
                if bval is None:
                    if "bval" not in converted:
                        raise InputError(f"--dwi {args.dwi} has no gradient table (dw_scheme) "
                                         "in its header: give --bval and --bvec")
                    bval, bvec = converted["bval"], converted["bvec"]
            result = fit_volume(
                args.model, dwi, bval, bvec, args.out, mask=args.mask,
                prefix=prefix, options=fit_options, progress=progress,
                dictionary_dir=args.dictionary_dir,
                chunk_voxels=args.chunk_voxels or DEFAULT_CHUNK_VOXELS, preview=args.preview,
                delta=args.delta, Delta=args.Delta, TE=args.TE,
                b0_threshold=b0_threshold, model_options=model_options,
                s0_responses=None if args.multi_tissue is None
                else parse_responses(args.multi_tissue))
            if mif:  # the sidecars name the .mif, not its temporary conversion
                _name_sources(result.files, [args.dwi, args.bval, args.bvec, args.mask])
    except (DictionaryError, CancelledError) as exc:
        raise _cli_error(str(exc)) from exc
    finally:
        if bar is not None:
            bar.close()
    out = sys.stdout
    what = ("deconvolution" if is_volume_model(args.model) else "matching") \
        if fit_options.solver == "fingerprint" else fit_options.solver
    out.write(f"fitted {result.n_voxels} voxels with {result.model} in {result.seconds:.1f} s"
              f" ({result.n_voxels / max(result.timings.get('fit', 0.0), 1e-9):,.0f} voxels/s"
              f" {what})\n")
    if result.n_invalid:
        out.write(f"{result.n_invalid} voxels were left out ({result.n_unusable} for NaN, "
                  f"infinite or negative signals or no positive b=0 signal; NaN in the "
                  f"maps)\n")
    counts = getattr(result, "quality_counts", None) or {}
    if counts:
        flagged = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in counts.items()
                            if k not in ("any", "total") and v)
        out.write(f"quality: {counts['any']} of {counts['total']} voxels flagged"
                  f"{' (' + flagged + ')' if flagged else ''}\n")
    out.write(f"maps in {shown_path(result.out_dir)}:\n")
    for path in result.files:
        if path.suffix != ".json":
            out.write(f"  {path.name}\n")
    if isinstance(profile, StageProfile):
        out.write("stage profile (seconds summed over threads; sub-stages indented):\n")
        out.write(profile.table() + "\n")
    return 0
