"""``fingerprint demo``: simulate a small NODDI phantom, fit it and report the accuracy."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(subparsers: Any) -> None:
    """Register ``fingerprint demo``."""
    parser = subparsers.add_parser("demo", help="fit a simulated NODDI phantom",
                                   description="Fit a simulated NODDI phantom.")
    parser.set_defaults(func=_cmd_demo)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fingerprint.cli.main import CLIError

    raise CLIError("demo is not available yet")
