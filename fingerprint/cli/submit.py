"""``fingerprint submit``: send a volume to a lab server, optionally wait and download.

    fingerprint submit --server URL --api-key KEY --model noddi --dwi dwi.nii.gz \\
        --bval dwi.bval --bvec dwi.bvec [--mask mask.nii.gz] [--wait] [--out DIR] \\
        [--solver brute2fine --Ns 5 ...] [--n-neighbors N] [--refine nonlinear] ...

The fit options are the server's: one flag per option of the library's
:data:`~fingerprint.fitting.options.FIT_OPTION_SPECS` that the server offers (the same
flags as ``fingerprint fit``), sent as the job's form fields and validated by the server.

The API key may also come from ``$FINGERPRINT_API_KEY`` and the server from
``$FINGERPRINT_SERVER``. Errors from the server (bad key, upload too large, invalid
input, too many jobs) exit with status 2 and the server's message.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fingerprint.cli.flags import add_b0_threshold_argument, add_option_flags, option_values
from fingerprint.cli.main import CLIError
from fingerprint.fitting.options import FIT_OPTION_SPECS

if TYPE_CHECKING:
    from fingerprint.client import FingerprintClient

#: The fit options a lab server job takes (the library's specs marked ``server``).
SUBMIT_OPTION_SPECS = tuple(s for s in FIT_OPTION_SPECS if s.server)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint submit``."""
    parser = subparsers.add_parser(
        "submit", help="fit a volume on a lab server (upload, wait, download)",
        description="Upload a DWI volume to a fingerprint lab server and queue a fit; with "
                    "--wait, show progress and download the maps.")
    parser.add_argument("--server", default=os.environ.get("FINGERPRINT_SERVER"),
                        help="server URL, e.g. http://lab-server:8000 "
                             "(default $FINGERPRINT_SERVER)")
    parser.add_argument("--api-key", default=None,
                        help="API key (default $FINGERPRINT_API_KEY)")
    parser.add_argument("--model", default="noddi", help="named model (default noddi)")
    parser.add_argument("--dwi", type=Path, required=True, help="4-D DWI NIfTI")
    parser.add_argument("--bval", type=Path, required=True, help="FSL bval file (s/mm²)")
    parser.add_argument("--bvec", type=Path, required=True, help="FSL bvec file")
    parser.add_argument("--mask", type=Path, help="3-D brain mask NIfTI")
    add_option_flags(parser, SUBMIT_OPTION_SPECS)
    add_b0_threshold_argument(parser)
    parser.add_argument("--prefix",
                        help="BIDS prefix of the output files (default: the BIDS entities of "
                             "the --dwi file name, e.g. sub-01_ses-1)")
    parser.add_argument("--delta", type=float, metavar="SECONDS",
                        help="gradient pulse duration (models that need timing)")
    parser.add_argument("--Delta", type=float, metavar="SECONDS",
                        help="gradient pulse separation (models that need timing)")
    parser.add_argument("--TE", type=float, metavar="SECONDS", help="echo time")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job, showing progress, then download the maps")
    parser.add_argument("--out", type=Path,
                        help="where to put the maps (implies --wait; default ./<job id>)")
    parser.add_argument("--poll", type=float, default=1.0, help="status poll period (s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _fail(message: str) -> Exception:
    return CLIError(message)


_HINTS = {
    401: "check --api-key (or $FINGERPRINT_API_KEY)",
    403: "this needs an admin key",
    413: "the upload is larger than the server accepts (ask for a larger --max-upload-mb)",
    422: "the inputs were rejected",
    429: "too many of your jobs are queued or running; wait for one to finish",
}


def run(args: argparse.Namespace) -> int:
    import httpx  # lazy: keeps httpx off CLI start-up

    # lazy: keeps httpx off CLI start-up
    from fingerprint.client import FingerprintClient, ServerError

    api_key = args.api_key or os.environ.get("FINGERPRINT_API_KEY")
    if not args.server:
        raise _fail("--server is required (or set $FINGERPRINT_SERVER)")
    if not api_key:
        raise _fail("--api-key is required (or set $FINGERPRINT_API_KEY)")
    wait = args.wait or args.out is not None
    prefix = args.prefix if args.prefix is not None else _default_prefix(args.dwi)
    try:
        with FingerprintClient(args.server, api_key) as client:
            options: dict[str, int | float | str] = option_values(args, SUBMIT_OPTION_SPECS)
            if args.b0_threshold is not None:  # the server's field is in s/mm² too
                options["b0_threshold"] = args.b0_threshold
            job = client.submit(args.dwi, args.bval, args.bvec, args.mask, model=args.model,
                                prefix=prefix, delta=args.delta, Delta=args.Delta,
                                TE=args.TE, options=options)
            sys.stderr.write(f"submitted job {job['id']} ({job['model']})\n")
            if not wait:
                sys.stdout.write(f"{job['id']}\n")
                return 0
            job = _wait(client, job["id"], args.poll, not args.no_progress)
            if job["status"] != "succeeded":
                raise _fail(f"job {job['id']} {job['status']}: {job.get('error') or ''}".strip())
            out = args.out or Path(job["id"])
            files = client.download(job["id"], out)
    except ServerError as exc:
        hint = _HINTS.get(exc.status_code)
        where = f" (field '{exc.field}')" if exc.field else ""
        raise _fail(f"server refused the request: HTTP {exc.status_code}{where}: {exc.detail}"
                    + (f" — {hint}" if hint else "")) from None
    except httpx.HTTPError as exc:
        raise _fail(f"cannot talk to {args.server}: {exc}") from None
    sys.stderr.write(f"downloaded {len(files)} files into {out}\n")
    for path in files:
        sys.stdout.write(f"{path}\n")
    return 0


def _default_prefix(dwi: Path) -> str | None:
    """``sub-01_ses-1`` for ``sub-01_ses-1_dwi.nii.gz`` (None without BIDS entities)."""
    from fingerprint.fitting.pipeline import prefix_from_filename  # lazy: keeps numba off import

    prefix = prefix_from_filename(dwi)
    if prefix and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", prefix):
        return prefix
    return None


def _wait(client: FingerprintClient, job_id: str, poll: float, show: bool) -> dict[str, Any]:
    from tqdm import tqdm  # lazy: keeps tqdm off import

    bar = tqdm(total=100, unit="%", desc=f"{job_id[:8]} queued", disable=not show,
               leave=True, bar_format="{desc:32s} {percentage:3.0f}%|{bar}| {elapsed}")
    state = {"last": 0}

    def update(job: dict[str, Any]) -> None:
        value = int(round(100 * float(job.get("progress") or 0)))
        if value > state["last"]:
            bar.update(value - state["last"])
            state["last"] = value
        stage = job.get("stage")
        if stage and stage != "queued":  # e.g. "fitting 40%": where the job is, and how far
            within = int(round(100 * float(job.get("stage_progress") or 0)))
            bar.set_description_str(f"{job_id[:8]} {stage} {within}%")
        else:
            bar.set_description_str(f"{job_id[:8]} {stage or job['status']}")

    try:
        return client.wait(job_id, poll=poll, progress=update)
    finally:
        bar.close()
