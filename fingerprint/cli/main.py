"""Entry point of the ``fingerprint`` console script.

Each sub-command lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers the sub-command and sets ``func`` (a callable
taking the parsed ``argparse.Namespace`` and returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from fingerprint import __version__

SUBCOMMAND_MODULES = ("demo", "dictionary", "fit", "check", "bids", "compare", "serve",
                      "keys", "submit", "models")

logger = logging.getLogger("fingerprint")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fingerprint",
        description="Diffusion-MRI microstructure fitting by dictionary matching.",
    )
    parser.add_argument("--version", action="version", version=f"fingerprint {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)"
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(f"fingerprint.cli.{name}")
        module.add_parser(subparsers)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    if verbose < 2:
        for noisy in ("numba", "distributed", "httpx", "httpcore", "matplotlib", "faiss"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError, PermissionError) as exc:
        logger.debug("command failed", exc_info=True)
        sys.stderr.write(f"fingerprint {args.command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
