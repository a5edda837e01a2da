"""Fitting whole volumes: NIfTI + bval/bvec (+ mask) in, BIDS-derivative maps out.

>>> from fingerprint.fitting.pipeline import fit_volume, validate_inputs
>>> validate_inputs("sub-01_dwi.nii.gz", "sub-01_dwi.bval", "sub-01_dwi.bvec")
>>> result = fit_volume("noddi", "sub-01_dwi.nii.gz", "sub-01_dwi.bval",
...                     "sub-01_dwi.bvec", "derivatives/fingerprint", prefix="sub-01")
>>> result.files, result.n_voxels, result.seconds

Steps of :func:`fit_volume`:

1. validate the inputs (:func:`validate_inputs`; errors name the file at fault);
2. find or build the model's dictionary for the scheme and load the estimator
   (``FingerprintEstimator.from_model``; progress 0 -> 0.3 while a dictionary is built);
3. read the masked voxels slab by slab through nibabel's array proxy (never the whole
   image as float64) and fit them in chunks of ``chunk_voxels`` voxels, in this process or
   through any :class:`concurrent.futures.Executor` (a Dask client's ``get_executor()``
   works): workers receive the dictionary *path* and rebuild (and cache) the estimator,
   so nothing large is pickled but the voxel chunks themselves; ``should_cancel`` is
   polled between chunks (:class:`~fingerprint.errors.CancelledError`). A gzip-compressed
   DWI that needs more than one slab is first decompressed into a hidden temporary file
   in ``out_dir`` (removed at the end), because every slab read of a gzip stream would
   decompress the file again;
4. write float32 maps named ``<prefix>_model-<model>_param-<label>_dwimap.nii.gz`` with
   JSON sidecars into ``out_dir`` atomically (see :mod:`fingerprint.io.nifti` for the
   names of the s0, r2 and uncertainty maps), plus an optional PNG preview.

In this process, the built-in solver fits ``threads`` chunks side by side, one per
thread, each with single-threaded kernels (they and FAISS release the GIL); other
solvers fit one chunk at a time with multi-threaded kernels. Results do not depend on the
chunk size, the thread count nor on the executor: each voxel is fitted independently by
the same estimator.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import copy
import importlib
import logging
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import fingerprint
from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.core.scheme_checks import SchemeReport, check_csd_scheme, prepare_scheme
from fingerprint.dictionary.build import prepare_build
from fingerprint.dictionary.cache import default_dictionary_dir, store_path
from fingerprint.errors import CancelledError, FingerprintError, InputError
from fingerprint.fitting.engine import (
    ESTIMATORS,
    FingerprintFitter,
    dictionary_cache_key,
    effective_solver,
    fit_voxels,
    fitter_for_estimator,
    prepare_fitter,
)
from fingerprint.fitting.estimator import VoxelEstimates
from fingerprint.fitting.multi_tissue import (
    Responses,
    compartment_responses,
    volume_fraction_maps,
)
from fingerprint.fitting.options import FitOptions, check_prefix, parse_responses
from fingerprint.fitting.quality import FLAGS, flag_counts, voxel_quality
from fingerprint.fitting.registry import VoxelFitter, get_solver
from fingerprint.fitting.validity import default_mask, report_unusable, usable_voxels
from fingerprint.io.gradients import read_bvals_bvecs
from fingerprint.io.nifti import (
    DEFAULT_SLAB_BYTES,
    DWIImage,
    DWISpool,
    Slab,
    available_cpus,
    bids_map_name,
    load_mask,
    mu_to_vectors,
    write_map,
)
from fingerprint.models import (
    derived_map_specs,
    derived_maps,
    get_model,
    get_recipe,
    map_labels,
    model_name,
    recipe_for_model,
    requires_timing,
)
from fingerprint.models import model_name as recipe_name
from fingerprint.preview import write_preview
from fingerprint.stages import active_profile, stage, unrecorded
from fingerprint.volume_models import VOLUME_MODELS, get_volume_model, is_volume_model

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

    from fingerprint.core.modeling_framework import MultiCompartmentModelProperties

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CHUNK_VOXELS", "FitResult", "InputSummary", "check_dictionary_space",
           "check_fsl_scheme", "check_output_directory", "fit_chunk", "fit_volume",
           "open_inputs", "prefix_from_filename", "progress_stage", "read_fsl_scheme",
           "validate_inputs", "volume_mask"]

#: Voxels per fitted chunk (one task of an executor).
DEFAULT_CHUNK_VOXELS = 20_000
#: Share of the progress range spent on finding/building the dictionary.
_DICTIONARY_SHARE = 0.3
_WRITE_SHARE = 0.03
#: Threads writing (gzip-compressing) the maps of a volume at once.
_WRITE_THREADS = 2

ProgressCallback = Callable[[float], Any]

#: The stages of :func:`fit_volume`'s progress range, in order: (name, start, end).
PROGRESS_STAGES: tuple[tuple[str, float, float], ...] = (
    ("building dictionary", 0.0, _DICTIONARY_SHARE),
    ("fitting", _DICTIONARY_SHARE, 1.0 - _WRITE_SHARE),
    ("writing maps", 1.0 - _WRITE_SHARE, 1.0),
)


def progress_stage(fraction: float) -> tuple[str, float]:
    """(stage, completed fraction of that stage) of a :func:`fit_volume` progress value:
    ``'building dictionary'`` (finding or building it), ``'fitting'`` or
    ``'writing maps'``."""
    value = min(max(float(fraction), 0.0), 1.0)
    for name, lo, hi in PROGRESS_STAGES:
        if value < hi or hi >= 1.0:
            return name, min(max((value - lo) / (hi - lo), 0.0), 1.0)
    raise AssertionError("unreachable")  # pragma: no cover


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class InputSummary:
    """What :func:`validate_inputs` found (paths, shapes, scheme, voxel counts)."""

    dwi: Path
    bval: Path
    bvec: Path
    mask: Path | None
    shape: tuple[int, int, int, int]
    n_volumes: int
    n_voxels: int
    n_b0: int
    shell_bvalues: tuple[float, ...]
    dtype: str
    affine: np.ndarray = field(repr=False)
    scheme: AcquisitionScheme = field(repr=False)
    #: voxels (of the mask) with NaN or infinite values, left out of fits (0 unscanned)
    n_nonfinite_voxels: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (b-values in s/mm²)."""
        return {"dwi": str(self.dwi), "bval": str(self.bval), "bvec": str(self.bvec),
                "mask": str(self.mask) if self.mask else None, "shape": list(self.shape),
                "n_volumes": self.n_volumes, "n_voxels": self.n_voxels, "n_b0": self.n_b0,
                "shell_bvalues_s_per_mm2": list(self.shell_bvalues), "dtype": self.dtype,
                "n_nonfinite_voxels": self.n_nonfinite_voxels}


def _path(value: Any, what: str) -> Path:
    if value is None:
        raise InputError(f"the {what} file is required")
    try:
        return Path(os.fspath(value))
    except TypeError:
        raise InputError(f"{what} must be a file path, got {type(value).__name__}") from None


def read_fsl_scheme(bval: str | os.PathLike[str], bvec: str | os.PathLike[str], *,
                    delta: ArrayLike | None = None, Delta: ArrayLike | None = None,
                    TE: ArrayLike | None = None, b0_threshold: float | None = None
                    ) -> AcquisitionScheme:
    """Read an FSL bval/bvec pair (s/mm²) as an AcquisitionScheme, strictly:
    ``read_bvals_bvecs(..., strict_units=True)``, so b-values that look like s/m² are an
    InputError naming the bval file. ``b0_threshold`` is in s/m² (default 10e6, i.e.
    10 s/mm²). Used by fits, dictionary builds and the server."""
    return _read_scheme(_path(bval, "bval"), _path(bvec, "bvec"), delta, Delta, TE,
                        b0_threshold)


def _read_scheme(bval: Path, bvec: Path, delta: Any, Delta: Any, TE: Any,
                 b0_threshold: float | None = None) -> Any:
    kwargs: dict[str, Any] = {}
    if b0_threshold is not None:
        value = float(b0_threshold)
        if not np.isfinite(value) or value < 0:
            raise InputError(f"b0_threshold must be a finite non-negative b-value in s/m², "
                             f"got {b0_threshold!r}")
        kwargs["b0_threshold"] = value
    return read_bvals_bvecs(bval, bvec, delta=delta, Delta=Delta, TE=TE, strict_units=True,
                            **kwargs)


def check_fsl_scheme(scheme: AcquisitionScheme, bval: str | os.PathLike[str],
                     bvec: str | os.PathLike[str],
                     model: str | MultiCompartmentModelProperties | None = None,
                     model_name: str | None = None) -> SchemeReport:
    """Run the scheme checks (:mod:`fingerprint.core.scheme_checks`) for a scheme read
    from ``bval`` / ``bvec``: InputError naming the files and every refusal; warnings
    and notes are logged. ``model`` is a name, a model or None (the scheme alone).
    Returns the :class:`~fingerprint.core.scheme_checks.SchemeReport`."""
    if is_volume_model(model):  # mc_csd: three tissues, order 8 (its defaults)
        report = check_csd_scheme(scheme, 3, 8)
        report.log(logger)
        report.raise_if_refused(f"bval file {bval} / bvec file {bvec}")
        return report
    requires = None
    if isinstance(model, str):
        model_name, requires, model = model, requires_timing(model), get_model(model)
    elif model is not None:
        model_name = model_name or recipe_name(model)
        requires = requires_timing(model)
    _, report = prepare_scheme(scheme, model, model_name=model_name, requires_timing=requires,
                               who=f"bval file {bval} / bvec file {bvec}", log=logger)
    return report


def open_inputs(dwi: str | os.PathLike[str], bval: str | os.PathLike[str],
                bvec: str | os.PathLike[str], mask: np.ndarray | str | os.PathLike[str] | None,
                delta: ArrayLike | None = None, Delta: ArrayLike | None = None,
                TE: ArrayLike | None = None, b0_threshold: float | None = None,
                model: str | MultiCompartmentModelProperties | None = None
                ) -> tuple[DWIImage, AcquisitionScheme, np.ndarray | None, Path | None]:
    """Open a DWI volume and its scheme: the image (lazy), the acquisition scheme read
    from the FSL files (timings ``delta`` / ``Delta`` / ``TE`` in s, ``b0_threshold`` in
    s/m²; checked against ``model`` when given), the mask (an array, a NIfTI path or
    None) as a bool array or None, and the mask path. InputError naming the file when
    they do not fit together."""
    dwi_p, bval_p, bvec_p = _path(dwi, "DWI"), _path(bval, "bval"), _path(bvec, "bvec")
    image = DWIImage(dwi_p)
    scheme = _read_scheme(bval_p, bvec_p, delta, Delta, TE, b0_threshold)
    n = int(scheme.number_of_measurements)
    if n != image.n_volumes:
        raise InputError(
            f"DWI file {dwi_p} has {image.n_volumes} volumes but bval file {bval_p} and bvec "
            f"file {bvec_p} describe {n} measurements")
    check_fsl_scheme(scheme, bval_p, bvec_p, model)
    if isinstance(mask, np.ndarray):  # an in-memory mask (library use)
        mask_arr = np.asarray(mask)
        if mask_arr.ndim == 4 and mask_arr.shape[3] == 1:
            mask_arr = mask_arr[..., 0]
        if mask_arr.shape != image.spatial_shape:
            raise InputError(f"mask array has shape {mask_arr.shape} but the volumes of DWI "
                             f"file {dwi_p} are {image.spatial_shape}")
        mask_arr = mask_arr.astype(bool) & np.isfinite(mask_arr)
        if not mask_arr.any():
            raise InputError("the mask array is empty (no nonzero voxel)")
        return image, scheme, mask_arr, None
    mask_p = _path(mask, "mask") if mask is not None else None
    loaded = load_mask(mask_p, image.spatial_shape, image.affine) if mask_p else None
    return image, scheme, loaded, mask_p


def _scan_data(image: DWIImage, mask: np.ndarray | None,
               b0_mask: np.ndarray | None = None) -> int:
    """Read every volume once (truncated files fail here) and count the voxels (of the
    mask) with NaN or infinite values: they are left out of a fit, not refused. Without a
    mask, some voxel must have a positive mean b=0 signal (the default mask)."""
    b0_sum = None
    bad = np.zeros(image.spatial_shape, dtype=bool)
    for i in range(image.n_volumes):
        vol = image.read_volume(i)
        if mask is None and b0_mask is not None and b0_mask[i]:
            b0_sum = vol if b0_sum is None else b0_sum + vol
        bad |= ~np.isfinite(vol)
    if mask is not None:
        bad &= mask
    if b0_sum is not None and not np.any(np.isfinite(b0_sum) & (b0_sum > 0)):
        raise InputError(f"DWI file {image.path}: no voxel has a positive b=0 signal")
    n_bad = int(bad.sum())
    if n_bad:
        where = ", ".join(str(tuple(int(c) for c in row)) for row in np.argwhere(bad)[:5])
        logger.info("DWI file %s: %d voxels%s hold NaN or infinite values (left out of "
                    "fits; first at %s)", image.path, n_bad,
                    " of the mask" if mask is not None else "", where)
    return n_bad


def validate_inputs(dwi: str | os.PathLike[str], bval: str | os.PathLike[str],
                    bvec: str | os.PathLike[str], mask: str | os.PathLike[str] | None = None, *,
                    delta: ArrayLike | None = None, Delta: ArrayLike | None = None,
                    TE: ArrayLike | None = None, scan_data: bool = True,
                    b0_threshold: float | None = None,
                    model: str | MultiCompartmentModelProperties | None = None) -> InputSummary:
    """Check a DWI / bval / bvec (/ mask) set before fitting it.

    Raises :class:`~fingerprint.errors.InputError` naming the file at fault for: missing,
    unreadable, truncated or non-NIfTI files; a DWI that is not 4-D; bval/bvec files that
    do not parse, disagree with each other or with the number of volumes, hold b-values
    in s/m², or have no b=0 (at or below ``b0_threshold``, s/m²); a scheme that the scheme
    checks refuse for ``model`` (a name or a model, see
    :mod:`fingerprint.core.scheme_checks`); a mask that is unreadable, of another shape,
    or empty. With
    ``scan_data`` the image is read once, one volume at a time: truncated data fails, and
    voxels with NaN or infinite values are counted (``n_nonfinite_voxels``; fits leave
    them out, see :mod:`fingerprint.fitting.validity`).
    """
    image, scheme, mask_arr, mask_p = open_inputs(dwi, bval, bvec, mask, delta, Delta, TE,
                                                   b0_threshold, model)
    n_bad = 0
    if scan_data:
        n_bad = _scan_data(image, mask_arr, np.asarray(scheme.b0_mask, dtype=bool))
    n_vox = int(mask_arr.sum()) if mask_arr is not None else int(np.prod(image.spatial_shape))
    shells = tuple(float(b) / 1e6 for b in np.asarray(scheme.shell_bvalues))
    return InputSummary(dwi=image.path, bval=_path(bval, "bval"), bvec=_path(bvec, "bvec"),
                        mask=mask_p, shape=image.shape, n_volumes=image.n_volumes,
                        n_voxels=n_vox, n_b0=int(np.sum(scheme.b0_mask)),
                        shell_bvalues=shells, dtype=str(image.dtype), affine=image.affine,
                        scheme=scheme, n_nonfinite_voxels=n_bad)


def prefix_from_filename(path: str | os.PathLike[str]) -> str | None:
    """The BIDS entities of a DWI file name (``sub-01_ses-2_dwi.nii.gz`` -> ``sub-01_ses-2``),
    or None when the name has none."""
    name = Path(os.fspath(path)).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            name = name[: -len(ext)]
            break
    entities = [p for p in name.split("_") if re.fullmatch(r"[A-Za-z]+-[A-Za-z0-9]+", p)]
    return "_".join(entities) or None


# ----------------------------------------------------------------------------- chunks
def _chunk_result(ve: VoxelEstimates) -> dict[str, np.ndarray]:
    n = ve.parameters.shape[0]
    return {
        "parameters": np.asarray(ve.parameters, dtype=np.float32).reshape(n, -1),
        "uncertainty": np.asarray(ve.uncertainty, dtype=np.float32).reshape(n, -1),
        "s0": np.asarray(ve.s0, dtype=np.float32).reshape(n),
        "r2": np.asarray(ve.r2, dtype=np.float32).reshape(n),
        "valid": np.asarray(ve.valid, dtype=bool).reshape(n),
    }


def fit_chunk(fitter: VoxelFitter, data: np.ndarray) -> dict[str, np.ndarray]:
    """Fit one chunk of voxels (n, N) with ``fitter`` through the fitting core
    (:func:`~fingerprint.fitting.engine.fit_voxels`); what executors run. Fitters pickle
    small (the built-in one to its dictionary's path), so workers rebuild and cache
    them."""

    with stage("fit"):
        ve = fit_voxels(fitter, np.asarray(data))
        with stage("fit/flags"):
            out = _chunk_result(ve)
            out.update(voxel_quality(fitter, ve))
    return out


# ----------------------------------------------------------------------------- results
@dataclass
class FitResult:
    """What :func:`fit_volume` wrote and how long it took."""

    #: every file written (maps, sidecars, preview), absolute paths
    files: list[Path]
    #: voxels fitted (in the mask)
    n_voxels: int
    #: wall time of the whole call (s)
    seconds: float
    out_dir: Path = Path(".")
    #: map label -> NIfTI path (includes s0, r2 and '<label>_uncertainty')
    maps: dict[str, Path] = field(default_factory=dict)
    #: voxels of the mask that were not fitted (NaN in the maps), unusable ones included
    n_invalid: int = 0
    #: voxels of the mask left out for their signals (NaN, infinite or negative values, no
    #: positive b=0 signal; :mod:`fingerprint.fitting.validity`)
    n_unusable: int = 0
    model: str = ""
    dictionary: Path | None = None
    preview: Path | None = None
    #: seconds per step: dictionary, fit, write
    timings: dict[str, float] = field(default_factory=dict)
    #: voxels (of the mask) carrying each quality flag, with ``any`` and ``total``
    #: (:mod:`fingerprint.fitting.quality`)
    quality_counts: dict[str, int] = field(default_factory=dict)


class _Progress:
    """Monotone, clipped progress in [lo, hi] of the caller's 0..1 range."""

    def __init__(self, callback: ProgressCallback | None):
        self.callback = callback
        self.value = 0.0
        self._lock = threading.Lock()

    def __call__(self, fraction: float) -> None:
        if self.callback is None:
            return
        with self._lock:
            fraction = float(min(max(fraction, 0.0), 1.0))
            if fraction < self.value:
                return
            self.value = fraction
        self.callback(fraction)

    def span(self, lo: float, hi: float) -> ProgressCallback:
        return lambda f: self(lo + (hi - lo) * float(min(max(f, 0.0), 1.0)))


def _check_cancel(should_cancel: Callable[[], bool] | None) -> None:
    if should_cancel is not None and should_cancel():
        raise CancelledError("the fit was cancelled")


#: Map labels of one fascicle of a multi-fascicle model (``fascicle2_icvf``).
_FASCICLE_LABEL = re.compile(r"^fascicle(\d+)_")
#: How fascicles are numbered (sidecar ``FascicleOrder``).
FASCICLE_ORDER = ("by signal fraction, largest first; fascicles beyond a voxel's count "
                  "have fraction 0 and NaN direction and parameters")


def _resolve_model(model: Any) -> tuple[Any, str, Any]:
    """(model object or None, BIDS model label, estimator or None)."""
    if isinstance(model, str):
        recipe = get_recipe(model)
        return get_model(recipe.name), recipe.name, None
    if hasattr(model, "estimate") and hasattr(model, "model"):  # a ready estimator
        name = model_name(model.model) or type(model.model).__name__
        return model.model, name, model
    if not hasattr(model, "parameter_names"):
        raise InputError(f"model must be a model name, a model or an estimator, got "
                         f"{type(model).__name__}")
    return model, model_name(model) or type(model).__name__, None


def _map_plan(model: Any, offsets: dict[str, slice]) -> list[tuple[str, str, slice, bool]]:
    """(label, parameter name, columns in the parameter vector, is orientation)."""
    orientation = set(getattr(model, "orientation_parameter_names", None) or
                      [n for n, t in getattr(model, "parameter_types", {}).items()
                       if t == "orientation"])
    plan = []
    for label, name in map_labels(model).items():
        if name not in offsets:
            raise InputError(f"map {label!r} names parameter {name!r}, which the model does "
                             f"not have (parameters: {', '.join(offsets)})")
        plan.append((label, name, offsets[name], name in orientation))
    return plan


def _chunks(image: DWIImage | DWISpool, mask: np.ndarray, chunk_voxels: int, slab_bytes: int,
            b0_mask: np.ndarray, unusable: list[np.ndarray], alive: int = 2
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(coords (n, 3), data (n, N) float32) chunks of masked voxels; the coordinates of
    unusable voxels (:func:`~.validity.usable_voxels`) are appended to ``unusable``.
    ``alive``: slabs that may be alive at once (see :func:`_read_ahead`)."""
    for slab in _read_ahead(image, mask, slab_bytes, alive):
        for start in range(0, slab.data.shape[0], chunk_voxels):
            data = slab.data[start:start + chunk_voxels]
            coords = slab.coords[start:start + chunk_voxels]
            bad = ~usable_voxels(data, b0_mask)
            if bad.any():
                unusable.append(coords[bad])
            yield coords, data


def _read_ahead(image: DWIImage | DWISpool, mask: np.ndarray, slab_bytes: int,
                alive: int = 2) -> Iterator[Slab]:
    """The slabs of ``image`` (masked voxels), read by a background thread one slab ahead
    of the consumer: the next slab is read while this one is fitted. Slabs are
    ``slab_bytes / alive`` when there are several, so that the ``alive`` slabs that may
    be alive at once (the one being fitted and the next; with ``w`` fitting threads,
    ``w + 1``: chunks of earlier slabs may still be in flight) take no more memory than
    one slab read in turn. Errors of the reader are raised here."""
    if image.n_slabs(mask, slab_bytes) <= 1:
        slabs = image.iter_slabs(mask, max_bytes=slab_bytes)
        while True:
            with stage("read"):
                slab = next(slabs, None)
            if slab is None:
                return
            yield slab
    slabs = image.iter_slabs(mask, max_bytes=max(slab_bytes // max(int(alive), 2), 1))
    arrived: queue.Queue[Slab | BaseException | None] = queue.Queue()
    room = threading.Semaphore(2)  # slabs alive: the one being fitted and the next
    stop = threading.Event()

    def produce() -> None:
        try:
            while True:
                room.acquire()
                if stop.is_set():
                    return
                with stage("read"):
                    slab = next(slabs, None)
                arrived.put(slab)
                if slab is None:
                    return
        except BaseException as exc:  # handed to the consumer
            arrived.put(exc)

    reader = threading.Thread(target=produce, name="fingerprint-read-ahead", daemon=True)
    reader.start()
    try:
        while True:
            item = arrived.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
            room.release()
    finally:
        stop.set()
        room.release()
        reader.join()


def check_output_directory(out_dir: str | os.PathLike[str]) -> Path:
    """The absolute output directory; InputError before any work when it cannot be one
    (an existing file, or under a file or a read-only directory)."""
    if out_dir is None:
        raise InputError("an output directory (out_dir) is required")
    path = _path(out_dir, "output directory").absolute()
    if path.exists() and not path.is_dir():
        raise InputError(f"output directory {path} exists and is not a directory")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"output directory {path} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output directory {path} is not writable ({parent} is read-only)")
    return path


def check_dictionary_space(size: int | None, n_measurements: int,
                           directory: str | os.PathLike[str] | None, *,
                           model: str | MultiCompartmentModelProperties | None = None,
                           scheme: AcquisitionScheme | None = None, seed: int | None = 0) -> None:
    """InputError before building when a dictionary of ``size`` atoms cannot fit on the
    disk of ``directory`` (default: the dictionary cache): its simulated signals alone take
    ``size * n_measurements * 4`` bytes, at best about half of that once compressed. With
    ``model`` and ``scheme``, a dictionary already in the cache is not checked."""
    if size is None:
        return

    parent = Path(os.fspath(directory)).absolute() if directory else default_dictionary_dir()
    if model is not None and scheme is not None and parent.is_dir():
        try:
            key = prepare_build(model, scheme, size=size, seed=seed).key
            if store_path(parent, key).exists():
                return
        except (FingerprintError, ValueError):  # reported by the build itself
            pass
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    need = int(size) * int(n_measurements) * 4
    if need / 2 > free:
        raise InputError(f"a dictionary of {int(size):,} atoms needs about {need / 1e9:.3g} GB "
                         f"for its signals but {parent} has {free / 1e9:.3g} GB free; give a "
                         f"smaller dictionary size")


def volume_mask(image: DWIImage | DWISpool, scheme: AcquisitionScheme, rule: str) -> np.ndarray:
    """The default mask of ``image`` under ``rule`` (:data:`~.options.MASK_RULES`),
    bool of the image's spatial shape."""
    if rule == "all":
        return np.ones(image.spatial_shape, dtype=bool)
    return default_mask(image.mean_b0(np.asarray(scheme.b0_mask)),
                        source=f"DWI file {image.path}")


def _run_chunks(chunks: Iterator[tuple[np.ndarray, np.ndarray]], fitter: VoxelFitter,
                executor: cf.Executor | None,
                store: Callable[[np.ndarray, dict[str, np.ndarray]], None],
                done: Callable[[int], None], should_cancel: Callable[[], bool] | None,
                window: int) -> None:
    if executor is None:
        for coords, data in chunks:
            _check_cancel(should_cancel)
            store(coords, fit_chunk(fitter, data))
            done(coords.shape[0])
        _check_cancel(should_cancel)
        return
    pending: dict[cf.Future[dict[str, np.ndarray]], np.ndarray] = {}

    def drain(block_until: int) -> None:
        while len(pending) > block_until:
            finished, _ = cf.wait(list(pending), timeout=0.2,
                                  return_when=cf.FIRST_COMPLETED)
            _check_cancel(should_cancel)
            for fut in finished:
                coords = pending.pop(fut)
                store(coords, fut.result())
                done(coords.shape[0])

    try:
        for coords, data in chunks:
            _check_cancel(should_cancel)
            pending[executor.submit(fit_chunk, fitter, data)] = coords
            drain(window - 1)
        drain(0)
        _check_cancel(should_cancel)
    except BaseException:
        for fut in pending:
            fut.cancel()
        raise


def _fit_threads(fitter: VoxelFitter, options: FitOptions) -> int:
    """Threads that fit chunks side by side in this process: ``options.threads`` (default:
    the CPUs this process may use) for the built-in solver, whose estimator is shared
    read-only by the threads; 1 (one chunk at a time, its kernels using the threads)
    for the other solvers."""
    if not isinstance(fitter, FingerprintFitter):
        return 1
    if options.threads is not None:
        return max(1, int(options.threads))
    return available_cpus()


def _single_threaded(fitter: FingerprintFitter) -> FingerprintFitter:
    """``fitter`` with its estimator (dictionary, index and arrays shared, not copied)
    limited to one thread per call."""
    single = copy.copy(fitter.estimator)
    single.n_jobs = 1
    return FingerprintFitter(single, {**fitter.options, "n_jobs": 1}, fitter.polish)


#: Dictionary atoms fitted by :func:`_warm_up`.
_WARM_UP_VOXELS = 16


def _warm_up(fitter: VoxelFitter, workers: int, b0_mask: np.ndarray) -> None:
    """Fit a few of the dictionary's own signals once, results discarded and stages not
    recorded, so that the compiled kernels (Numba's cache) and the index are loaded while
    a compressed input is still being inflated rather than after. Best effort: a failure
    is logged and left to the fit itself."""
    if not isinstance(fitter, FingerprintFitter):
        return
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        with unrecorded():
            signals = getattr(getattr(fitter.estimator, "dictionary", None), "signals", None)
            if signals is None:
                return
            data = np.ascontiguousarray(np.asarray(signals[:_WARM_UP_VOXELS],
                                                   dtype=np.float32) * 1000.0)
            if data.ndim != 2 or data.shape[0] == 0:
                return
            usable_voxels(data, b0_mask)
            fit_chunk(_single_threaded(fitter) if workers > 1 else fitter, data)
    except Exception as exc:  # noqa: BLE001 - the fit itself reports real problems
        logger.debug("warm-up fit failed: %s", exc)
        return
    _record("warm-up", time.perf_counter() - t0, time.process_time() - c0)


@contextlib.contextmanager
def _fitting_threads(fitter: FingerprintFitter, workers: int
                     ) -> Iterator[tuple[cf.ThreadPoolExecutor, FingerprintFitter]]:
    """A pool of ``workers`` threads and the fitter they run: ``fitter``'s estimator
    (dictionary, index and arrays shared, not copied) limited to one thread per call, so
    that each thread fits its own chunk with serial kernels (Numba's thread count and
    FAISS's OpenMP count are per thread; the kernels and FAISS release the GIL). BLAS's
    thread count is process-wide: it is one while the pool runs. Chunks are independent,
    so the maps are those of one chunk at a time."""
    worker_fitter = _single_threaded(fitter)
    pool = cf.ThreadPoolExecutor(max_workers=int(workers), thread_name_prefix="fingerprint-fit")
    with contextlib.ExitStack() as stack:
        try:
            from threadpoolctl import threadpool_limits  # lazy: optional dependency

            stack.enter_context(threadpool_limits(limits=1))
        except ImportError:  # pragma: no cover - threadpoolctl is optional
            pass
        try:
            yield pool, worker_fitter
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _model_info(model: Any, model_label: str) -> dict[str, Any]:
    """The sidecars' ``Model`` entry."""
    recipe = recipe_for_model(model)
    info: dict[str, Any] = {"Name": model_label, "Class": type(model).__name__}
    if recipe is not None:
        info["Description"] = recipe.description.strip()
        if getattr(recipe, "reference", None):
            info["Reference"] = recipe.reference
    info["Parameters"] = list(model.parameter_names)
    return info


def _sidecar(*, label: str, parameter: str | None, units: str, description: str,
             model_info: dict[str, Any], sources: list[str], extra: dict[str, Any],
             solver: str = "fingerprint") -> dict[str, Any]:
    out: dict[str, Any] = {
        "Description": description,
        "Parameter": label,
        "ParameterName": parameter,
        "Units": units,
        "Model": dict(model_info),
        "Solver": solver,
        "GeneratedBy": [{"Name": "fingerprint", "Version": fingerprint.__version__,
                         "Description": "dictionary matching (fingerprinting)"
                         if solver == "fingerprint" else f"solver {solver}"}],
        "Sources": sources,
    }
    out.update(extra)
    return out


def fit_volume(model: str | MultiCompartmentModelProperties, dwi: str | os.PathLike[str],
               bval: str | os.PathLike[str], bvec: str | os.PathLike[str],
               out_dir: str | os.PathLike[str], *, mask: str | os.PathLike[str] | None = None,
               prefix: str | None = None, threads: int | None = None,
               executor: cf.Executor | None = None, progress: ProgressCallback | None = None,
               should_cancel: Callable[[], bool] | None = None,
               dictionary_dir: str | os.PathLike[str] | None = None,
               dictionary_size: int | None = None, chunk_voxels: int = DEFAULT_CHUNK_VOXELS,
               preview: bool = False, delta: float | None = None, Delta: float | None = None,
               TE: float | None = None, estimator_options: dict[str, Any] | None = None,
               slab_bytes: int = DEFAULT_SLAB_BYTES, executor_window: int | None = None,
               options: FitOptions | None = None, b0_threshold: float | None = None,
               model_options: Mapping[str, object] | None = None,
               s0_responses: Responses | None = None) -> FitResult:
    """Fit ``model`` to every masked voxel of a DWI volume and write the maps.

    Parameters
    ----------
    model : str, model or estimator
        A named model (``'noddi'``, see ``fingerprint.models.available_models()``), a
        ``MultiCompartmentModel``, or a ready ``FingerprintEstimator``.
    dwi, bval, bvec : path
        4-D NIfTI (.nii or .nii.gz) and FSL b-values (s/mm²) / b-vectors.
    out_dir : path
        Output directory (created if needed); maps are written there atomically.
    mask : path or array, optional
        3-D mask NIfTI or boolean array (nonzero = fit); default: voxels with a positive
        mean b=0 signal (``options.mask_rule``). Voxels of the mask with NaN, infinite or
        negative signals or no positive b=0 signal are left out, reported in one warning
        and NaN in the maps, as in ``model.fit``.
    prefix : str, optional
        File-name prefix, e.g. ``'sub-01_ses-1'`` (default: none, names start at
        ``model-``).
    threads : int, optional
        Threads for dictionary building and matching (default: the CPUs this process may
        use); the built-in solver fits that many chunks side by side.
    executor : concurrent.futures.Executor, optional
        Runs the voxel chunks (e.g. ``distributed.Client.get_executor()``); workers get
        the dictionary path and rebuild the estimator once per process.
    progress : callable(float), optional
        Called with a monotone fraction in [0, 1].
    should_cancel : callable() -> bool, optional
        Polled between chunks (and by the dictionary build); True raises CancelledError.
    dictionary_dir, dictionary_size :
        Where dictionaries are cached (default: the user cache) and how many atoms.
    chunk_voxels : int
        Voxels per chunk (memory per task; results do not depend on it).
    preview : bool
        Also write a PNG preview of the key maps.
    delta, Delta, TE : float, optional
        Pulse duration / separation / echo time in s (models that need timing).
    b0_threshold : float, optional
        b-value (s/m²) at or below which measurements are the b=0 reference that
        normalises S0 (default 10e6 s/m², i.e. 10 s/mm²; also ``options.b0_threshold``);
        it never changes the forward models. The scheme is checked against the model
        before anything is built (:mod:`fingerprint.core.scheme_checks`).
    estimator_options : dict, optional
        Further :class:`~fingerprint.fitting.options.FitOptions` fields by name (e.g.
        ``n_neighbors``, ``refine``); validated like ``options``.
    slab_bytes : int
        Largest block of float32 input data read at once (bytes).
    executor_window : int, optional
        Chunks in flight on the executor (default: twice its workers).
    s0_responses : optional
        Multi-tissue fit (:mod:`fingerprint.fitting.multi_tissue`): the S0 response of each
        top-level compartment (units of the data), a ``{'wm', 'gm', 'csf'}`` mapping for
        named models whose recipe lists its compartments' tissues, or ``'auto'``
        (estimated from the masked voxels); volume-fraction maps ``<tissue>_vf`` (or
        ``partial_volume_<i>_vf``) are written next to the signal fractions. Default:
        ``options.multi_tissue`` (the same, as text).
    options : FitOptions, optional
        How to fit (solver, dictionary size, neighbours, refinement, threads, mask rule):
        the same object and the same fitting core as ``model.fit``, so the maps equal
        ``model.fit``'s on the same data. ``threads``, ``dictionary_size`` and
        ``estimator_options`` override its fields.
    model_options : dict, optional
        Options of a volume model (``mc_csd``: ``sh_order``, ``responses``, ...; see
        :mod:`fingerprint.volume_models`), which is fitted per volume by
        :func:`fingerprint.fitting.csd_volume.fit_mc_csd_volume` (responses from the
        whole volume; its own maps: FOD SH, peaks, tissue fractions).

    Returns
    -------
    FitResult
    """
    if is_volume_model(model):
        # the model's runner (mc_csd: fingerprint.fitting.csd_volume, which builds on
        # this module's helpers) is named by the catalogue and resolved here
        module_name, _, function = get_volume_model(model).runner.partition(":")
        runner = getattr(importlib.import_module(module_name), function)
        if b0_threshold is None and options is not None:
            b0_threshold = options.b0_threshold
        result: FitResult = runner(dwi, bval, bvec, out_dir, mask=mask,
                                   prefix=check_prefix(prefix), model_options=model_options,
                                   progress=progress, should_cancel=should_cancel,
                                   chunk_voxels=chunk_voxels, preview=preview,
                                   b0_threshold=b0_threshold, slab_bytes=slab_bytes)
        return result
    if model_options:
        raise InputError(f"model_options apply to the volume models "
                         f"({', '.join(VOLUME_MODELS)}) only")
    t_start = time.perf_counter()
    if chunk_voxels < 1:
        raise InputError(f"chunk_voxels must be positive, got {chunk_voxels}")
    prefix = check_prefix(prefix)
    opts = _volume_options(options, threads=threads, dictionary_size=dictionary_size,
                           estimator_options=estimator_options)
    if b0_threshold is not None:
        opts = opts.replace(b0_threshold=b0_threshold)
    out_dir = check_output_directory(out_dir)
    prog = _Progress(progress)
    model_obj, model_label, est = _resolve_model(model)
    with stage("inputs"):
        image, scheme, mask_arr, _ = open_inputs(dwi, bval, bvec, mask, delta, Delta, TE,
                                                 opts.b0_threshold, model_obj)
    prog(0.0)
    # the default mask of a gzip DWI is made from its decompressed copy (below): reading
    # its b=0 volumes from the gzip stream would decompress most of the file twice
    defer_mask = (mask_arr is None and opts.mask_rule != "all" and s0_responses is None
                  and image.is_compressed)
    if not defer_mask:
        with stage("mask"):
            if mask_arr is None:
                mask_arr = volume_mask(image, scheme, opts.mask_rule)
    _check_cancel(should_cancel)
    n_total = int(mask_arr.sum()) if mask_arr is not None else 0
    responses = None
    if s0_responses is None and opts.multi_tissue is not None:
        s0_responses = parse_responses(opts.multi_tissue)
    if s0_responses is not None:
        sample = None
        if isinstance(s0_responses, str) and mask_arr is not None:  # (never deferred)
            sample = np.concatenate([slab.data for slab in image.iter_slabs(
                mask_arr, max_bytes=int(slab_bytes))]) if n_total else None
        responses = compartment_responses(model_obj, s0_responses, scheme=scheme,
                                          data=sample)

    # the decompression of a gzip DWI (into a temporary file read slab by slab) runs in
    # the background while the dictionary and estimator load
    with contextlib.ExitStack() as spool:
        selection = np.ones(image.spatial_shape, dtype=bool) if mask_arr is None else mask_arr
        spooled = image.is_compressed and image.n_slabs(selection, int(slab_bytes)) > 1
        ready = spool.enter_context(image.spooling(selection, out_dir,
                                                   max_bytes=int(slab_bytes)))
        # -- dictionary and fitter -----------------------------------------------------------
        t0, c0 = time.perf_counter(), time.process_time()
        fitter: VoxelFitter
        if est is None and get_solver(effective_solver(model_obj,
                                                       opts.solver)).uses_dictionary:
            check_dictionary_space(opts.dictionary_size, scheme.number_of_measurements,
                                   dictionary_dir, model=model_obj, scheme=scheme, seed=opts.seed)
        if est is None:
            fitter = prepare_fitter(model_obj, scheme, opts, dictionary_dir=dictionary_dir,
                                    progress=prog.span(0.0, _DICTIONARY_SHARE),
                                    should_cancel=should_cancel)
        else:
            fitter = fitter_for_estimator(est, opts)
        est = getattr(fitter, "estimator", None)
        dictionary = getattr(est, "dictionary", None)
        stored = getattr(dictionary, "path", None)
        dict_path = Path(stored) if stored else None
        if not _same_acquisition(fitter.scheme, scheme):
            raise InputError(f"the estimator was made for another acquisition scheme than "
                             f"{Path(os.fspath(bval))} / {Path(os.fspath(bvec))}")
        prog(_DICTIONARY_SHARE)
        t_dict = time.perf_counter() - t0
        _record("dictionary", t_dict, time.process_time() - c0)
        _check_cancel(should_cancel)

        # -- fit chunk by chunk --------------------------------------------------------------
        t0, c0 = time.perf_counter(), time.process_time()
        b0_mask = np.asarray(scheme.b0_mask, dtype=bool)
        workers = _fit_threads(fitter, opts) if executor is None else 1
        if executor is None and spooled:
            _warm_up(fitter, workers, b0_mask)
        with stage("read"):
            source = ready()
        if mask_arr is None:
            with stage("mask"):
                mask_arr = volume_mask(source, scheme, opts.mask_rule)
            n_total = int(mask_arr.sum())
            _check_cancel(should_cancel)
        layout = _layout(fitter)
        plan = _map_plan(model_obj, layout)
        n_params = sum(sl.stop - sl.start for sl in layout.values())
        params = np.full((n_total, n_params), np.nan, dtype=np.float32)
        unc = np.full((n_total, n_params), np.nan, dtype=np.float32)
        s0 = np.full(n_total, np.nan, dtype=np.float32)
        r2 = np.full(n_total, np.nan, dtype=np.float32)
        valid = np.zeros(n_total, dtype=bool)
        quality = np.full(n_total, 1, dtype=np.uint8)  # "invalid" until fitted
        sigma = np.full(n_total, np.nan, dtype=np.float32)
        orient_sd = np.full(n_total, np.nan, dtype=np.float32)
        rows = _row_index(mask_arr)
        fit_span = prog.span(_DICTIONARY_SHARE, 1.0 - _WRITE_SHARE)
        done_count = [0]

        def store(coords: np.ndarray, out: dict[str, np.ndarray]) -> None:
            r = rows[coords[:, 0], coords[:, 1], coords[:, 2]]
            params[r] = out["parameters"]
            unc[r] = out["uncertainty"]
            s0[r] = out["s0"]
            r2[r] = out["r2"]
            valid[r] = out["valid"]
            if "quality" in out:
                quality[r] = out["quality"]
                sigma[r] = out["sigma"]
                orient_sd[r] = out["orientation_sd"]

        def done(n: int) -> None:
            done_count[0] += n
            fit_span(done_count[0] / max(n_total, 1))

        shared_key = None
        if executor is not None:
            if isinstance(fitter, FingerprintFitter) and est is not None:
                if dict_path is None:
                    raise InputError("an executor needs an estimator backed by a stored "
                                     "dictionary")
                # tasks run in this process's threads (or unpickled here) share the estimator
                shared_key = dictionary_cache_key(str(dict_path), fitter.options)
                if shared_key in ESTIMATORS:
                    shared_key = None
                else:
                    ESTIMATORS.put(shared_key, est)
        window = executor_window or max(2, 2 * int(getattr(executor, "_max_workers", 2) or 2))
        unusable: list[np.ndarray] = []
        try:
            if workers > 1 and isinstance(fitter, FingerprintFitter):
                # chunks fitted side by side, one per thread, each with single-threaded
                # kernels: half-size chunks and (workers + 1) smaller slabs keep the
                # memory of one chunk and one slab at a time
                # (a volume smaller than that still gives every thread a chunk)
                size = max(1, min(-(-int(chunk_voxels) // workers), -(-n_total // workers)))
                with _fitting_threads(fitter, workers) as (pool, worker_fitter):
                    _run_chunks(_chunks(source, mask_arr, size, int(slab_bytes), b0_mask,
                                        unusable, alive=workers + 1),
                                worker_fitter, pool, store, done, should_cancel, workers)
            else:
                _run_chunks(_chunks(source, mask_arr, int(chunk_voxels), int(slab_bytes),
                                    b0_mask, unusable),
                            fitter, executor, store, done, should_cancel, window)
        finally:
            if shared_key is not None:  # do not keep this fit's estimator alive here
                ESTIMATORS.pop(shared_key)
    t_fit = time.perf_counter() - t0
    bad_coords = np.concatenate(unusable) if unusable else np.zeros((0, 3), dtype=np.int64)
    if bad_coords.shape[0]:
        order = np.lexsort(bad_coords.T[::-1])  # first voxels in C order, like the mask's
        report_unusable(bad_coords[order], n_total, source=f"DWI file {image.path}")
    n_unusable = int(bad_coords.shape[0])
    n_invalid = int(n_total - valid.sum())
    if n_invalid > n_unusable:
        logger.warning("%d of %d voxels could not be fitted (NaN in the maps)",
                       n_invalid - n_unusable, n_total)

    # -- write ---------------------------------------------------------------------------
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"output directory {out_dir} cannot be created: "
                         f"{exc.strerror or exc}") from None
    pref = prefix or ""
    sources = [Path(os.fspath(dwi)).name, Path(os.fspath(bval)).name,
               Path(os.fspath(bvec)).name]
    if mask is not None and not isinstance(mask, np.ndarray):
        sources.append(Path(os.fspath(mask)).name)
    common_extra: dict[str, Any] = {"FittedVoxels": n_total, "InvalidVoxels": n_invalid,
                                    "UnusableInputVoxels": n_unusable}
    if dict_path is not None:
        common_extra["Dictionary"] = {"Key": getattr(dictionary, "key", None),
                                      "Atoms": int(getattr(dictionary, "n_atoms", 0) or 0)}
    model_info = _model_info(model_obj, model_label)
    solver_info = get_solver(effective_solver(model_obj, opts.solver))
    solver_name = solver_info.name
    # solvers without a dictionary (brute2fine, mix) estimate no uncertainty: no maps
    with_uncertainty = bool(solver_info.uses_dictionary)
    files: list[Path] = []
    maps: dict[str, Path] = {}
    # maps are compressed and written by a few threads at once (zlib releases the GIL)
    writer = cf.ThreadPoolExecutor(max_workers=_WRITE_THREADS,
                                   thread_name_prefix="fingerprint-write")
    writes: list[tuple[str | None, cf.Future[tuple[Path, Path]]]] = []
    # valid voxels: finite values (an uncertainty that is not defined is 0); voxels that
    # were not fitted: NaN; outside the mask: 0
    unc[valid] = np.nan_to_num(unc[valid], nan=0.0, posinf=0.0, neginf=0.0)
    params[~valid] = np.nan
    unc[~valid] = np.nan

    def volume(values: np.ndarray) -> np.ndarray:
        vol = np.zeros(image.spatial_shape + values.shape[1:], dtype=np.float32)
        vol[mask_arr] = values  # rows are numbered in the mask's C order
        return vol

    def emit(label: str, values: np.ndarray, *, parameter: str | None, units: str,
             description: str, desc: str | None = None, extra: dict | None = None) -> None:
        name = bids_map_name(pref, model_label, label, desc=desc)
        sidecar = _sidecar(label=label if desc is None else f"{label} ({desc})",
                           parameter=parameter, units=units, description=description,
                           model_info=model_info, sources=sources,
                           extra={**common_extra, **(extra or {})}, solver=solver_name)
        key = label if desc is None else f"{label}_{desc}"
        writes.append((key, writer.submit(
            lambda: write_map(volume(values), image.img, out_dir, name, sidecar))))

    # units as the compartments and distributions declare them
    units = {**dict(fitter.model.parameter_units), **dict(model_obj.parameter_units)}
    for label, pname, cols, is_orientation in plan:
        if should_cancel is not None and should_cancel():
            writer.shutdown(wait=True, cancel_futures=True)
            raise CancelledError("the fit was cancelled")
        values = params[:, cols]
        fascicle = _FASCICLE_LABEL.match(label)
        if fascicle:  # per-fascicle maps of multi-fascicle models (ball_stick_stick, ...)
            common_extra["Fascicle"] = int(fascicle.group(1))
            common_extra["FascicleOrder"] = FASCICLE_ORDER
        else:
            common_extra.pop("Fascicle", None)
            common_extra.pop("FascicleOrder", None)
        if is_orientation and values.shape[1] == 2:
            # no direction (a fascicle beyond the voxel's count): zero vector
            vec = mu_to_vectors(values).astype(np.float32)
            vec[~valid] = np.nan
            emit(label, vec, parameter=pname, units="n/a",
                 description=f"{label}: unit vector (x, y, z in the b-vector frame) of the "
                             f"orientation {pname}",
                 extra={"OrientationEncoding": {"Type": "vector", "Reference": "bvec",
                                                "EncodingAxis": 3}})
            continue
        if values.shape[1] == 1:
            values = values[:, 0]
        emit(label, values, parameter=pname, units=units[pname],
             description=f"{label} ({pname})")
        if not with_uncertainty:
            continue
        u = unc[:, cols]
        emit(label, u[:, 0] if u.shape[1] == 1 else u, parameter=pname,
             units=units[pname], desc="uncertainty",
             description=f"uncertainty of {label}: spread (standard deviation) of the "
                         f"parameter among the matched dictionary atoms")
    common_extra.pop("Fascicle", None)
    common_extra.pop("FascicleOrder", None)
    _emit_derived(model_obj, params, layout, valid, emit)
    if responses is not None:
        columns = {name: params[:, sl][:, 0] for name, sl in layout.items()
                   if sl.stop - sl.start == 1}
        for label, values in volume_fraction_maps(model_obj, columns, responses).items():
            emit(label, np.where(valid, values, np.nan).astype(np.float32), parameter=None,
                 units="n/a", description=f"{label}: volume fraction (signal fractions "
                 "divided by their tissues' S0 responses, renormalised)",
                 extra={"S0TissueResponses": list(responses)})
    emit("s0", np.where(valid, s0, np.nan).astype(np.float32), parameter=None,
         units="arbitrary",
         description="fitted signal without diffusion weighting (units of the input)")
    emit("r2", np.where(valid, r2, np.nan).astype(np.float32), parameter=None,
         units="n/a", description="coefficient of determination R² of the fitted signal")
    emit("sigma", np.where(valid, sigma, np.nan).astype(np.float32), parameter=None,
         units="arbitrary",
         description="estimated noise standard deviation (units of the input): the b=0 "
                     "spread pooled with the fit residual")
    if np.isfinite(orient_sd[valid]).any():
        emit("orientation", np.where(valid, orient_sd, np.nan).astype(np.float32),
             parameter=None, units="degree", desc="uncertainty",
             description="orientation uncertainty: 1-sd cone angle of the fibre axis "
                         "(Fisher information of the fitted angular profile, or the "
                         "spread of the matched atoms' axes)")

    counts = flag_counts(quality)
    q_name = bids_map_name(pref, model_label, None, desc="quality")
    q_sidecar = _sidecar(
        label="quality", parameter=None, units="n/a",
        description="per-voxel quality flags, a bit map: " + ", ".join(
            f"{bit} = {name}" for name, bit in FLAGS.items()) + " (rules in the "
            "fingerprint documentation, fingerprint.fitting.quality)",
        model_info=model_info, sources=sources,
        extra={**common_extra, "QualityFlags": dict(FLAGS), "QualityCounts": counts})
    writes.append((None, writer.submit(
        lambda: write_map(volume(quality.astype(np.float32)), image.img, out_dir, q_name,
                          q_sidecar))))
    for key, future in writes:  # in the order submitted, whatever order they finish in
        nii, js = future.result()
        files.extend([nii, js])
        if key is not None:
            maps[key] = nii
    writer.shutdown()
    if counts["any"]:
        logger.info("quality flags: %s of %d voxels flagged (%s)", counts["any"], n_total,
                    ", ".join(f"{k} {v}" for k, v in counts.items()
                              if k in FLAGS and v))
    preview_path = None
    if preview:
        preview_path = write_preview(
            {label: p for label, p in maps.items()
             if not label.endswith("_uncertainty") and label != "sigma"},
            out_dir / bids_map_name(pref, model_label, None, desc="preview", suffix=None,
                                    extension=".png"),
            title=f"fingerprint {model_label}")
        files.append(preview_path)
    t_write = time.perf_counter() - t0
    _record("write", t_write, time.process_time() - c0)
    prog(1.0)
    seconds = time.perf_counter() - t_start
    logger.debug("fitted %d voxels with %s in %.1f s (dictionary %.1f s, fit %.1f s, "
                 "write %.1f s)", n_total, model_label, seconds, t_dict, t_fit, t_write)
    return FitResult(files=files, n_voxels=n_total, seconds=seconds, out_dir=out_dir,
                     maps=maps, n_invalid=n_invalid, n_unusable=n_unusable,
                     model=model_label, dictionary=dict_path,
                     preview=preview_path,
                     timings={"dictionary": t_dict, "fit": t_fit, "write": t_write},
                     quality_counts=counts)


def _record(name: str, seconds: float, cpu: float) -> None:
    """Add ``seconds`` (``cpu`` seconds) to stage ``name`` of the active stage profile."""
    prof = active_profile()
    if prof is not None:
        prof.add(name, seconds, cpu=cpu)


def _emit_derived(model: Any, params: np.ndarray, layout: dict[str, slice],
                  valid: np.ndarray, emit: Callable[..., None]) -> None:
    """Write a named model's derived maps (DTI's fa, md, ad, rd, v1) from the fitted
    parameters."""
    specs = derived_map_specs(model)
    if not specs:
        return
    columns = {name: params[:, sl][:, 0] if sl.stop - sl.start == 1 else params[:, sl]
               for name, sl in layout.items()}
    for label, values in derived_maps(model, columns).items():
        spec = specs[label]
        out = np.asarray(values, dtype=np.float32)
        out[~valid] = np.nan
        extra = None
        if spec.width == 3:
            extra = {"OrientationEncoding": {"Type": "vector", "Reference": "bvec",
                                             "EncodingAxis": 3}}
        emit(label, out, parameter=None, units=spec.units,
             description=f"{label}: {spec.description}", extra=extra)


def _layout(fitter: VoxelFitter) -> dict[str, slice]:
    """Parameter name -> columns of the fitter's parameter vectors."""
    layout = getattr(getattr(fitter, "estimator", None), "parameter_layout", None)
    if layout is None:
        layout = fitter.model.parameter_layout
    return dict(layout.slices)


def _volume_options(options: FitOptions | None, *, threads: int | None,
                    dictionary_size: int | None,
                    estimator_options: Mapping[str, object] | None) -> FitOptions:
    """``options`` with the keyword shortcuts of :func:`fit_volume` applied."""
    values: dict[str, object] = dict(options.to_dict()) if options is not None else {}
    if threads is not None:
        values["threads"] = threads
    if dictionary_size is not None:
        values["dictionary_size"] = dictionary_size
    values.update(estimator_options or {})
    return FitOptions.from_mapping(values)


def _row_index(mask: np.ndarray) -> np.ndarray:
    """(X, Y, Z) int64: row of each masked voxel in the output arrays (-1 outside)."""
    rows = np.full(mask.shape, -1, dtype=np.int64)
    rows[mask] = np.arange(int(mask.sum()), dtype=np.int64)
    return rows


def _same_acquisition(a: Any, b: Any) -> bool:
    """Same b-values and gradient directions (to file-format precision)."""
    if getattr(a, "hash", None) == getattr(b, "hash", None):
        return True
    ba, bb = np.asarray(a.bvalues), np.asarray(b.bvalues)
    ga, gb = np.asarray(a.gradient_directions), np.asarray(b.gradient_directions)
    return (ba.shape == bb.shape and ga.shape == gb.shape
            and bool(np.allclose(ba, bb, rtol=1e-4, atol=1e3))
            and bool(np.allclose(ga, gb, atol=1e-4)))
