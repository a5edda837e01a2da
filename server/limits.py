"""Limits that keep one API key from exhausting the server.

* :func:`check_fit_upload` runs while the client waits, in bounded memory and time: it
  reads headers only (NIfTI headers, bval/bvec), refuses a DWI whose decompressed data
  block (known from its header) is over the limit, a mask whose grid or affine differs
  from the DWI's, and counts the mask's voxels slice by slice (never the whole mask in
  memory), stopping at a deadline or when the client goes away.
* :func:`check_job_inputs` runs in the job's worker process before fitting: it streams
  every gzip input once in bounded memory to catch headers that lie about the data size
  (a file whose data is longer or shorter than its header says), then runs the library's
  full checks (finite values, b=0 signal) and counts the voxels to fit.
* :class:`UploadGate` bounds the uploads in flight, per key and in total (429).
* :func:`disk_free` / :func:`check_disk` implement the disk reserve (507).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fingerprint.errors import CancelledError, FingerprintError, InputError
from fingerprint.fitting.engine import effective_solver, runs_per_voxel_fit
from fingerprint.fitting.options import FitOptions
from fingerprint.fitting.registry import BUILTIN_SOLVER
from fingerprint.fitting.validity import default_mask
from fingerprint.io.nifti import READ_ERRORS, DWIImage, open_gzip, open_nifti

from .config import Settings
from .errors import ApiError
from .storage import is_disk_full
from .validation import public_message, validate_scheme

logger = logging.getLogger(__name__)

__all__ = ["InputLimits", "UploadGate", "check_disk", "check_fit_upload", "check_job_inputs",
           "disk_free", "is_disk_full", "job_fit_options", "verify_data_length"]

#: Seconds a client told "429" is asked to wait before retrying.
RETRY_AFTER = 10
#: Bytes decompressed per read when streaming a gzip input (the memory bound).
_STREAM_BLOCK = 4 * 1024 * 1024
#: DWIs up to this many bytes (header + decompressed data) are checked whole while the
#: client waits; larger ones by their job.
SMALL_DWI_BYTES = 256 * 1024 * 1024
#: ... when one of their volumes takes at most this many bytes as float32 (the memory the
#: check needs; a 1.25 mm whole-brain volume takes about 15 MB)
SMALL_VOLUME_BYTES = 32 * 1024 * 1024
#: Largest block of mask data read at once (bytes).
_MASK_BLOCK = 16 * 1024 * 1024
#: Tolerance of the mask / DWI affine comparison (mm, and relative).
AFFINE_ATOL = 1e-3
AFFINE_RTOL = 1e-4


@dataclass(frozen=True)
class InputLimits:
    """Per-job input limits (picklable; travels with the job to its worker)."""

    max_voxels: int
    max_dwi_bytes: int
    #: what the voxel limit is for, in the refusal ("" or " with solver 'mix'")
    voxels_for: str = ""

    @classmethod
    def from_settings(cls, settings: Settings, model: str | None = None,
                      options: FitOptions | None = None) -> InputLimits:
        """The limits of a job fitting ``model`` (a name) with ``options``: a job that runs
        a non-linear fit per voxel (the library's
        :func:`~fingerprint.fitting.engine.runs_per_voxel_fit`: a classical solver, or
        dictionary matching with the non-linear polish) fits at most
        ``max_classical_voxels``."""
        plain = cls(max_voxels=int(settings.max_voxels),
                    max_dwi_bytes=int(settings.max_dwi_bytes))
        if model is None or options is None or \
                settings.max_classical_voxels >= settings.max_voxels:
            return plain
        try:
            if not runs_per_voxel_fit(model, options):
                return plain
            solver = effective_solver(model, options.solver)
        except InputError:  # an unknown model: refused by the model check
            return plain
        if solver != BUILTIN_SOLVER:
            what = f" with solver {solver!r}"
        else:
            why = "refine='nonlinear'" if options.refine == "nonlinear" else \
                "the model's default; refine=false turns it off"
            what = f" with the non-linear polish of model {model!r} ({why})"
        return cls(max_voxels=int(settings.max_classical_voxels),
                   max_dwi_bytes=int(settings.max_dwi_bytes),
                   voxels_for=f"{what}, a non-linear fit per voxel (max_classical_voxels)")


def job_fit_options(options: Mapping[str, object]) -> FitOptions:
    """The :class:`FitOptions` of a job's stored options (those among them that are fit
    options; validated when the job was accepted)."""
    return FitOptions.from_mapping({k: v for k, v in options.items()
                                    if k in FitOptions.option_names()})


class Stopped(Exception):
    """A check stopped early: its deadline passed or its client went away."""


def _mib(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


# ------------------------------------------------------------------- disk space
def disk_free(path: Path) -> int:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return int(shutil.disk_usage(path).free)


def disk_full_error(what: str) -> ApiError:
    return ApiError(507, f"not enough disk space on the server {what}; try again later",
                    headers={"Retry-After": str(RETRY_AFTER * 6)})


def check_disk(path: Path, reserve: int, what: str, need: int = 0) -> None:
    """ApiError(507) when ``need`` more bytes would leave less than ``reserve`` free."""
    try:
        free = disk_free(path)
    except OSError:
        return
    if free - need < reserve:
        raise disk_full_error(what)


# ------------------------------------------------------------------- uploads in flight
class UploadGate:
    """Counts uploads in flight, per key and in total (the API runs in one process)."""

    def __init__(self, per_key: int, total: int) -> None:
        self.per_key = int(per_key)
        self.total = int(total)
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._all = 0

    @property
    def in_flight(self) -> int:
        return self._all

    @contextlib.contextmanager
    def slot(self, key_id: str) -> Iterator[None]:
        """Hold one upload slot of ``key_id``; ApiError(429, Retry-After) when none is
        free."""
        with self._lock:
            if self._counts.get(key_id, 0) >= self.per_key:
                raise ApiError(429, f"this API key already has {self.per_key} uploads in "
                                    "progress; wait for one to finish",
                               headers={"Retry-After": str(RETRY_AFTER)})
            if self._all >= self.total:
                raise ApiError(429, f"the server is receiving {self.total} uploads already; "
                                    "try again shortly",
                               headers={"Retry-After": str(RETRY_AFTER)})
            self._counts[key_id] = self._counts.get(key_id, 0) + 1
            self._all += 1
        try:
            yield
        finally:
            with self._lock:
                self._all -= 1
                left = self._counts.get(key_id, 1) - 1
                if left:
                    self._counts[key_id] = left
                else:
                    self._counts.pop(key_id, None)


# ------------------------------------------------------------------- NIfTI headers
#: What reading a damaged gzip NIfTI stream may raise.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (*READ_ERRORS, struct.error, zlib.error)


def _data_layout(img: Any) -> tuple[int, int]:
    """(offset of the data block, its size in bytes) from a NIfTI header."""
    header = img.header
    itemsize = np.dtype(header.get_data_dtype()).itemsize
    nbytes = int(np.prod([int(s) for s in img.shape], dtype=np.int64)) * itemsize
    offset = getattr(img.dataobj, "offset", None)  # where nibabel really reads from
    if offset is None:
        offset = header.get_data_offset()
    return int(offset), nbytes


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _check_plain_size(path: Path, end: int, what: str) -> None:
    """An uncompressed file must hold exactly its header's data block."""
    size = path.stat().st_size
    if size < end:
        raise InputError(f"{what} file {path} is truncated: {size:,} bytes, its header "
                         f"needs {end:,}")
    if size > end:
        raise InputError(f"{what} file {path} holds {size - end:,} bytes more than its "
                         f"header declares ({end:,}): the header does not describe the data")


def verify_data_length(path: Path, end: int, what: str,
                       should_stop: Callable[[], bool] | None = None) -> None:
    """Check that ``path`` holds exactly ``end`` bytes of NIfTI (header + data), reading a
    gzip stream once in blocks of 4 MiB (memory stays bounded whatever it decompresses
    to) and stopping as soon as it passes ``end``. InputError when it is longer, shorter
    or corrupt; :class:`Stopped` when ``should_stop()`` turns true."""
    path = Path(path)
    if not _is_gzip(path):
        _check_plain_size(path, end, what)
        return
    total = 0
    try:
        with open_gzip(path) as src:
            while True:
                block = src.read(_STREAM_BLOCK)
                if not block:
                    break
                total += len(block)
                if total > end:
                    raise InputError(
                        f"{what} file {path} decompresses to more than the {end:,} bytes its "
                        f"header declares: the header does not describe the data")
                if should_stop is not None and should_stop():
                    raise Stopped(f"{what} check stopped")
    except (InputError, Stopped):
        raise
    except _STREAM_ERRORS as exc:
        raise InputError(f"{what} file {path} is truncated or corrupt after {total:,} "
                         f"decompressed bytes: {exc}") from None
    if total < end:
        raise InputError(f"{what} file {path} is truncated: it decompresses to {total:,} "
                         f"bytes, its header needs {end:,}")


def _rewrite(exc: Exception, files: dict[str, Path]) -> ApiError:
    message, field = public_message(str(exc) or type(exc).__name__, files)
    return ApiError(422, f"invalid input: {message}", field)


def check_fit_upload(files: dict[str, Path], timing: dict[str, float], limits: InputLimits,
                     *, deadline: float, should_stop: Callable[[], bool] | None = None,
                     model: str | None = None, b0_threshold: float | None = None) -> None:
    """The checks of a fit upload made while its client waits (headers only, the scheme
    checks of ``fingerprint.core.scheme_checks`` against ``model`` with ``b0_threshold``
    in s/mm², plus the mask counted slice by slice): ApiError 413 (over a limit) or 422
    (invalid) naming the field; :class:`Stopped` when the client left. ``deadline`` is a
    ``time.monotonic()`` value."""
    scheme = validate_scheme(files, timing, b0_threshold=b0_threshold)
    try:
        image = DWIImage(files["dwi"], check=False)
        offset, nbytes = _data_layout(image.img)
        if nbytes > limits.max_dwi_bytes:
            raise ApiError(413, f"the DWI holds {_mib(nbytes)} of data once decompressed "
                                f"(shape {image.shape}, {image.dtype}), more than the server's "
                                f"limit of {_mib(limits.max_dwi_bytes)} per job", "dwi")
        if not _is_gzip(image.path):
            _check_plain_size(image.path, offset + nbytes, "DWI")
        n = int(scheme.number_of_measurements)
        if n != image.n_volumes:
            raise InputError(f"DWI file {image.path} has {image.n_volumes} volumes but bval "
                             f"file {files['bval']} and bvec file {files['bvec']} describe "
                             f"{n} measurements")
        from fingerprint.fitting.pipeline import check_fsl_scheme

        # no b=0 (naming the b0_threshold that would fix it), only b=0, NODDI on a single
        # shell, a restricted model without timing, ...: the library's one set of checks
        check_fsl_scheme(scheme, files["bval"], files["bvec"], model)
        if "mask" in files:
            mask = open_nifti(files["mask"], "mask")
            _check_mask(mask, files["mask"], image, limits, deadline, should_stop)
        volume = int(np.prod(image.spatial_shape, dtype=np.int64)) * 4
        if offset + nbytes <= SMALL_DWI_BYTES and volume <= SMALL_VOLUME_BYTES:
            _check_small_data(files, timing, offset + nbytes, deadline, should_stop,
                              model=model, b0_threshold=b0_threshold)
    except (ApiError, Stopped):
        raise
    except (FingerprintError, ValueError, OSError, EOFError, zlib.error) as exc:
        raise _rewrite(exc, files) from None


def _check_small_data(files: dict[str, Path], timing: dict[str, float], end: int,
                      deadline: float, should_stop: Callable[[], bool] | None, *,
                      model: str | None = None, b0_threshold: float | None = None) -> None:
    """A small DWI is checked whole while the client waits (its length streamed, then the
    library's one pass over the data: truncation, NaN, b=0 signal); when the time limit
    passes first, the job makes these checks instead."""
    from fingerprint.fitting.pipeline import validate_inputs

    def stop() -> bool:
        if should_stop is not None and should_stop():
            return True
        return time.monotonic() > deadline

    try:
        verify_data_length(files["dwi"], end, "DWI", stop)
    except Stopped:
        if should_stop is not None and should_stop():
            raise
        return  # out of time: left to the job
    if time.monotonic() < deadline:
        validate_inputs(files["dwi"], files["bval"], files["bvec"], files.get("mask"),
                        model=model, b0_threshold=None if b0_threshold is None
                        else b0_threshold * 1e6, delta=timing.get("delta"),
                        Delta=timing.get("Delta"), TE=timing.get("TE"))


def _check_mask(mask: Any, path: Path, image: Any, limits: InputLimits, deadline: float,
                should_stop: Callable[[], bool] | None) -> None:
    shape = tuple(int(s) for s in mask.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"mask file {path} has shape {tuple(mask.shape)}: a 3-D image is "
                         "needed")
    if shape != tuple(image.spatial_shape):
        raise InputError(f"mask file {path} has shape {shape} but the DWI volumes are "
                         f"{tuple(image.spatial_shape)}")
    if not np.allclose(np.asarray(mask.affine, dtype=float), image.affine, atol=AFFINE_ATOL,
                       rtol=AFFINE_RTOL):
        worst = float(np.max(np.abs(np.asarray(mask.affine, dtype=float) - image.affine)))
        raise InputError(f"mask file {path} has a different affine from the DWI's (they "
                         f"differ by up to {worst:.4g}, tolerance {AFFINE_ATOL:g}): the mask "
                         "is not on the DWI's voxel grid")
    dtype = np.dtype(mask.header.get_data_dtype())
    if dtype.kind not in "biuf":
        raise InputError(f"mask file {path} has unsupported data type {dtype}")
    offset, nbytes = _data_layout(mask)
    if not _is_gzip(path):
        _check_plain_size(path, offset + nbytes, "mask")
    count = _count_mask(mask, path, shape, deadline, should_stop)
    if count == 0:
        raise InputError(f"mask file {path} is empty (no nonzero voxel)")
    if count > limits.max_voxels:
        raise ApiError(422, f"the mask has {count:,} voxels, more than the server's limit of "
                            f"{limits.max_voxels:,} voxels per job{limits.voxels_for}",
                       "mask")


def _count_mask(mask: Any, path: Path, shape: tuple[int, ...], deadline: float,
                should_stop: Callable[[], bool] | None) -> int:
    """Nonzero voxels of a mask, read a block of rows at a time (in file order)."""
    x, y, z = shape
    extra = (0,) if len(mask.shape) == 4 else ()
    itemsize = np.dtype(mask.header.get_data_dtype()).itemsize
    rows = max(1, _MASK_BLOCK // max(1, x * itemsize))
    proxy = mask.dataobj
    count = 0
    for k in range(z):
        for j in range(0, y, rows):
            if time.monotonic() > deadline:
                raise ApiError(422, f"the mask could not be read within the server's time "
                                    f"limit (shape {shape}, {np.dtype(mask.get_data_dtype())})",
                               "mask")
            if should_stop is not None and should_stop():
                raise Stopped("mask check stopped")
            try:
                block = np.asarray(proxy[(slice(None), slice(j, j + rows), k) + tuple(extra)])
            except READ_ERRORS as exc:
                raise InputError(f"mask file {path} cannot be read: {exc}") from None
            if block.dtype.kind == "f" and not np.all(np.isfinite(block)):
                raise InputError(f"mask file {path} contains NaN or infinite values")
            if block.dtype.kind in "if" and block.size and block.min() < 0:
                raise InputError(f"mask file {path} has negative values: a mask holds 0 "
                                 "outside and 1 (or any positive value) inside")
            count += int(np.count_nonzero(block))
    return count


# ------------------------------------------------------------------- in the job
def check_job_inputs(dwi: Path, bval: Path, bvec: Path, mask: Path | None,
                     timing: dict[str, float], limits: InputLimits,
                     should_cancel: Callable[[], bool] | None = None, *,
                     mask_rule: str = "positive_b0") -> np.ndarray | None:
    """The heavy checks of a fit, run in its worker before fitting: the decompressed size
    of every NIfTI input against its header (streamed, bounded memory), the library's
    ``validate_inputs`` (one pass over the data), and the number of voxels to fit against
    the limit. Returns the default mask (``mask_rule`` ``'positive_b0'``: voxels with a
    positive mean b=0 signal) when no mask file was given, else None. InputError
    otherwise."""
    from fingerprint.fitting.pipeline import validate_inputs

    def stop() -> bool:
        return bool(should_cancel and should_cancel())

    image = DWIImage(dwi, check=False)
    offset, nbytes = _data_layout(image.img)
    if nbytes > limits.max_dwi_bytes:
        raise InputError(f"the DWI holds {_mib(nbytes)} of data once decompressed, more than "
                         f"the server's limit of {_mib(limits.max_dwi_bytes)} per job")
    try:
        verify_data_length(dwi, offset + nbytes, "DWI", stop)
        if mask is not None:
            m_offset, m_bytes = _data_layout(open_nifti(mask, "mask"))
            verify_data_length(mask, m_offset + m_bytes, "mask", stop)
    except Stopped:
        raise CancelledError("cancelled while checking the inputs") from None
    summary = validate_inputs(dwi, bval, bvec, mask, delta=timing.get("delta"),
                              Delta=timing.get("Delta"), TE=timing.get("TE"))
    if stop():
        raise CancelledError("cancelled while checking the inputs")
    result = None
    n_voxels = summary.n_voxels
    what = "mask"
    if mask is None:
        if mask_rule == "all":
            n_voxels = int(np.prod(image.spatial_shape))
            what = "image"
        else:
            b0 = image.mean_b0(np.asarray(summary.scheme.b0_mask, dtype=bool))
            result = default_mask(b0, source=f"DWI file {dwi}")
            n_voxels = int(result.sum())
            what = "default mask (voxels with a positive b=0 signal)"
    if n_voxels > limits.max_voxels:
        raise InputError(f"the {what} has {n_voxels:,} voxels, more than the server's limit "
                         f"of {limits.max_voxels:,} voxels per job{limits.voxels_for}; give a "
                         "smaller mask")
    return result
