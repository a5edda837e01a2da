"""Request and response bodies of the HTTP API."""

from __future__ import annotations

from typing import Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field

from .db import Job, JobKind, JobStatus

__all__ = [
    "DictionaryInfo",
    "ErrorBody",
    "Health",
    "JobList",
    "JobSummary",
    "MapSummary",
    "JobOut",
    "ModelInfo",
    "Queue",
    "QueuedJob",
    "Responses",
    "job_out",
]

JobStage = Literal["queued", "building dictionary", "fitting", "writing maps"]


#: The ``responses`` of a route (status -> OpenAPI response description).
Responses = dict[int | str, dict[str, Any]]


class ErrorBody(BaseModel):
    """Every error response: a message, and the form field at fault when there is one."""

    detail: str = Field(..., description="what went wrong")
    field: str | None = Field(None, description="the request field at fault")


class JobOut(BaseModel):
    """A job as its owner sees it."""

    id: str
    kind: JobKind
    model: str
    status: JobStatus
    progress: float = Field(..., ge=0, le=1, description="completed fraction")
    stage: JobStage | None = Field(
        None, description="what an unfinished job is doing: queued, building dictionary "
                          "(finding or building the model's dictionary), fitting, writing "
                          "maps; null once the job has finished")
    stage_progress: float = Field(0.0, ge=0, le=1,
                                  description="completed fraction of the current stage")
    created: str = Field(..., description="ISO-8601 UTC")
    started: str | None = None
    finished: str | None = None
    error: str | None = Field(None, description="why the job failed (or a note on a re-run)")
    attempts: int = Field(..., description="runs started so far")
    cancel_requested: bool = False
    options: dict[str, Any] = Field(
        default_factory=dict, description="what the job was asked: the fit options given "
                                          "(as the library normalised them; b0_threshold in "
                                          "s/m²), the output prefix and the pulse timing (s)")
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


class QueuedJob(BaseModel):
    """A queued or running job as the admin's queue view shows it (no file names)."""

    id: str
    owner: str = Field(..., description="name of the owner's key")
    kind: JobKind
    model: str
    status: JobStatus
    stage: JobStage | None
    stage_progress: float
    progress: float
    created: str
    started: str | None


class ExecutorInfo(BaseModel):
    healthy: bool
    message: str
    mode: Literal["process", "dask"]
    workers: int
    threads_per_job: int
    dask_scheduler: str | None


class QueueLimits(BaseModel):
    max_jobs_per_key: int
    max_upload_mb: float


class Queue(BaseModel):
    """The server's executor and every queued or running job."""

    executor: ExecutorInfo
    limits: QueueLimits
    running: list[QueuedJob]
    queued: list[QueuedJob]


class _Summary(BaseModel):
    """Part of a viewer summary (cached as JSON beside the job's outputs; unknown keys of
    an older cache are ignored)."""

    model_config = ConfigDict(extra="ignore")


class Histogram(_Summary):
    edges: list[float] = Field(..., description="bin edges, min to max")
    counts: list[int]


class MapSummary(_Summary):
    """One map of a finished fit as the viewer shows it."""

    label: str = Field(..., description="e.g. odi, odi-uncertainty, mu")
    file: str = Field(..., description="its NIfTI among the job's files")
    kind: Literal["scalar", "direction"]
    shape: list[int]
    units: str
    units_text: str
    description: str
    volume: str = Field(..., description="name of its byte volume in the viewer cache")
    min: float | None = Field(None, description="display range (scalar maps)")
    max: float | None = None
    mean: float | None = None
    median: float | None = None
    histogram: Histogram | None = None


class ModelSummary(_Summary):
    name: str
    class_: str | None = Field(None, alias="class", serialization_alias="class")
    description: str | None = None
    reference: str | None = None


class SolverSummary(_Summary):
    name: str
    description: str | None = None
    software: str
    dictionary_atoms: int | None = None


class Shell(_Summary):
    bval: float = Field(..., description="s/mm², rounded to 50")
    count: int


class SchemeSummary(_Summary):
    measurements: int | None = None
    shells: list[Shell] = Field(default_factory=list)
    units: str | None = None
    delta: float | None = None
    Delta: float | None = None
    TE: float | None = None


class TimingSummary(_Summary):
    fit_seconds: float | None = None
    queued_seconds: float | None = None
    run_seconds: float | None = None
    voxels: int | None = None
    fitted_voxels: int | None = None
    invalid_voxels: int | None = None


class JobSummary(_Summary):
    """What the web page's viewer shows of a finished fit."""

    version: int
    job: str
    model: ModelSummary
    solver: SolverSummary
    scheme: SchemeSummary
    timing: TimingSummary
    mask_voxels: int
    shape: list[int]
    voxel_size: list[float] = Field(..., description="mm")
    maps: list[MapSummary]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, str] = Field(default_factory=dict)


def job_stage(kind: JobKind, status: JobStatus, progress: float
              ) -> tuple[JobStage | None, float]:
    """(stage, completed fraction of it) of a job: ``queued`` while waiting; for a running
    fit, the stage of the fitting pipeline its progress falls in; for a running dictionary
    job, ``building dictionary``; None once finished."""
    if status == "queued":
        return "queued", 0.0
    if status != "running":
        return None, 0.0
    if kind == "dictionary":
        return "building dictionary", min(max(float(progress), 0.0), 1.0)
    # the volume runner is heavy to import (numba, nibabel): only once a fit is running
    from fingerprint.fitting.pipeline import progress_stage

    stage, fraction = progress_stage(progress)
    return cast(JobStage, stage), fraction


def job_out(job: Job, base: str = "/v1") -> JobOut:
    """The public view of a job record."""
    stage, stage_progress = job_stage(job.kind, job.status, float(job.progress))
    links = {"self": f"{base}/jobs/{job.id}"}
    if job.kind == "fit" and job.status == "succeeded" and not job.deleted:
        links["results"] = f"{base}/jobs/{job.id}/results"
    return JobOut(
        id=job.id, kind=job.kind, model=job.model, status=job.status,
        progress=float(job.progress), stage=stage, stage_progress=round(stage_progress, 4),
        created=job.created, started=job.started,
        finished=job.finished, error=job.error, attempts=int(job.attempts),
        cancel_requested=bool(job.cancel_requested), options=job.options,
        files=list(job.outputs) if not job.deleted else [], result=job.result,
        links=links)
