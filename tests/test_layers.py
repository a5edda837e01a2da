"""The layering of the code, enforced: kernels -> core -> dictionary -> fitting -> io ->
cli / server. A module may import its own layer and the layers below, never above; the
library never imports the server; server routers do not import each other; and the
imports between modules form no cycle. Imports inside ``if TYPE_CHECKING:`` blocks (type
names only) are not imports at run time and are left out.

A module-level ``__getattr__`` (PEP 562) that imports a module to hand one of its names on
(``fingerprint.core.modeling_framework`` offering dmipy's spherical-harmonics framework
under dmipy's module name) is a re-export, not a dependency: the module never uses what
it forwards. Such imports obey the layers but are not edges of the cycle check; a test
checks that these functions only forward names."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Layers from the bottom; a module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("fingerprint", "fingerprint.errors", "fingerprint.core.constants",
              "fingerprint.core.backends")),
    ("kernels", ("fingerprint.kernels",)),
    ("core", ("fingerprint.core", "fingerprint.signal_models", "fingerprint.distributions",
              "fingerprint.utils", "fingerprint.data", "fingerprint.tissue_response")),
    # named models carry their dictionaries' recipes; what atoms are matched on (their
    # features, in a fibre frame) is part of a stored dictionary
    ("dictionary", ("fingerprint.dictionary", "fingerprint.models", "fingerprint.recipes",
                    "fingerprint.volume_models",
                    "fingerprint.fitting.features", "fingerprint.fitting.frame")),
    ("fitting", ("fingerprint.fitting",)),
    # the volume runner reads NIfTI and writes maps around the fitting core
    # (and the volume-level model comparison, which reads and writes volumes)
    ("io", ("fingerprint.io", "fingerprint.fitting.pipeline", "fingerprint.phantoms",
            "fingerprint.fitting.csd_volume",
            "fingerprint.preview", "fingerprint.fitting.solvers.selection")),
    ("app", ("fingerprint.cli", "fingerprint.client", "fingerprint.__main__",
             "fingerprint.batch", "server")),
]
RANK = {name: i for i, (name, _) in enumerate(LAYERS)}

#: Upward imports that are allowed, each with its reason.
ALLOWED: dict[tuple[str, str], str] = {}


def _layer(module: str) -> str:
    best, best_len = "base", -1
    for name, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = name, len(prefix)
    return best


def _modules() -> dict[str, Path]:
    out = {}
    for top in ("fingerprint", "server"):
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_module_getattr(node: ast.AST) -> bool:
    return isinstance(node, ast.FunctionDef) and node.name == "__getattr__"


def _imports(module: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported internal module, line, at module level) of ``module``; imports in a
    module-level ``__getattr__`` (lazy re-exports) are left out (see
    :func:`_reexports`)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: list[tuple[str, int, bool]] = []

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, top)
                continue
            if top and node is tree and _is_module_getattr(child):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    target = resolve(alias.name)
                    if target:
                        found.append((target, child.lineno, top))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".")
                    base = base if is_package else base[:-1]
                    base = base[:len(base) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                else:
                    stem = child.module or ""
                for alias in child.names:
                    target = resolve(f"{stem}.{alias.name}") or resolve(stem)
                    if target:
                        found.append((target, child.lineno, top))
            visit(child, inner)

    visit(tree, True)
    return [(t, line, top) for t, line, top in found if t != module]


def _reexports(path: Path) -> list[ast.FunctionDef]:
    """The module-level ``__getattr__`` functions of a module that import something."""
    tree = ast.parse(path.read_text(), str(path))
    return [node for node in tree.body if _is_module_getattr(node) and any(
        isinstance(sub, (ast.Import, ast.ImportFrom)) or
        (isinstance(sub, ast.Attribute) and sub.attr == "import_module")
        for sub in ast.walk(node))]


def _reexport_targets(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(module, line) that ``module``'s ``__getattr__`` imports to forward names."""
    out = []
    for func in _reexports(path):
        for sub in ast.walk(func):
            if isinstance(sub, ast.ImportFrom) and not sub.level and sub.module:
                for alias in sub.names:
                    for name in (f"{sub.module}.{alias.name}", sub.module):
                        if name in known:
                            out.append((name, sub.lineno))
                            break
            elif isinstance(sub, ast.Import):
                out += [(a.name, sub.lineno) for a in sub.names if a.name in known]
    return out


def _graph() -> dict[str, list[tuple[str, int, bool]]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_no_module_imports_a_higher_layer():
    violations = []
    for module, imports in _graph().items():
        for target, line, _ in imports:
            if RANK[_layer(target)] > RANK[_layer(module)] and (module, target) not in ALLOWED:
                violations.append(f"{module}:{line} ({_layer(module)}) imports {target} "
                                  f"({_layer(target)})")
    assert not violations, "layering violations:\n" + "\n".join(sorted(violations))


def test_lazy_reexports_obey_the_layers_and_only_forward_names():
    """A module-level ``__getattr__`` that imports may only hand the imported module's
    attribute on (``return getattr(module, name)``) or raise AttributeError, and may not
    import a higher layer."""
    modules = _modules()
    known = set(modules)
    problems = []
    for module, path in modules.items():
        for target, line in _reexport_targets(module, path, known):
            if RANK[_layer(target)] > RANK[_layer(module)]:
                problems.append(f"{module}:{line} re-exports from a higher layer: {target}")
        for func in _reexports(path):
            for sub in ast.walk(func):
                if isinstance(sub, ast.Return) and not (
                        isinstance(sub.value, ast.Call) and isinstance(sub.value.func, ast.Name)
                        and sub.value.func.id == "getattr"):
                    problems.append(f"{module}:{sub.lineno} __getattr__ returns something "
                                    "other than getattr(module, name)")
    assert not problems, "\n".join(problems)


def test_the_library_never_imports_the_server():
    bad = [f"{m}:{line} imports {t}" for m, imports in _graph().items()
           if m.startswith("fingerprint") for t, line, _ in imports if t.startswith("server")
           # the `serve` and `keys` commands start the server / manage its keys
           and m not in ("fingerprint.cli.serve", "fingerprint.cli.keys")]
    assert not bad, bad


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10_000))
    try:
        for v in sorted(edges):
            if v not in index:
                strong(v)
    finally:
        sys.setrecursionlimit(limit)
    return out


def _is_package_reexport(module: str, target: str, modules: dict[str, Path]) -> bool:
    """A package's ``__init__`` importing its own submodules is not a cycle of concern."""
    return modules[module].name == "__init__.py" and target.startswith(module + ".")


def test_imports_form_no_cycle():
    """No cycle, counting every import (also the ones inside functions): a cycle hidden
    in a function still ties the modules together."""
    modules = _modules()
    edges = {m: {t for t, _, _ in imports if not _is_package_reexport(m, t, modules)}
             for m, imports in _graph().items()}
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checker_sees_a_violation_and_a_cycle():
    """The checks above catch what they are for."""
    assert _layer("fingerprint.core.modeling_framework") == "core"
    assert _layer("fingerprint.fitting.pipeline") == "io"
    assert _layer("fingerprint.fitting.engine") == "fitting"
    assert RANK[_layer("fingerprint.fitting.engine")] > RANK[_layer("fingerprint.core.x")]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    modules = _modules()
    framework = "fingerprint.core.modeling_framework"
    assert [t for t, _ in _reexport_targets(framework, modules[framework], set(modules))] \
        == ["fingerprint.core.spherical_harmonics_model"]
