"""Flags shared by several commands (``fit``, ``check``, ``compare``, ``bids``,
``dictionary build``, ``submit``): the b=0 threshold in s/mm², the timing flags in
seconds, the fit options' flags generated from the library's option specs, and the
logging of third-party libraries."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable

from fingerprint.errors import InputError
from fingerprint.fitting.options import TIMING_LIMITS_S, OptionSpec, check_timing

__all__ = ["DEFAULT_B0_THRESHOLD_S_PER_MM2", "add_b0_threshold_argument", "add_option_flags",
           "b0_threshold_si", "check_timing_flags", "option_flag", "option_values",
           "quiet_third_party_logs"]

#: Default of --b0-threshold, s/mm² (the library's DEFAULT_B0_THRESHOLD, 10e6 s/m²).
DEFAULT_B0_THRESHOLD_S_PER_MM2 = 10.0


def add_b0_threshold_argument(parser: argparse.ArgumentParser) -> None:
    """The shared ``--b0-threshold`` flag (s/mm²) of fit, check and dictionary build."""
    parser.add_argument("--b0-threshold", type=float, dest="b0_threshold", metavar="B",
                        help="b-value (s/mm²) at or below which measurements are the b=0 "
                             f"reference that normalises S0 (default "
                             f"{DEFAULT_B0_THRESHOLD_S_PER_MM2:g}); the forward models use "
                             "every measurement's own b-value whatever it is")


def b0_threshold_si(args: argparse.Namespace) -> float | None:
    """--b0-threshold in s/m² (None when not given); InputError when not a b-value."""
    value = getattr(args, "b0_threshold", None)
    if value is None:
        return None
    if not (0.0 <= value < 1e5):  # also false for NaN
        raise InputError(f"--b0-threshold must be a b-value in s/mm² between 0 and 1e5; got "
                         f"{value:g}")
    return float(value) * 1e6


def option_flag(name: str) -> str:
    """The command-line flag of fit option ``name`` (``N_sphere_samples`` ->
    ``--N-sphere-samples``)."""
    return "--" + name.replace("_", "-")


def add_option_flags(parser: argparse.ArgumentParser, specs: Iterable[OptionSpec]) -> None:
    """One flag per fit option of ``specs`` (:data:`fingerprint.fitting.options.
    FIT_OPTION_SPECS`), named by :func:`option_flag`, typed and explained by its spec;
    unset flags are None (the library's default applies)."""
    for spec in specs:
        flag = option_flag(spec.name)
        if spec.kind == "int":
            parser.add_argument(flag, dest=spec.name, type=int, metavar="N", help=spec.help)
        elif spec.kind == "float":
            parser.add_argument(flag, dest=spec.name, type=float, metavar="X",
                                help=spec.help)
        elif spec.kind == "choice":
            parser.add_argument(flag, dest=spec.name, choices=spec.choices, help=spec.help)
        elif spec.kind == "bool":
            parser.add_argument(flag, dest=spec.name, choices=("true", "false"),
                                help=spec.help)
        elif spec.kind == "refine":
            parser.add_argument(flag, dest=spec.name, choices=("true", "false", "nonlinear"),
                                help=spec.help)
        else:  # text, validated by the library
            parser.add_argument(flag, dest=spec.name, metavar="TEXT", help=spec.help)


def option_values(args: argparse.Namespace, specs: Iterable[OptionSpec]
                  ) -> dict[str, int | float | str]:
    """The fit options of ``specs`` given on the command line (name -> value as parsed)."""
    out: dict[str, int | float | str] = {}
    for spec in specs:
        value = getattr(args, spec.name, None)
        if value is not None:
            out[spec.name] = value
    return out


def quiet_third_party_logs(args: argparse.Namespace) -> None:
    """FAISS announces its CPU-feature probing at INFO level: hide it unless -vv."""
    if getattr(args, "verbose", 0) < 2:
        logging.getLogger("faiss").setLevel(logging.WARNING)


def check_timing_flags(args: argparse.Namespace) -> None:
    """--delta / --Delta / --TE must be finite, positive and in seconds (the limits of
    :data:`fingerprint.fitting.options.TIMING_LIMITS_S`, shared with the server): 10 for
    --delta is a millisecond value, not 10 s."""
    for name in TIMING_LIMITS_S:
        check_timing(name, getattr(args, name, None), flag=f"--{name}")
