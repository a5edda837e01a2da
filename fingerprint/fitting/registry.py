"""Solvers: the public hook through which fitting methods join the one fitting core.

A solver turns a model, a scheme and :class:`~fingerprint.fitting.options.FitOptions`
into a :class:`VoxelFitter`, which fits b0-usable voxels (n, N) to
:class:`~fingerprint.fitting.estimator.VoxelEstimates`. ``model.fit``, ``fit_volume``
(hence ``fingerprint fit`` and the lab server) all run the solver named by
``FitOptions.solver`` through :func:`fingerprint.fitting.engine.fit_voxels`, so a solver
registered here is available everywhere at once::

    from fingerprint.fitting.registry import register_solver

    def prepare(request: SolverRequest) -> VoxelFitter:
        return MyFitter(request.model, request.scheme, request.options)

    register_solver("mine", prepare, description="what it does")

A fitter handed to an executor (``fit_volume(executor=...)``) must be picklable; keep it
small (the fingerprint solver pickles to its dictionary's path and options).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fingerprint.errors import InputError

if TYPE_CHECKING:  # type names only; the registry itself imports nothing heavy
    import os

    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties as Model
    from fingerprint.fitting.estimator import VoxelEstimates
    from fingerprint.fitting.options import FitOptions

__all__ = ["BUILTIN_SOLVER", "DMIPY_SOLVERS", "REFUSED_SOLVERS", "SolverInfo",
           "SolverRequest", "VoxelFitter", "available_solvers", "check_solver", "get_solver",
           "register_alias", "register_solver", "unregister_solver"]


class VoxelFitter(Protocol):
    """What a solver prepares: fits voxels of one model on one scheme."""

    #: the model it fits (its parameter layout is the estimates' columns)
    model: Model
    scheme: AcquisitionScheme

    def fit_voxels(self, data: np.ndarray,
                   x0: np.ndarray | Mapping[str, np.ndarray] | None = None
                   ) -> VoxelEstimates:
        """Estimates of ``data`` (n, N) float64 raw signals, every voxel usable
        (:func:`fingerprint.fitting.validity.usable_voxels`); ``x0`` optional starts."""
        ...


@dataclass(frozen=True)
class SolverRequest:
    """What a solver gets to prepare a :class:`VoxelFitter`."""

    model: Model
    scheme: AcquisitionScheme
    options: FitOptions
    dictionary_dir: str | os.PathLike[str] | None = None
    progress: Callable[[float], object] | None = None
    should_cancel: Callable[[], bool] | None = None


SolverFactory = Callable[[SolverRequest], VoxelFitter]


@dataclass(frozen=True)
class SolverInfo:
    """A registered solver."""

    name: str
    prepare: SolverFactory
    description: str = ""
    #: whether it matches against a (cached) dictionary
    uses_dictionary: bool = False
    #: whether it runs a non-linear fit per voxel (seconds per voxel: the classical
    #: solvers); dictionary matching decides per model and options (its polish, see
    #: :func:`fingerprint.fitting.engine.runs_per_voxel_fit`)
    per_voxel_fit: bool = True


#: The built-in solver (dictionary matching), always a valid name.
BUILTIN_SOLVER = "fingerprint"
#: dmipy's solver names: aliases of dictionary matching until registered themselves.
DMIPY_SOLVERS = ("brute2fine", "mix", "amico")

#: dmipy solvers refused (when no solver of that name is registered), with the reason:
#: :func:`check_solver`, hence :class:`~fingerprint.fitting.options.FitOptions`, refuses
#: them, so every front end reports the reason before any work starts.
REFUSED_SOLVERS: Mapping[str, str] = {
    "amico": "solver 'amico' (dmipy's linearised AMICO fit) is not implemented; use "
             "solver='fingerprint' (dictionary matching, the fast fit), 'brute2fine' or "
             "'mix' (classical non-linear fits)",
}

_SOLVERS: dict[str, SolverInfo] = {}
_ALIASES: dict[str, str] = {name: BUILTIN_SOLVER for name in DMIPY_SOLVERS}
_LOCK = threading.Lock()


def register_solver(name: str, prepare: SolverFactory, *, description: str = "",
                    uses_dictionary: bool = False, per_voxel_fit: bool = True,
                    replace: bool = False) -> None:
    """Make solver ``name`` (case-insensitive) available to every entry point. A name
    registered twice is an error unless ``replace``; registering one of dmipy's solver
    names replaces its alias to dictionary matching. ``per_voxel_fit``: whether it runs a
    non-linear fit per voxel (limited by servers like the classical solvers; False for
    closed-form or matching solvers)."""
    key = str(name).lower()
    if not key.isidentifier():
        raise InputError(f"solver name {name!r} must be an identifier")
    with _LOCK:
        if key in _SOLVERS and not replace:
            raise InputError(f"solver {key!r} is already registered")
        _SOLVERS[key] = SolverInfo(key, prepare, description, uses_dictionary,
                                   per_voxel_fit)
        _ALIASES.pop(key, None)


def unregister_solver(name: str) -> None:
    """Forget solver ``name`` (tests)."""
    with _LOCK:
        _SOLVERS.pop(str(name).lower(), None)


def register_alias(alias: str, target: str) -> None:
    """Let ``alias`` name solver ``target`` (dmipy's solver names map to dictionary
    matching until solvers of those names are registered)."""
    with _LOCK:
        if alias.lower() not in _SOLVERS:
            _ALIASES[alias.lower()] = target.lower()


def available_solvers() -> dict[str, str]:
    """Registered solver name -> description (aliases excluded)."""
    with _LOCK:
        return {k: v.description for k, v in sorted(_SOLVERS.items())}


def check_solver(name: object) -> str:
    """The canonical (lower-case) name of solver ``name``; InputError listing the
    registered ones otherwise. Aliases are kept as given (resolved by
    :func:`get_solver`)."""
    if not isinstance(name, str):
        raise InputError(f"option 'solver' must be a solver name, got {name!r}")
    key = name.lower()
    with _LOCK:
        if key in REFUSED_SOLVERS and key not in _SOLVERS:
            raise InputError(REFUSED_SOLVERS[key])
        if key in _SOLVERS or key in _ALIASES or key == BUILTIN_SOLVER:
            return key
        known = sorted(set(_SOLVERS) | {BUILTIN_SOLVER}) + sorted(set(_ALIASES) -
                                                                  set(REFUSED_SOLVERS))
    raise InputError(f"option 'solver' must be one of {', '.join(known)}; got {name!r}")


def get_solver(name: str) -> SolverInfo:
    """The registered solver ``name`` (aliases resolved). The built-in ``'fingerprint'``
    is registered by :mod:`fingerprint.fitting.engine`, which calls this."""
    key = check_solver(name)
    with _LOCK:
        target = _ALIASES.get(key, key)
        info = _SOLVERS.get(target)
    if info is None:
        raise InputError(f"solver {name!r} is not available in this process (import "
                         f"fingerprint.fitting.engine to register the built-in one)")
    return info


