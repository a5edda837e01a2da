"""Gradient-table readers and writers: FSL bval/bvec, Camino ``.scheme``, MRtrix ``-grad``.

Every reader returns an immutable :class:`~fingerprint.core.acquisition_scheme.AcquisitionScheme`
in SI units and every error names the file and what was expected.

Units of the formats:

* FSL ``.bval``: b-values in s/mm², one row (a single column is accepted too);
  ``.bvec``: unit vectors as 3 rows × N columns (N rows × 3 columns is accepted too).
* Camino ``.scheme``: SI units. ``VERSION: BVECTOR`` rows are ``gx gy gz b`` (b in s/m²);
  ``VERSION: STEJSKALTANNER`` rows are ``gx gy gz |G| DELTA delta TE`` (T/m and s). A TE
  column of zeros means "unknown".
* MRtrix ``-grad`` / ``dw_scheme`` tables: N rows ``x y z b`` with b in s/mm². The vectors
  are in scanner (real-space) coordinates, unlike FSL's image-axis bvecs; no conversion
  between the two is attempted here (it needs the image orientation).

Vectors are normalised on reading; measurements at b = 0 get zero vectors, and so do
NaN or zero vectors of measurements at or below ``b0_threshold`` (a note is logged);
measurements with 0 < b <= ``b0_threshold`` keep their direction, which the forward models
use (the threshold only decides which measurements normalise S0). A logged warning
flags b-values that look like they are in the wrong unit.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fingerprint.core.acquisition_scheme import (
    DEFAULT_B0_THRESHOLD,
    AcquisitionScheme,
    acquisition_scheme_from_bvalues,
    acquisition_scheme_from_gradient_strengths,
    b_from_g,
)
from fingerprint.core.backends import register_backend
from fingerprint.core.scheme_checks import check_gradient_table
from fingerprint.errors import InputError

if TYPE_CHECKING:
    from numpy.typing import ArrayLike

__all__ = [
    "read_bvals_bvecs",
    "read_fsl_gradients",
    "read_camino_scheme",
    "read_mrtrix_grad",
    "write_bvals_bvecs",
    "write_camino_scheme",
    "write_mrtrix_grad",
]

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

# b-values (s/mm²) above this in an FSL/MRtrix file are almost certainly s/m²
_MAX_PLAUSIBLE_B_S_PER_MM2 = 1e6
# b-values (s/m²) below this (but positive) in a Camino file are almost certainly s/mm²
_MIN_PLAUSIBLE_BMAX_S_PER_M2 = 1e6


# --------------------------------------------------------------------------- parsing
def _read_text(path: PathLike, what: str) -> str:
    p = Path(path)
    if not p.exists():
        raise InputError(f"{what} file {p} does not exist")
    if not p.is_file():
        raise InputError(f"{what} file {p} is not a regular file")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {what} file {p}: {exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{what} file {p} is not a text file (expected whitespace-separated "
                         "numbers)") from None


def _parse_rows(text: str, path: PathLike, what: str, comment: str = "#"
                ) -> list[tuple[int, list[float]]]:
    """Non-empty, non-comment lines as (line number, floats)."""
    rows: list[tuple[int, list[float]]] = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split(comment, 1)[0].replace(",", " ").strip()
        if not line:
            continue
        try:
            values = [float(tok) for tok in line.split()]
        except ValueError:
            raise InputError(f"{what} file {path}, line {lineno}: expected numbers, got "
                             f"{raw.strip()[:60]!r}") from None
        rows.append((lineno, values))
    return rows


def _matrix(rows: list[tuple[int, list[float]]], path: PathLike, what: str) -> np.ndarray:
    if not rows:
        raise InputError(f"{what} file {path} contains no numbers")
    width = len(rows[0][1])
    for lineno, values in rows:
        if len(values) != width:
            raise InputError(f"{what} file {path}, line {lineno}: {len(values)} values where "
                             f"the first line has {width} (every line needs the same count)")
    return np.array([v for _, v in rows], dtype=float)


def _check_finite(arr: np.ndarray, path: PathLike, what: str) -> None:
    bad = ~np.isfinite(arr)
    if bad.any():
        raise InputError(f"{what} file {path} contains non-finite values (NaN or inf)")


def _check_nonnegative_b(b: np.ndarray, path: PathLike, what: str) -> None:
    neg = np.flatnonzero(b < 0)
    if neg.size:
        raise InputError(f"{what} file {path}: b-values must be zero or positive; "
                         f"{b[neg[0]]:g} at measurement {int(neg[0])}")


def _warn_if_si(b_s_per_mm2: np.ndarray, path: PathLike, strict: bool = False) -> None:
    """Log a warning (InputError when ``strict``) when b-values read from a format that
    stores s/mm² look like s/m²."""
    bmax = float(b_s_per_mm2.max()) if b_s_per_mm2.size else 0.0
    if bmax > _MAX_PLAUSIBLE_B_S_PER_MM2:
        message = (f"{path}: b-values reach {bmax:g}; this format stores s/mm², these look "
                   "like s/m² (divide them by 1e6)")
        if strict:
            raise InputError(message)
        logger.warning("%s", message)


def _directions(vectors: np.ndarray, b_si: np.ndarray, b0_threshold: float,
                path: PathLike, what: str) -> np.ndarray:
    """Normalised vectors for every measurement with b > 0 that has one; zero rows for
    b = 0 and for NaN or zero vectors at or below the b=0 threshold (logged as notes).

    The checks are :func:`fingerprint.core.scheme_checks.check_gradient_table`'s: its
    refusals (a zero or NaN vector above the threshold) are an InputError naming the file.
    """
    findings = check_gradient_table(b_si, vectors, b0_threshold, f"{what} file {path}")
    refused = [f.message for f in findings if f.level == "refuse"]
    if refused:
        raise InputError("; ".join(refused))
    for f in findings:
        (logger.warning if f.level == "warn" else logger.info)("%s", f.message)
    finite = np.isfinite(vectors).all(axis=1)
    vecs = np.where(finite[:, None], vectors, 0.0)
    norms = np.linalg.norm(vecs, axis=1)
    keep = (b_si > 0) & (norms >= 1e-8)
    out = np.zeros_like(vecs)
    out[keep] = vecs[keep] / norms[keep, None]
    return out


def read_fsl_gradients(bval_path: PathLike, bvec_path: PathLike
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The raw contents of an FSL bval/bvec pair: b-values (N,) in s/mm² and vectors
    (N, 3) as written (not normalised; NaN kept). Parse errors name the file."""
    b = _read_bvals(bval_path)
    return b, _read_bvecs(bvec_path, b.size, bval_path)


def _b0_threshold(scheme_kwargs: dict[str, Any]) -> float:
    return float(scheme_kwargs.get("b0_threshold", DEFAULT_B0_THRESHOLD))


# --------------------------------------------------------------------------- FSL
def _read_bvals(path: PathLike) -> np.ndarray:
    rows = _parse_rows(_read_text(path, "bval"), path, "bval")
    if not rows:
        raise InputError(f"bval file {path} contains no b-values")
    widths = {len(v) for _, v in rows}
    if len(rows) > 1 and widths != {1}:
        raise InputError(f"bval file {path} must hold one row of b-values (or one column); "
                         f"found {len(rows)} rows of {sorted(widths)} values")
    b = np.array([x for _, v in rows for x in v], dtype=float)
    _check_finite(b, path, "bval")
    _check_nonnegative_b(b, path, "bval")
    return b


def _read_bvecs(path: PathLike, n: int, bval_path: PathLike) -> np.ndarray:
    vecs = _matrix(_parse_rows(_read_text(path, "bvec"), path, "bvec"), path, "bvec")
    bad = np.isinf(vecs)
    if bad.any():
        raise InputError(f"bvec file {path} contains infinite values")
    # NaN is accepted here: it is refused for diffusion-weighted measurements only (a b=0
    # direction is irrelevant), see _directions
    if vecs.shape == (3, n):
        return vecs.T.copy()
    if vecs.shape == (n, 3):
        return vecs
    if 3 in vecs.shape:
        count = vecs.shape[1] if vecs.shape[0] == 3 else vecs.shape[0]
        raise InputError(f"bvec file {path} has {count} vectors but bval file {bval_path} has "
                         f"{n} b-values")
    raise InputError(f"bvec file {path} must hold 3 rows (x, y, z) of {n} values, or {n} "
                     f"rows of 3 values; found {vecs.shape[0]} rows of {vecs.shape[1]} values")


def read_bvals_bvecs(bval_path: PathLike, bvec_path: PathLike, delta: ArrayLike | None = None,
                     Delta: ArrayLike | None = None, TE: ArrayLike | None = None, *,
                     strict_units: bool = False, **scheme_kwargs: Any) -> AcquisitionScheme:
    """Read an FSL bval/bvec pair into an :class:`AcquisitionScheme` (SI units).

    Parameters
    ----------
    bval_path, bvec_path: the FSL files (b in s/mm²; bvecs 3×N or N×3).
    delta, Delta, TE: optional pulse duration, separation and echo time in seconds
        (scalar or one per measurement).
    strict_units: b-values that look like s/m² are an InputError naming the bval file
        instead of a logged warning (what the command line and the server use).
    scheme_kwargs: ``b0_threshold`` / ``min_b_shell_distance`` in s/m².
    """
    unknown = set(scheme_kwargs) - {"b0_threshold", "min_b_shell_distance"}
    if unknown:
        raise TypeError(f"read_bvals_bvecs got unexpected keyword arguments {sorted(unknown)}")
    b = _read_bvals(bval_path)
    _warn_if_si(b, bval_path, strict=strict_units)
    vecs = _read_bvecs(bvec_path, b.size, bval_path)
    b_si = b * 1e6
    dirs = _directions(vecs, b_si, _b0_threshold(scheme_kwargs), bvec_path, "bvec")
    try:
        return acquisition_scheme_from_bvalues(b_si, dirs, delta=delta, Delta=Delta, TE=TE,
                                               **scheme_kwargs)
    except InputError as exc:
        raise InputError(f"{bval_path} / {bvec_path}: {exc}") from None


def _fmt(value: float) -> str:
    return np.format_float_positional(float(value), unique=True, trim="-")


def write_bvals_bvecs(scheme: AcquisitionScheme, bval_path: PathLike,
                      bvec_path: PathLike) -> None:
    """Write ``scheme`` as FSL files: b-values in s/mm² (one row), bvecs 3×N."""
    if not isinstance(scheme, AcquisitionScheme):
        raise InputError(f"write_bvals_bvecs needs an AcquisitionScheme, got "
                         f"{type(scheme).__name__}")
    b = np.asarray(scheme.bvalues) / 1e6
    Path(bval_path).write_text(" ".join(_fmt(x) for x in b) + "\n")
    dirs = np.asarray(scheme.gradient_directions)
    Path(bvec_path).write_text(
        "\n".join(" ".join(_fmt(x) for x in dirs[:, k]) for k in range(3)) + "\n")


# --------------------------------------------------------------------------- Camino
_CAMINO_VERSIONS = {"BVECTOR": "BVECTOR", "1": "BVECTOR",
                    "STEJSKALTANNER": "STEJSKALTANNER", "2": "STEJSKALTANNER"}


def read_camino_scheme(path: PathLike, min_b_shell_distance: float | None = None,
                       b0_threshold: float | None = None) -> AcquisitionScheme:
    """Read a Camino ``.scheme`` file (``VERSION: BVECTOR`` or ``VERSION: STEJSKALTANNER``).

    Without a VERSION line the layout is inferred from the column count (4 or 7).
    ``min_b_shell_distance`` / ``b0_threshold`` (s/m²) default to the scheme defaults.
    """
    text = _read_text(path, "Camino scheme")
    version: str | None = None
    body: list[str] = []
    for raw in text.splitlines():
        stripped = raw.strip()
        if stripped.upper().startswith("VERSION"):
            key = stripped.split(":", 1)[1].strip().upper() if ":" in stripped else ""
            if key not in _CAMINO_VERSIONS:
                raise InputError(f"Camino scheme file {path}: unsupported {stripped!r} "
                                 "(expected VERSION: BVECTOR or VERSION: STEJSKALTANNER)")
            version = _CAMINO_VERSIONS[key]
            body.append("")
        else:
            body.append(raw)
    table = _matrix(_parse_rows("\n".join(body), path, "Camino scheme"), path, "Camino scheme")
    _check_finite(table[:, 3:], path, "Camino scheme")
    if version is None:
        inferred = {4: "BVECTOR", 7: "STEJSKALTANNER"}.get(table.shape[1])
        if inferred is None:
            raise InputError(f"Camino scheme file {path} has no VERSION line and "
                             f"{table.shape[1]} columns (expected 4 for BVECTOR or 7 for "
                             "STEJSKALTANNER)")
        logger.info("%s has no VERSION line; reading it as %s", path, inferred)
        version = inferred
    expected = 4 if version == "BVECTOR" else 7
    if table.shape[1] != expected:
        layout = "gx gy gz b" if version == "BVECTOR" else "gx gy gz |G| DELTA delta TE"
        raise InputError(f"Camino scheme file {path}: VERSION: {version} needs {expected} "
                         f"columns ({layout}); found {table.shape[1]}")
    kwargs: dict[str, Any] = {}
    if min_b_shell_distance is not None:
        kwargs["min_b_shell_distance"] = float(min_b_shell_distance)
    if b0_threshold is not None:
        kwargs["b0_threshold"] = float(b0_threshold)
    threshold = _b0_threshold(kwargs)
    try:
        if version == "BVECTOR":
            b = table[:, 3]
            _check_nonnegative_b(b, path, "Camino scheme")
            bmax = float(b.max())
            if 0.0 < bmax < _MIN_PLAUSIBLE_BMAX_S_PER_M2:
                logger.warning("%s: b-values reach only %g; Camino stores s/m², these look "
                               "like s/mm² (multiply them by 1e6)", path, bmax)
            dirs = _directions(table[:, :3], b, threshold, path, "Camino scheme")
            return acquisition_scheme_from_bvalues(b, dirs, **kwargs)
        g, Delta, delta, TE = table[:, 3], table[:, 4], table[:, 5], table[:, 6]
        neg = np.flatnonzero(g < 0)
        if neg.size:
            raise InputError(f"Camino scheme file {path}: gradient strength |G| must be zero "
                             f"or positive; {g[neg[0]]:g} at measurement {int(neg[0])}")
        te = None if np.all(TE == 0) else TE
        # b is only known after the conversion; b0s are those with tiny b
        b = b_from_g(g, delta, Delta)
        dirs = _directions(table[:, :3], np.where(g > 0, b, 0.0), threshold, path,
                           "Camino scheme")
        return acquisition_scheme_from_gradient_strengths(g, dirs, delta, Delta, te, **kwargs)
    except InputError as exc:
        if str(path) in str(exc):
            raise
        raise InputError(f"Camino scheme file {path}: {exc}") from None


def write_camino_scheme(scheme: AcquisitionScheme, path: PathLike,
                        version: str | None = None) -> None:
    """Write ``scheme`` as a Camino ``.scheme`` file (SI units).

    ``version`` is ``"STEJSKALTANNER"`` (needs delta and Delta; the default when they are
    known) or ``"BVECTOR"``. An unknown TE is written as 0.
    """
    has_timing = scheme.delta is not None and scheme.Delta is not None
    version = (version or ("STEJSKALTANNER" if has_timing else "BVECTOR")).upper()
    dirs = np.asarray(scheme.gradient_directions)
    lines: list[str]
    if version == "BVECTOR":
        lines = ["#g_x g_y g_z b[s/m^2]", "VERSION: BVECTOR"]
        lines += [" ".join(_fmt(x) for x in (*d, b))
                  for d, b in zip(dirs, scheme.bvalues, strict=True)]
    elif version == "STEJSKALTANNER":
        G, Delta, delta = scheme.gradient_strengths, scheme.Delta, scheme.delta
        if G is None or Delta is None or delta is None:  # no pulse timing
            raise InputError("a STEJSKALTANNER scheme file needs delta and Delta; this scheme "
                             "has no pulse timing (write VERSION: BVECTOR instead)")
        n = scheme.number_of_measurements
        te = np.zeros(n) if scheme.TE is None else np.asarray(scheme.TE)
        lines = ["#g_x g_y g_z |G|[T/m] DELTA[s] delta[s] TE[s]", "VERSION: STEJSKALTANNER"]
        for i in range(n):
            row = (*dirs[i], G[i], Delta[i], delta[i], te[i])
            lines.append(" ".join(_fmt(x) for x in row))
    else:
        raise InputError(f"unknown Camino scheme version {version!r} (expected BVECTOR or "
                         "STEJSKALTANNER)")
    Path(path).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- MRtrix
def read_mrtrix_grad(path: PathLike, delta: ArrayLike | None = None, Delta: ArrayLike | None = None,
                     TE: ArrayLike | None = None, **scheme_kwargs: Any) -> AcquisitionScheme:
    """Read an MRtrix gradient table (N rows ``x y z b``, b in s/mm²).

    delta, Delta, TE: optional timings in seconds; scheme_kwargs: ``b0_threshold`` /
    ``min_b_shell_distance`` in s/m².
    """
    unknown = set(scheme_kwargs) - {"b0_threshold", "min_b_shell_distance"}
    if unknown:
        raise TypeError(f"read_mrtrix_grad got unexpected keyword arguments {sorted(unknown)}")
    table = _matrix(_parse_rows(_read_text(path, "MRtrix gradient"), path, "MRtrix gradient"),
                    path, "MRtrix gradient")
    if table.shape[1] != 4:
        raise InputError(f"MRtrix gradient file {path} must have 4 columns (x y z b[s/mm²]); "
                         f"found {table.shape[1]}")
    _check_finite(table[:, 3:], path, "MRtrix gradient")
    b = table[:, 3]
    _check_nonnegative_b(b, path, "MRtrix gradient")
    _warn_if_si(b, path)
    b_si = b * 1e6
    dirs = _directions(table[:, :3], b_si, _b0_threshold(scheme_kwargs), path,
                       "MRtrix gradient")
    try:
        return acquisition_scheme_from_bvalues(b_si, dirs, delta=delta, Delta=Delta, TE=TE,
                                               **scheme_kwargs)
    except InputError as exc:
        raise InputError(f"MRtrix gradient file {path}: {exc}") from None


def write_mrtrix_grad(scheme: AcquisitionScheme, path: PathLike) -> None:
    """Write ``scheme`` as an MRtrix gradient table (``x y z b``, b in s/mm²)."""
    dirs = np.asarray(scheme.gradient_directions)
    b = np.asarray(scheme.bvalues) / 1e6
    lines = ["# x y z b[s/mm^2]"]
    lines += [" ".join(_fmt(x) for x in (*d, bb)) for d, bb in zip(dirs, b, strict=True)]
    Path(path).write_text("\n".join(lines) + "\n")


register_backend("read_camino_scheme", read_camino_scheme)
register_backend("write_camino_scheme", write_camino_scheme)
