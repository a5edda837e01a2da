"""The checks of submitted jobs that need the library: the model's name, the pulse timing
it needs, the acquisition scheme; and the library's messages made public.

The library names files by path in its messages; here the server's private upload paths
are replaced by the form field names the client used, and the field at fault is reported.
The form fields themselves are parsed by :mod:`server.forms`, the uploads' headers and
data checked by :mod:`server.limits` (the library's ``validate_inputs`` and scheme
checks, under the server's limits).
"""

from __future__ import annotations

import re
from pathlib import Path

from fingerprint.core.acquisition_scheme import AcquisitionScheme
from fingerprint.errors import UnknownModelError
from fingerprint.fitting.pipeline import read_fsl_scheme
from fingerprint.models import available_models, get_recipe, requires_timing
from fingerprint.volume_models import is_volume_model

from .errors import ApiError

__all__ = ["check_model", "check_timing", "public_message", "validate_scheme"]


def check_model(name: str) -> str:
    """The catalogue name of model ``name`` (422 naming the known models otherwise)."""
    if is_volume_model(name):  # fitted per volume (mc_csd), not from a recipe
        return name.strip().lower().replace("-", "_")
    try:
        return get_recipe(name).name
    except UnknownModelError as exc:
        raise ApiError(422, str(exc) or f"unknown model {name!r}; known models: "
                       f"{', '.join(available_models())}", "model") from None
    except ValueError as exc:
        raise ApiError(422, str(exc), "model") from None


def check_timing(model: str, timing: dict[str, float]) -> None:
    """422 on the ``delta`` field when model ``model`` needs pulse timing the form lacks
    (otherwise the job would be accepted and fail when it runs)."""
    if is_volume_model(model):
        return
    if requires_timing(model) and ("delta" not in timing or "Delta" not in timing):
        raise ApiError(422, f"model {model!r} needs the pulse timing of the acquisition: give "
                            f"the 'delta' and 'Delta' form fields (seconds)", "delta")


def public_message(message: str, files: dict[str, Path]) -> tuple[str, str | None]:
    """``message`` with the server's paths of ``files`` replaced by their field names,
    and the field at fault (the first named, else the first mentioned)."""
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


def validate_scheme(files: dict[str, Path], timing: dict[str, float] | None = None,
                    b0_threshold: float | None = None) -> AcquisitionScheme:
    """Read an uploaded bval/bvec pair as an acquisition scheme (422 on bad input);
    ``timing`` in s, ``b0_threshold`` in s/mm² (the form field's unit)."""
    values = {k: v for k, v in (timing or {}).items() if k in ("delta", "Delta", "TE")}
    threshold = None if b0_threshold is None else float(b0_threshold) * 1e6
    try:
        return read_fsl_scheme(str(files["bval"]), str(files["bvec"]), **values,
                               b0_threshold=threshold)
    except ImportError:  # a broken installation is the server's fault, not the client's
        raise
    except Exception as exc:  # an unreadable scheme is the client's problem
        message, field = public_message(str(exc) or type(exc).__name__, files)
        raise ApiError(422, f"invalid acquisition scheme: {message}", field) from None
