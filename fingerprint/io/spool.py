"""Spooling a gzip DWI: one decompression pass into an uncompressed temporary file that
holds only the voxels to fit.

A NIfTI file stores its volumes one after another, so no voxel is complete until the whole
gzip stream has been inflated, and every slab read of a gzip stream would inflate it from
the start again. :class:`DWISpool` therefore inflates the stream once, in a background
thread, and writes the voxels of a *selection* (the mask, or every voxel) to a temporary
file, volume after volume::

    offset t * n * itemsize:  volume t's n selected voxels, in the file's (Fortran) order

with the file's own data type (no conversion while spooling). The file is allocated to its
final size first (cheaper writes, and a full disk fails at once), and on POSIX systems it
is unlinked as soon as it is open: it is read through the open descriptor and vanishes
with the process whatever happens. Memory stays bounded: one decompression block (or one
volume, when the selection is a part of the volume) while spooling, one slab while
reading.

Reading (:meth:`DWISpool.iter_slabs`) gives the very :class:`Slab` blocks that
:meth:`DWIImage.iter_slabs <fingerprint.io.nifti.DWIImage.iter_slabs>` gives (same slices,
same voxel order, so a fit cuts the same chunks): one positioned read per volume, one
transpose and one reordering of the rows per slab. Values are nibabel's (scaling and type
conversion applied element by element as its array proxy applies them).

:func:`fingerprint.io.nifti.prefetch` starts a spool before the caller needs it (the
command line starts one before importing the fitting code); :meth:`DWIImage.spooling
<fingerprint.io.nifti.DWIImage.spooling>` adopts it when it was made for the same file,
selection and directory (:func:`adopt`), and :func:`discard_prefetched` ends the ones
nobody adopted.

This module also opens gzip streams for the rest of the package (:func:`open_gzip`,
:func:`open_gzip_stream`). It imports only numpy and the decompressors (nibabel lazily),
so that the command line can start a spool early.
"""

from __future__ import annotations

import gzip
import logging
import os
import secrets
import struct
import threading
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

import numpy as np

from fingerprint.errors import InputError
from fingerprint.stages import stage

if TYPE_CHECKING:
    from nibabel import Nifti1Header, Nifti1Image

logger = logging.getLogger(__name__)

__all__ = ["READ_ERRORS", "SPOOL_THREADS", "DWISpool", "Slab", "SpoolSource", "adopt",
           "available_cpus", "discard_prefetched", "open_gzip", "open_gzip_stream",
           "register_prefetched", "spool_threads"]

#: Bytes inflated per read of the gzip stream.
_BLOCK_BYTES = 16 * 1024**2
#: Spools at least this large (bytes) are released by a background thread.
_RELEASE_IN_BACKGROUND_BYTES = 256 * 1024**2
#: Bytes the inflating thread hands over at a time.
_INFLATE_BLOCK_BYTES = 4 * 1024**2
#: Largest float32 block transposed at once while reading a slab (bytes).
_TRANSPOSE_BYTES = 4 * 1024**2

_fast_gzip: types.ModuleType
_fast_gzip_error: type[Exception]
try:  # ISA-L decompresses gzip about 1.6x faster than zlib (the spooling of large DWIs)
    import isal.igzip
    import isal.isal_zlib

    _fast_gzip = isal.igzip
    _fast_gzip_error = isal.isal_zlib.error
except ImportError:  # pragma: no cover - isal is a dependency; stdlib as a fallback
    _fast_gzip = gzip
    _fast_gzip_error = zlib.error

_threaded_gzip: types.ModuleType | None
try:  # ISA-L inflating in a thread of its own (the spool writes meanwhile)
    import isal.igzip_threaded

    _threaded_gzip = isal.igzip_threaded
except ImportError:  # pragma: no cover - older ISA-L bindings, or no ISA-L
    _threaded_gzip = None

_parallel_gzip: types.ModuleType | None
try:  # rapidgzip decompresses one gzip stream on several cores at once (the spooling)
    import rapidgzip

    _parallel_gzip = rapidgzip
except ImportError:  # pragma: no cover - rapidgzip is a dependency; one core as a fallback
    _parallel_gzip = None

_READ_ERRORS = (OSError, EOFError, ValueError, zlib.error, struct.error, gzip.BadGzipFile,
                _fast_gzip_error)
#: What reading a truncated or corrupt NIfTI (or its gzip stream) may raise.
READ_ERRORS: tuple[type[BaseException], ...] = _READ_ERRORS


def open_gzip(path: str | os.PathLike[str]) -> BinaryIO:
    """``path`` (gzip) opened for reading with the fastest decompressor at hand (ISA-L,
    else the standard library); read errors are among :data:`READ_ERRORS`."""
    return _fast_gzip.open(path, "rb")


def available_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - platforms without sched_getaffinity
        return max(1, os.cpu_count() or 1)


def open_gzip_stream(path: str | os.PathLike[str], threads: int | None = None) -> BinaryIO:
    """``path`` (gzip) opened for one pass from start to end, decompressed on ``threads``
    cores (default: those this process may use) by rapidgzip when there are several and
    it is installed, else by :func:`open_gzip`. Errors of a corrupt or truncated stream
    are among :data:`READ_ERRORS` or a RuntimeError."""
    n = available_cpus() if threads is None else max(1, int(threads))
    if _parallel_gzip is not None and n > 1:
        stream: BinaryIO = _parallel_gzip.open(os.fspath(path), parallelization=n)
        return stream
    return open_gzip(path)


#: Cores that inflate a gzip DWI into its spool (None: every core this process may use,
#: by rapidgzip). One (ISA-L) leaves the other cores to the spool's writes and to what
#: runs meanwhile (imports, the dictionary, the index), and spends less CPU time.
SPOOL_THREADS: int | None = 1


def spool_threads() -> int:
    """Cores that inflate a gzip DWI into its spool (:data:`SPOOL_THREADS`)."""
    return available_cpus() if SPOOL_THREADS is None else max(1, int(SPOOL_THREADS))


@dataclass(frozen=True)
class Slab:
    """A block of whole slices ``[start, stop)`` along the last spatial axis."""

    start: int
    stop: int
    #: (n, 3) integer voxel coordinates of the masked voxels of the slab
    coords: np.ndarray
    #: (n, N) float32 signals of those voxels
    data: np.ndarray


class _OpenedImage(Protocol):
    """What :meth:`SpoolSource.of` reads of a :class:`~fingerprint.io.nifti.DWIImage`."""

    path: Path
    shape: tuple[int, int, int, int]
    img: Nifti1Image

    @property
    def dtype(self) -> np.dtype: ...

    @property
    def header(self) -> Nifti1Header: ...


@dataclass(frozen=True)
class SpoolSource:
    """Where a DWI's voxels are in its decompressed stream and how to scale them."""

    #: the user's file (gzip NIfTI), named in messages
    path: Path
    #: (X, Y, Z, N)
    shape: tuple[int, int, int, int]
    #: byte offset of the data block in the decompressed stream
    offset: int
    #: on-disk data type (byte order included)
    dtype: np.dtype
    #: nibabel's scale factors of the array proxy (``_slope``, ``_inter``)
    slope: Any
    inter: Any

    @classmethod
    def of(cls, image: _OpenedImage) -> SpoolSource:
        """The source of a :class:`~fingerprint.io.nifti.DWIImage`."""
        proxy = image.img.dataobj
        x, y, z, n = (int(s) for s in image.shape)
        return cls(path=Path(image.path), shape=(x, y, z, n),
                   offset=int(getattr(proxy, "offset", image.header.get_data_offset())),
                   dtype=np.dtype(getattr(proxy, "dtype", image.dtype)),
                   slope=getattr(proxy, "_slope", 1.0), inter=getattr(proxy, "_inter", 0.0))

    @property
    def raw_float32(self) -> bool:
        """Whether the stored values are the float32 values (no scaling, native order)."""
        return (self.dtype == np.dtype(np.float32) and _is_one(self.slope)
                and _is_zero(self.inter))


def _is_one(value: Any) -> bool:
    arr = np.asanyarray(value)
    return arr.size == 1 and bool(arr == 1)


def _is_zero(value: Any) -> bool:
    arr = np.asanyarray(value)
    return arr.size == 1 and bool(arr == 0)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def scaled_float32(raw: np.ndarray, source: SpoolSource) -> np.ndarray:
    """``raw`` values of ``source`` as nibabel's array proxy gives them in float32
    (``_get_scaled(np.float32, ...)``: scale factors cast to float32 where they can be,
    the read scaling, the promotion), then float32; values beyond its range are an
    InputError naming the file."""
    from nibabel.volumeutils import apply_read_scaling  # lazy: keeps nibabel off import

    if source.raw_float32:
        return raw
    slope, inter = np.asanyarray(source.slope), np.asanyarray(source.inter)
    if np.can_cast(slope, np.float32):
        slope = slope.astype(np.float32)
    if np.can_cast(inter, np.float32):
        inter = inter.astype(np.float32)
    out = apply_read_scaling(raw, slope, inter)
    out = np.asarray(out).astype(np.promote_types(out.dtype, np.float32), copy=False)
    return checked_float32(out, source.path)


def checked_float32(values: np.ndarray, path: str | os.PathLike[str]) -> np.ndarray:
    """``values`` (signals read from the DWI file ``path``) as float32; an InputError naming
    the file when a finite value lies beyond the float32 range."""
    if values.dtype != np.float32 and values.size:
        with np.errstate(invalid="ignore"):
            top = np.nanmax(np.abs(values), initial=0.0, where=np.isfinite(values))
        if top > _FLOAT32_MAX:
            raise InputError(
                f"DWI file {path} holds values up to {float(top):.3g}, beyond the "
                f"float32 range (±{_FLOAT32_MAX:.3g}) signals are fitted in; rescale the "
                f"data (the fit only depends on signal ratios)")
    return np.asarray(values, dtype=np.float32)


def _open_stream(path: Path, threads: int) -> Any:
    """``path`` opened for one pass: on ``threads`` cores by rapidgzip when more than
    one, else by ISA-L in a thread of its own (the caller's thread writes the previous
    block meanwhile), else by :func:`~fingerprint.io.nifti.open_gzip`."""
    if threads > 1:
        return open_gzip_stream(path, threads)
    if _threaded_gzip is not None and _fast_gzip is not gzip:
        stream: BinaryIO = _threaded_gzip.open(path, "rb", threads=1,
                                               block_size=_INFLATE_BLOCK_BYTES)
        return stream
    return open_gzip(path)


class DWISpool:
    """The selected voxels of a gzip DWI, inflated once into a temporary file by a
    background thread (see the module's documentation).

    Parameters
    ----------
    source : SpoolSource
        The file and the layout of its data.
    selection : ndarray of bool (X, Y, Z) or None
        Voxels to keep (None: all); later reads may ask for any subset of them.
    directory : path
        Where the temporary file goes (created if needed).
    threads : int
        Cores inflating the stream: 1 (ISA-L, the default: the other cores stay free for
        the writes and whatever the caller does meanwhile) or more (rapidgzip).
    """

    def __init__(self, source: SpoolSource, selection: np.ndarray | None,
                 directory: str | os.PathLike[str], *, threads: int = 1):
        self.source = source
        x, y, z, n = source.shape
        if selection is None:
            self._index: np.ndarray | None = None  # every voxel
            self.n_selected = x * y * z
        else:
            sel = np.asarray(selection, dtype=bool)
            if sel.shape != (x, y, z):
                raise InputError(f"selection shape {sel.shape} differs from the DWI's "
                                 f"{(x, y, z)}")
            self._index = np.flatnonzero(sel.ravel(order="F"))
            self.n_selected = int(self._index.size)
            if self.n_selected == x * y * z:
                self._index = None
        self.selection = None if selection is None else np.asarray(selection, dtype=bool)
        self.directory = Path(directory)
        self.threads = max(1, int(threads))
        self._itemsize = source.dtype.itemsize
        self._fd: int | None = None
        self._tmp: Path | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.volumes_done = 0

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        """The user's file (named in messages)."""
        return self.source.path

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.source.shape

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.source.shape[:3]

    @property
    def n_volumes(self) -> int:
        return self.source.shape[3]

    @property
    def nbytes(self) -> int:
        """Size of the temporary file (bytes)."""
        return self.n_selected * self.n_volumes * self._itemsize

    # ------------------------------------------------------------------ spooling
    def start(self) -> DWISpool:
        """Create the temporary file and start inflating into it; returns self."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".fingerprint-dwi-{os.getpid()}-{secrets.token_hex(4)}.spool"
            self._fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            self._tmp = tmp
            if hasattr(os, "posix_fallocate") and self.nbytes:
                try:
                    os.posix_fallocate(self._fd, 0, self.nbytes)
                except OSError as exc:
                    if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                        raise
                    # file systems without fallocate: grow as written
            if os.name == "posix":  # read through the descriptor; gone with the process
                tmp.unlink()
                self._tmp = None
        except OSError as exc:
            self._cleanup()
            raise InputError(
                f"cannot decompress DWI file {self.path} into {self.directory} "
                f"({self.nbytes / 1e9:.3g} GB needed): {exc.strerror or exc}") from None
        self._thread = threading.Thread(target=self._run, name="fingerprint-decompress",
                                        daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            with stage("read/decompress"), _open_stream(self.path, self.threads) as src:
                self._spool(src)
                # to the end of the stream: its checksums are verified there
                while not self._stop.is_set() and src.read(_BLOCK_BYTES):
                    pass
        except (*_READ_ERRORS, RuntimeError) as exc:
            if isinstance(exc, InputError):
                self._error = exc
            else:
                self._error = InputError(f"DWI file {self.path} cannot be decompressed: "
                                         f"{exc}")
        except BaseException as exc:  # handed to the waiting thread
            self._error = exc

    def _read_exactly(self, src: Any, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            n = src.readinto(view[got:])
            if not n:
                raise InputError(f"DWI file {self.path} is truncated: its data end in "
                                 f"{what}")
            got += n

    def _spool(self, src: Any) -> None:
        assert self._fd is not None
        x, y, z, n_vol = self.source.shape
        item = self._itemsize
        volume_bytes = x * y * z * item
        skip = memoryview(bytearray(min(max(self.source.offset, 1), _BLOCK_BYTES)))
        left = self.source.offset
        while left:
            k = min(left, len(skip))
            self._read_exactly(src, skip[:k], "the header")
            left -= k
        fd = self._fd
        if self._index is None:  # every voxel: the data block as it is, block by block
            total = volume_bytes * n_vol
            buf = memoryview(bytearray(min(_BLOCK_BYTES, max(total, 1))))
            done = 0
            while done < total and not self._stop.is_set():
                k = min(len(buf), total - done)
                self._read_exactly(src, buf[:k], f"volume {done // volume_bytes} of {n_vol}")
                _pwrite_all(fd, buf[:k], done)
                done += k
                self.volumes_done = done // volume_bytes
            return
        # a part of each volume: one volume at a time, its selected voxels gathered
        raw = bytearray(volume_bytes)
        view = memoryview(raw)
        cell = np.dtype(f"V{item}")
        values = np.frombuffer(raw, dtype=cell)
        row = self.n_selected * item
        for t in range(n_vol):
            if self._stop.is_set():
                return
            self._read_exactly(src, view, f"volume {t} of {n_vol}")
            picked = values[self._index]
            _pwrite_all(fd, memoryview(picked).cast("B"), t * row)
            self.volumes_done = t + 1

    def wait(self) -> DWISpool:
        """Wait until every volume is spooled; errors of the decompression are raised
        here (InputError naming the file for a truncated or corrupt stream)."""
        if self._thread is None:
            raise RuntimeError("the spool was not started")
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self

    @property
    def ready(self) -> bool:
        """Whether the decompression has ended (successfully or not)."""
        return self._thread is not None and not self._thread.is_alive()

    def close(self) -> None:
        """Stop the decompression (if running) and remove the temporary file."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self._tmp is None and self.nbytes >= _RELEASE_IN_BACKGROUND_BYTES:
                # the last close of an unlinked file frees its pages (a tenth of a second
                # per GB): done beside what follows (writing the maps)
                threading.Thread(target=_close_quietly, args=(fd,), daemon=True,
                                 name="fingerprint-spool-release").start()
            else:
                os.close(fd)
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> DWISpool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ reading
    def _positions(self, mask: np.ndarray) -> np.ndarray:
        """Positions (in the selection's order) of the voxels of ``mask``; InputError when
        ``mask`` asks for voxels outside the selection."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.spatial_shape:
            raise InputError(f"mask shape {mask.shape} differs from the DWI's "
                             f"{self.spatial_shape}")
        flat = np.flatnonzero(mask.ravel(order="F"))
        if self._index is None:
            return flat
        pos = np.searchsorted(self._index, flat)
        pos_clipped = np.minimum(pos, max(self._index.size - 1, 0))
        if pos.size and (self._index.size == 0
                         or np.any(self._index[pos_clipped] != flat)):
            raise InputError("the mask holds voxels that were not decompressed")
        return pos

    def _flat_of(self, positions: np.ndarray) -> np.ndarray:
        return positions if self._index is None else self._index[positions]

    def _slab_slices(self, max_bytes: int) -> int:
        """Slices per slab (those of :meth:`DWIImage.slab_slices
        <fingerprint.io.nifti.DWIImage.slab_slices>`)."""
        x, y, _, n = self.source.shape
        return max(1, int(max_bytes // max(x * y * n * 4, 1)))

    def n_slabs(self, mask: np.ndarray, max_bytes: int) -> int:
        """Number of slabs :meth:`iter_slabs` gives for ``mask``."""
        step = self._slab_slices(max_bytes)
        z = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=(0, 1)))
        return int(np.unique(z // step).size)

    def read_rows(self, p0: int, p1: int) -> np.ndarray:
        """(p1 - p0, N) float32 signals of the selected voxels ``p0 .. p1 - 1``."""
        if self._fd is None:
            raise RuntimeError("the spool is closed")
        n = p1 - p0
        n_vol = self.n_volumes
        item = self._itemsize
        raw = np.empty((n_vol, n), dtype=self.source.dtype)
        view = raw.view(np.uint8).reshape(-1).data
        row = self.n_selected * item
        piece = n * item
        for t in range(n_vol):
            _pread_all(self._fd, view[t * piece:(t + 1) * piece], t * row + p0 * item,
                       self.path)
        values = scaled_float32(raw, self.source)
        del raw
        return _transpose(values)

    def iter_slabs(self, mask: np.ndarray, *, max_bytes: int,
                   start_slice: int = 0) -> Iterator[Slab]:
        """The voxels of ``mask`` (a subset of the selection) as the :class:`Slab` blocks
        of :meth:`DWIImage.iter_slabs <fingerprint.io.nifti.DWIImage.iter_slabs>`: the
        same slices (at most ``max_bytes`` of float32 signals per slab, one slice at
        least), the same voxel order (C order of (x, y, z) within a slab), so that a fit
        cuts the same chunks whichever of the two it reads. ``start_slice`` skips the
        slices before it."""
        self.wait()
        mask = np.asarray(mask, dtype=bool)
        pos = self._positions(mask)
        if pos.size == 0:
            return
        x, y, nz = self.spatial_shape
        flat = self._flat_of(pos)  # ascending: z is the slowest axis on disk
        zs = flat // (x * y)
        step = self._slab_slices(max_bytes)
        for z0 in range(int(start_slice), nz, step):
            lo, hi = (int(i) for i in np.searchsorted(zs, [z0, min(nz, z0 + step)]))
            if lo == hi:
                continue
            part, f = pos[lo:hi], flat[lo:hi]
            p0 = int(part[0])
            data = self.read_rows(p0, int(part[-1]) + 1)  # the file's order
            cx, cy, cz = f % x, (f // x) % y, zs[lo:hi]
            order = np.lexsort((cz, cy, cx))  # C order: x slowest, z fastest
            data = data[(part - p0)[order]]
            coords = np.stack([cx[order], cy[order], cz[order]], axis=1).astype(np.int64)
            yield Slab(int(cz[0]), int(cz[-1]) + 1, coords, data)

    def read_volume(self, index: int) -> np.ndarray:
        """One 3-D volume as float32 (0 outside the selection)."""
        self.wait()
        if self._fd is None:
            raise RuntimeError("the spool is closed")
        item = self._itemsize
        raw = np.empty(self.n_selected, dtype=self.source.dtype)
        row = self.n_selected * item
        _pread_all(self._fd, raw.view(np.uint8).data, int(index) * row, self.path)
        values = scaled_float32(raw, self.source)
        out = np.zeros(int(np.prod(self.spatial_shape)), dtype=np.float32)
        if self._index is None:
            out[:] = values
        else:
            out[self._index] = values
        return out.reshape(self.spatial_shape, order="F")

    def mean_b0(self, b0_mask: np.ndarray) -> np.ndarray:
        """Mean of the b=0 volumes (float32, 3-D), as :meth:`DWIImage.mean_b0
        <fingerprint.io.nifti.DWIImage.mean_b0>` (0 outside the selection)."""
        return mean_of_volumes(self.read_volume, b0_mask, self.spatial_shape, self.path)


def mean_of_volumes(read_volume: Callable[[int], np.ndarray], b0_mask: np.ndarray,
                    spatial_shape: tuple[int, ...], path: str | os.PathLike[str]
                    ) -> np.ndarray:
    """Mean (float32, 3-D) of the volumes of the DWI file ``path`` selected by ``b0_mask``,
    read one at a time by ``read_volume``; an InputError naming the file if none is."""
    idx = np.flatnonzero(np.asarray(b0_mask, dtype=bool))
    if idx.size == 0:
        raise InputError(f"no b=0 volumes for DWI file {path}")
    acc = np.zeros(spatial_shape, dtype=np.float64)
    for i in idx:
        acc += read_volume(int(i))
    return (acc / idx.size).astype(np.float32)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:  # pragma: no cover - nothing to do about it
        pass


def _transpose(values: np.ndarray) -> np.ndarray:
    """(N, n) -> C-contiguous (n, N), a few voxel columns at a time (cache friendly)."""
    n_vol, n = values.shape
    out = np.empty((n, n_vol), dtype=values.dtype)
    step = max(1, _TRANSPOSE_BYTES // max(n_vol * values.dtype.itemsize, 1))
    for i in range(0, n, step):
        out[i:i + step] = values[:, i:i + step].T
    return out


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _pread_all(fd: int, view: memoryview, offset: int, path: Path) -> None:
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got) if hasattr(os, "preadv") \
            else _pread_into(fd, view[got:], offset + got)
        if not n:
            raise InputError(f"the decompressed copy of DWI file {path} ended early")
        got += n


def _pread_into(fd: int, view: memoryview, offset: int) -> int:  # pragma: no cover
    data = os.pread(fd, len(view), offset)
    view[:len(data)] = data
    return len(data)


# ---------------------------------------------------------------------- prefetching
_PREFETCHED: list[tuple[tuple[Any, ...], DWISpool]] = []
_PREFETCH_LOCK = threading.Lock()


def _file_key(path: Path) -> tuple[Any, ...]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


def _key(path: Path, directory: Path) -> tuple[Any, ...]:
    return (*_file_key(path), str(Path(directory).absolute()))


def register_prefetched(path: str | os.PathLike[str], directory: str | os.PathLike[str],
                        spool: DWISpool) -> None:
    """Put a started spool of ``path`` into ``directory`` on the waiting list of
    :func:`adopt` (see :func:`fingerprint.io.nifti.prefetch`)."""
    key = _key(Path(os.fspath(path)), Path(directory))
    with _PREFETCH_LOCK:
        _PREFETCHED.append((key, spool))


def adopt(path: str | os.PathLike[str], directory: str | os.PathLike[str],
          selection: np.ndarray | None) -> DWISpool | None:
    """The prefetched spool of ``path`` into ``directory`` whose selection holds every
    voxel of ``selection`` (None: all voxels), taken from the waiting list (the caller
    closes it); None when there is none."""
    try:
        key = _key(Path(os.fspath(path)), Path(directory))
    except OSError:
        return None
    with _PREFETCH_LOCK:
        for i, (k, spool) in enumerate(_PREFETCHED):
            if k != key:
                continue
            if spool.selection is not None:
                want = (np.ones(spool.spatial_shape, dtype=bool) if selection is None
                        else np.asarray(selection, dtype=bool))
                if want.shape != spool.selection.shape or np.any(want & ~spool.selection):
                    continue
            del _PREFETCHED[i]
            return spool
    return None


def discard_prefetched() -> None:
    """Stop and remove every prefetched spool nobody adopted."""
    with _PREFETCH_LOCK:
        spools = [s for _, s in _PREFETCHED]
        _PREFETCHED.clear()
    for spool in spools:
        spool.close()
