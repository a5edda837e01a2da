"""Building dictionaries: sample, simulate in fixed-size chunks, store atomically.

:func:`build_dictionary` writes one dictionary at a chosen path; :func:`get_or_build_dictionary`
finds it in (or adds it to) the dictionary directory by key. Either way the store is
written into a hidden temporary sibling and renamed into place only when complete, so
an interrupted build never leaves something that opens; a second builder of the same
key waits on a file lock and then reuses the first one's result (no simulation).

Memory is bounded by the chunk size (``DEFAULT_CHUNK_ATOMS`` atoms of parameters,
signals and features at a time, plus one chunk being compressed and written in the
background), not by the number of atoms.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

import fingerprint
from fingerprint.errors import CancelledError, DictionaryError, InputError
from fingerprint.fitting.features import FeatureMap
from fingerprint.kernels import defer_parallel
from fingerprint.models import get_recipe, recipe_for_model, requires_timing
from fingerprint.progress import library_progress

from .cache import (
    build_lock,
    cleanup_stale_temporaries,
    default_dictionary_dir,
    dictionary_key,
    store_path,
    temporary_sibling,
)
from .sampling import ParameterSpace, SamplingPlan, SamplingSpec, resolve_sampling
from .store import (
    FORMAT_NAME,
    Dictionary,
    StoreWriter,
    current_features_version,
    open_dictionary,
    read_attributes,
    scheme_to_dict,
)

if TYPE_CHECKING:
    from fingerprint.core.acquisition_scheme import AcquisitionScheme
    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_ATOMS",
    "DEFAULT_SIZE",
    "BuildRequest",
    "build_dictionary",
    "get_or_build_dictionary",
    "prepare_build",
    "simulate_atoms",
]

#: Atoms simulated, featurised and written per step (bounds the build's memory).
DEFAULT_CHUNK_ATOMS = 16384
#: Number of atoms when neither the caller nor a recipe says otherwise.
DEFAULT_SIZE = 100_000

ProgressCallback = Callable[[float], Any]


def simulate_atoms(model: MultiCompartmentModelProperties, scheme: AcquisitionScheme,
                   parameters: np.ndarray) -> np.ndarray:
    """Signals (S0 = 1) of atoms with parameter vectors ``parameters`` (n, P), as float32
    (n, N) -- or (n, shells) for spherical-mean models -- via the model's batched
    forward model ``simulate_signal``."""
    signals = np.asarray(model.simulate_signal(scheme, parameters))
    if signals.ndim != 2 or signals.shape[0] != parameters.shape[0]:
        raise DictionaryError(
            f"the model's simulate_signal returned shape {signals.shape} for "
            f"{parameters.shape[0]} atoms; expected (atoms, measurements)")
    return signals.astype(np.float32, copy=False)


def _feature_map(model: Any, scheme: Any) -> Any:
    return FeatureMap.from_model(model, scheme)


class BuildRequest:
    """Everything that determines one dictionary: model, scheme, resolved sampling, key."""

    def __init__(self, model: MultiCompartmentModelProperties, scheme: AcquisitionScheme,
                 plan: SamplingPlan, name: str | None, features_version: int):
        self.model = model
        self.scheme = scheme
        self.plan = plan
        self.name = name
        self.features_version = features_version
        self.spec = model.to_spec()
        self.spec_hash = str(model.spec_hash)
        self.scheme_hash = str(scheme.hash)
        self.key = dictionary_key(self.spec_hash, self.scheme_hash, plan.to_dict(),
                                  features_version)

    @property
    def size(self) -> int:
        return self.plan.size

    def metadata(self) -> dict[str, Any]:
        import zarr  # lazy: keeps zarr off import

        model, space = self.model, self.plan.space
        spherical = bool(getattr(model, "is_spherical_mean", False))
        return {
            "key": self.key,
            "name": self.name,
            "model": self.spec,
            "model_spec_hash": self.spec_hash,
            "model_class": type(model).__name__,
            "parameter_names": list(model.parameter_names),
            "parameter_cardinality": {k: int(v) for k, v in
                                      model.parameter_cardinality.items()},
            "orientation_parameter_names": space.orientation_names,
            "partial_volume_names": list(getattr(model, "partial_volume_names", []) or []),
            "canonical_orientation": space.canonical_orientation,
            "spherical_mean": spherical,
            "signal_kind": "shells" if spherical else "measurements",
            "scheme": scheme_to_dict(self.scheme),
            "scheme_hash": self.scheme_hash,
            "features_version": self.features_version,
            "sampling": self.plan.to_dict(),
            "seed": self.plan.spec.seed,
            "package_version": fingerprint.__version__,
            "software": {"fingerprint": fingerprint.__version__, "numpy": np.__version__,
                         "numba": numba.__version__, "zarr": zarr.__version__},
        }


def _resolve_model(model: Any) -> tuple[Any, Any]:
    """(model object, recipe or None) for a model name or object."""
    if isinstance(model, str):
        recipe = get_recipe(model)
        return recipe.build_model(), recipe
    for attr in ("to_spec", "simulate_signal", "parameter_names"):
        if not hasattr(model, attr):
            raise InputError(
                f"model must be a model name or a MultiCompartmentModel, got "
                f"{type(model).__name__} (no {attr!r})")
    return model, recipe_for_model(model)


def _check_timing(model: Any, recipe: Any, scheme: Any) -> None:
    needs = (recipe is not None and recipe.requires_timing) or requires_timing(model)
    if needs and (getattr(scheme, "delta", None) is None or
                  getattr(scheme, "Delta", None) is None):
        label = f"model {recipe.name!r}" if recipe is not None else "this model"
        raise InputError(
            f"{label} needs pulse timing but the acquisition scheme has no delta/Delta: "
            "give the pulse duration and separation in seconds (delta=, Delta= of the "
            "scheme constructors and readers; --delta and --Delta on the command line) or "
            "read a Camino .scheme file")


def prepare_build(model: str | MultiCompartmentModelProperties, scheme: AcquisitionScheme, *,
                  sampling: SamplingSpec | None = None, size: int | None = None,
                  seed: int | None = None) -> BuildRequest:
    """Resolve a model (name or object), scheme and sampling into a :class:`BuildRequest`.

    The sampling starts from ``sampling``, else the recipe's default sampling (when the
    model is, or equals, a named model), else ``SamplingSpec(size=DEFAULT_SIZE)``;
    ``size`` and ``seed`` override it.
    """
    model_obj, recipe = _resolve_model(model)
    _check_timing(model_obj, recipe, scheme)
    if sampling is None:
        sampling = recipe.sampling_spec() if recipe is not None else \
            SamplingSpec(size=DEFAULT_SIZE)
    sampling = sampling.replace(size=size, seed=seed)
    plan = resolve_sampling(ParameterSpace.from_model(model_obj), sampling)
    return BuildRequest(model_obj, scheme, plan, recipe.name if recipe else None,
                        current_features_version())


# --------------------------------------------------------------------------- building
@contextlib.contextmanager
def _numba_threads(n_jobs: int | None):
    if not n_jobs:
        yield
        return

    n = max(1, min(int(n_jobs), numba.config.NUMBA_NUM_THREADS))
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _report(progress: ProgressCallback | None, fraction: float) -> None:
    if progress is not None:
        progress(min(max(float(fraction), 0.0), 1.0))


def _write_store(request: BuildRequest, tmp: Path, *, chunk_atoms: int,
                 progress: ProgressCallback | None,
                 should_cancel: Callable[[], bool] | None) -> float:
    """Simulate and write the store at ``tmp``; returns the seconds it took."""
    t0 = time.perf_counter()
    plan, model, scheme = request.plan, request.model, request.scheme
    fmap = _feature_map(model, scheme)
    writer: StoreWriter | None = None
    pending: Future | None = None
    chunk_atoms = max(1, int(chunk_atoms))
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dictionary-writer") as pool:
        for start, stop in plan.chunks(chunk_atoms):
            if should_cancel is not None and should_cancel():
                raise CancelledError("dictionary build cancelled")
            params = plan.sample(start, stop)
            signals = simulate_atoms(model, scheme, params)
            if not np.isfinite(signals).all():
                bad = int(np.flatnonzero(~np.isfinite(signals).all(axis=1))[0])
                values = dict(zip(plan.space.names, _split(params[bad], plan), strict=True))
                raise DictionaryError(
                    f"the model produced non-finite signals for parameters {values}")
            with defer_parallel():  # a one-off: no parallel compilation on a first run
                features = np.asarray(fmap.atom_features(signals), dtype=np.float32)
            if writer is None:
                writer = StoreWriter(tmp, plan.size, signals.shape[1], features.shape[1],
                                     params.shape[1], chunk_atoms)
            if pending is not None:
                pending.result()
            pending = pool.submit(writer.write, start, signals=signals, features=features,
                                  parameters=params)
            _report(progress, stop / plan.size * 0.999)
        if pending is not None:
            pending.result()
    attrs = request.metadata()
    attrs["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat()
    attrs["build_seconds"] = round(time.perf_counter() - t0, 3)
    assert writer is not None  # set by the first batch; a build has at least one
    writer.finalize(attrs)
    return float(attrs["build_seconds"])


def _split(vector: np.ndarray, plan: SamplingPlan) -> list[Any]:
    out, i = [], 0
    for p in plan.space.parameters:
        out.append(vector[i] if p.cardinality == 1 else vector[i:i + p.cardinality].tolist())
        i += p.cardinality
    return out


def _existing(target: Path, key: str) -> Dictionary | None:
    """The valid dictionary at ``target`` if it has ``key``, else None."""
    if not target.exists():
        return None
    try:
        d = open_dictionary(target)
    except DictionaryError:
        return None
    return d if d.key == key else None


def _clear_target(target: Path, *, overwrite: bool, in_cache: bool) -> bool:
    """Decide what to do with whatever sits at ``target``; returns True when it must be
    replaced on install. Never removes anything that is not a fingerprint dictionary."""
    if not target.exists() and not target.is_symlink():
        return False
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
        return False
    try:
        attrs = read_attributes(target)
    except DictionaryError:
        attrs = None
    if attrs is None or attrs.get("format") != FORMAT_NAME:
        raise DictionaryError(
            f"{target} exists and is not a fingerprint dictionary; refusing to overwrite it")
    if in_cache or overwrite:
        return True
    raise DictionaryError(
        f"{target} already holds a different or damaged dictionary; remove it, choose "
        "another path, or overwrite it (--force)")


def _install(tmp: Path, target: Path, replace: bool, key: str) -> Dictionary:
    trash = None
    if replace and target.exists():
        trash = target.parent / f".{target.name}.trash-{os.getpid()}-{time.time_ns()}"
        os.rename(target, trash)
    try:
        os.rename(tmp, target)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.EISDIR, errno.ENOTDIR):
            raise
        # another builder installed first: keep theirs if it is the same dictionary
        shutil.rmtree(tmp, ignore_errors=True)
        winner = _existing(target, key)
        if winner is None:
            raise DictionaryError(
                f"{target} was created by someone else during the build and is not the "
                "expected dictionary") from exc
        logger.info("another process built %s first; using it", target)
        return winner
    finally:
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    return open_dictionary(target)


def _build_at(request: BuildRequest, target: Path, *, overwrite: bool, in_cache: bool,
              progress: ProgressCallback | None, n_jobs: int | None,
              should_cancel: Callable[[], bool] | None, chunk_atoms: int) -> Dictionary:
    hit = _existing(target, request.key)
    if hit is not None:
        logger.info("dictionary cache hit: %s", target)
        _report(progress, 1.0)
        return hit
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create the dictionary directory {target.parent}: "
                         f"{exc.strerror or exc}") from None
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write a dictionary into {target.parent}: permission denied")
    with build_lock(target):
        hit = _existing(target, request.key)
        if hit is not None:  # built by another process while we waited
            logger.info("dictionary built concurrently: %s", target)
            _report(progress, 1.0)
            return hit
        cleanup_stale_temporaries(target)
        replace = _clear_target(target, overwrite=overwrite, in_cache=in_cache)
        tmp = temporary_sibling(target)
        logger.info("building the %s dictionary (%d atoms) into %s",
                    request.name or type(request.model).__name__, request.plan.size, target)
        try:
            with _numba_threads(n_jobs), \
                    library_progress("building dictionary", progress) as shown:
                seconds = _write_store(request, tmp, chunk_atoms=chunk_atoms, progress=shown,
                                       should_cancel=should_cancel)
            result = _install(tmp, target, replace, request.key)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("built dictionary %s: %d atoms in %.1f s", target, request.plan.size,
                    seconds)
    _report(progress, 1.0)
    return result


def build_dictionary(model: str | MultiCompartmentModelProperties, scheme: AcquisitionScheme,
                     path: str | os.PathLike, *, sampling: SamplingSpec | None = None,
                     size: int | None = None, seed: int | None = None,
                     progress: ProgressCallback | None = None, n_jobs: int | None = None,
                     should_cancel: Callable[[], bool] | None = None, overwrite: bool = False,
                     chunk_atoms: int = DEFAULT_CHUNK_ATOMS) -> Dictionary:
    """Build the dictionary of ``model`` on ``scheme`` at ``path`` (a new directory).

    Parameters
    ----------
    model: a named model (``'noddi'``) or a MultiCompartmentModel /
        MultiCompartmentSphericalMeanModel (fixed, linked and bounded parameters respected).
    scheme: the AcquisitionScheme to simulate.
    path: where to put the store; when it already holds the same dictionary (same key)
        it is returned without simulating.
    sampling, size, seed: see :func:`prepare_build`.
    progress: called with the completed fraction (0..1).
    n_jobs: threads for the forward model (default: all cores).
    should_cancel: polled between chunks; when it returns True the build stops with
        CancelledError and leaves nothing behind.
    overwrite: replace a different or damaged dictionary at ``path`` (never anything that
        is not a fingerprint dictionary).
    chunk_atoms: atoms per build step (bounds memory).
    """
    request = prepare_build(model, scheme, sampling=sampling, size=size, seed=seed)
    return _build_at(request, Path(path), overwrite=overwrite, in_cache=False,
                     progress=progress, n_jobs=n_jobs, should_cancel=should_cancel,
                     chunk_atoms=chunk_atoms)


def get_or_build_dictionary(model: str | MultiCompartmentModelProperties, scheme: AcquisitionScheme,
                            *, size: int | None = None, seed: int | None = 0,
                            directory: str | os.PathLike | None = None,
                            progress: ProgressCallback | None = None, n_jobs: int | None = None,
                            sampling: SamplingSpec | None = None,
                            should_cancel: Callable[[], bool] | None = None,
                            chunk_atoms: int = DEFAULT_CHUNK_ATOMS) -> Dictionary:
    """The dictionary of ``model`` on ``scheme`` from the dictionary directory, built (once)
    if missing.

    ``model`` is a name (``'noddi'``) or a model object; a model identical to a named model
    gets that model's recipe sampling. ``directory`` defaults to
    :func:`default_dictionary_dir`. A cache hit opens the stored dictionary without any
    simulation; damaged entries in the directory are rebuilt.
    """
    request = prepare_build(model, scheme, sampling=sampling, size=size, seed=seed)
    directory = Path(directory) if directory is not None else default_dictionary_dir()
    return _build_at(request, store_path(directory, request.key), overwrite=False,
                     in_cache=True, progress=progress, n_jobs=n_jobs,
                     should_cancel=should_cancel, chunk_atoms=chunk_atoms)
