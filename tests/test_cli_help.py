"""Every command explains itself: each sub-command has a description and every option and
argument a help line, and ``fingerprint COMMAND --help`` prints them."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from fingerprint.cli.main import build_parser

REPO = Path(__file__).resolve().parents[1]


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of the parser and every sub-command below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(build_parser()))


def test_every_command_is_listed() -> None:
    names = {" ".join(path) for path, _ in COMMANDS}
    for expected in ("demo", "fit", "serve", "submit", "keys create", "keys list",
                     "keys revoke", "dictionary build", "dictionary list", "dictionary info",
                     "dictionary models"):
        assert expected in names


@pytest.mark.parametrize("path,parser", COMMANDS, ids=[" ".join(p) or "fingerprint"
                                                        for p, _ in COMMANDS])
def test_command_and_options_have_help(path: tuple[str, ...], parser) -> None:
    assert (parser.description or "").strip(), f"`fingerprint {' '.join(path)}` has no description"
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                assert (choice.help or "").strip(), \
                    f"`fingerprint {' '.join(path)} {choice.dest}` has no help line"
            continue
        name = "/".join(action.option_strings) or action.dest
        assert (action.help or "").strip(), f"`fingerprint {' '.join(path)}` {name}: no help"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS if p],
                         ids=[" ".join(p) for p, _ in COMMANDS if p])
def test_help_prints(path: tuple[str, ...]) -> None:
    proc = subprocess.run([sys.executable, "-m", "fingerprint", *path, "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fingerprint " + " ".join(path))
    parser = dict(COMMANDS)[path]
    assert parser.description.split()[0] in proc.stdout
