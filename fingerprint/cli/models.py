"""``fingerprint models``: the catalogue of named models.

    fingerprint models              # one line per model
    fingerprint models NAME [--json]  # description, parameters (units, bounds), scheme
                                      # requirements, output maps, reference
"""

from __future__ import annotations

import argparse
import json
import sys


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fingerprint models``."""
    parser = subparsers.add_parser(
        "models", help="list the named models, or describe one",
        description="Without NAME: list the named models (for --model of `fit`, "
                    "`dictionary build` and the server) with a one-line description. With "
                    "NAME: print its description, parameters with units and bounds, scheme "
                    "requirements, output maps and literature reference.")
    parser.add_argument("name", nargs="?", metavar="NAME", help="a named model, e.g. noddi")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=_cmd_models)


def _cmd_models(args: argparse.Namespace) -> int:
    from fingerprint.models import (  # lazy: CLI start-up builds the parsers only
        catalogue,
        describe_model,
        format_model,
        get_recipe,
    )
    from fingerprint.volume_models import is_volume_model  # lazy: CLI start-up parsers only

    if args.name is None:
        models = catalogue()
        if args.json:
            sys.stdout.write(json.dumps(models, indent=2) + "\n")
        else:
            width = max((len(n) for n in models), default=10) + 2
            for name, description in models.items():
                sys.stdout.write(f"{name:{width}s}{description}\n")
        return 0
    if not is_volume_model(args.name):
        get_recipe(args.name)  # unknown names: the error listing the models
    if args.json:
        sys.stdout.write(json.dumps(describe_model(args.name), indent=2) + "\n")
    else:
        sys.stdout.write(format_model(args.name))
    return 0
