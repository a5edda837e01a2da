"""Imports belong at the top of a module. An import inside a function is kept only for an
optional dependency or for a heavy import held off start-up (numba, FAISS, SciPy,
nibabel, zarr, matplotlib, the server, ... ; the library's modules off the CLI's start-up),
and says so: ``# lazy: <reason>`` on the import's line, or on a comment line just above
its group of imports."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAZY = re.compile(r"#\s*lazy:\s*\S.{4,}")
IMPORT_LINE = re.compile(r"\s*(from\s+\S+\s+import\b|import\s+\S)")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _function_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                found.append(child)
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(tree, False)
    return found


def _has_reason(lines: list[str], node: ast.Import | ast.ImportFrom) -> bool:
    """``# lazy: <reason>`` on the statement, or above it in its block of imports and
    comments (one reason may cover a group of imports)."""
    end = node.end_lineno or node.lineno
    if any(LAZY.search(line) for line in lines[node.lineno - 1:end]):
        return True
    i = node.lineno - 2
    while i >= 0:
        line = lines[i]
        stripped = line.strip()
        if LAZY.search(line):
            return True
        if stripped.startswith("#") or IMPORT_LINE.match(line) or \
                (stripped and (stripped.startswith(")") or stripped.endswith((",", "(")))):
            i -= 1
            continue
        return False
    return False


def unexplained_local_imports(source: str, name: str = "<string>") -> list[str]:
    lines = source.splitlines()
    return [f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}"
            for node in _function_imports(ast.parse(source, name))
            if not _has_reason(lines, node)]


def test_every_function_local_import_gives_its_reason():
    bad: list[str] = []
    for path in sorted((ROOT / "fingerprint").rglob("*.py")):
        bad += unexplained_local_imports(path.read_text(), str(path.relative_to(ROOT)))
    assert not bad, ("imports inside functions without a '# lazy: <reason>' comment (move "
                     "them to the top of the module, or say why they must wait):\n" +
                     "\n".join(bad))


def test_the_check_sees_an_unexplained_import():
    source = '''
import os

def a():
    import json
    return json

def b():
    import numba  # lazy: keeps numba off import
    # lazy: optional dependency
    from dipy.core import gradients
    from dipy.data import get_sphere

    x = 1
    import zarr
    return numba, gradients, get_sphere, zarr, x
'''
    assert unexplained_local_imports(source) == ["<string>:5: import json",
                                                 "<string>:15: import zarr"]
