"""``fingerprint serve``: run the lab fitting server (FastAPI + uvicorn).

    fingerprint serve [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--workers N]
                      [--dask-scheduler tcp://host:8786] [--max-upload-mb N]
                      [--max-jobs-per-key N]

Every option can also be set by an environment variable (``FINGERPRINT_HOST``,
``FINGERPRINT_PORT``, ``FINGERPRINT_DATA_DIR``, ``FINGERPRINT_WORKERS``,
``FINGERPRINT_DASK_SCHEDULER``, ``FINGERPRINT_MAX_UPLOAD_MB``,
``FINGERPRINT_MAX_JOBS_PER_KEY``, ...); flags win. API docs are served at ``/docs``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

_FLAGS = ("host", "port", "data_dir", "workers", "threads", "dask_scheduler", "max_upload_mb",
          "max_jobs_per_key", "max_attempts", "max_dictionary_size", "dictionary_dir",
          "log_level", "max_voxels", "max_dwi_mb", "max_user_dictionary_size",
          "max_uploads_per_key", "max_uploads", "min_upload_rate_kb", "max_upload_seconds",
          "dictionary_cache_gb", "disk_reserve_mb")


def add_parser(subparsers: Any) -> None:
    """Register ``fingerprint serve``."""
    parser = subparsers.add_parser(
        "serve", help="run the lab fitting server (HTTP API, docs at /docs)",
        description="Run the lab fitting server. Options default to FINGERPRINT_* "
                    "environment variables, then to the values shown.")
    parser.add_argument("--host", help="interface to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default 8000)")
    parser.add_argument("--data-dir", type=Path,
                        help="database, jobs and dictionaries (default ./fingerprint-data)")
    parser.add_argument("--workers", type=int, help="jobs run at the same time (default 1)")
    parser.add_argument("--threads", type=int,
                        help="threads per job (default: cores / workers)")
    parser.add_argument("--dask-scheduler", metavar="ADDRESS",
                        help="run voxel chunks on this dask.distributed scheduler "
                             "(tcp://host:8786) instead of local worker processes")
    parser.add_argument("--max-upload-mb", type=float,
                        help="largest upload in MiB (default 2048)")
    parser.add_argument("--max-jobs-per-key", type=int,
                        help="queued + running jobs allowed per API key (default 4)")
    parser.add_argument("--max-attempts", type=int,
                        help="runs of a job interrupted by server stops before it fails "
                             "(default 3)")
    parser.add_argument("--max-dictionary-size", type=int,
                        help="largest dictionary (atoms) a request may ask for "
                             "(default 2000000)")
    parser.add_argument("--dictionary-dir", type=Path,
                        help="dictionary directory (default <data-dir>/dictionaries)")
    limits = parser.add_argument_group(
        "limits", "what one API key may use (see the server documentation)")
    limits.add_argument("--max-voxels", type=int,
                        help="most voxels one job may fit (default 5000000)")
    limits.add_argument("--max-dwi-mb", type=float,
                        help="largest decompressed DWI per job in MiB, from its header "
                             "(default 8192)")
    limits.add_argument("--max-user-dictionary-size", type=int,
                        help="largest dictionary (atoms) a non-admin key may ask for "
                             "(default: the model's own size)")
    limits.add_argument("--max-uploads-per-key", type=int,
                        help="uploads in progress at once per key (default 2)")
    limits.add_argument("--max-uploads", type=int,
                        help="uploads in progress at once in total (default 16)")
    limits.add_argument("--min-upload-rate-kb", type=float,
                        help="slowest average upload rate in KiB/s (default 16; 408 below)")
    limits.add_argument("--max-upload-seconds", type=float,
                        help="longest time an upload may take (default 3600)")
    limits.add_argument("--dictionary-cache-gb", type=float,
                        help="size budget of the dictionary cache in GiB (default 20)")
    limits.add_argument("--disk-reserve-mb", type=float,
                        help="free disk space kept in MiB; uploads and jobs below it get "
                             "507 (default 512)")
    parser.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"],
                        help="server log level (default info)")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings from the environment, overridden by the flags that were given."""
    from pydantic import ValidationError

    from server.config import Settings

    given = {name: getattr(args, name) for name in _FLAGS
             if getattr(args, name, None) is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid server settings: {problems}") from None


def check_data_dir(path: Path) -> None:
    """One-line errors (CLIError) for a ``--data-dir`` that cannot hold the server's data."""
    from fingerprint.cli.main import CLIError

    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"is under the file {parent}"
                raise CLIError(f"--data-dir {path} {where}; give a directory")
            break


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from fingerprint.cli.main import CLIError
    from server.app import DataDirLocked, _DataDirLock, create_app

    settings = settings_from_args(args)
    check_data_dir(settings.data_dir)
    probe = _DataDirLock(Path(settings.data_dir))
    try:
        probe.acquire()
    except DataDirLocked as exc:
        raise CLIError(str(exc)) from None
    except OSError as exc:
        raise CLIError(f"cannot use --data-dir {settings.data_dir}: "
                       f"{exc.strerror or exc}") from None
    probe.release()
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=10)
    return 0
