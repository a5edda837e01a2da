"""``fingerprint fit``: fit a named model to a DWI volume and write BIDS-derivative maps."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``fingerprint fit``."""
    parser = subparsers.add_parser("fit", help="fit a model to a DWI volume",
                                   description="Fit a model to a DWI volume.")
    parser.set_defaults(func=_cmd_fit)


def _cmd_fit(args: argparse.Namespace) -> int:
    from fingerprint.cli.main import CLIError

    raise CLIError("fit is not available yet")
