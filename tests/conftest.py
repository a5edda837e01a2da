"""Shared test fixtures.

The dmipy reference signals live in ``shared/reference`` beside the checkout (as CI has
them); ``FINGERPRINT_REFERENCE_DIR`` overrides the location.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _reference_dir() -> Path:
    env = os.environ.get("FINGERPRINT_REFERENCE_DIR")
    if env:
        return Path(env)
    return REPO_ROOT.parent / "shared" / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = _reference_dir()
    if not (path / "README.md").exists():
        pytest.fail(f"dmipy reference fixtures not found at {path} (set FINGERPRINT_REFERENCE_DIR)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_dictionary_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every test's dictionaries out of the user's cache."""
    if "FINGERPRINT_DICTIONARY_DIR" not in os.environ:
        os.environ["FINGERPRINT_DICTIONARY_DIR"] = str(tmp_path_factory.mktemp("dictionaries"))
