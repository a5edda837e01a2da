"""``python -m server``: the same as ``fingerprint serve`` (same options)."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from fingerprint.cli import serve

    parser = argparse.ArgumentParser(prog="python -m server",
                                     description="Run the fingerprint lab server.")
    serve.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    args.prog = "python -m server"
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    for noisy in ("numba", "distributed", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except ValueError as exc:
        sys.stderr.write(f"fingerprint serve: error: {exc}\n")
        return 2


if __name__ == "__main__":
    sys.exit(main())
