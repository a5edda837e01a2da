"""MRtrix ``.mif`` / ``.mif.gz`` images: reading, FSL gradient conversion, writing.

An MRtrix image file starts with the text line ``mrtrix image``, then ``key: value`` lines
up to ``END``; the voxels follow at the offset given by ``file: . <offset>``. The keys used
here:

=============  ====================================================================
``dim``        sizes of the axes (``X,Y,Z,N``)
``vox``        voxel sizes (mm for the spatial axes)
``layout``     per axis, its rank in the storage order (0 = fastest) with a sign:
               ``-`` means the axis is stored in reverse order on disk
``datatype``   ``Float32LE``, ``Int16BE``, ``UInt8``, ... (see ``_DATATYPES``)
``transform``  3 rows of 4 numbers: direction cosines of the axes and the position of
               the first voxel in scanner (RAS+, mm) coordinates
``scaling``    optional ``offset,multiplier`` applied to the stored values
``dw_scheme``  one line per volume, ``x,y,z,b``: gradient direction in scanner
               coordinates and b in s/mm²
``file``       ``. <offset>`` (data in this file) or ``<name> <offset>`` (a separate file)
=============  ====================================================================

FSL's ``.bvec`` files hold gradients in the image's voxel axes instead, with one twist: when
the voxel-to-world matrix has a positive determinant (a "neurological" voxel order), the
first voxel axis is flipped, because FSL works in radiological voxel coordinates.
:func:`scanner_to_fsl_bvecs` does that conversion (what MRtrix's ``-export_grad_fsl`` does):

    v_voxel = R⁻¹ g,   R = the affine's 3 x 3 part with unit columns;
    v_voxel[0] = -v_voxel[0] when det(R) > 0.

>>> from fingerprint.io.mif import read_mif
>>> image = read_mif("dwi.mif.gz")
>>> image.data.shape, image.affine, image.bvals, image.bvecs   # bvecs: FSL, 3 x N
"""

from __future__ import annotations

import contextlib
import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fingerprint.errors import InputError
from fingerprint.io.nifti import atomic_write_nifti

logger = logging.getLogger(__name__)

__all__ = ["MifImage", "fsl_to_scanner_gradients", "is_mif", "mif_as_nifti",
           "mif_gradients_as_fsl", "read_mif", "read_mif_header", "scanner_to_fsl_bvecs",
           "write_mif"]

_DATATYPES: dict[str, str] = {
    "int8": "i1", "uint8": "u1",
    "int16le": "<i2", "int16be": ">i2", "uint16le": "<u2", "uint16be": ">u2",
    "int32le": "<i4", "int32be": ">i4", "uint32le": "<u4", "uint32be": ">u4",
    "int64le": "<i8", "int64be": ">i8", "uint64le": "<u8", "uint64be": ">u8",
    "float32le": "<f4", "float32be": ">f4", "float64le": "<f8", "float64be": ">f8",
    # no byte order given: MRtrix writes little-endian on every platform it supports
    "int16": "<i2", "uint16": "<u2", "int32": "<i4", "uint32": "<u4",
    "float32": "<f4", "float64": "<f8",
}
_MAX_HEADER_BYTES = 16 * 1024**2


def is_mif(path: str | os.PathLike) -> bool:
    """Whether ``path`` is named like an MRtrix image (``.mif`` or ``.mif.gz``)."""
    name = Path(path).name.lower()
    return name.endswith(".mif") or name.endswith(".mif.gz")


@dataclass(frozen=True)
class MifImage:
    """An MRtrix image read into memory.

    ``data`` is indexed along MRtrix's logical axes (voxel i, j, k, volume), whatever the
    storage layout; ``affine`` (4, 4) maps voxel indices to scanner coordinates in mm;
    ``grad`` is the ``dw_scheme`` (N, 4: x, y, z in scanner coordinates, b in s/mm²) or
    None; ``header`` holds every key as a list of its raw values."""

    path: Path
    data: np.ndarray = field(repr=False)
    affine: np.ndarray = field(repr=False)
    grad: np.ndarray | None = field(repr=False)
    header: dict[str, list[str]] = field(repr=False)

    @property
    def bvals(self) -> np.ndarray:
        """b-values (N,) in s/mm² from the ``dw_scheme``."""
        return self._grad()[:, 3].copy()

    @property
    def bvecs(self) -> np.ndarray:
        """(3, N) gradient directions in FSL's convention (see the module docstring)."""
        return scanner_to_fsl_bvecs(self._grad()[:, :3], self.affine)

    def _grad(self) -> np.ndarray:
        if self.grad is None:
            raise InputError(f"MRtrix image {self.path} has no dw_scheme (gradient table) in "
                             "its header; give --bval/--bvec files")
        return self.grad


def _open(path: Path):
    with open(path, "rb") as fh:
        magic = fh.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def _read_header(path: Path) -> tuple[dict[str, list[str]], int]:
    """Header keys (lower case) -> raw values, and the header's length in bytes."""
    try:
        with _open(path) as fh:
            first = fh.readline(64)
            if first.rstrip(b"\r\n") != b"mrtrix image":
                raise InputError(f"MRtrix image {path} does not start with 'mrtrix image' "
                                 "(not a .mif file)")
            header: dict[str, list[str]] = {}
            size = len(first)
            while True:
                line = fh.readline(1 << 20)
                size += len(line)
                if not line or size > _MAX_HEADER_BYTES:
                    raise InputError(f"MRtrix image {path}: header has no END line")
                text = line.decode("utf-8", errors="replace").strip()
                if text == "END":
                    return header, size
                if not text or text.startswith("#"):
                    continue
                key, sep, value = text.partition(":")
                if not sep:
                    raise InputError(f"MRtrix image {path}: header line {text[:60]!r} is not "
                                     "'key: value'")
                header.setdefault(key.strip().lower(), []).append(value.strip())
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read MRtrix image {path}: {exc}") from None


def _numbers(header: dict[str, list[str]], key: str, path: Path, *, row: int = 0
             ) -> list[float]:
    values = header.get(key)
    if not values or row >= len(values):
        raise InputError(f"MRtrix image {path}: header has no '{key}' entry")
    try:
        return [float(x) for x in values[row].replace(",", " ").split()]
    except ValueError:
        raise InputError(f"MRtrix image {path}: '{key}: {values[row]}' is not a list of "
                         "numbers") from None


def _layout(header: dict[str, list[str]], ndim: int, path: Path) -> list[tuple[int, int]]:
    """Per axis (rank in storage order, sign)."""
    raw = header.get("layout", [",".join(f"+{i}" for i in range(ndim))])[0]
    out = []
    for item in raw.replace(" ", "").split(","):
        sign = -1 if item.startswith("-") else 1
        try:
            out.append((int(item.lstrip("+-")), sign))
        except ValueError:
            raise InputError(f"MRtrix image {path}: layout '{raw}' is not like "
                             "'+0,+1,+2,+3'") from None
    if len(out) != ndim or sorted(r for r, _ in out) != list(range(ndim)):
        raise InputError(f"MRtrix image {path}: layout '{raw}' does not match its "
                         f"{ndim} dimensions")
    return out


def _affine(header: dict[str, list[str]], vox: list[float], path: Path) -> np.ndarray:
    rows = header.get("transform")
    if rows is None:
        transform = np.eye(4)[:3]
    else:
        if len(rows) != 3:
            raise InputError(f"MRtrix image {path}: 'transform' needs 3 rows, found {len(rows)}")
        transform = np.array([_numbers(header, "transform", path, row=i) for i in range(3)])
        if transform.shape != (3, 4) or not np.all(np.isfinite(transform)):
            raise InputError(f"MRtrix image {path}: 'transform' rows need 4 finite numbers")
    affine = np.eye(4)
    affine[:3, :3] = transform[:, :3] * np.asarray(vox[:3], dtype=float)[None, :]
    affine[:3, 3] = transform[:, 3]
    return affine


def _grad(header: dict[str, list[str]], n_volumes: int, path: Path) -> np.ndarray | None:
    rows = header.get("dw_scheme")
    if not rows:
        return None
    table = np.array([_numbers(header, "dw_scheme", path, row=i) for i in range(len(rows))])
    if table.ndim != 2 or table.shape[1] != 4:
        raise InputError(f"MRtrix image {path}: dw_scheme rows need 4 numbers (x,y,z,b)")
    if table.shape[0] != n_volumes:
        raise InputError(f"MRtrix image {path}: dw_scheme has {table.shape[0]} rows but the "
                         f"image has {n_volumes} volumes")
    if not np.all(np.isfinite(table)):
        raise InputError(f"MRtrix image {path}: dw_scheme holds NaN or infinite values")
    return table


def read_mif_header(path: str | os.PathLike) -> MifImage:
    """The header of an MRtrix image (affine, gradient table) without its voxels
    (``data`` is an empty array)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"MRtrix image {path} "
                         f"{'is not a regular file' if path.exists() else 'does not exist'}")
    header, _ = _read_header(path)
    dim = [int(round(x)) for x in _numbers(header, "dim", path)]
    vox = [v if np.isfinite(v) and v > 0 else 1.0 for v in _numbers(header, "vox", path)]
    return MifImage(path=path, data=np.empty((0,), dtype=np.float32),
                    affine=_affine(header, vox + [1.0] * 3, path),
                    grad=_grad(header, dim[3] if len(dim) > 3 else 1, path), header=header)


def read_mif(path: str | os.PathLike) -> MifImage:
    """Read an MRtrix ``.mif`` / ``.mif.gz`` image (voxels, affine, gradient table).

    Raises InputError naming the file for a missing file, a header that is not MRtrix's,
    an unsupported data type or a file shorter than its header says.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"MRtrix image {path} "
                         f"{'is not a regular file' if path.exists() else 'does not exist'}")
    header, header_size = _read_header(path)
    dim = [int(round(x)) for x in _numbers(header, "dim", path)]
    if not dim or min(dim) < 1:
        raise InputError(f"MRtrix image {path}: dim {dim} must be positive sizes")
    vox = _numbers(header, "vox", path)
    if len(vox) < min(3, len(dim)):
        raise InputError(f"MRtrix image {path}: vox needs a size per spatial axis")
    vox = [v if np.isfinite(v) and v > 0 else 1.0 for v in vox] + [1.0] * 3
    dtype_name = header.get("datatype", [""])[0].strip()
    code = _DATATYPES.get(dtype_name.lower())
    if code is None:
        raise InputError(f"MRtrix image {path}: datatype {dtype_name!r} is not supported "
                         f"(supported: {', '.join(sorted({k for k in _DATATYPES}))})")
    dtype = np.dtype(code)
    layout = _layout(header, len(dim), path)
    file_entry = header.get("file", [". " + str(header_size)])[0].split()
    data_name = file_entry[0] if file_entry else "."
    try:
        offset = int(file_entry[1]) if len(file_entry) > 1 else 0
    except ValueError:
        raise InputError(f"MRtrix image {path}: 'file: {' '.join(file_entry)}' has no "
                         "byte offset") from None
    n_bytes = int(np.prod(dim)) * dtype.itemsize
    source = path if data_name == "." else path.parent / data_name
    try:
        with _open(source) as fh:
            fh.seek(offset)
            buffer = fh.read(n_bytes)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise InputError(f"cannot read the voxels of MRtrix image {path}: {exc}") from None
    if len(buffer) < n_bytes:
        raise InputError(f"MRtrix image {path} is truncated: {len(buffer)} bytes of voxel data "
                         f"where dim {dim} and {dtype_name} need {n_bytes}")
    flat = np.frombuffer(buffer, dtype=dtype)
    # storage: the axis of rank 0 varies fastest -> C order lists the slowest axis first
    order = sorted(range(len(dim)), key=lambda a: layout[a][0])  # fastest first
    stored = flat.reshape([dim[a] for a in reversed(order)])
    axes_in_stored = list(reversed(order))  # stored axis k is logical axis axes_in_stored[k]
    data = np.transpose(stored, [axes_in_stored.index(a) for a in range(len(dim))])
    for axis, (_, sign) in enumerate(layout):
        if sign < 0:
            data = np.flip(data, axis=axis)
    data = np.ascontiguousarray(data)
    if "scaling" in header:
        inter, slope = (_numbers(header, "scaling", path) + [0.0, 1.0])[:2]
        if (inter, slope) != (0.0, 1.0):
            data = data.astype(np.float32) * np.float32(slope) + np.float32(inter)
    affine = _affine(header, vox, path)
    n_volumes = dim[3] if len(dim) > 3 else 1
    return MifImage(path=path, data=data, affine=affine, grad=_grad(header, n_volumes, path),
                    header=header)


def _rotation(affine: np.ndarray) -> np.ndarray:
    m = np.asarray(affine, dtype=float)[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 0) or not np.all(np.isfinite(m)):
        raise InputError("the image's affine has a degenerate 3 x 3 part")
    return m / norms[None, :]


def scanner_to_fsl_bvecs(vectors: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """(N, 3) gradient directions in scanner coordinates -> (3, N) FSL bvecs of an image
    with voxel-to-scanner ``affine`` (voxel axes; x flipped when det > 0)."""
    r = _rotation(affine)
    out = np.linalg.solve(r, np.asarray(vectors, dtype=float).T)
    if np.linalg.det(r) > 0:
        out[0] = -out[0]
    norms = np.linalg.norm(out, axis=0)
    scale = np.linalg.norm(np.asarray(vectors, dtype=float), axis=1)
    nz = norms > 0
    out[:, nz] *= scale[nz] / norms[nz]  # keep each vector's length (R may hold shear)
    return out


def fsl_to_scanner_gradients(bvecs: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Inverse of :func:`scanner_to_fsl_bvecs`: (3, N) FSL bvecs -> (N, 3) scanner vectors."""
    r = _rotation(affine)
    v = np.array(bvecs, dtype=float)
    if np.linalg.det(r) > 0:
        v[0] = -v[0]
    return (r @ v).T


def write_mif(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray,
              grad: np.ndarray | None = None) -> Path:
    """Write ``data`` (float32, layout ``+0,+1,+2,...``) as an MRtrix image; ``grad`` is
    an (N, 4) dw_scheme (scanner x, y, z and b in s/mm²). ``.mif.gz`` names are gzipped."""
    path = Path(path)
    data = np.asarray(data, dtype="<f4")
    affine = np.asarray(affine, dtype=float)
    vox = np.linalg.norm(affine[:3, :3], axis=0)
    transform = np.concatenate([affine[:3, :3] / vox[None, :], affine[:3, 3:]], axis=1)
    lines = ["mrtrix image", f"dim: {','.join(str(s) for s in data.shape)}",
             f"vox: {','.join(repr(float(v)) for v in list(vox) + [1.0] * (data.ndim - 3))}",
             f"layout: {','.join(f'+{i}' for i in range(data.ndim))}",
             "datatype: Float32LE"]
    lines += ["transform: " + ",".join(repr(float(x)) for x in row) for row in transform]
    if grad is not None:
        lines += ["dw_scheme: " + ",".join(repr(float(x)) for x in row)
                  for row in np.asarray(grad, dtype=float)]
    text = "\n".join(lines) + "\n"
    offset = len(text) + len("file: . \nEND\n") + 8
    offset += (-offset) % 16
    head = (text + f"file: . {offset}\nEND\n").encode()
    head += b"\0" * (offset - len(head))
    payload = head + np.ascontiguousarray(data.transpose(range(data.ndim)[::-1])).tobytes()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(tmp, "wb") as fh:
        fh.write(payload)
    os.replace(tmp, path)
    return path


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".mif.gz", ".mif"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


@contextlib.contextmanager
def mif_as_nifti(path: str | os.PathLike, directory: str | os.PathLike | None = None
                 ) -> Iterator[dict[str, Path]]:
    """Convert an MRtrix image to a temporary NIfTI (+ FSL bval/bvec when it has a
    gradient table) in a hidden directory under ``directory`` (default: the system's
    temporary directory), removed on exit.

    Yields ``{'dwi': ..., 'bval': ..., 'bvec': ...}`` (no bval/bvec without dw_scheme);
    the files are named after the ``.mif`` (``sub-01_dwi.mif.gz`` -> ``sub-01_dwi.nii``).
    """
    import nibabel as nib  # lazy: keeps nibabel off import

    image = read_mif(path)
    stem = _stem(image.path)
    if directory is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fingerprint-mif-",
                                dir=str(directory) if directory is not None else None))
    try:
        nii = nib.Nifti1Image(image.data, image.affine)
        nii.header.set_xyzt_units("mm", "sec")
        nii.set_qform(image.affine, 1)
        nii.set_sform(image.affine, 1)
        out = {"dwi": atomic_write_nifti(nii, tmp / f"{stem}.nii")}
        out.update(_write_fsl(image, tmp, stem))
        yield out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_fsl(image: MifImage, directory: Path, stem: str) -> dict[str, Path]:
    if image.grad is None:
        return {}
    bval, bvec = directory / f"{stem}.bval", directory / f"{stem}.bvec"
    bval.write_text(" ".join(f"{b:g}" for b in image.bvals) + "\n")
    bvec.write_text("\n".join(" ".join(f"{x:.8f}" for x in row) for row in image.bvecs)
                    + "\n")
    return {"bval": bval, "bvec": bvec}


@contextlib.contextmanager
def mif_gradients_as_fsl(path: str | os.PathLike) -> Iterator[dict[str, Path]]:
    """The gradient table of an MRtrix image as temporary FSL files (header only; the
    same files :func:`mif_as_nifti` writes). Yields ``{'bval', 'bvec'}``, or ``{}``
    without dw_scheme."""
    image = read_mif_header(path)
    tmp = Path(tempfile.mkdtemp(prefix=".fingerprint-grad-"))
    try:
        yield _write_fsl(image, tmp, _stem(image.path))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
