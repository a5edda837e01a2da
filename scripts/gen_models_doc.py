"""Write docs/models.md, the model catalogue, from the recipes (``dictionaries/*.toml``).

    python scripts/gen_models_doc.py           # rewrite docs/models.md
    python scripts/gen_models_doc.py --check   # exit 1 when docs/models.md is out of date

The text comes from :func:`fingerprint.models.models_markdown`, the same metadata
``fingerprint models NAME`` prints; ``tests/test_model_docs.py`` checks the file is up to
date, so a new recipe needs a rerun of this script.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / "docs" / "models.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="only check that docs/models.md is up to date")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from fingerprint.models import models_markdown

    text = models_markdown()
    if args.check:
        current = TARGET.read_text(encoding="utf-8") if TARGET.exists() else ""
        if current != text:
            sys.stderr.write("docs/models.md is out of date: run python "
                             "scripts/gen_models_doc.py\n")
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {TARGET.relative_to(ROOT)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
