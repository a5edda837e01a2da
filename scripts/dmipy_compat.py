"""Run dmipy's own test suite against fingerprint, with only the imports changed.

Usage::

    python3 scripts/dmipy_compat.py DMIPY_CHECKOUT [--keep DIR] [-k EXPR] [-v]

``DMIPY_CHECKOUT`` is a local checkout of dmipy (1.0.5). Its ``*/tests/test_*.py`` files are
copied into a temporary folder (nothing is written into this repository or the checkout),
``dmipy`` is replaced by ``fingerprint`` in their imports, and two numpy names that
numpy 2 removed are replaced by their successors (the nose decorator
``np.testing.dec.skipif`` by ``pytest.mark.skipif``, ``np.trapz`` by ``np.trapezoid``);
pytest then runs them against the installed project (or the one on ``PYTHONPATH``).
dmipy skips five tests unless ``cvxpy`` is importable (its own CSD solver); install it to
run them (the project solves with Clarabel and does not need it). The script prints
passed / failed / skipped per file and the totals, and exits non-zero when a test fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

_IMPORT = re.compile(r"^(\s*)(from|import)(\s+)dmipy\b", re.MULTILINE)


def rewrite(source: str) -> str:
    """Apply the import change and the decorator change to one test module's text."""
    text = _IMPORT.sub(r"\1\2\3fingerprint", source)
    text = re.sub(r"np\.testing\.dec\.skipif\((.*)\)",
                  r'pytest.mark.skipif(\1, reason="optional dependency missing")', text)
    text = text.replace("np.trapz(", "np.trapezoid(")
    if "pytest.mark." in text and not re.search(r"^import pytest\b", text, re.MULTILINE):
        text = "import pytest\n" + text
    return text


def collect(checkout: Path, dest: Path) -> list[Path]:
    """Copy and rewrite every ``*/tests/test_*.py`` of the checkout into ``dest``."""
    package = checkout / "dmipy" if (checkout / "dmipy").is_dir() else checkout
    files = sorted(package.glob("*/tests/test_*.py"))
    if not files:
        raise SystemExit(f"no */tests/test_*.py under {package}: is it a dmipy checkout?")
    written = []
    for src in files:
        sub = src.parent.parent.name
        target = dest / f"{sub}__{src.name}"
        target.write_text(rewrite(src.read_text()))
        written.append(target)
    return written


def summarise(report: Path, files: list[Path]) -> dict[str, dict[str, int]]:
    """Count outcomes per test file from pytest's JUnit XML report.

    A file that cannot be imported counts each of its ``def test_`` functions as failed.
    """
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    defined = {f.stem: len(re.findall(r"^def test_", f.read_text(), re.MULTILINE))
               for f in files}
    root = ET.parse(report).getroot()
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        if not classname:  # a collection error: the whole module failed to import
            stem = case.get("name", "?").split("/")[-1].removesuffix(".py")
            counts[stem]["failed"] += defined.get(stem, 1)
            counts[stem]["unimportable"] = 1
            continue
        name = classname.split(".")[0]
        if case.find("skipped") is not None:
            outcome = "skipped"
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome = "failed"
        else:
            outcome = "passed"
        counts[name][outcome] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkout", type=Path, help="local checkout of dmipy")
    parser.add_argument("--keep", type=Path, help="write the rewritten tests here and keep them")
    parser.add_argument("-k", default=None, help="pytest -k expression")
    parser.add_argument("-v", action="store_true", help="show pytest's own output")
    args = parser.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="dmipy_compat_")
    dest = args.keep or Path(tmp)
    dest.mkdir(parents=True, exist_ok=True)
    try:
        files = collect(args.checkout, dest)
        report = Path(tmp) / "report.xml"
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               "--rootdir", str(dest), "--junitxml", str(report), "-o",
               "junit_family=xunit1", "--continue-on-collection-errors",
               *(["-k", args.k] if args.k else []),
               *[str(f) for f in files]]
        proc = subprocess.run(cmd, cwd=dest, capture_output=not args.v, text=True, check=False)
        if not report.exists():
            print(proc.stdout or "", proc.stderr or "")
            return 2
        counts = summarise(report, files)
        totals: dict[str, int] = defaultdict(int)
        width = max(len(f.stem) for f in files)
        print(f"{'file':<{width}}  passed  failed  skipped")
        for f in files:
            c = counts.get(f.stem, {})
            for key in ("passed", "failed", "skipped"):
                totals[key] += c.get(key, 0)
            note = "  (import error)" if c.get("unimportable") else ""
            print(f"{f.stem:<{width}}  {c.get('passed', 0):6d}  {c.get('failed', 0):6d}"
                  f"  {c.get('skipped', 0):7d}{note}")
        print(f"{'total':<{width}}  {totals['passed']:6d}  {totals['failed']:6d}"
              f"  {totals['skipped']:7d}")
        return 1 if totals["failed"] else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
