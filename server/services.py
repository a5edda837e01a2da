"""What the job routes share: receiving a job's upload under the server's limits,
running the checks made while the client waits, and queueing the job.

Routers import this module (and :mod:`server.dependencies`), never each other.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from fingerprint.fitting.options import FitOptions
from fingerprint.models import get_recipe
from fingerprint.volume_models import is_volume_model

from .auth import ApiKey
from .db import Job, JobKind
from .dependencies import ServerContext
from .errors import ApiError
from .forms import ModelForm, parse_form
from .limits import (
    InputLimits,
    Stopped,
    check_disk,
    check_fit_upload,
    disk_full_error,
    is_disk_full,
)
from .schemas import job_out
from .storage import DRAIN_LIMIT, FileField, Upload, UploadTimeouts, drain, receive_multipart
from .validation import check_model, check_timing

__all__ = ["JOB_ID_PATTERN", "JobUpload", "accept_job", "accepted", "check_dictionary_size",
           "client_watch", "finished_fit", "job_upload", "owned_job", "receive_job_upload",
           "run_checks", "upload_slot"]

#: Job ids: 32 lower-case hex digits (anything else is answered 404 without a lookup).
JOB_ID_PATTERN = re.compile(r"^[0-9a-f]{32}$")


def owned_job(ctx: ServerContext, key_id: str, job_id: str) -> Job:
    """The job ``job_id`` of key ``key_id`` (404 when unknown, deleted or another key's)."""
    job = ctx.db.get_job(job_id) if JOB_ID_PATTERN.match(job_id) else None
    if job is None or job.owner != key_id or job.deleted:
        raise ApiError(404, f"no job {job_id[:64]}")
    return job


def finished_fit(ctx: ServerContext, key_id: str, job_id: str, what: str) -> Job:
    """The caller's succeeded fit job (404 when unknown, 409 when it is another kind or
    not finished); ``what`` names what the caller wants (``result files``, ``maps``)."""
    job = owned_job(ctx, key_id, job_id)
    if job.kind != "fit":
        raise ApiError(409, f"job {job_id} builds a dictionary and has no {what}")
    if job.status != "succeeded":
        raise ApiError(409, f"job {job_id} is {job.status}; {what} exist only for "
                            "succeeded jobs")
    return job


async def _reject_before_body(request: Request, status: int, detail: str,
                              field: str | None = None) -> None:
    """Answer without storing the body, after reading (and discarding) a bounded part of
    it so the client sees the response."""
    await drain(request.stream(), DRAIN_LIMIT)
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
        await drain(request.stream(), DRAIN_LIMIT, 2.0)
        raise
    try:
        yield
    finally:
        slot.__exit__(None, None, None)


async def receive_job_upload(request: Request, ctx: ServerContext, key_id: str,
                             files: dict[str, FileField], text: set[str]
                             ) -> tuple[Upload, Path]:
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
        await drain(request.stream(), DRAIN_LIMIT, 2.0)
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
    except BaseException:
        shutil.rmtree(upload_dir, ignore_errors=True)
        raise
    return upload, upload_dir


M = TypeVar("M", bound=ModelForm)


@dataclass(frozen=True)
class JobUpload(Generic[M]):
    """A job's upload, received and checked as far as the form goes: its files (in
    ``directory``, which the job takes over), its parsed form, the model's catalogue name
    and the pulse timing (s)."""

    upload: Upload
    directory: Path
    form: M
    model: str
    timing: dict[str, float]


@contextlib.asynccontextmanager
async def job_upload(request: Request, ctx: ServerContext, key: ApiKey,
                     files: dict[str, FileField], form: type[M]) -> AsyncIterator[JobUpload[M]]:
    """Receive a job's multipart form (in one of the key's upload slots, under the
    server's limits), parse its text fields as ``form`` and check its model and the
    timing that model needs (422 naming the field). The upload directory is removed when
    the block raises (a job that was accepted has moved it away)."""
    async with upload_slot(request, ctx, key.id):
        upload, directory = await receive_job_upload(request, ctx, key.id, files,
                                                     set(form.model_fields))
        try:
            parsed = parse_form(form, upload.fields)
            model = check_model(parsed.model or ctx.settings.default_model)
            timing = parsed.timing()
            check_timing(model, timing)
            yield JobUpload(upload, directory, parsed, model, timing)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise


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
                     b0_threshold: float | None = None,
                     options: FitOptions | None = None) -> None:
    """The checks made while the client waits (headers, the scheme against ``model`` with
    ``b0_threshold`` in s/mm², mask voxels under the limit of a fit of ``model`` with
    ``options``), in a thread, under the server's time limit; stopped when the client goes
    away."""
    limits = InputLimits.from_settings(ctx.settings, model, options)
    deadline = time.monotonic() + ctx.settings.check_seconds
    async with client_watch(request) as gone:
        try:
            await run_in_threadpool(check_fit_upload, files, timing, limits,
                                    deadline=deadline, should_stop=gone.is_set, model=model,
                                    b0_threshold=b0_threshold)
        except Stopped:
            raise ApiError(400, "the client disconnected during the checks") from None


def check_dictionary_size(ctx: ServerContext, key: ApiKey, model: str, size: int | None,
                          field: str) -> None:
    """Sizes above the server's largest (``max_dictionary_size``) are 422; only admin
    keys may ask for dictionaries larger than the non-admin limit (the model's own size
    unless configured): 403 naming the limit."""
    if size is None:
        return
    if is_volume_model(model):
        raise ApiError(422, f"model {model!r} uses no dictionary: leave '{field}' out", field)
    top = ctx.settings.max_dictionary_size
    if size > top:
        raise ApiError(422, f"'{field}' must be between 1 and {top}, got {size}", field)
    if key.is_admin:
        return
    limit = ctx.settings.max_user_dictionary_size
    what = "the server's limit for non-admin keys"
    if limit is None:
        limit = int(get_recipe(model).sampling_spec().size)
        what = f"the default size of model {model!r}, the limit for non-admin keys"
    if size > limit:
        raise ApiError(403, f"'{field}' {size:,} is above {what} ({limit:,} atoms); ask an "
                            "admin to build a larger dictionary", field)


def accept_job(ctx: ServerContext, key_id: str, upload_dir: Path, *, kind: JobKind,
               model: str, options: dict[str, Any], inputs: dict[str, str]) -> Job:
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


def accepted(job: Job) -> JSONResponse:
    """202 with the job and its ``Location``."""
    body = job_out(job).model_dump()
    return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})
