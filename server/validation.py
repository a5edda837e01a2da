"""Checks of submitted jobs, run before a job is accepted (headers, counts, units, then one
pass over the data for truncation and NaN).

The library names files by path in its messages; here the server's private upload paths
are replaced by the form field names the client used, and the field at fault is reported.
"""

from __future__ import annotations

import importlib
import logging
import re
from pathlib import Path
from typing import Any

from fingerprint.errors import FingerprintError, UnknownModelError
from fingerprint.fitting.options import PREFIX_PATTERN, TIMING_LIMITS_S

from .errors import ApiError

logger = logging.getLogger(__name__)

__all__ = ["b0_threshold_field", "check_model", "check_timing", "float_field", "int_field",
           "prefix_field", "timing_fields", "validate_fit", "validate_scheme"]

_PREFIX_RE = PREFIX_PATTERN


def int_field(fields: dict[str, str], name: str, *, low: int, high: int) -> int | None:
    raw = fields.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(422, f"'{name}' must be an integer, got {raw[:40]!r}", name) from None
    if not low <= value <= high:
        raise ApiError(422, f"'{name}' must be between {low} and {high}, got {value}", name)
    return value


def float_field(fields: dict[str, str], name: str, *, low: float, high: float,
                unit: str) -> float | None:
    raw = fields.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, f"'{name}' must be a number ({unit}), got {raw[:40]!r}",
                       name) from None
    if not low < value < high:
        raise ApiError(422, f"'{name}' must be in {unit}, between {low:g} and {high:g}; got "
                            f"{value:g}", name)
    return value


def prefix_field(fields: dict[str, str]) -> str | None:
    raw = fields.get("prefix")
    if not raw:
        return None
    if not _PREFIX_RE.match(raw):
        raise ApiError(422, "'prefix' must be 1-64 letters, digits, '_' or '-' (a BIDS "
                            "entity string such as sub-01_ses-1)", "prefix")
    return raw


def timing_fields(fields: dict[str, str]) -> dict[str, float]:
    """The optional pulse timing of a form (``delta``, ``Delta``, ``TE``, in s)."""
    values = {name: float_field(fields, name, low=0, high=limit, unit="seconds")
              for name, limit in TIMING_LIMITS_S.items()}
    return {k: v for k, v in values.items() if v is not None}


def b0_threshold_field(fields: dict[str, str]) -> float | None:
    """The optional ``b0_threshold`` form field: a b-value in s/mm² (like the bval file) at
    or below which measurements are the b=0 reference (default 10 s/mm²)."""
    raw = fields.get("b0_threshold")
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(422, f"'b0_threshold' must be a b-value in s/mm², got {raw[:40]!r}",
                       "b0_threshold") from None
    if not 0.0 <= value < 1e5:  # also false for NaN
        raise ApiError(422, "'b0_threshold' must be a b-value in s/mm² between 0 and 1e5; "
                            f"got {value:g}", "b0_threshold")
    return value


def check_model(name: str) -> str:
    """The catalogue name of model ``name`` (422 naming the known models otherwise)."""
    from fingerprint.models import available_models, get_recipe

    try:
        return get_recipe(name).name
    except UnknownModelError as exc:
        raise ApiError(422, str(exc) or f"unknown model {name!r}; known models: "
                       f"{', '.join(available_models())}", "model") from None
    except ValueError as exc:
        raise ApiError(422, str(exc), "model") from None


def check_timing(model: str, timing: dict[str, Any]) -> None:
    """422 on the ``delta`` field when model ``model`` needs pulse timing the form lacks
    (otherwise the job would be accepted and fail when it runs)."""
    from fingerprint.models import requires_timing

    if requires_timing(model) and ("delta" not in timing or "Delta" not in timing):
        raise ApiError(422, f"model {model!r} needs the pulse timing of the acquisition: give "
                            f"the 'delta' and 'Delta' form fields (seconds)", "delta")


def _rewrite(message: str, files: dict[str, Path]) -> tuple[str, str | None]:
    """Replace server paths by field names; return the message and the field at fault."""
    field = None
    # longest paths first so 'dwi.nii.gz' is not half-replaced by a shorter match
    for name, path in sorted(files.items(), key=lambda kv: -len(str(kv[1]))):
        for text in (str(path), path.name):
            if text in message:
                field = field or name
                message = message.replace(text, f"'{name}'")
    if field is None:
        lowered = message.lower()
        for name in ("mask", "bvec", "bval", "dwi"):
            if name in files and re.search(rf"\b{name}", lowered):
                field = name
                break
    return message, field


def validate_fit(files: dict[str, Path], timing: dict[str, float] | None = None,
                 model: str | None = None, b0_threshold: float | None = None) -> Any:
    """Run the library's ``validate_inputs`` on the uploaded files (422 on bad input):
    headers, shapes, b-value counts and units, the scheme checks against ``model``
    (refusals such as NODDI on a single shell or a missing b=0, whose message suggests a
    ``b0_threshold``), then one pass over the data (truncated files, NaN or infinite
    signals in the mask). ``b0_threshold`` is in s/mm² (the form field's unit)."""
    validate_inputs = importlib.import_module("fingerprint.fitting.pipeline").validate_inputs
    extra: dict[str, Any] = {}
    if model is not None:
        extra["model"] = model
    if b0_threshold is not None:
        extra["b0_threshold"] = float(b0_threshold) * 1e6

    try:
        return validate_inputs(str(files["dwi"]), str(files["bval"]), str(files["bvec"]),
                               mask=str(files["mask"]) if "mask" in files else None,
                               **(timing or {}), **extra)
    except ImportError:  # a broken installation is the server's fault, not the client's
        raise
    except Exception as exc:  # anything unreadable in the uploads is the client's problem
        if not isinstance(exc, (FingerprintError, ValueError, OSError, EOFError)):
            logger.info("validate_inputs raised %s for an upload", type(exc).__name__)
        message, field = _rewrite(str(exc) or type(exc).__name__, files)
        raise ApiError(422, f"invalid input: {message}", field) from None


def validate_scheme(files: dict[str, Path], timing: dict[str, Any] | None = None,
                    b0_threshold: float | None = None) -> Any:
    """Read an uploaded bval/bvec pair as an acquisition scheme (422 on bad input);
    ``b0_threshold`` in s/mm² (the form field's unit)."""
    read_fsl_scheme = importlib.import_module("fingerprint.fitting.pipeline").read_fsl_scheme
    timing = {k: v for k, v in (timing or {}).items() if k in ("delta", "Delta", "TE")}
    if b0_threshold is not None:
        timing["b0_threshold"] = float(b0_threshold) * 1e6
    try:
        return read_fsl_scheme(str(files["bval"]), str(files["bvec"]), **timing)
    except ImportError:
        raise
    except Exception as exc:  # an unreadable scheme is the client's problem
        message, field = _rewrite(str(exc) or type(exc).__name__, files)
        raise ApiError(422, f"invalid acquisition scheme: {message}", field) from None
