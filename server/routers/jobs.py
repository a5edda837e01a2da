"""/v1/jobs: submit, list, inspect, download and delete fitting jobs."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import threading
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ..dependencies import ApiError, CallerKey, Context, ServerContext
from ..limits import (
    InputLimits,
    Stopped,
    check_disk,
    check_fit_upload,
    disk_full_error,
    is_disk_full,
)
from ..schemas import ErrorBody, JobList, JobOut, job_out
from ..storage import (
    DRAIN_LIMIT,
    FileField,
    UploadError,
    UploadTimeouts,
    _drain,
    receive_multipart,
)
from ..validation import (
    b0_threshold_field,
    check_model,
    check_timing,
    int_field,
    prefix_field,
    timing_fields,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])

JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")
JobId = Annotated[str, PathParam(description="job id", max_length=64)]

FIT_FILES = {
    "dwi": FileField("dwi", nifti=True),
    "bval": FileField("dwi.bval"),
    "bvec": FileField("dwi.bvec"),
    "mask": FileField("mask", nifti=True, required=False),
}
FIT_TEXT = {"model", "threads", "dictionary_size", "prefix", "delta", "Delta", "TE",
            "b0_threshold"}

_ERRORS = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    404: {"model": ErrorBody, "description": "no such job (or not yours)"},
}

_FIT_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["dwi", "bval", "bvec"],
            "additionalProperties": False,
            "properties": {
                "dwi": {"type": "string", "format": "binary",
                        "description": "4-D diffusion-weighted NIfTI (.nii or .nii.gz)"},
                "bval": {"type": "string", "format": "binary",
                         "description": "FSL bval file (s/mm²)"},
                "bvec": {"type": "string", "format": "binary", "description": "FSL bvec file"},
                "mask": {"type": "string", "format": "binary",
                         "description": "optional 3-D brain mask NIfTI"},
                "model": {"type": "string", "default": "noddi",
                          "description": "named model (GET /v1/models)"},
                "threads": {"type": "integer", "minimum": 1, "maximum": 256,
                            "description": "threads for this job"},
                "dictionary_size": {"type": "integer", "minimum": 1,
                                    "description": "atoms in the dictionary (default: the "
                                                   "model's)"},
                "prefix": {"type": "string",
                           "description": "BIDS prefix of the output files (sub-01_ses-1)"},
                "delta": {"type": "number",
                          "description": "gradient pulse duration (s), for models that "
                                         "need timing"},
                "Delta": {"type": "number", "description": "gradient pulse separation (s)"},
                "TE": {"type": "number", "description": "echo time (s)"},
                "b0_threshold": {"type": "number", "minimum": 0, "default": 10,
                                 "description": "b-value (s/mm²) at or below which "
                                                "measurements are the b=0 reference that "
                                                "normalises S0; the forward models use "
                                                "every measurement's own b-value"},
            },
        }}},
    }
}


def _owned_job(ctx: ServerContext, key_id: str, job_id: str) -> dict[str, Any]:
    job = ctx.db.get_job(job_id) if JOB_ID_PATTERN.match(job_id) else None
    if job is None or job["owner"] != key_id or job["deleted"]:
        raise ApiError(404, f"no job {job_id}")
    return job


async def _reject_before_body(request: Request, status: int, detail: str,
                              field: str | None = None) -> None:
    """Answer without storing the body, after reading (and discarding) a bounded part of
    it so the client sees the response."""
    await _drain(request.stream(), DRAIN_LIMIT)
    raise ApiError(status, detail, field)


@contextlib.asynccontextmanager
async def upload_slot(request: Request, ctx: ServerContext, key_id: str
                      ) -> AsyncIterator[None]:
    """Hold one of the key's (and the server's) upload slots for the whole request: 429
    with ``Retry-After`` when none is free (the body is then only briefly drained)."""
    if ctx.gate is None:  # set by the application's lifespan
        raise RuntimeError("the server has no upload gate")
    try:
        slot = ctx.gate.slot(key_id)
        slot.__enter__()
    except ApiError:
        await _drain(request.stream(), DRAIN_LIMIT, 2.0)
        raise
    try:
        yield
    finally:
        slot.__exit__(None, None, None)


async def receive_job_upload(request: Request, ctx: ServerContext, key_id: str,
                             files: dict[str, FileField], text: set[str]):
    """Check the per-key limit and the disk reserve, then stream the form into a fresh
    upload directory. Returns (upload, upload_dir); the caller owns (and removes on
    error) the directory."""
    settings = ctx.settings
    limit = settings.max_jobs_per_key
    if await run_in_threadpool(ctx.db.count_active, key_id) >= limit:
        await _reject_before_body(request, 429, f"this API key already has {limit} queued or "
                                                "running jobs; wait for one to finish")
    try:
        check_disk(ctx.storage.tmp_dir, settings.disk_reserve_bytes, "to store an upload")
    except ApiError:
        await _drain(request.stream(), DRAIN_LIMIT, 2.0)
        raise
    try:
        upload_dir = ctx.storage.new_upload_dir()
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error("to store an upload") from None
        raise
    timeouts = UploadTimeouts(min_rate=settings.min_upload_rate_kb * 1024,
                              grace=settings.upload_grace_seconds,
                              max_seconds=settings.max_upload_seconds)
    try:
        upload = await receive_multipart(request, upload_dir, file_fields=files,
                                         text_fields=text, max_bytes=settings.max_upload_bytes,
                                         timeouts=timeouts,
                                         disk_reserve=settings.disk_reserve_bytes)
    except UploadError as exc:
        shutil.rmtree(upload_dir, ignore_errors=True)
        raise ApiError(exc.status_code, exc.detail, exc.field, exc.headers) from None
    except BaseException:
        shutil.rmtree(upload_dir, ignore_errors=True)
        raise
    return upload, upload_dir


@contextlib.asynccontextmanager
async def client_watch(request: Request) -> AsyncIterator[threading.Event]:
    """An event set when the client disconnects (polled while the body is complete)."""
    gone = threading.Event()

    async def watch() -> None:
        while not gone.is_set():
            try:
                if await request.is_disconnected():
                    gone.set()
                    return
            except Exception:  # no way to tell: keep going
                return
            await asyncio.sleep(0.25)

    task = asyncio.create_task(watch())
    try:
        yield gone
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def run_checks(request: Request, ctx: ServerContext, files: dict[str, Path],
                     timing: dict[str, float], *, model: str | None = None,
                     b0_threshold: float | None = None) -> None:
    """The checks made while the client waits (headers, the scheme against ``model`` with
    ``b0_threshold`` in s/mm², mask voxels), in a thread, under the server's time limit;
    stopped when the client goes away."""
    limits = InputLimits.from_settings(ctx.settings)
    deadline = time.monotonic() + ctx.settings.check_seconds
    async with client_watch(request) as gone:
        try:
            await run_in_threadpool(check_fit_upload, files, timing, limits,
                                    deadline=deadline, should_stop=gone.is_set, model=model,
                                    b0_threshold=b0_threshold)
        except Stopped:
            raise ApiError(400, "the client disconnected during the checks") from None


def check_dictionary_size(ctx: ServerContext, key: Any, model: str, size: int | None,
                          field: str) -> None:
    """Only admin keys may ask for dictionaries larger than the non-admin limit (the
    model's own size unless configured): 403 naming the limit."""
    if size is None or key.is_admin:
        return
    limit = ctx.settings.max_user_dictionary_size
    what = "the server's limit for non-admin keys"
    if limit is None:
        from fingerprint.models import get_recipe

        limit = int(get_recipe(model).sampling_spec().size)
        what = f"the default size of model {model!r}, the limit for non-admin keys"
    if size > limit:
        raise ApiError(403, f"'{field}' {size:,} is above {what} ({limit:,} atoms); ask an "
                            "admin to build a larger dictionary", field)


def accept_job(ctx: ServerContext, key_id: str, upload_dir: Path, *, kind: str, model: str,
               options: dict[str, Any], inputs: dict[str, str]) -> dict[str, Any]:
    """Move a validated upload into place and queue the job (429 over the per-key limit,
    507 when the disk is full: nothing is left behind)."""
    check_disk(ctx.storage.jobs_dir, ctx.settings.disk_reserve_bytes, "to create the job")
    job_id = ctx.db.new_job_id()
    try:
        ctx.storage.promote(upload_dir, job_id)
        job = ctx.db.insert_job(job_id, owner=key_id, kind=kind, model=model, options=options,
                                inputs=inputs, max_active=ctx.settings.max_jobs_per_key)
    except Exception as exc:
        ctx.storage.remove_job(job_id)
        if is_disk_full(exc):
            raise disk_full_error("to create the job") from None
        raise
    if job is None:
        ctx.storage.remove_job(job_id)
        raise ApiError(429, f"this API key already has {ctx.settings.max_jobs_per_key} queued "
                            "or running jobs; wait for one to finish")
    ctx.dispatcher.wake()
    return job


def accepted(job: dict[str, Any]) -> JSONResponse:
    body = job_out(job).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})


@router.post("", status_code=202, response_model=JobOut, openapi_extra=_FIT_BODY,
             summary="Submit a fitting job",
             responses={**_ERRORS,
                        400: {"model": ErrorBody, "description": "malformed multipart body"},
                        403: {"model": ErrorBody,
                              "description": "dictionary size reserved to admins"},
                        408: {"model": ErrorBody, "description": "upload too slow"},
                        413: {"model": ErrorBody,
                              "description": "upload, or its decompressed DWI, too large"},
                        415: {"model": ErrorBody, "description": "not multipart/form-data"},
                        422: {"model": ErrorBody, "description": "invalid input"},
                        429: {"model": ErrorBody,
                              "description": "too many active jobs or uploads (Retry-After)"},
                        507: {"model": ErrorBody, "description": "server disk full"}})
async def submit_job(request: Request, ctx: Context, key: CallerKey) -> JSONResponse:
    """Upload a DWI (+ bval, bvec, optional mask) and queue a fit. Headers, counts, units,
    the mask and the per-job limits are checked before the job is accepted (in bounded
    memory and time); the data themselves (finite values, b=0 signal) are checked by the
    job before it fits. The answer is 202 with the job and its ``Location``."""
    async with upload_slot(request, ctx, key.id):
        upload, upload_dir = await receive_job_upload(request, ctx, key.id, FIT_FILES,
                                                      FIT_TEXT)
        try:
            fields = upload.fields
            model = check_model(fields.get("model") or ctx.settings.default_model)
            options: dict[str, Any] = {}
            threads = int_field(fields, "threads", low=1, high=256)
            if threads is not None:
                options["threads"] = threads
            size = int_field(fields, "dictionary_size", low=1,
                             high=ctx.settings.max_dictionary_size)
            check_dictionary_size(ctx, key, model, size, "dictionary_size")
            if size is not None:
                options["dictionary_size"] = size
            prefix = prefix_field(fields)
            if prefix is not None:
                options["prefix"] = prefix
            timing = timing_fields(fields)
            check_timing(model, timing)
            options.update(timing)
            b0_threshold = b0_threshold_field(fields)
            if b0_threshold is not None:  # s/mm² on the form, s/m² in the fit options
                options["b0_threshold"] = b0_threshold * 1e6
            await run_checks(request, ctx, upload.files, timing, model=model,
                             b0_threshold=b0_threshold)
            inputs = {name: path.name for name, path in upload.files.items()}
            job = await run_in_threadpool(accept_job, ctx, key.id, upload_dir, kind="fit",
                                          model=model, options=options, inputs=inputs)
        except BaseException:
            shutil.rmtree(upload_dir, ignore_errors=True)
            raise
    return accepted(job)


@router.get("", response_model=JobList, summary="List your jobs", responses=_ERRORS)
def list_jobs(ctx: Context, key: CallerKey,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
              cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$",
                                                  description="next_cursor of the "
                                                              "previous page")] = None,
              status: Annotated[str | None, Query(
                  pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
              kind: Annotated[str | None, Query(pattern="^(fit|dictionary)$")] = None,
              ) -> JobList:
    """The caller's jobs, newest first; page with ``limit``/``offset`` or with
    ``cursor`` (the previous page's ``next_cursor``)."""
    before = int(cursor) if cursor is not None else None
    rows, total = ctx.db.list_jobs(key.id, limit=limit, offset=offset, before_seq=before,
                                   kind=kind, status=status)
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1]["seq"]
        more, _ = ctx.db.list_jobs(key.id, limit=1, before_seq=last, kind=kind, status=status)
        if more:
            next_cursor = str(last)
    return JobList(items=[job_out(r) for r in rows], total=total, limit=limit, offset=offset,
                   next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, summary="Job status", responses=_ERRORS)
def get_job(job_id: JobId, ctx: Context, key: CallerKey) -> JobOut:
    """Status (queued, running, succeeded, failed, cancelled), progress and timestamps."""
    return job_out(_owned_job(ctx, key.id, job_id))


def _finished_fit(ctx: ServerContext, key_id: str, job_id: str) -> dict[str, Any]:
    job = _owned_job(ctx, key_id, job_id)
    if job["kind"] != "fit":
        raise ApiError(409, f"job {job_id} builds a dictionary and has no result files")
    if job["status"] != "succeeded":
        raise ApiError(409, f"job {job_id} is {job['status']}; results exist only for "
                            "succeeded jobs")
    return job


def _zip_stream(directory: Path, names: list[str]) -> Iterator[bytes]:
    """Yield a ZIP archive of ``directory/names`` as it is written (never whole in
    memory). Files are stored, not recompressed (the maps are gzipped already)."""

    class _Sink:
        def __init__(self) -> None:
            self.buffer = bytearray()

        def write(self, data: bytes) -> int:
            self.buffer += data
            return len(data)

        def flush(self) -> None:
            pass

        def take(self) -> bytes:
            data = bytes(self.buffer)
            self.buffer.clear()
            return data

    sink = _Sink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_STORED) as archive:
        for name in names:
            path = directory / name
            info = zipfile.ZipInfo.from_file(path, arcname=name)
            info.compress_type = (zipfile.ZIP_STORED if name.endswith(".gz")
                                  else zipfile.ZIP_DEFLATED)
            with open(path, "rb") as src, archive.open(info, "w", force_zip64=True) as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
                    if len(sink.buffer) >= 1 << 20:
                        yield sink.take()
            yield sink.take()
    yield sink.take()


@router.get("/{job_id}/results", summary="Download all result files (ZIP)",
            response_class=StreamingResponse,
            responses={**_ERRORS, 200: {"content": {"application/zip": {}},
                                        "description": "ZIP of the maps and sidecars"},
                       409: {"model": ErrorBody, "description": "job not succeeded"}})
def get_results(job_id: JobId, ctx: Context, key: CallerKey) -> StreamingResponse:
    """A ZIP of the BIDS-derivative maps and their JSON sidecars, streamed."""
    job = _finished_fit(ctx, key.id, job_id)
    directory = ctx.storage.outputs_dir(job_id)
    missing = [n for n in job["outputs"] if not (directory / n).is_file()]
    if missing:
        raise ApiError(410, f"the result files of job {job_id} are gone ({missing[0]})")
    return StreamingResponse(
        _zip_stream(directory, list(job["outputs"])), media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'})


@router.get("/{job_id}/results/{file_name}", summary="Download one result file",
            responses={**_ERRORS, 200: {"content": {"application/gzip": {},
                                                    "application/json": {}}},
                       409: {"model": ErrorBody, "description": "job not succeeded"}})
def get_result_file(job_id: JobId, file_name: str, ctx: Context, key: CallerKey) -> Response:
    """One output file, by a name listed in the job's ``files``."""
    job = _finished_fit(ctx, key.id, job_id)
    # the name is only compared with the job's own output list, never joined to a path
    matches = [n for n in job["outputs"] if n == file_name]
    if not matches:
        raise ApiError(404, f"job {job_id} has no result file named {file_name[:200]!r}")
    name = matches[0]
    path = ctx.storage.outputs_dir(job_id) / name
    if not path.is_file():
        raise ApiError(410, f"the result file {name} of job {job_id} is gone")
    media = ("application/json" if name.endswith(".json") else
             "application/gzip" if name.endswith(".gz") else "application/octet-stream")
    return FileResponse(path, media_type=media, filename=Path(name).name)


@router.delete("/{job_id}", response_model=JobOut, summary="Cancel and delete a job",
               responses={**_ERRORS, 202: {"model": JobOut,
                                           "description": "still stopping; files are removed "
                                                          "when it has"}})
async def delete_job(job_id: JobId, ctx: Context, key: CallerKey) -> JSONResponse:
    """Cancel the job if it is queued or running, then delete its files. The answer is
    the job's last state (200), or 202 if a running job has not stopped yet (its files
    are removed as soon as it does). Afterwards the job is gone (404)."""
    job = await run_in_threadpool(_owned_job, ctx, key.id, job_id)
    if job["status"] in ("queued", "running"):
        await run_in_threadpool(ctx.storage.request_cancel, job_id)
        job = await run_in_threadpool(ctx.db.request_cancel, job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ctx.settings.cancel_wait_seconds
        while job["status"] == "running" and loop.time() < deadline:
            await asyncio.sleep(0.05)
            job = await run_in_threadpool(ctx.db.get_job, job_id)
    await run_in_threadpool(ctx.db.mark_deleted, job_id)
    # re-read after marking: a job that finished meanwhile is cleaned up here, one still
    # running by the dispatcher when it stops
    job = await run_in_threadpool(ctx.db.get_job, job_id)
    if job["status"] == "running":
        body = job_out(job).model_dump()
        return JSONResponse(body, status_code=202)
    await run_in_threadpool(ctx.storage.remove_job, job_id)
    body = job_out(job).model_dump()
    body["files"] = []
    body["links"] = {}
    return JSONResponse(body, status_code=200)
