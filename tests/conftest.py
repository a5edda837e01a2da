"""Shared test fixtures.

The dmipy reference signals are test data in ``tests/data/reference`` (see its README);
``FINGERPRINT_REFERENCE_DIR`` points the tests at another copy.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from reference_helpers import default_reference_dir

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = default_reference_dir()
    if not (path / "signals_hcp.npz").exists():
        pytest.fail(f"dmipy reference signals not found in {path}: expected signals_hcp.npz "
                    "(tests/data/reference in the repository, or FINGERPRINT_REFERENCE_DIR)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _isolated_dictionary_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep every test's dictionaries out of the user's cache."""
    if "FINGERPRINT_DICTIONARY_DIR" not in os.environ:
        os.environ["FINGERPRINT_DICTIONARY_DIR"] = str(tmp_path_factory.mktemp("dictionaries"))


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A small NODDI phantom as files (``dwi``, ``bval``, ``bvec``, ``mask``; 3x3x2
    voxels), the input of the server tests (a module may define its own)."""
    from server_helpers import write_phantom

    return write_phantom(tmp_path_factory.mktemp("phantom"), shape=(3, 3, 2))
