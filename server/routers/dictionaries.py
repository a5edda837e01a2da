"""/v1/dictionaries: prebuild (admin) and list dictionaries."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..dependencies import AdminKey, CallerKey, Context
from ..schemas import DictionaryInfo, ErrorBody, JobOut
from ..storage import FileField
from ..validation import check_model, check_timing, int_field, timing_fields, validate_scheme
from .jobs import accept_job, accepted, receive_job_upload, upload_slot

router = APIRouter(prefix="/dictionaries", tags=["dictionaries"])

SCHEME_FILES = {"bval": FileField("scheme.bval"), "bvec": FileField("scheme.bvec")}
SCHEME_TEXT = {"model", "size", "seed", "delta", "Delta", "TE"}

_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["bval", "bvec"],
            "additionalProperties": False,
            "properties": {
                "bval": {"type": "string", "format": "binary",
                         "description": "FSL bval file (s/mm²)"},
                "bvec": {"type": "string", "format": "binary", "description": "FSL bvec file"},
                "model": {"type": "string", "default": "noddi"},
                "size": {"type": "integer", "minimum": 1,
                         "description": "atoms (default: the model's)"},
                "seed": {"type": "integer", "minimum": 0},
                "delta": {"type": "number", "description": "gradient pulse duration (s)"},
                "Delta": {"type": "number", "description": "gradient pulse separation (s)"},
                "TE": {"type": "number", "description": "echo time (s)"},
            },
        }}},
    }
}


@router.post("", status_code=202, response_model=JobOut, openapi_extra=_BODY,
             summary="Prebuild a dictionary (admin)",
             responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody},
                        413: {"model": ErrorBody}, 422: {"model": ErrorBody},
                        429: {"model": ErrorBody}})
async def build_dictionary(request: Request, ctx: Context, key: AdminKey) -> JSONResponse:
    """Queue the build of a model's dictionary for an acquisition scheme (bval + bvec,
    optional pulse timing). The build is a job: follow it at ``/v1/jobs/{id}``."""
    async with upload_slot(request, ctx, key.id):
        upload, upload_dir = await receive_job_upload(request, ctx, key.id, SCHEME_FILES,
                                                      SCHEME_TEXT)
        try:
            fields = upload.fields
            model = check_model(fields.get("model") or ctx.settings.default_model)
            options: dict[str, Any] = {
                "size": int_field(fields, "size", low=1,
                                  high=ctx.settings.max_dictionary_size),
                "seed": int_field(fields, "seed", low=0, high=2**31 - 1) or 0,
                **timing_fields(fields),
            }
            options = {k: v for k, v in options.items() if v is not None}
            check_timing(model, options)
            await run_in_threadpool(validate_scheme, upload.files, options)
            inputs = {name: path.name for name, path in upload.files.items()}
            job = await run_in_threadpool(accept_job, ctx, key.id, upload_dir,
                                          kind="dictionary", model=model, options=options,
                                          inputs=inputs)
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
    return accepted(job)


def _info(entry: dict[str, Any], directory: Path) -> DictionaryInfo:
    """The library's summary of a store, without server paths."""

    def public(key: str, value: Any) -> Any:
        if isinstance(value, str):
            if key.endswith("path") and "/" in value:
                return Path(value).name
            return value.replace(str(directory), "<dictionaries>")
        return value

    details = {k: public(k, v) for k, v in entry.items() if k not in ("path", "valid")}
    return DictionaryInfo(name=Path(entry["path"]).name, valid=bool(entry.get("valid")),
                          details=details)


@router.get("", response_model=list[DictionaryInfo], summary="List stored dictionaries",
            responses={401: {"model": ErrorBody}})
def list_dictionaries(ctx: Context, key: CallerKey) -> list[DictionaryInfo]:
    """The dictionaries in the server's dictionary directory, oldest first: all of them
    for admin keys, for other keys only those their own jobs used."""
    from fingerprint.dictionary import list_dictionaries as _list

    directory = ctx.settings.resolved_dictionary_dir
    entries = _list(directory)
    if not key.is_admin:
        used = _used_by(ctx, key.id)
        entries = [e for e in entries if Path(e["path"]).name in used]
    return [_info(e, directory) for e in entries]


def _used_by(ctx: Context, key_id: str) -> set[str]:
    """Names of the dictionaries the jobs of ``key_id`` used (or built)."""
    rows = ctx.db.connect().execute(
        "SELECT result FROM jobs WHERE owner = ? AND status = 'succeeded'",
        (key_id,)).fetchall()
    names = set()
    for (text,) in rows:
        try:
            name = json.loads(text or "{}").get("dictionary")
        except (ValueError, AttributeError):
            continue
        if isinstance(name, str):
            names.add(name)
    return names
