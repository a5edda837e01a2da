"""Public signatures of the library and the server say what they take and give: ``Any``
in a public (non-underscore) function or method signature of ``fingerprint/`` and of
``server/`` is counted, and each count may not grow.

Deliberately generic places are not counted: ``*args`` / ``**kwargs`` passed through
(dmipy's keyword arguments), JSON-like payloads (``dict[str, Any]``,
``Mapping[str, Any]``) and callbacks whose result is ignored (``Callable[..., Any]``).
Everything else has a real type: models (``MultiCompartmentModelProperties``, the
base of the frameworks), fitted models (``FittedMultiCompartmentModel`` or the
``FittedModel`` protocol every framework's fit satisfies), array inputs
(``numpy.typing.ArrayLike``), images (``nibabel.Nifti1Image``), numba kernels
(``Callable`` type variables), third-party handles (FAISS indexes, zarr groups, the Dask
client) by their class. The ceilings below are what remains; keep them at zero."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Any in public signatures of fingerprint/ (287 before the API was typed, counted so; 109
#: before the last pass typed models, fitted models, images and kernels).
MAX_PUBLIC_ANY = 0
#: Any in public signatures of server/ (1 before: the Dask client).
MAX_SERVER_PUBLIC_ANY = 0

_GENERIC_CONTAINERS = {"dict", "Dict", "Mapping", "MutableMapping"}


def _is_any(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "Any") or \
        (isinstance(node, ast.Attribute) and node.attr == "Any")


def _count_any(annotation: ast.expr | None) -> int:
    """``Any`` in an annotation, leaving out the value type of ``dict[str, Any]`` /
    ``Mapping[str, Any]`` and the result of ``Callable[..., Any]``."""
    if annotation is None:
        return 0
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval").body
    excluded: set[int] = set()
    for node in ast.walk(annotation):
        if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Tuple):
            name = node.value.attr if isinstance(node.value, ast.Attribute) else \
                getattr(node.value, "id", "")
            last = node.slice.elts[-1]
            if name in _GENERIC_CONTAINERS | {"Callable"} and _is_any(last):
                excluded.add(id(last))
    return sum(1 for node in ast.walk(annotation) if _is_any(node) and id(node) not in excluded)


def public_any(source: str, name: str = "<string>") -> list[str]:
    """``file:line function(parameter)`` for every counted ``Any``."""
    found: list[str] = []

    def visit(node: ast.AST, public: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                visit(child, public and not child.name.startswith("_"))
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if not public or (child.name.startswith("_") and
                                  child.name not in ("__init__", "__call__")):
                    continue
                args = child.args
                for arg in args.posonlyargs + args.args + args.kwonlyargs:
                    found.extend([f"{name}:{child.lineno} {child.name}({arg.arg})"] *
                                 _count_any(arg.annotation))
                found.extend([f"{name}:{child.lineno} {child.name}(return)"] *
                             _count_any(child.returns))

    visit(ast.parse(source, name), True)
    return found


def _package_any(package: str) -> list[str]:
    out: list[str] = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT)
        if any(part.startswith("_") and part not in ("__init__.py", "__main__.py")
               for part in rel.parts):
            continue
        out += public_any(path.read_text(), str(rel))
    return out


def test_public_signatures_use_any_at_most_the_ceiling():
    found = _package_any("fingerprint")
    assert len(found) <= MAX_PUBLIC_ANY, (
        f"{len(found)} Any in public signatures (ceiling {MAX_PUBLIC_ANY}); type the new "
        "ones:\n" + "\n".join(found))


def test_public_server_signatures_use_any_at_most_the_ceiling():
    assert any((ROOT / "server").rglob("*.py")), "the server's modules were not found"
    found = _package_any("server")
    assert len(found) <= MAX_SERVER_PUBLIC_ANY, (
        f"{len(found)} Any in public signatures of the server (ceiling "
        f"{MAX_SERVER_PUBLIC_ANY}); type the new ones:\n" + "\n".join(found))


def test_the_count_sees_any_and_leaves_out_the_generic_places():
    source = '''
from typing import Any

def f(scheme: Any, *args: Any, payload: dict[str, Any], cb: Callable[..., Any],
      **kwargs: Any) -> Any: ...

def _private(x: Any) -> Any: ...

class _Hidden:
    def g(self, x: Any) -> None: ...

class Shown:
    def __init__(self, x: "Any") -> None: ...
    def h(self, x: list[Any]) -> None: ...
'''
    assert public_any(source) == ["<string>:4 f(scheme)", "<string>:4 f(return)",
                                  "<string>:13 __init__(x)", "<string>:14 h(x)"]
