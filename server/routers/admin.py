"""/v1/admin: API keys (list, create, revoke) and the server's workers and queue, for
admin keys only. The same operations as ``fingerprint keys``, for the web page."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from ..auth import ApiKey, create_key, list_keys, revoke_key
from ..db import Job, JobStatus
from ..dependencies import AdminKey, ApiError, CallerKey, Context
from ..schemas import ErrorBody, ExecutorInfo, Queue, QueuedJob, QueueLimits, Responses, job_stage

router = APIRouter(prefix="/admin", tags=["admin"])
#: ``/v1/me`` (any valid key)
me_router = APIRouter(tags=["keys"])

__all__ = ["KeyCreate", "KeyCreated", "KeyOut", "Me", "me_router", "router"]

_ERRORS: Responses = {401: {"model": ErrorBody, "description": "missing or invalid API key"},
           403: {"model": ErrorBody, "description": "not an admin key"}}


class KeyOut(BaseModel):
    """An API key's public record (never the secret)."""

    id: str
    name: str
    is_admin: bool
    created: str
    revoked: str | None = None


class KeyCreate(BaseModel):
    """A new key: its unique name and whether it is an admin key."""

    name: str = Field(..., min_length=1, max_length=64,
                      description="1-64 letters, digits, '.', '_', '@' or '-'")
    admin: bool = False


class KeyCreated(KeyOut):
    """A key just created, with the key itself: shown this once, never again."""

    key: str


class Me(BaseModel):
    """The caller's own key."""

    id: str
    name: str
    is_admin: bool


def _out(key: ApiKey) -> KeyOut:
    return KeyOut(id=key.id, name=key.name, is_admin=key.is_admin, created=key.created,
                  revoked=key.revoked)


@me_router.get("/me", response_model=Me, summary="The caller's key",
            responses={401: _ERRORS[401]})
def whoami(key: CallerKey) -> Me:
    """The name of the caller's key and whether it is an admin key (any valid key)."""
    return Me(id=key.id, name=key.name, is_admin=key.is_admin)


@router.get("/keys", response_model=list[KeyOut], summary="List API keys (admin)",
            responses=_ERRORS)
def get_keys(ctx: Context, key: AdminKey) -> list[KeyOut]:
    """Every key, active or revoked, oldest first (never their secrets)."""
    return [_out(k) for k in list_keys(ctx.db)]


@router.post("/keys", response_model=KeyCreated, status_code=201,
             summary="Create an API key (admin)",
             responses={**_ERRORS, 409: {"model": ErrorBody, "description": "name taken"},
                        422: {"model": ErrorBody, "description": "invalid name"}})
def post_key(body: KeyCreate, ctx: Context, key: AdminKey) -> JSONResponse:
    """Create a key; the answer carries the key itself, which cannot be shown again."""
    if ctx.db.find_key(body.name) is not None:
        raise ApiError(409, f"a key named {body.name!r} already exists", "name")
    try:
        record, token = create_key(ctx.db, body.name, admin=body.admin)
    except ValueError as exc:
        raise ApiError(422, str(exc), "name") from None
    out = KeyCreated(**_out(record).model_dump(), key=token)
    return JSONResponse(out.model_dump(), status_code=201,
                        headers={"Cache-Control": "no-store"})


@router.delete("/keys/{key_id}", response_model=KeyOut, summary="Revoke an API key (admin)",
               responses={**_ERRORS, 404: {"model": ErrorBody, "description": "no such key"},
                          409: {"model": ErrorBody, "description": "the caller's own key"}})
def delete_key(key_id: Annotated[str, PathParam(max_length=64, description="key id or name")],
               ctx: Context, key: AdminKey) -> KeyOut:
    """Revoke a key (by id or name); it stops working at once. An admin cannot revoke
    the key it is using."""
    row = ctx.db.find_key(key_id)
    if row is None:
        raise ApiError(404, f"no API key named or with id {key_id[:64]!r}")
    if row["id"] == key.id:
        raise ApiError(409, "this is the key you are using; revoke it with another admin key")
    return _out(revoke_key(ctx.db, row["id"]))


@router.get("/queue", response_model=Queue, summary="Workers and queue (admin)",
            responses=_ERRORS)
def get_queue(ctx: Context, key: AdminKey) -> Queue:
    """The executor (mode, worker processes, health) and every queued or running job,
    of all keys (owner by key name; no file names)."""
    ok, message = ctx.dispatcher.health()
    names = {k.id: k.name for k in list_keys(ctx.db)}

    def row(job: Job) -> QueuedJob:
        stage, stage_progress = job_stage(job.kind, job.status, job.progress)
        return QueuedJob(id=job.id, owner=names.get(job.owner, job.owner), kind=job.kind,
                         model=job.model, status=job.status, stage=stage,
                         stage_progress=stage_progress, progress=job.progress,
                         created=job.created, started=job.started)

    def rows(status: JobStatus) -> list[QueuedJob]:
        return [row(j) for j in ctx.db.jobs_with_status(status) if not j.deleted]

    settings = ctx.settings
    return Queue(
        executor=ExecutorInfo(healthy=ok, message=message, mode=ctx.dispatcher.mode,
                              workers=settings.workers,
                              threads_per_job=settings.threads_per_job,
                              dask_scheduler=settings.dask_scheduler),
        limits=QueueLimits(max_jobs_per_key=settings.max_jobs_per_key,
                           max_upload_mb=settings.max_upload_mb),
        running=rows("running"), queued=rows("queued"))
