"""docs/models.md is generated from the recipes and up to date."""

from __future__ import annotations

from pathlib import Path

from fingerprint.models import catalogue, models_markdown

DOC = Path(__file__).resolve().parent.parent / "docs" / "models.md"


def test_models_doc_is_up_to_date():
    assert DOC.read_text(encoding="utf-8") == models_markdown(), \
        "docs/models.md is out of date: run python scripts/gen_models_doc.py"


def test_models_doc_lists_every_named_model():
    text = DOC.read_text(encoding="utf-8")
    for name in catalogue():  # the recipes' models and the volume models (mc_csd)
        assert f"\n## {name}\n" in text
