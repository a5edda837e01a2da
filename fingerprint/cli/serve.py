"""``fingerprint serve``: run the lab fitting server (FastAPI + uvicorn).

    fingerprint serve [--host 127.0.0.1] [--port 8000] [--data-dir DIR] [--workers N]
                      [--dask-scheduler tcp://host:8786] [--max-upload-mb N] ...

The options are the server's settings (:class:`server.config.Settings`: one flag per
field, ``fingerprint serve --help`` lists them); every one can also be set by an
environment variable ``FINGERPRINT_<FIELD>`` (``FINGERPRINT_DATA_DIR``, ...); flags win.
API docs are served at ``/docs``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from fingerprint.cli.main import CLIError

if TYPE_CHECKING:  # type names only: the server loads when the command runs
    from server.config import Settings

def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint serve``. Its flags are the server's settings
    (:func:`server.config.argument_parser`), parsed when the command runs, so that the
    other commands do not load the server."""
    parser = subparsers.add_parser(
        "serve", help="run the lab fitting server (HTTP API, docs at /docs)",
        description="Run the lab fitting server; `fingerprint serve --help` lists its "
                    "options.", add_help=False, prefix_chars="+")
    parser.add_argument("options", nargs=argparse.REMAINDER,
                        help="the server's options (--host, --port, --data-dir, --workers, "
                             "limits, ...): see `fingerprint serve --help`")
    parser.set_defaults(func=run)


def settings_from_args(args: argparse.Namespace, prog: str = "fingerprint serve"
                       ) -> Settings:
    """Settings from the environment, overridden by the flags that were given."""
    # lazy: the server's settings (pydantic) load only for this command
    from server.config import settings_from_argv

    return settings_from_argv(args.options, prog)


def check_data_dir(path: Path) -> None:
    """One-line errors (CLIError) for a ``--data-dir`` that cannot hold the server's data."""
    path = Path(path)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is a file" if parent == path else f"is under the file {parent}"
                raise CLIError(f"--data-dir {path} {where}; give a directory")
            break


def run(args: argparse.Namespace) -> int:
    # lazy: the server and its web framework load only for this command
    import uvicorn

    from server.app import DataDirLock, DataDirLocked, create_app  # lazy: server code

    settings = settings_from_args(args, getattr(args, "prog", "fingerprint serve"))
    check_data_dir(settings.data_dir)
    probe = DataDirLock(Path(settings.data_dir))
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
