"""NIfTI input and BIDS-derivative output.

Input
-----
:class:`DWIImage` opens a 4-D diffusion-weighted NIfTI without reading its voxels; data are
read through nibabel's array proxy in slabs of whole slices along the last spatial axis
(the slowest-varying spatial axis on disk), so a volume is never held as a float64 copy:
at most one slab (``max_bytes``, float32) is in memory at a time; uncompressed files are
read volume by volume within a slab (no second copy); gzip files that need several
slabs are decompressed once to a temporary file first (:meth:`DWIImage.spooled`). Masks are small
3-D images and are read whole by :func:`load_mask`.

Output
------
Parameter maps follow the BIDS derivatives proposal for diffusion models (BEP016)::

    <prefix>_model-<model>_param-<label>_dwimap.nii.gz      (+ .json sidecar)

(``<prefix>_`` is omitted when there is no prefix; model names and labels are written in
lower camel case, ``ball_stick`` -> ``ballStick``; the optional PNG preview is
``<prefix>_model-<model>_desc-preview.png``). Every fitted model writes, besides its own
labels (``fingerprint.models.map_labels``):

=====================================================  ========================================
``..._param-s0_dwimap``                                 fitted non-diffusion-weighted signal
                                                        (scanner units)
``..._param-r2_dwimap``                                 coefficient of determination of the fit
``..._param-<label>_desc-uncertainty_dwimap``           per scalar label: spread (standard
                                                        deviation) of the matched dictionary
                                                        neighbours, in the label's units
=====================================================  ========================================

Orientation labels (e.g. NODDI ``direction``) are 4-D maps of unit vectors (x, y, z on the
last axis) in the frame of the b-vectors. Maps are float32, use the input's affine and
header (data type, scaling and dimensions adapted) and are written atomically (temporary
file in the same directory, then renamed). Voxels outside the mask, or that could not be
fitted, are 0 in every map.

Sidecar keys: ``Description``, ``Parameter`` (label), ``ParameterName`` (dmipy parameter
name, None for s0/r2), ``Units`` (SI in CMIXF: ``m^2/s``, ``m``, ``rad``, ``s``; ``n/a`` for
dimensionless, ``arbitrary`` for s0), ``Model`` (Name, Class, Description, Reference,
Parameters), ``GeneratedBy`` (software name and version), ``Sources`` (input file names),
``FittedVoxels``, ``InvalidVoxels``, ``Dictionary`` (Key, Atoms) and, for orientation maps,
``OrientationEncoding``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.orientations import mu_to_vectors as _mu_to_vectors
from fingerprint.errors import InputError
from fingerprint.io.spool import (
    _READ_ERRORS,
    READ_ERRORS,
    DWISpool,
    Slab,
    SpoolSource,
    _fast_gzip,
    adopt,
    available_cpus,
    checked_float32,
    mean_of_volumes,
    open_gzip,
    open_gzip_stream,
    register_prefetched,
    spool_threads,
)

if TYPE_CHECKING:
    from nibabel import Nifti1Header, Nifti1Image
    from nibabel.spatialimages import SpatialImage

logger = logging.getLogger(__name__)

__all__ = [
    "DEEP_CHECK_BYTES",
    "DEFAULT_SLAB_BYTES",
    "DWIImage",
    "DWISpool",
    "READ_ERRORS",
    "Slab",
    "atomic_write_json",
    "atomic_write_nifti",
    "available_cpus",
    "bids_map_name",
    "load_mask",
    "mu_to_vectors",
    "open_gzip",
    "open_gzip_stream",
    "open_nifti",
    "prefetch",
    "write_map",
]

#: Largest gzip DWI (bytes on disk) inflated when opened to check a trailer that does not
#: give its data size (see :class:`DWIImage`).
DEEP_CHECK_BYTES = 32 * 1024**2

#: Largest slab of float32 DWI data read at once (bytes).
DEFAULT_SLAB_BYTES = 128 * 1024**2


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def open_nifti(path: str | os.PathLike, what: str = "image") -> Nifti1Image:
    """Open a NIfTI file with nibabel (header only), with errors naming the file.

    A gzip file is kept open between reads, so that reads at increasing offsets (volume
    after volume) continue the decompression instead of restarting it."""
    # lazy: keeps nibabel off import
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} file {path} does not exist")
    if not path.is_file():
        raise InputError(f"{what} file {path} is not a regular file")
    try:
        img = nib.load(str(path), keep_file_open=_is_gzip(path))
    except (ImageFileError, *_READ_ERRORS) as exc:
        gz_name = path.name.lower().endswith(".gz")
        hint = ""
        if gz_name and not _is_gzip(path) and _has_nifti_magic(path):
            hint = " (it is an uncompressed NIfTI: name it .nii)"
        elif not gz_name and _is_gzip(path):
            hint = " (it is gzip-compressed: name it .nii.gz)"
        raise InputError(f"{what} file {path} cannot be read as NIfTI: {exc}{hint}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(f"{what} file {path} is a {type(img).__name__}, not a NIfTI image")
    return img


def _has_nifti_magic(path: Path) -> bool:
    """Whether ``path`` starts with an uncompressed NIfTI-1/2 header."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(348)
    except OSError:
        return False
    return head[344:347] in (b"n+1", b"ni1") or head[4:7] in (b"n+2", b"ni2")


def _expected_data_end(img: Any) -> int:
    """Byte offset (in the uncompressed stream) where ``img``'s data block ends."""
    header = img.header
    # the offset read from the file is the array proxy's: a loaded image's header is a
    # copy whose vox_offset nibabel resets to 0 (which made every gzip file look truncated
    # and decompressed it whole to read its last voxel)
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    itemsize = np.dtype(header.get_data_dtype()).itemsize
    return offset + int(np.prod(img.shape, dtype=np.int64)) * itemsize


def check_file_complete(img: Nifti1Image, path: str | os.PathLike, what: str = "image",
                        *, deep: bool = True) -> None:
    """Cheap truncation check without decompressing: the file must hold the whole data
    block (uncompressed files), or the gzip trailer's uncompressed size must match the
    header (gzip files). A multi-member gzip stream records only its last member's size:
    with ``deep`` its last voxel is then read to be sure (the whole stream is inflated);
    without, the check is left to the reads, which fail on a short stream (a DWI is read
    whole anyway, a mask is small)."""
    path = Path(path)
    end = _expected_data_end(img)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        magic = fh.read(2)
        if magic != b"\x1f\x8b":
            if size < end:
                raise InputError(f"{what} file {path} is truncated: {size} bytes, the header "
                                 f"needs {end}")
            return
        if size < 18:
            raise InputError(f"{what} file {path} is truncated (gzip stream too short)")
        fh.seek(-4, os.SEEK_END)
        isize = struct.unpack("<I", fh.read(4))[0]
    if isize == end % 2**32:
        return
    if not deep:
        logger.debug("%s file %s: the gzip trailer does not give the data size (several "
                     "members?); checked while reading", what, path)
        return
    # multi-member gzip streams only record the last member's size: read the last voxel
    try:
        last = tuple(s - 1 for s in img.shape)
        np.asarray(img.dataobj[last])
    except _READ_ERRORS as exc:
        raise InputError(f"{what} file {path} is truncated or corrupt: {exc}") from None


class DWIImage:
    """A 4-D diffusion-weighted NIfTI opened lazily (nothing read until asked).

    Parameters
    ----------
    path : str or Path
        ``.nii`` or ``.nii.gz`` file, shape (X, Y, Z, N).
    check : bool
        Check that the file is complete (cheap; see :func:`check_file_complete`: a gzip
        stream whose trailer does not give the data size -- several members, or a
        truncated file -- is inflated here only when it is at most
        :data:`DEEP_CHECK_BYTES`; larger ones are checked by the reads, which inflate
        them anyway, and fail naming the file).
    """

    def __init__(self, path: str | os.PathLike, *, check: bool = True):
        self.path = Path(path)  # the file named in messages
        self._file = self.path  # the file actually read (a temporary copy when spooled)
        self.img = open_nifti(self.path, "DWI")
        shape = tuple(int(s) for s in self.img.shape)
        if len(shape) == 5 and shape[3] == 1:  # (X, Y, Z, 1, N) is sometimes written
            raise InputError(f"DWI file {self.path} is 5-D {shape}; expected (X, Y, Z, N)")
        if len(shape) != 4:
            raise InputError(
                f"DWI file {self.path} has shape {shape}: a 4-D image (X, Y, Z, volumes) is "
                f"needed, got {len(shape)}-D")
        if min(shape) < 1:
            raise InputError(f"DWI file {self.path} has an empty dimension: {shape}")
        dtype = np.dtype(self.img.header.get_data_dtype())
        if dtype.kind not in "iuf":
            raise InputError(f"DWI file {self.path} has unsupported data type {dtype}")
        self.shape: tuple[int, int, int, int] = shape
        if check:
            small = self.path.stat().st_size <= DEEP_CHECK_BYTES
            check_file_complete(self.img, self.path, "DWI", deep=small)

    # ------------------------------------------------------------------ properties
    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """(X, Y, Z)."""
        return self.shape[:3]

    @property
    def n_volumes(self) -> int:
        """Number of measurements N."""
        return self.shape[3]

    @property
    def affine(self) -> np.ndarray:
        """Voxel-to-world affine (4, 4) (sform, else qform, as nibabel chooses)."""
        return np.asarray(self.img.affine, dtype=np.float64)

    @property
    def header(self) -> Nifti1Header:
        return self.img.header

    @property
    def dtype(self) -> np.dtype:
        """On-disk data type."""
        return np.dtype(self.img.header.get_data_dtype())

    @property
    def float32_nbytes(self) -> int:
        """Size of the whole image as float32 (bytes)."""
        return int(np.prod(self.shape, dtype=np.int64)) * 4

    # ------------------------------------------------------------------ reading
    def _read(self, slicer: tuple) -> np.ndarray:
        proxy = self.img.dataobj
        try:
            if hasattr(proxy, "_get_scaled"):
                out = proxy._get_scaled(np.float32, slicer)
            else:  # pragma: no cover - other proxy implementations
                out = np.asarray(proxy[slicer])
        except _READ_ERRORS as exc:
            raise InputError(f"DWI file {self.path} cannot be read: {exc}") from None
        return checked_float32(np.asarray(out), self.path)

    def read_volume(self, index: int) -> np.ndarray:
        """One 3-D volume as float32."""
        return self._read((slice(None), slice(None), slice(None), int(index)))

    def slab_slices(self, max_bytes: int = DEFAULT_SLAB_BYTES) -> int:
        """Slices per slab so that one slab of float32 data takes at most ``max_bytes``."""
        x, y, _, n = self.shape
        per_slice = x * y * n * 4
        return max(1, int(max_bytes // max(per_slice, 1)))

    @property
    def is_compressed(self) -> bool:
        """Whether the file is gzip-compressed (slab reads then cost a pass each)."""
        return _is_gzip(self._file)

    def n_slabs(self, mask: np.ndarray, max_bytes: int = DEFAULT_SLAB_BYTES) -> int:
        """Number of slabs :meth:`iter_slabs` reads for ``mask``."""
        step = self.slab_slices(max_bytes)
        z = np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=(0, 1)))
        return int(np.unique(z // step).size)

    @contextlib.contextmanager
    def spooled(self, mask: np.ndarray, directory: str | os.PathLike, *,
                max_bytes: int = DEFAULT_SLAB_BYTES) -> Iterator[DWIImage | DWISpool]:
        """This image, or -- when it is gzip-compressed and would be read in more than one
        slab -- a :class:`~fingerprint.io.spool.DWISpool` of its ``mask`` voxels in
        ``directory`` (one decompression pass instead of one per slab; removed on exit).
        Both read slabs with ``iter_slabs``; memory stays bounded either way."""
        with self.spooling(mask, directory, max_bytes=max_bytes) as ready:
            yield ready()

    @contextlib.contextmanager
    def spooling(self, mask: np.ndarray, directory: str | os.PathLike, *,
                 max_bytes: int = DEFAULT_SLAB_BYTES
                 ) -> Iterator[Callable[[], DWIImage | DWISpool]]:
        """Like :meth:`spooled`, but the decompression runs in a background thread while
        the block goes on (e.g. loading a dictionary): the block gets a function that
        waits for it and returns what to read (this image when no copy is needed).
        Errors of the decompression are raised by that function; the copy is removed on
        exit. A spool started earlier for the same file and directory
        (:func:`fingerprint.io.spool.prefetch`) is adopted instead of starting one."""
        if not self.is_compressed or self.n_slabs(mask, max_bytes) <= 1:
            yield lambda: self
            return
        spool = adopt(self.path, directory, mask)
        if spool is None:
            spool = DWISpool(SpoolSource.of(self), mask, directory,
                             threads=spool_threads()).start()
        else:
            logger.debug("reading %s from its early decompression", self.path)
        try:
            yield spool.wait
        finally:
            spool.close()

    def iter_slabs(self, mask: np.ndarray, *, max_bytes: int = DEFAULT_SLAB_BYTES,
                   start_slice: int = 0) -> Iterator[Slab]:
        """Masked voxels slab by slab (skipping slabs without masked voxels).

        Voxel order within a slab is C order of (x, y, z); the union over slabs is every
        masked voxel exactly once.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.spatial_shape:
            raise InputError(f"mask shape {mask.shape} differs from the DWI's "
                             f"{self.spatial_shape}")
        nz = self.shape[2]
        step = self.slab_slices(max_bytes)
        compressed = self.is_compressed
        for z0 in range(start_slice, nz, step):
            z1 = min(nz, z0 + step)
            sub = mask[:, :, z0:z1]
            if not sub.any():
                continue
            # read only the range of slices that actually holds masked voxels
            zs = np.flatnonzero(sub.any(axis=(0, 1)))
            a, b = z0 + int(zs[0]), z0 + int(zs[-1]) + 1
            local = mask[:, :, a:b]
            if compressed:  # one read: each read of a gzip stream decompresses from the start
                block = self._read((slice(None), slice(None), slice(a, b), slice(None)))
                data = np.ascontiguousarray(block[local])
                del block
            else:  # volume by volume: no second slab-sized copy
                data = self._read_volumes(a, b, local)
            coords = np.argwhere(local)
            coords[:, 2] += a
            yield Slab(a, b, coords, data)

    def _raw_float32(self) -> tuple[int, np.dtype] | None:
        """(data offset, on-disk dtype) when the voxels can be read as they are stored
        (an uncompressed float32 file in NIfTI's order, without scaling), else None."""
        proxy = self.img.dataobj
        dtype = np.dtype(getattr(proxy, "dtype", self.dtype))
        if dtype.kind != "f" or dtype.itemsize != 4 or getattr(proxy, "order", "F") != "F":
            return None
        slope, inter = getattr(proxy, "slope", None), getattr(proxy, "inter", None)
        if slope is None or inter is None or float(slope) != 1.0 or float(inter) != 0.0:
            return None
        if self.is_compressed:
            return None
        return int(proxy.offset), dtype

    def _read_volumes(self, a: int, b: int, local: np.ndarray) -> np.ndarray:
        """(n, N) float32 signals of the voxels of ``local`` (the mask of slices
        ``[a, b)``), read volume by volume. An uncompressed float32 file (such as the
        spooled copy of a gzip input) is read straight into one reused buffer per volume
        (the values nibabel gives, without its per-read copies and conversions)."""
        data = np.empty((int(local.sum()), self.n_volumes), dtype=np.float32)
        raw = self._raw_float32()
        if raw is None:
            for t in range(self.n_volumes):
                data[:, t] = self._read((slice(None), slice(None), slice(a, b), t))[local]
            return data
        offset, dtype = raw
        x, y, z, _ = self.shape
        coords = np.argwhere(local)  # C order of (x, y, z), as local's boolean index
        index = coords[:, 0] + x * (coords[:, 1] + y * coords[:, 2])  # F order on disk
        buf = np.empty(x * y * (b - a), dtype=dtype)
        view = buf.view(np.uint8).data
        volume_bytes = x * y * z * dtype.itemsize
        try:
            with open(self._file, "rb", buffering=0) as fh:
                for t in range(self.n_volumes):
                    fh.seek(offset + t * volume_bytes + x * y * a * dtype.itemsize)
                    got = 0
                    while got < buf.nbytes:
                        n = fh.readinto(view[got:])
                        if not n:
                            raise InputError(f"DWI file {self.path} is truncated: volume {t} "
                                             f"ends before slice {b}")
                        got += n
                    data[:, t] = buf[index]
        except OSError as exc:
            raise InputError(f"DWI file {self.path} cannot be read: {exc}") from None
        return data

    def mean_b0(self, b0_mask: np.ndarray) -> np.ndarray:
        """Mean of the b=0 volumes (float32, 3-D), read one volume at a time."""
        return mean_of_volumes(self.read_volume, b0_mask, self.spatial_shape, self.path)


def prefetch(dwi: str | os.PathLike[str], directory: str | os.PathLike[str],
             mask: str | os.PathLike[str] | None = None, *, threads: int = 1,
             max_bytes: int = 0) -> DWISpool | None:
    """Start spooling the gzip NIfTI ``dwi`` into ``directory`` now (the voxels of the
    ``mask`` file, else all) for :meth:`DWIImage.spooling` to adopt later
    (:func:`fingerprint.io.spool.adopt`; :func:`fingerprint.io.spool.discard_prefetched`
    ends the ones nobody adopted). Best effort: None (and nothing started) when ``dwi``
    is not a gzip NIfTI, its masked voxels fit in one slab of ``max_bytes`` (a fit reads
    them without a spool), or anything about the inputs is wrong (the fit that follows
    reports it)."""
    try:
        path = Path(os.fspath(dwi))
        image = DWIImage(path, check=False)
        if not image.is_compressed:
            return None
        selection = None
        if mask is not None:
            selection = load_mask(mask, image.spatial_shape)
        every = np.ones(image.spatial_shape, dtype=bool) if selection is None else selection
        if image.n_slabs(every, max_bytes) <= 1:
            return None
        spool = DWISpool(SpoolSource.of(image), selection, directory, threads=threads)
        spool.start()
        register_prefetched(path, directory, spool)
    except Exception as exc:  # noqa: BLE001 - reported by the fit that follows
        logger.debug("no early decompression of %s: %s", dwi, exc)
        return None
    logger.debug("decompressing %s into %s ahead of the fit", path, directory)
    return spool


def load_mask(path: str | os.PathLike, spatial_shape: tuple[int, ...],
              affine: np.ndarray | None = None) -> np.ndarray:
    """Read a 3-D mask (nonzero = inside) matching ``spatial_shape``; InputError naming the
    file when it is unreadable, mis-shaped, not finite or empty."""
    path = Path(path)
    img = open_nifti(path, "mask")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise InputError(f"mask file {path} has shape {tuple(img.shape)}: a 3-D image is needed")
    if shape != tuple(spatial_shape):
        raise InputError(f"mask file {path} has shape {shape} but the DWI volumes are "
                         f"{tuple(spatial_shape)}")
    check_file_complete(img, path, "mask")
    try:
        data = np.asanyarray(img.dataobj).reshape(shape)
    except _READ_ERRORS as exc:
        raise InputError(f"mask file {path} cannot be read: {exc}") from None
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        raise InputError(f"mask file {path} contains NaN or infinite values")
    if data.dtype.kind in "if" and data.size and data.min() < 0:
        raise InputError(f"mask file {path} has negative values (down to {data.min():g}): a "
                         f"mask holds 0 outside and 1 (or any positive value) inside")
    mask = data != 0
    if not mask.any():
        raise InputError(f"mask file {path} is empty (no nonzero voxel)")
    if affine is not None and not np.allclose(img.affine, affine, atol=1e-3, rtol=1e-4):
        logger.warning("mask file %s has a different affine from the DWI image; "
                       "using it voxel for voxel", path)
    return mask


# ---------------------------------------------------------------------- output
def bids_map_name(prefix: str, model: str, label: str | None, desc: str | None = None,
                  extension: str = ".nii.gz", suffix: str | None = "dwimap") -> str:
    """``<prefix>_model-<model>_param-<label>[_desc-<desc>]_dwimap<extension>``
    (no ``param`` entity when ``label`` is None, no suffix when ``suffix`` is None).

    BIDS labels are alphanumeric: ``model``, ``label`` and ``desc`` are written in lower
    camel case (``ball_stick`` -> ``ballStick``, ``lambda_par`` -> ``lambdaPar``) and any
    other character is dropped.
    """
    def clean(text: str) -> str:
        words = [w for w in re.split(r"[^0-9A-Za-z]+", str(text)) if w]
        out = "".join(w if i == 0 else w[:1].upper() + w[1:] for i, w in enumerate(words))
        if not out:
            raise InputError(f"cannot make a BIDS label from {text!r}")
        return out

    parts = [prefix] if prefix else []
    parts.append(f"model-{clean(model)}")
    if label is not None:
        parts.append(f"param-{clean(label)}")
    if desc:
        parts.append(f"desc-{clean(desc)}")
    if suffix:
        parts.append(suffix)
    return "_".join(parts) + extension


def mu_to_vectors(mu: np.ndarray) -> np.ndarray:
    """(..., 2) angles (theta, phi) in rad -> (..., 3) unit vectors; NaN rows -> 0
    (:func:`fingerprint.core.orientations.mu_to_vectors`)."""
    return _mu_to_vectors(mu, nonfinite=0.0)


def _tmp_sibling(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def atomic_write_nifti(img: SpatialImage, path: str | os.PathLike) -> Path:
    """Save ``img`` to ``path`` via a temporary sibling and a rename."""
    import nibabel as nib  # lazy: keeps nibabel off import

    path = Path(path)
    tmp = _tmp_sibling(path)
    # nibabel picks the compression from the name: keep the suffix on the temporary file
    tmp = tmp.with_name(tmp.name + "".join(path.suffixes[-2:]))
    try:
        if path.name.endswith(".nii.gz") and isinstance(img, (nib.Nifti1Image,
                                                              nib.Nifti2Image)):
            # the single-file NIfTI nibabel would write, compressed by ISA-L (several
            # times faster than zlib at the same level; zlib when ISA-L is missing)
            tmp.write_bytes(_fast_gzip.compress(img.to_bytes(), compresslevel=1))
        else:
            nib.save(img, str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_json(obj: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented JSON via a temporary sibling and a rename."""
    path = Path(path)
    tmp = _tmp_sibling(path)
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def map_image(data: np.ndarray, reference: Nifti1Image) -> Nifti1Image:
    """A float32 NIfTI image of ``data`` (3-D or 4-D) with the reference image's affine
    and header (data type, scaling, intent and time units reset)."""
    import nibabel as nib  # lazy: keeps nibabel off import

    data = np.asarray(data, dtype=np.float32)
    header = reference.header.copy()
    header.set_data_dtype(np.float32)
    header.set_slope_inter(None, None)
    try:
        header.set_intent("none")
    except Exception:  # pragma: no cover - header types without intents
        pass
    xyz_units = header.get_xyzt_units()[0]
    header.set_xyzt_units(xyz=xyz_units, t="unknown")
    header["descrip"] = b"fingerprint"
    cls = type(reference) if isinstance(reference, (nib.Nifti1Image, nib.Nifti2Image)) \
        else nib.Nifti1Image
    img = cls(data, reference.affine, header)
    if data.ndim == 4:
        img.header.set_zooms(tuple(reference.header.get_zooms()[:3]) + (1.0,))
    sform, scode = reference.header.get_sform(coded=True)
    qform, qcode = reference.header.get_qform(coded=True)
    if scode:
        img.set_sform(sform, int(scode))
    if qcode:
        img.set_qform(qform, int(qcode))
    return img


def write_map(data: np.ndarray, reference: Nifti1Image, directory: str | os.PathLike, name: str,
              sidecar: Mapping[str, Any]) -> tuple[Path, Path]:
    """Write one map (``name`` ending in .nii.gz) and its JSON sidecar, atomically.
    Returns (nifti path, json path)."""
    directory = Path(directory)
    nii = atomic_write_nifti(map_image(data, reference), directory / name)
    base = name[:-7] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]
    js = atomic_write_json(sidecar, directory / f"{base}.json")
    return nii, js
