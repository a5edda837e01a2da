"""/v1/dictionaries: prebuild (admin) and list dictionaries."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from fingerprint.dictionary import list_dictionaries as stored_dictionaries

from ..dependencies import AdminKey, CallerKey, Context
from ..forms import DictionaryForm, multipart_body
from ..schemas import DictionaryInfo, ErrorBody, JobOut
from ..services import accept_job, accepted, check_dictionary_size, job_upload
from ..storage import FileField
from ..validation import validate_scheme

router = APIRouter(prefix="/dictionaries", tags=["dictionaries"])

SCHEME_FILES = {"bval": FileField("scheme.bval"), "bvec": FileField("scheme.bvec")}

_BODY = multipart_body(DictionaryForm, {"bval": ("FSL bval file (s/mm²)", True),
                                        "bvec": ("FSL bvec file", True)})


@router.post("", status_code=202, response_model=JobOut, openapi_extra=_BODY,
             summary="Prebuild a dictionary (admin)",
             responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody},
                        413: {"model": ErrorBody}, 422: {"model": ErrorBody},
                        429: {"model": ErrorBody}})
async def build_dictionary(request: Request, ctx: Context, key: AdminKey) -> JSONResponse:
    """Queue the build of a model's dictionary for an acquisition scheme (bval + bvec,
    optional pulse timing). The build is a job: follow it at ``/v1/jobs/{id}``."""
    async with job_upload(request, ctx, key, SCHEME_FILES, DictionaryForm) as sent:
        check_dictionary_size(ctx, key, sent.model, sent.form.size, "size")
        options: dict[str, Any] = {"seed": sent.form.seed, **sent.timing}
        if sent.form.size is not None:
            options["size"] = sent.form.size
        await run_in_threadpool(validate_scheme, sent.upload.files, sent.timing)
        inputs = {name: path.name for name, path in sent.upload.files.items()}
        job = await run_in_threadpool(accept_job, ctx, key.id, sent.directory,
                                      kind="dictionary", model=sent.model, options=options,
                                      inputs=inputs)
    return accepted(job)


def _info(entry: dict[str, Any], directory: Path) -> DictionaryInfo:
    """The library's summary of a store, without server paths."""

    def public(key: str, value: object) -> object:
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
    directory = ctx.settings.resolved_dictionary_dir
    entries = stored_dictionaries(directory)
    if not key.is_admin:
        used = ctx.db.dictionaries_used_by(key.id)
        entries = [e for e in entries if Path(e["path"]).name in used]
    return [_info(e, directory) for e in entries]
