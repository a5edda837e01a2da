"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = [
    "DictionaryInfo",
    "ErrorBody",
    "Health",
    "JobList",
    "JobOut",
    "ModelInfo",
    "job_out",
]

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class ErrorBody(BaseModel):
    """Every error response: a message, and the form field at fault when there is one."""

    detail: str = Field(..., description="what went wrong")
    field: str | None = Field(None, description="the request field at fault")


class JobOut(BaseModel):
    """A job as its owner sees it."""

    id: str
    kind: Literal["fit", "dictionary"]
    model: str
    status: JobStatus
    progress: float = Field(..., ge=0, le=1, description="completed fraction")
    created: str = Field(..., description="ISO-8601 UTC")
    started: str | None = None
    finished: str | None = None
    error: str | None = Field(None, description="why the job failed (or a note on a re-run)")
    attempts: int = Field(..., description="runs started so far")
    cancel_requested: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    files: list[str] = Field(default_factory=list, description="output file names")
    result: dict[str, Any] = Field(default_factory=dict)
    links: dict[str, str] = Field(default_factory=dict)


class JobList(BaseModel):
    """A page of jobs, newest first."""

    items: list[JobOut]
    total: int = Field(..., description="jobs matching the filters")
    limit: int
    offset: int
    next_cursor: str | None = Field(None, description="pass as ?cursor= for the next page")


class ModelInfo(BaseModel):
    name: str
    description: str


class DictionaryInfo(BaseModel):
    """A stored dictionary (the library's summary)."""

    name: str = Field(..., description="directory name of the store")
    valid: bool
    details: dict[str, Any] = Field(default_factory=dict)


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


def job_out(job: dict[str, Any], base: str = "/v1") -> JobOut:
    """The public view of a job row."""
    links = {"self": f"{base}/jobs/{job['id']}"}
    if job["kind"] == "fit" and job["status"] == "succeeded" and not job["deleted"]:
        links["results"] = f"{base}/jobs/{job['id']}/results"
    return JobOut(
        id=job["id"], kind=job["kind"], model=job["model"], status=job["status"],
        progress=float(job["progress"]), created=job["created"], started=job["started"],
        finished=job["finished"], error=job["error"], attempts=int(job["attempts"]),
        cancel_requested=bool(job["cancel_requested"]), options=job["options"],
        files=list(job["outputs"]) if not job["deleted"] else [], result=job["result"],
        links=links)
