"""/v1/jobs: submit, list, inspect, download and delete fitting jobs."""

from __future__ import annotations

import asyncio
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from ..db import Job, JobKind, JobStatus
from ..dependencies import ApiError, CallerKey, Context
from ..forms import FitForm, check_multi_tissue, fit_options, multipart_body
from ..schemas import ErrorBody, JobList, JobOut, Responses, job_out
from ..services import (
    accept_job,
    accepted,
    check_dictionary_size,
    finished_fit,
    job_upload,
    owned_job,
    run_checks,
)
from ..storage import FileField

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobId = Annotated[str, PathParam(description="job id", max_length=64)]

FIT_FILES = {
    "dwi": FileField("dwi", nifti=True),
    "bval": FileField("dwi.bval"),
    "bvec": FileField("dwi.bvec"),
    "mask": FileField("mask", nifti=True, required=False),
}

_ERRORS: Responses = {
    401: {"model": ErrorBody, "description": "missing or invalid API key"},
    404: {"model": ErrorBody, "description": "no such job (or not yours)"},
}

_FIT_BODY = multipart_body(FitForm, {
    "dwi": ("4-D diffusion-weighted NIfTI (.nii or .nii.gz)", True),
    "bval": ("FSL bval file (s/mm²)", True),
    "bvec": ("FSL bvec file", True),
    "mask": ("optional 3-D brain mask NIfTI", False),
})


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
    async with job_upload(request, ctx, key, FIT_FILES, FitForm) as sent:
        form = sent.form
        check_dictionary_size(ctx, key, sent.model, getattr(form, "dictionary_size", None),
                              "dictionary_size")
        # the fit options, validated once by the library (b0_threshold: s/mm² on the
        # form, s/m² in the options)
        fit, options = fit_options(form, b0_threshold=form.b0_threshold)
        if fit.multi_tissue is not None:
            check_multi_tissue(sent.model, fit.multi_tissue)
        if form.prefix is not None:
            options["prefix"] = form.prefix
        options.update(sent.timing)
        await run_checks(request, ctx, sent.upload.files, sent.timing, model=sent.model,
                         b0_threshold=form.b0_threshold, options=fit)
        inputs = {name: path.name for name, path in sent.upload.files.items()}
        job = await run_in_threadpool(accept_job, ctx, key.id, sent.directory, kind="fit",
                                      model=sent.model, options=options, inputs=inputs)
    return accepted(job)


@router.get("", response_model=JobList, summary="List your jobs", responses=_ERRORS)
def list_jobs(ctx: Context, key: CallerKey,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
              cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,18}$",
                                                  description="next_cursor of the "
                                                              "previous page")] = None,
              status: Annotated[JobStatus | None, Query()] = None,
              kind: Annotated[JobKind | None, Query()] = None,
              ) -> JobList:
    """The caller's jobs, newest first; page with ``limit``/``offset`` or with
    ``cursor`` (the previous page's ``next_cursor``)."""
    before = int(cursor) if cursor is not None else None
    rows, total = ctx.db.list_jobs(key.id, limit=limit, offset=offset, before_seq=before,
                                   kind=kind, status=status)
    next_cursor = None
    if len(rows) == limit:
        last = rows[-1].seq
        more, _ = ctx.db.list_jobs(key.id, limit=1, before_seq=last, kind=kind, status=status)
        if more:
            next_cursor = str(last)
    return JobList(items=[job_out(r) for r in rows], total=total, limit=limit, offset=offset,
                   next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut, summary="Job status", responses=_ERRORS)
def get_job(job_id: JobId, ctx: Context, key: CallerKey) -> JobOut:
    """Status (queued, running, succeeded, failed, cancelled), progress and timestamps."""
    return job_out(owned_job(ctx, key.id, job_id))


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

        def close(self) -> None:
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
    job = finished_fit(ctx, key.id, job_id, "result files")
    directory = ctx.storage.outputs_dir(job_id)
    missing = [n for n in job.outputs if not (directory / n).is_file()]
    if missing:
        raise ApiError(410, f"the result files of job {job_id} are gone ({missing[0]})")
    return StreamingResponse(
        _zip_stream(directory, list(job.outputs)), media_type="application/zip",
        headers={"Content-Disposition": f'attachment; filename="{job_id}.zip"'})


@router.get("/{job_id}/results/{file_name}", summary="Download one result file",
            responses={**_ERRORS, 200: {"content": {"application/gzip": {},
                                                    "application/json": {}}},
                       409: {"model": ErrorBody, "description": "job not succeeded"}})
def get_result_file(job_id: JobId, file_name: str, ctx: Context, key: CallerKey) -> Response:
    """One output file, by a name listed in the job's ``files``."""
    job = finished_fit(ctx, key.id, job_id, "result files")
    # the name is only compared with the job's own output list, never joined to a path
    matches = [n for n in job.outputs if n == file_name]
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
    job: Job | None = await run_in_threadpool(owned_job, ctx, key.id, job_id)
    if job is not None and job.active:
        await run_in_threadpool(ctx.storage.request_cancel, job_id)
        job = await run_in_threadpool(ctx.db.request_cancel, job_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + ctx.settings.cancel_wait_seconds
        while job is not None and job.status == "running" and loop.time() < deadline:
            await asyncio.sleep(0.05)
            job = await run_in_threadpool(ctx.db.get_job, job_id)
    await run_in_threadpool(ctx.db.mark_deleted, job_id)
    # re-read after marking: a job that finished meanwhile is cleaned up here, one still
    # running by the dispatcher when it stops
    job = await run_in_threadpool(ctx.db.get_job, job_id)
    if job is None:  # pragma: no cover - rows are never removed
        raise ApiError(404, f"no job {job_id}")
    if job.status == "running":
        body = job_out(job).model_dump()
        return JSONResponse(body, status_code=202)
    await run_in_threadpool(ctx.storage.remove_job, job_id)
    body = job_out(job).model_dump()
    body["files"] = []
    body["links"] = {}
    return JSONResponse(body, status_code=200)
