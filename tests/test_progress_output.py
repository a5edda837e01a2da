"""Terminal output: progress bars and log records never share a line; the library draws a
bar for long dictionary builds only in interactive terminals (or when asked to); printed
paths follow one rule; the dictionary build log names the final store."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

import fingerprint.progress as lib_progress
from fingerprint.cli.progress import progress_bar, shown_path


def _record_lines(text: str, message: str) -> list[str]:
    """The visible text of each terminal line holding ``message`` (after the last \\r)."""
    return [line.split("\r")[-1] for line in text.split("\n") if message in line]


def test_cli_bar_and_log_records_never_share_a_line(capsys) -> None:
    import sys

    # a console handler on stderr, as `logging.basicConfig` makes (created here: pytest
    # swaps sys.stderr between fixture set-up and the test body)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        closer, progress = progress_bar("fit")
        progress(0.3)
        logging.getLogger("fingerprint.test").warning("a record while the bar is drawn")
        progress(0.6)
        closer.close()
    finally:
        root.removeHandler(handler)
    err = capsys.readouterr().err
    assert "fit:" in err, repr(err)
    lines = _record_lines(err, "a record while the bar is drawn")
    assert lines and all(line.startswith("WARNING fingerprint.test:") for line in lines), err


def test_library_progress_modes(monkeypatch) -> None:
    monkeypatch.delenv("FINGERPRINT_PROGRESS", raising=False)
    lib_progress.set_progress(None)
    assert lib_progress.progress_mode() == "auto"
    monkeypatch.setenv("FINGERPRINT_PROGRESS", "never")
    assert lib_progress.progress_mode() == "never"
    monkeypatch.setenv("FINGERPRINT_PROGRESS", "bogus")
    assert lib_progress.progress_mode() == "auto"
    lib_progress.set_progress("always")
    try:
        assert lib_progress.progress_mode() == "always"
    finally:
        lib_progress.set_progress(None)
    with pytest.raises(ValueError, match="always"):
        lib_progress.set_progress("loud")


def test_library_bar_only_when_interactive_or_asked(monkeypatch, capsys) -> None:
    given = [].append
    with lib_progress.library_progress("building dictionary", given) as cb:
        assert cb is given  # a caller's callback always wins
    monkeypatch.setenv("FINGERPRINT_PROGRESS", "auto")
    with lib_progress.library_progress("building dictionary", None) as cb:
        assert cb is None  # pytest's stderr is not a terminal: silent
    monkeypatch.setenv("FINGERPRINT_PROGRESS", "always")
    monkeypatch.setattr(lib_progress, "DELAY_SECONDS", 0.0)
    with lib_progress.library_progress("building dictionary", None) as cb:
        assert cb is not None
        cb(0.5)
        cb(1.0)
    assert "building dictionary" in capsys.readouterr().err


def test_model_fit_build_is_silent_without_a_terminal(tmp_path, monkeypatch, capfd) -> None:
    from fingerprint.dictionary import get_or_build_dictionary
    from fingerprint.models import get_model
    from fingerprint.phantoms import default_scheme

    monkeypatch.setenv("FINGERPRINT_PROGRESS", "auto")
    get_or_build_dictionary(get_model("ball_stick"), default_scheme(), size=300,
                            directory=tmp_path)
    assert capfd.readouterr().err == ""


def test_build_log_names_the_final_store(tmp_path, caplog) -> None:
    from fingerprint.dictionary import get_or_build_dictionary
    from fingerprint.models import get_model
    from fingerprint.phantoms import default_scheme

    with caplog.at_level(logging.INFO, logger="fingerprint.dictionary.build"):
        d = get_or_build_dictionary(get_model("ball_stick"), default_scheme(), size=300,
                                    directory=tmp_path)
    built = [r.getMessage() for r in caplog.records if r.getMessage().startswith("built ")]
    assert built and str(d.path) in built[0] and ".tmp" not in built[0]


def test_shown_path_one_rule(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "b").mkdir(parents=True)
    assert shown_path("a/b") == os.path.join("a", "b")
    assert shown_path(tmp_path / "a" / "b") == os.path.join("a", "b")  # same path, same text
    outside = Path(os.path.abspath(os.sep))
    assert shown_path(outside) == str(outside)


def test_demo_prints_paths_one_way(tmp_path, monkeypatch, capsys) -> None:
    from fingerprint.cli.main import main

    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--out", "demo", "--shape", "3", "3", "2", "--dictionary-size",
                 "800", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "-> demo/phantom" in out
    assert "maps:    demo/fit" in out and "preview: demo/sub-demo" in out
    assert str(tmp_path) not in out  # paths inside the current directory: relative
