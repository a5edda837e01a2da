"""Late-bound services that dmipy-named entry points of ``core`` offer but higher layers
implement: ``model.fit`` (the fitting core), reading / writing Camino scheme files
(``acquisition_scheme_from_schemefile``, ``AcquisitionScheme.to_schemefile``), and the
scheme requirements a named model's recipe states (``model_requirements``, asked by
:mod:`fingerprint.core.scheme_checks`).

``core`` never imports those layers: a service is looked up here by name, and a higher
layer registers its implementation (:func:`register_backend`; ``fingerprint.fitting.engine``
and ``fingerprint.io.gradients`` do so when imported). When a service is asked for before
its layer was imported, the module named in :data:`DEFAULT_PROVIDERS` is imported by name
(which registers it), so ``model.fit`` works after importing only ``core``.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

from fingerprint.errors import FingerprintError

__all__ = ["DEFAULT_PROVIDERS", "backend", "register_backend"]

#: Service name -> module that registers its default implementation when imported.
DEFAULT_PROVIDERS: dict[str, str] = {
    "fit": "fingerprint.fitting.engine",
    "read_camino_scheme": "fingerprint.io.gradients",
    "write_camino_scheme": "fingerprint.io.gradients",
    "model_requirements": "fingerprint.models",
}

_BACKENDS: dict[str, Callable[..., Any]] = {}
_LOCK = threading.Lock()


def register_backend(name: str, implementation: Callable[..., Any]) -> None:
    """Make ``implementation`` the service ``name`` (replacing an earlier one)."""
    with _LOCK:
        _BACKENDS[name] = implementation


def backend(name: str) -> Callable[..., Any]:
    """The implementation of service ``name`` (importing its default provider once)."""
    with _LOCK:
        found = _BACKENDS.get(name)
    if found is not None:
        return found
    provider = DEFAULT_PROVIDERS.get(name)
    if provider is None:
        raise FingerprintError(f"no backend named {name!r}; known: {sorted(DEFAULT_PROVIDERS)}")
    importlib.import_module(provider)  # registers the service on import
    with _LOCK:
        found = _BACKENDS.get(name)
    if found is None:
        raise FingerprintError(f"module {provider} did not register the {name!r} backend")
    return found
