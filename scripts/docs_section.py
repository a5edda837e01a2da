"""Write a benchmark's generated section into a docs page, between its two markers."""

from __future__ import annotations

from pathlib import Path


def write_section(doc: Path, text: str, begin: str, end: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``doc`` by ``text`` (which holds
    both markers), or append ``text`` when the markers are not there yet."""
    current = doc.read_text(encoding="utf-8")
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + text + rest.split(end, 1)[1]
    else:
        current = current.rstrip("\n") + "\n\n" + text + "\n"
    doc.write_text(current, encoding="utf-8")
