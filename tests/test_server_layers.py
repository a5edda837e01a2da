"""The server is a client of the library's public API: its routers import neither each
other nor private (``_``-prefixed) names of the library, and no server module reaches
into the library's private helpers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTERS = ROOT / "server" / "routers"


def _imports(path: Path, root: Path) -> list[tuple[int, str, list[str]]]:
    """(line, absolute module, imported names) of every import in ``path`` (a module
    under ``root``; function bodies and ``TYPE_CHECKING`` blocks included)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                out.append((node.lineno, alias.name, []))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, [a.name for a in node.names]))
    return out


def _private(module: str, names: list[str]) -> bool:
    return any(p.startswith("_") and not p.startswith("__")
               for p in [*module.split("."), *names])


def router_violations(paths: list[Path], root: Path = ROOT) -> list[str]:
    """Imports of one router by another, and of private library names, in ``paths``
    (modules under ``root``)."""
    bad = []
    for path in paths:
        for line, module, names in _imports(path, root):
            where = f"{path.relative_to(root)}:{line}"
            targets = [module] + [f"{module}.{n}" for n in names]
            if any(t.startswith("server.routers.") for t in targets) or (
                    module == "server.routers" and names):
                bad.append(f"{where} imports a router ({module} {names})")
            if module.startswith("fingerprint") and _private(module, names):
                bad.append(f"{where} imports a private library name ({module} {names})")
    return bad


def test_routers_import_no_router_and_no_private_library_name():
    routers = [p for p in ROUTERS.glob("*.py") if p.name != "__init__.py"]
    assert len(routers) >= 6
    assert router_violations(routers) == []


def test_the_server_uses_only_public_library_names():
    bad = [v for v in router_violations(sorted((ROOT / "server").rglob("*.py")))
           if "private library name" in v]
    assert bad == []


def test_the_check_sees_violations(tmp_path):
    """The check catches what it is for."""
    fake = tmp_path / "server" / "routers" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from .jobs import router\nfrom ..services import accepted\n"
                    "from fingerprint.io.nifti import _fast_gzip\n"
                    "def f():\n    from server.routers import maps\n")
    found = router_violations([fake], tmp_path)
    assert len(found) == 3, found
    assert sum("imports a router" in v for v in found) == 2
    assert sum("private library name" in v for v in found) == 1
