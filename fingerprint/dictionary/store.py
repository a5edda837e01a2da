"""The on-disk dictionary format: a Zarr v3 directory store (see docs/dictionary-format.md).

Writing goes through :class:`StoreWriter`, which fills the arrays chunk by chunk and
writes the completion marker (``complete`` plus a checksum of all attributes and a
manifest of every chunk file's size) last. Reading goes through :func:`open_dictionary`,
which opens the store lazily (metadata only) and refuses anything that is not a complete,
intact dictionary of the current format and features version with a
:class:`~fingerprint.errors.DictionaryError`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.acquisition_scheme import AcquisitionScheme, acquisition_scheme_from_bvalues
from fingerprint.core.modeling_framework import MultiCompartmentModelProperties, model_from_spec
from fingerprint.errors import DictionaryError
from fingerprint.fitting.features import FEATURES_VERSION

if TYPE_CHECKING:
    import zarr

    from fingerprint.core.acquisition_scheme import AcquisitionScheme

logger = logging.getLogger(__name__)

__all__ = [
    "ARRAY_NAMES",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "Dictionary",
    "StoreWriter",
    "attrs_checksum",
    "current_features_version",
    "open_dictionary",
    "scheme_from_dict",
    "scheme_to_dict",
]

#: Value of the ``format`` attribute of every dictionary store.
FORMAT_NAME = "fingerprint-dictionary"
#: Version of the layout described in docs/dictionary-format.md.
FORMAT_VERSION = 1
#: The arrays of a dictionary, all with one row per atom.
ARRAY_NAMES = ("signals", "features", "parameters")
_DTYPES: dict[str, np.dtype] = {"signals": np.dtype("float32"), "features": np.dtype("float32"),
           "parameters": np.dtype("float64")}


def current_features_version() -> int:
    """``FEATURES_VERSION`` of the installed feature map (dictionaries must match it)."""
    return int(FEATURES_VERSION)


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays (recursively) to plain JSON types."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    return value


def attrs_checksum(attrs: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``attrs`` without its ``checksum`` entry."""
    body = {k: v for k, v in attrs.items() if k != "checksum"}
    text = json.dumps(_jsonable(body), sort_keys=True, separators=(",", ":"),
                      allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


# --------------------------------------------------------------------------- schemes
_SCHEME_ARRAYS = ("bvalues", "gradient_directions", "qvalues", "gradient_strengths",
                  "delta", "Delta", "TE")


def scheme_to_dict(scheme: AcquisitionScheme) -> dict[str, Any]:
    """Full arrays of an acquisition scheme as JSON-able lists (SI units)."""
    out: dict[str, Any] = {}
    for name in _SCHEME_ARRAYS:
        value = getattr(scheme, name, None)
        out[name] = None if value is None else np.asarray(value, dtype=float).tolist()
    out["b0_threshold"] = float(scheme.b0_threshold)
    min_dist = getattr(scheme, "min_b_shell_distance", None)
    out["min_b_shell_distance"] = None if min_dist is None else float(min_dist)
    shell_indices = getattr(scheme, "shell_indices", None)
    out["shell_indices"] = None if shell_indices is None else \
        np.asarray(shell_indices).astype(int).tolist()
    return out


def scheme_from_dict(data: Mapping[str, Any]) -> AcquisitionScheme:
    """Rebuild an :class:`AcquisitionScheme` from :func:`scheme_to_dict` output."""
    def arr(name: str) -> np.ndarray | None:
        value = data.get(name)
        return None if value is None else np.asarray(value, dtype=float)

    kwargs: dict[str, Any] = {"delta": arr("delta"), "Delta": arr("Delta"), "TE": arr("TE"),
                              "b0_threshold": float(data["b0_threshold"])}
    if data.get("min_b_shell_distance") is not None:
        kwargs["min_b_shell_distance"] = float(data["min_b_shell_distance"])
    bvalues, directions = arr("bvalues"), arr("gradient_directions")
    if bvalues is None or directions is None:
        raise DictionaryError("stored acquisition scheme lacks its bvalues or "
                              "gradient_directions")
    return acquisition_scheme_from_bvalues(bvalues, directions, **kwargs)


# --------------------------------------------------------------------------- writing
def _codecs() -> list[Any]:
    from zarr.codecs import BloscCodec, Crc32cCodec  # lazy: keeps zarr off import

    return [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()]


class StoreWriter:
    """Write one dictionary store at ``path`` (a directory that must not exist yet).

    Create, then :meth:`write` aligned row blocks (any order), then :meth:`finalize`
    with the attributes; the completion marker is written last, so a store whose
    writer died is recognisably incomplete.
    """

    def __init__(self, path: str | os.PathLike, n_atoms: int, n_signals: int,
                 n_features: int, n_parameters: int, chunk_atoms: int):
        import zarr  # lazy: keeps zarr off import

        self.path = Path(path)
        self.n_atoms = int(n_atoms)
        self.chunk_atoms = int(min(chunk_atoms, max(n_atoms, 1)))
        self._group = zarr.open_group(str(self.path), mode="w-", zarr_format=3)
        self._group.attrs.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                                  "complete": False})
        widths = {"signals": n_signals, "features": n_features, "parameters": n_parameters}
        self.arrays = {}
        for name in ARRAY_NAMES:
            self.arrays[name] = self._group.create_array(
                name, shape=(self.n_atoms, int(widths[name])),
                chunks=(self.chunk_atoms, max(int(widths[name]), 1)),
                dtype=_DTYPES[name], compressors=_codecs(), fill_value=np.nan,
                dimension_names=("atom", _COLUMN_DIMS[name]),
            )

    def write(self, start: int, *, signals: np.ndarray, features: np.ndarray,
              parameters: np.ndarray) -> None:
        """Write rows ``start .. start + len(signals) - 1`` of every array."""
        stop = start + len(signals)
        for name, block in (("signals", signals), ("features", features),
                            ("parameters", parameters)):
            if len(block) != stop - start:
                raise ValueError(f"{name} block has {len(block)} rows, expected {stop - start}")
            self.arrays[name][start:stop] = np.asarray(block, dtype=_DTYPES[name])

    def finalize(self, attrs: Mapping[str, Any]) -> dict[str, Any]:
        """Write the attributes, the chunk manifest, and last the completion marker."""
        body = dict(_jsonable(attrs))
        body.update({"format": FORMAT_NAME, "format_version": FORMAT_VERSION,
                     "n_atoms": self.n_atoms, "chunk_atoms": self.chunk_atoms,
                     "n_signals": int(self.arrays["signals"].shape[1]),
                     "n_features": int(self.arrays["features"].shape[1]),
                     "n_parameters": int(self.arrays["parameters"].shape[1]),
                     "chunk_manifest": _chunk_manifest(self.path, self.n_atoms,
                                                       self.chunk_atoms),
                     "complete": True})
        body.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat())
        body["checksum"] = attrs_checksum(body)
        # one write of zarr.json: the marker and the checksum land together, last
        self._group.attrs.put(body)
        return body


_COLUMN_DIMS = {"signals": "measurement", "features": "feature", "parameters": "parameter"}


def _chunk_files(path: Path, name: str, n_atoms: int, chunk_atoms: int) -> list[Path]:
    n_chunks = -(-n_atoms // chunk_atoms) if n_atoms else 0
    return [path / name / "c" / str(i) / "0" for i in range(n_chunks)]


def _chunk_manifest(path: Path, n_atoms: int, chunk_atoms: int) -> dict[str, list[int]]:
    out = {}
    for name in ARRAY_NAMES:
        sizes = []
        for f in _chunk_files(path, name, n_atoms, chunk_atoms):
            try:
                sizes.append(f.stat().st_size)
            except FileNotFoundError:
                raise DictionaryError(f"chunk {f} was not written") from None
        out[name] = sizes
    return out


# --------------------------------------------------------------------------- reading
class Dictionary:
    """An opened dictionary store (lazy: arrays are read on access, chunk by chunk).

    Attributes
    ----------
    path: the store directory.
    metadata: all attributes (dict).
    signals: zarr array (atoms, measurements) float32 -- signals of canonical atoms
        (orientation along z when the model has one orientation), S0 = 1; per shell for
        spherical-mean models.
    features: zarr array (atoms, k) float32 from ``FeatureMap.atom_features``.
    parameters: zarr array (atoms, parameter-vector length) float64, dmipy order, SI.
    """

    def __init__(self, path: Path, group: zarr.Group, metadata: dict[str, Any]):
        self.path = path
        self.metadata = metadata
        self._group = group
        self.signals = group["signals"]
        self.features = group["features"]
        self.parameters = group["parameters"]

    # ------------------------------------------------------------- description
    def __len__(self) -> int:
        return int(self.metadata["n_atoms"])

    @property
    def n_atoms(self) -> int:
        return int(self.metadata["n_atoms"])

    @property
    def key(self) -> str:
        return str(self.metadata.get("key", ""))

    @property
    def name(self) -> str | None:
        """Recipe name (``'noddi'``, ...) or None for a custom model."""
        return self.metadata.get("name")

    @property
    def parameter_names(self) -> list[str]:
        return list(self.metadata["parameter_names"])

    @property
    def parameter_cardinality(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.metadata["parameter_cardinality"].items()}

    @property
    def features_version(self) -> int:
        return int(self.metadata["features_version"])

    @property
    def canonical_orientation(self) -> bool:
        """True when atoms are stored with their single orientation along z."""
        return bool(self.metadata["canonical_orientation"])

    @property
    def sampling(self) -> dict[str, Any]:
        return dict(self.metadata["sampling"])

    @cached_property
    def model(self) -> MultiCompartmentModelProperties:
        """The model, rebuilt exactly from its stored spec."""
        try:
            return model_from_spec(self.metadata["model"])
        except Exception as exc:  # a spec this version cannot rebuild
            raise DictionaryError(
                f"dictionary {self.path}: cannot rebuild its model from the stored spec: {exc}"
            ) from exc

    @cached_property
    def scheme(self) -> AcquisitionScheme:
        """The acquisition scheme the atoms were simulated for."""
        scheme = scheme_from_dict(self.metadata["scheme"])
        stored = self.metadata.get("scheme_hash")
        if stored is not None and getattr(scheme, "hash", stored) != stored:
            raise DictionaryError(
                f"dictionary {self.path}: the stored scheme does not rebuild to the scheme "
                f"hash it was built for ({stored})")
        return scheme

    # ------------------------------------------------------------- reading data
    def _read(self, name: str, start: int, stop: int | None) -> np.ndarray:
        try:
            return np.asarray(self._group[name][start:stop])
        except Exception as exc:
            raise DictionaryError(
                f"dictionary {self.path}: cannot read {name!r} rows {start}..{stop}: {exc} "
                "(the store is corrupt; delete it and rebuild)") from exc

    def read_signals(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``signals`` as a numpy array (DictionaryError if corrupt)."""
        return self._read("signals", start, stop)

    def read_features(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``features`` as a numpy array (DictionaryError if corrupt)."""
        return self._read("features", start, stop)

    def read_parameters(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of ``parameters`` (DictionaryError if corrupt)."""
        return self._read("parameters", start, stop)

    def verify(self) -> None:
        """Read every chunk (each carries a CRC32C) and check for NaN rows; raise
        DictionaryError on the first problem. Costs a full read of the store."""
        step = int(self.metadata["chunk_atoms"])
        for name in ARRAY_NAMES:
            for start in range(0, self.n_atoms, step):
                block = self._read(name, start, start + step)
                if np.isnan(block).any():
                    raise DictionaryError(
                        f"dictionary {self.path}: {name!r} rows {start}.. hold missing values")

    def __reduce__(self):
        return (open_dictionary, (str(self.path),))

    def __repr__(self) -> str:
        return (f"Dictionary({str(self.path)!r}, name={self.name!r}, atoms={self.n_atoms}, "
                f"measurements={self.signals.shape[1]}, features={self.features.shape[1]})")


def read_attributes(path: str | os.PathLike) -> dict[str, Any]:
    """The attributes of the store at ``path``, read from its ``zarr.json`` (no validation
    beyond "is a Zarr v3 group"). Raises DictionaryError."""
    path = Path(path)
    meta_file = path / "zarr.json"
    if not path.exists():
        raise DictionaryError(f"no dictionary at {path}: the path does not exist")
    if not path.is_dir():
        raise DictionaryError(f"{path} is not a dictionary: expected a Zarr directory store")
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise DictionaryError(
            f"{path} is not a dictionary: it has no zarr.json (not a Zarr v3 store, or an "
            "interrupted build)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DictionaryError(f"dictionary {path}: zarr.json is unreadable or corrupt: "
                              f"{exc}") from None
    if not isinstance(meta, dict) or meta.get("zarr_format") != 3 or \
            meta.get("node_type") != "group":
        raise DictionaryError(f"{path} is not a dictionary: expected a Zarr v3 group")
    attrs = meta.get("attributes") or {}
    if not isinstance(attrs, dict):
        raise DictionaryError(f"dictionary {path}: corrupt attributes in zarr.json")
    return attrs


def validate_attributes(path: Path, attrs: Mapping[str, Any],
                        features_version: int | None = None) -> None:
    """Raise DictionaryError unless ``attrs`` describe a complete, intact dictionary of this
    format (and, when given, of this features version)."""
    if attrs.get("format") != FORMAT_NAME:
        raise DictionaryError(
            f"{path} is not a fingerprint dictionary (its 'format' attribute is "
            f"{attrs.get('format')!r}, expected {FORMAT_NAME!r})")
    version = attrs.get("format_version")
    if version != FORMAT_VERSION:
        raise DictionaryError(
            f"dictionary {path} has format version {version!r}; this fingerprint reads "
            f"version {FORMAT_VERSION}: rebuild it")
    if attrs.get("complete") is not True:
        raise DictionaryError(
            f"dictionary {path} is incomplete (its build was interrupted or is still "
            "running): delete it and rebuild")
    if attrs.get("checksum") != attrs_checksum(attrs):
        raise DictionaryError(
            f"dictionary {path} is corrupt: its attributes do not match their checksum")
    if features_version is not None and attrs.get("features_version") != features_version:
        raise DictionaryError(
            f"dictionary {path} was built with features version "
            f"{attrs.get('features_version')!r} but this fingerprint uses version "
            f"{features_version}: rebuild it")


def _check_arrays(path: Path, group: Any, attrs: Mapping[str, Any]) -> None:
    n_atoms = int(attrs["n_atoms"])
    widths = {"signals": attrs.get("n_signals"), "features": attrs.get("n_features"),
              "parameters": attrs.get("n_parameters")}
    for name in ARRAY_NAMES:
        try:
            arr = group[name]
        except Exception as exc:
            raise DictionaryError(f"dictionary {path}: array {name!r} is missing or "
                                  f"unreadable ({exc})") from None
        width = widths[name]
        if arr.shape[0] != n_atoms or (width is not None and arr.shape[1] != int(width)):
            raise DictionaryError(
                f"dictionary {path}: array {name!r} has shape {arr.shape}, expected "
                f"({n_atoms}, {widths[name]})")
        if np.dtype(arr.dtype) != _DTYPES[name]:
            raise DictionaryError(
                f"dictionary {path}: array {name!r} has dtype {arr.dtype}, expected "
                f"{_DTYPES[name]}")
    manifest = attrs.get("chunk_manifest") or {}
    chunk_atoms = int(attrs["chunk_atoms"])
    for name in ARRAY_NAMES:
        files = _chunk_files(path, name, n_atoms, chunk_atoms)
        sizes = manifest.get(name)
        if sizes is None or len(sizes) != len(files):
            raise DictionaryError(f"dictionary {path}: corrupt chunk manifest for {name!r}")
        for f, size in zip(files, sizes, strict=True):
            try:
                actual = f.stat().st_size
            except FileNotFoundError:
                raise DictionaryError(
                    f"dictionary {path} is truncated: chunk file {f} is missing") from None
            if actual != size:
                raise DictionaryError(
                    f"dictionary {path} is truncated or corrupt: chunk file {f} has "
                    f"{actual} bytes, expected {size}")


def open_dictionary(path: str | os.PathLike, *,
                    check_features_version: bool = True) -> Dictionary:
    """Open the dictionary at ``path`` lazily (metadata only) and validate it.

    Raises :class:`~fingerprint.errors.DictionaryError` with a clear message when the path
    is missing, not a Zarr v3 store, a foreign store, incomplete (interrupted build),
    truncated (missing or short chunk files), corrupt (attribute checksum), of another
    format version, or built with another features version. Chunks also carry CRC32C
    checksums, verified when read.
    """
    import zarr  # lazy: keeps zarr off import

    path = Path(path)
    attrs = read_attributes(path)
    fv = current_features_version() if check_features_version else None
    validate_attributes(path, attrs, fv)
    try:
        group = zarr.open_group(str(path), mode="r", zarr_format=3)
    except Exception as exc:
        raise DictionaryError(f"dictionary {path}: cannot open the Zarr store: {exc}") from exc
    _check_arrays(path, group, attrs)
    return Dictionary(path, group, dict(attrs))
