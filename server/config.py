"""Server settings, from command-line flags or ``FINGERPRINT_*`` environment variables.

Every field can be set by an environment variable named ``FINGERPRINT_<FIELD>`` (for
example ``FINGERPRINT_DATA_DIR``, ``FINGERPRINT_MAX_UPLOAD_MB``); explicit constructor
arguments (the ``fingerprint serve`` flags) take precedence.
"""

from __future__ import annotations

import argparse
import os
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Union, get_args, get_origin

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["LIMIT_SETTINGS", "Settings", "argument_parser", "settings_from_argv"]

#: Settings shown in the "limits" group of ``fingerprint serve --help``.
LIMIT_SETTINGS = ("max_voxels", "max_classical_voxels", "max_dwi_mb", "max_user_dictionary_size",
                  "max_uploads_per_key", "max_uploads", "min_upload_rate_kb",
                  "upload_grace_seconds", "max_upload_seconds", "check_seconds",
                  "dictionary_cache_gb", "disk_reserve_mb")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_METAVARS: dict[type, str] = {int: "N", float: "NUM", Path: "DIR"}


def _default_workers() -> int:
    return 1


class Settings(BaseSettings):
    """Configuration of one server instance."""

    model_config = SettingsConfigDict(env_prefix="FINGERPRINT_", extra="ignore")

    host: str = Field("127.0.0.1", description="interface to listen on")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    data_dir: Path = Field(Path("fingerprint-data"),
                           description="directory holding the database, jobs and dictionaries")
    dictionary_dir: Path | None = Field(
        None, description="dictionary directory (default: <data_dir>/dictionaries)")
    workers: int = Field(default_factory=_default_workers, ge=1, le=256,
                         description="jobs run at the same time")
    threads: int | None = Field(
        None, ge=1, description="threads per job (default: cores / workers, at least 1)")
    dask_scheduler: str | None = Field(
        None, description="address of a dask.distributed scheduler (tcp://host:8786); "
                          "voxel chunks then run as Dask tasks")
    max_upload_mb: float = Field(2048.0, gt=0, description="largest request body, in MiB")
    max_jobs_per_key: int = Field(4, ge=1, description="queued + running jobs per API key")
    # -- limits per job and per key (a lab machine: 2-4 such jobs at once fit in 32 GB) ----
    max_voxels: int = Field(
        5_000_000, ge=1, description="most voxels a job may fit (in its mask, or in the "
                                     "default mask when it gives none)")
    max_classical_voxels: int = Field(
        200_000, ge=1, description="most voxels a job may fit with a non-linear fit per "
                                   "voxel, far slower than dictionary matching: a "
                                   "classical solver (brute2fine, mix) or the non-linear "
                                   "polish (refine=nonlinear, or a model's default polish)")
    max_dwi_mb: float = Field(
        8192.0, gt=0, description="largest DWI data block once decompressed (MiB), read "
                                  "from the NIfTI header before anything is decompressed")
    max_user_dictionary_size: int | None = Field(
        None, ge=1, description="largest dictionary (atoms) a non-admin key may ask for "
                                "(default: the model's own size; admins go up to "
                                "max_dictionary_size)")
    max_uploads_per_key: int = Field(
        2, ge=1, description="uploads (and their checks) in flight at once per API key")
    max_uploads: int = Field(16, ge=1, description="uploads in flight at once in total")
    min_upload_rate_kb: float = Field(
        16.0, ge=0, description="slowest average upload rate accepted (KiB/s, measured "
                                "after upload_grace_seconds); slower bodies get 408")
    upload_grace_seconds: float = Field(
        30.0, gt=0, description="time before the minimum upload rate applies (s), and "
                                "longest wait for the next piece of a request body")
    max_upload_seconds: float = Field(
        3600.0, gt=0, description="longest time a request body may take to arrive (s)")
    check_seconds: float = Field(
        30.0, gt=0, description="time limit of the checks made while the client waits (s)")
    dictionary_cache_gb: float = Field(
        20.0, gt=0, description="size budget of the dictionary cache (GiB); least recently "
                                "used dictionaries not in use are evicted beyond it")
    disk_reserve_mb: float = Field(
        512.0, ge=0, description="free space (MiB) kept on the data disk: uploads and jobs "
                                 "that would go below it are refused with 507")
    max_attempts: int = Field(3, ge=1,
                              description="runs of a job interrupted by a server stop before "
                                          "it is failed")
    default_model: str = Field("noddi", description="model used when a job names none")
    max_dictionary_size: int = Field(2_000_000, ge=1,
                                     description="largest dictionary a job may ask for")
    cancel_wait_seconds: float = Field(
        10.0, ge=0, description="how long DELETE waits for a running job to stop")
    cancel_kill_seconds: float = Field(
        30.0, gt=0, description="a running job that has not stopped this long after its "
                                "cancellation has its worker process killed")
    poll_interval: float = Field(0.2, gt=0, description="dispatcher polling period (s)")
    log_level: str = Field("info", description="server log level: "
                                                ", ".join(_LOG_LEVELS))

    @field_validator("log_level", mode="after")
    @classmethod
    def _log_level(cls, value: str) -> str:
        if value.lower() not in _LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
        return value.lower()

    @field_validator("data_dir", "dictionary_dir", mode="after")
    @classmethod
    def _expand(cls, value: Path | None) -> Path | None:
        return None if value is None else Path(os.path.expanduser(str(value))).absolute()

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_dwi_bytes(self) -> int:
        return int(self.max_dwi_mb * 1024 * 1024)

    @property
    def dictionary_cache_bytes(self) -> int:
        return int(self.dictionary_cache_gb * 1024**3)

    @property
    def disk_reserve_bytes(self) -> int:
        return int(self.disk_reserve_mb * 1024 * 1024)

    @property
    def database_path(self) -> Path:
        return self.data_dir / "fingerprint.sqlite3"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def tmp_dir(self) -> Path:
        return self.data_dir / "tmp"

    @property
    def resolved_dictionary_dir(self) -> Path:
        return self.dictionary_dir if self.dictionary_dir is not None else (
            self.data_dir / "dictionaries")

    @property
    def threads_per_job(self) -> int:
        if self.threads:
            return self.threads
        try:
            cores = len(os.sched_getaffinity(0))  # the cores this process may use
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            cores = os.cpu_count() or 1
        return max(1, cores // self.workers)


def _flag_type(annotation: object) -> type:
    """The argparse type of a settings field (``X | None`` -> ``X``)."""
    if get_origin(annotation) in (Union, types.UnionType):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation if isinstance(annotation, type) else str


def argument_parser(prog: str = "fingerprint serve") -> argparse.ArgumentParser:
    """The command-line flags of the server, one per :class:`Settings` field
    (``--max-upload-mb`` for ``max_upload_mb``), with its type and description: the
    settings are the one source of ``fingerprint serve`` and ``python -m server``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Run the lab fitting server (HTTP API, docs at /docs). "
                               "Every option can also be set by an environment variable "
                               "FINGERPRINT_<OPTION> (FINGERPRINT_DATA_DIR, ...); flags win.")
    limits = parser.add_argument_group("limits", "what one API key and one job may use "
                                                 "(see the server documentation)")
    for name, info in Settings.model_fields.items():
        kind = _flag_type(info.annotation)
        default = None if info.default_factory is not None else info.default
        shown = "" if default is None else f" (default {default})"
        group = limits if name in LIMIT_SETTINGS else parser
        group.add_argument("--" + name.replace("_", "-"), dest=name, type=kind,
                           metavar=_METAVARS.get(kind, "TEXT"),
                           help=f"{info.description}{shown}")
    return parser


def settings_from_argv(argv: Sequence[str], prog: str = "fingerprint serve") -> Settings:
    """Settings from the environment, overridden by the flags in ``argv`` (ValueError
    naming the setting when one is invalid; ``--help`` prints the flags and exits)."""
    args = argument_parser(prog).parse_args(list(argv))
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"invalid server settings: {problems}") from None
