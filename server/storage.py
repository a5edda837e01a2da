"""Job directories and streamed multipart uploads.

Layout of the data directory::

    fingerprint.sqlite3        jobs and API keys (WAL)
    jobs/<id>/inputs/          the uploaded files, under fixed names
    jobs/<id>/outputs/         the finished maps (renamed into place when complete)
    jobs/<id>/outputs.partial/ maps being written
    jobs/<id>/cancel           flag file: the owner asked to cancel
    tmp/upload-*/              uploads being received (moved to jobs/<id> when accepted)
    dictionaries/              prebuilt dictionaries (shared with Dask workers)

Client-supplied file names are never used: each upload field is stored under a fixed name
chosen by the server (the extension of a NIfTI file comes from its content).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import secrets
import shutil
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.requests import Request

from .errors import ApiError

logger = logging.getLogger(__name__)

__all__ = ["DRAIN_LIMIT", "FileField", "JobStorage", "UploadError", "Upload",
           "UploadTimeouts", "drain", "is_disk_full", "receive_multipart"]

#: Bytes of an over-limit body read and discarded before answering 413, so that an
#: HTTP/1.1 client still sending its body gets the response instead of a reset.
DRAIN_LIMIT = 64 * 1024 * 1024
#: Longest time spent reading and discarding such a body (s).
DRAIN_SECONDS = 5.0
MAX_TEXT_FIELD = 4096
#: RFC 2046: a boundary is 1-70 characters from this set (not ending with a space).
_BOUNDARY_RE = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
#: Bytes of headers one part may carry, and parts one form may have.
MAX_PART_HEADERS = 8192
MAX_PARTS = 32
#: Bytes written between two checks of the disk reserve.
_DISK_CHECK_BYTES = 16 * 1024 * 1024
_GZIP_MAGIC = b"\x1f\x8b"


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the quota) is full: ENOSPC / EDQUOT, or SQLite's
    "database or disk is full"."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()


class UploadError(ApiError):
    """A rejected upload: HTTP status, message, and the form field at fault (if any)."""


@dataclass(frozen=True)
class UploadTimeouts:
    """How slowly a request body may arrive: ``min_rate`` bytes/s on average once
    ``grace`` seconds have passed (``grace`` is also the longest wait for the next
    piece), and ``max_seconds`` in all. Slower bodies are answered 408."""

    min_rate: float = 0.0
    grace: float = 30.0
    max_seconds: float = 3600.0


@dataclass(frozen=True)
class FileField:
    """A file field of a form: its stored base name and whether it is a NIfTI image
    (stored as ``<base>.nii`` or ``<base>.nii.gz`` after sniffing the content)."""

    base: str
    nifti: bool = False
    required: bool = True


@dataclass
class Upload:
    """What a multipart form delivered: stored files by field, and text fields."""

    files: dict[str, Path] = field(default_factory=dict)
    fields: dict[str, str] = field(default_factory=dict)
    size: int = 0


class JobStorage:
    """Paths of the data directory."""

    def __init__(self, data_dir: str | os.PathLike) -> None:
        self.data_dir = Path(data_dir)
        self.jobs_dir = self.data_dir / "jobs"
        self.tmp_dir = self.data_dir / "tmp"

    def ensure(self) -> None:
        for path in (self.data_dir, self.jobs_dir, self.tmp_dir):
            path.mkdir(parents=True, exist_ok=True)

    def job_dir(self, job_id: str) -> Path:
        if not job_id or not job_id.isalnum():
            raise ValueError(f"invalid job id {job_id!r}")
        return self.jobs_dir / job_id

    def inputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "inputs"

    def outputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "outputs"

    def partial_outputs_dir(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "outputs.partial"

    def cancel_flag(self, job_id: str) -> Path:
        return self.job_dir(job_id) / "cancel"

    def new_upload_dir(self) -> Path:
        path = self.tmp_dir / f"upload-{secrets.token_hex(8)}"
        path.mkdir(parents=True)
        return path

    def promote(self, upload_dir: Path, job_id: str) -> Path:
        """Move a received upload into place as the inputs of job ``job_id``."""
        target = self.job_dir(job_id)
        target.mkdir(parents=True)
        os.rename(upload_dir, target / "inputs")
        return target

    def request_cancel(self, job_id: str) -> None:
        path = self.job_dir(job_id)
        if path.is_dir():
            self.cancel_flag(job_id).touch()

    def remove_job(self, job_id: str) -> None:
        shutil.rmtree(self.job_dir(job_id), ignore_errors=True)

    def job_dir_ids(self) -> list[str]:
        if not self.jobs_dir.is_dir():
            return []
        return [p.name for p in self.jobs_dir.iterdir()]

    def clean_tmp(self) -> int:
        """Remove everything in the temporary directory; returns the number of entries."""
        if not self.tmp_dir.is_dir():
            return 0
        n = 0
        for entry in self.tmp_dir.iterdir():
            n += 1
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        return n


class _Receiver:
    """Callbacks of the streaming multipart parser, writing file parts to disk."""

    def __init__(self, dest: Path, file_fields: dict[str, FileField],
                 text_fields: set[str], disk_reserve: int = 0) -> None:
        self.dest = dest
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.disk_reserve = int(disk_reserve)
        self.upload = Upload()
        self._header_field = b""
        self._header_value = b""
        self._header_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._fh: BinaryIO | None = None
        self._path: Path | None = None
        self._text: bytearray | None = None
        self._first = b""
        self._parts = 0
        self._written = 0
        self._checked = 0
        #: the field of the part being received (None between parts)
        self.open_part: str | None = None

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._header_bytes = 0
        self._name = None
        self.open_part = "?"
        self._parts += 1
        if self._parts > MAX_PARTS:
            raise UploadError(400, f"the form has more than {MAX_PARTS} parts")

    def _count_header(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADERS:
            raise UploadError(400, f"a form part has more than {MAX_PART_HEADERS} bytes of "
                                   "headers")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._count_header(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._header_field.strip().lower()] = self._header_value
        self._header_field = b""
        self._header_value = b""

    def on_headers_finished(self) -> None:
        disposition = self._headers.get(b"content-disposition")
        if disposition is None:
            raise UploadError(422, "a form part has no Content-Disposition header")
        _, options = parse_options_header(disposition)
        raw_name = options.get(b"name")
        if raw_name is None:
            raise UploadError(422, "a form part has no field name")
        name = raw_name.decode("utf-8", "replace")
        if name in self.upload.files or name in self.upload.fields:
            raise UploadError(422, f"form field '{name}' was sent more than once", name)
        self._name = name
        self.open_part = name
        if name in self.file_fields:
            spec = self.file_fields[name]
            self._path = self.dest / f"{spec.base}.upload"
            try:
                self._fh = open(self._path, "xb")  # noqa: SIM115 - closed in on_part_end
            except FileExistsError:  # the same stored name twice
                raise UploadError(422, f"form field '{name}' was sent more than once",
                                  name) from None
            self._first = b""
        elif name in self.text_fields:
            self._text = bytearray()
        else:
            expected = sorted([*self.file_fields, *self.text_fields])
            raise UploadError(422, f"unknown form field '{name}' (expected one of: "
                                   f"{', '.join(expected)})", name)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if self._fh is not None:
            if len(self._first) < 2:
                self._first += chunk[: 2 - len(self._first)]
            self._fh.write(chunk)
            self._written += len(chunk)
            if self.disk_reserve and self._written - self._checked >= _DISK_CHECK_BYTES:
                self._checked = self._written
                self._check_disk()
        elif self._text is not None:
            self._text += chunk
            if len(self._text) > MAX_TEXT_FIELD:
                raise UploadError(422, f"form field '{self._name}' is longer than "
                                       f"{MAX_TEXT_FIELD} bytes", self._name)

    def _check_disk(self) -> None:
        try:
            free = shutil.disk_usage(self.dest).free
        except OSError:
            return
        if free < self.disk_reserve:
            raise _disk_full()

    def on_part_end(self) -> None:
        name = self._name
        self.open_part = None
        if name is None:  # pragma: no cover - the parser ends only parts it began
            return
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            spec = self.file_fields[name]
            if self._path is None or self._path.stat().st_size == 0:
                raise UploadError(422, f"file field '{name}' is empty", name)
            if spec.nifti:
                suffix = ".nii.gz" if self._first == _GZIP_MAGIC else ".nii"
            else:
                suffix = ""
            final = self.dest / f"{spec.base}{suffix}"
            os.rename(self._path, final)
            self.upload.files[name] = final
            self._path = None
        elif self._text is not None:
            try:
                self.upload.fields[name] = self._text.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise UploadError(422, f"form field '{name}' is not UTF-8 text", name) from None
            self._text = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _disk_full() -> UploadError:
    return UploadError(507, "not enough disk space on the server to store the upload; try "
                            "again later", headers={"Retry-After": "60"})


async def drain(stream: AsyncIterator[bytes], budget: int,
                seconds: float = DRAIN_SECONDS) -> None:
    """Read and discard at most ``budget`` bytes of ``stream`` for at most ``seconds``."""

    async def read() -> None:
        drained = 0
        async for chunk in stream:
            drained += len(chunk)
            if drained > budget:
                return

    try:
        await asyncio.wait_for(read(), seconds)
    except (Exception, asyncio.TimeoutError):  # the client went away or is too slow
        return


def check_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` Content-Type (UploadError 415 when the
    type is another, 400 when the boundary is missing or not a valid RFC 2046 boundary)."""
    mime, options = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise UploadError(415, "the request body must be multipart/form-data "
                               f"(got {content_type[:100] or 'no Content-Type'})")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "the multipart/form-data Content-Type has no boundary "
                               "parameter")
    text = boundary.decode("latin-1")
    if len(text) > 70:
        raise UploadError(400, f"the multipart boundary is {len(text)} characters long; at "
                               "most 70 are allowed (RFC 2046)")
    if not _BOUNDARY_RE.match(text):
        raise UploadError(400, "the multipart boundary holds characters RFC 2046 does not "
                               "allow")
    return boundary


async def _next_chunk(iterator: AsyncIterator[bytes], timeout: float, what: str) -> bytes:
    try:
        return await asyncio.wait_for(iterator.__anext__(), max(timeout, 0.001))
    except asyncio.TimeoutError:
        raise UploadError(408, what) from None


async def receive_multipart(request: Request, dest: Path, *, file_fields: dict[str, FileField],
                            text_fields: set[str], max_bytes: int,
                            timeouts: UploadTimeouts | None = None,
                            disk_reserve: int = 0) -> Upload:
    """Stream a ``multipart/form-data`` request body into ``dest``.

    File parts are written to disk chunk by chunk as they arrive (never held in memory)
    under the server-chosen names of ``file_fields``; text parts are kept (4 KiB each at
    most). UploadError with status: 413 for a body larger than ``max_bytes`` (refused as
    soon as it passes the limit, before anything more is written), 408 for a body that
    arrives slower than ``timeouts`` allow, 507 when the disk's free space falls below
    ``disk_reserve`` bytes (or the disk is full), 400 for a malformed body (bad or
    over-long boundary, truncated part, no closing boundary, too many parts or headers),
    422 for an unknown, repeated, empty or missing field. The caller removes ``dest`` on
    error.
    """
    timeouts = timeouts or UploadTimeouts()
    content_type = request.headers.get("content-type", "")
    boundary = check_boundary(content_type)
    limit_mb = max_bytes / (1024 * 1024)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        if int(declared) - max_bytes <= DRAIN_LIMIT:
            await drain(request.stream(), DRAIN_LIMIT)
        raise UploadError(413, f"the upload is {int(declared) / 1048576:.1f} MiB, more than "
                               f"the server's limit of {limit_mb:.4g} MiB")
    receiver = _Receiver(dest, file_fields, text_fields, disk_reserve)
    parser = MultipartParser(boundary, receiver.callbacks())
    total = 0
    stream = request.stream()
    iterator = stream.__aiter__()
    loop = asyncio.get_running_loop()
    start = loop.time()
    try:
        while True:
            elapsed = loop.time() - start
            if elapsed > timeouts.max_seconds:
                raise UploadError(408, f"the upload took longer than the server's limit of "
                                       f"{timeouts.max_seconds:g} s")
            if timeouts.min_rate and elapsed > timeouts.grace and \
                    total < timeouts.min_rate * elapsed:
                raise UploadError(408, f"the upload is too slow: {total / elapsed / 1024:.1f} "
                                       f"KiB/s on average, the server needs at least "
                                       f"{timeouts.min_rate / 1024:g} KiB/s")
            wait = min(timeouts.grace, timeouts.max_seconds - elapsed)
            try:
                chunk = await _next_chunk(iterator, wait, f"no data arrived for {wait:.3g} s: "
                                                          "the upload timed out")
            except StopAsyncIteration:
                break
            total += len(chunk)
            if total > max_bytes:
                receiver.close()
                await drain(stream, DRAIN_LIMIT)
                raise UploadError(413, f"the upload is larger than the server's limit of "
                                       f"{limit_mb:.4g} MiB")
            if chunk:
                try:
                    parser.write(chunk)
                except (UploadError, MultipartParseError):
                    receiver.close()
                    await drain(stream, DRAIN_LIMIT)
                    raise
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(400, f"malformed multipart body: {exc}") from None
    except OSError as exc:
        if is_disk_full(exc):
            raise _disk_full() from None
        raise
    except Exception as exc:
        if type(exc).__name__ == "ClientDisconnect":
            raise UploadError(400, "the client disconnected before the upload was "
                                   "complete") from None
        raise
    finally:
        receiver.close()
    if parser.state != MultipartState.END:
        cut = receiver.open_part
        where = f" (the part '{cut}' is cut off)" if cut and cut != "?" else ""
        raise UploadError(400, "the multipart body ends before its closing boundary "
                               f"'--{boundary.decode('latin-1')}--': the upload is "
                               f"incomplete{where}", cut if cut != "?" else None)
    receiver.upload.size = total
    for name, spec in file_fields.items():
        if spec.required and name not in receiver.upload.files:
            raise UploadError(422, f"missing file field '{name}'", name)
    return receiver.upload
