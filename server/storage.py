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

import logging
import os
import secrets
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

logger = logging.getLogger(__name__)

__all__ = ["FileField", "JobStorage", "UploadError", "Upload", "receive_multipart"]

#: Bytes of an over-limit body read and discarded before answering 413, so that an
#: HTTP/1.1 client still sending its body gets the response instead of a reset.
DRAIN_LIMIT = 64 * 1024 * 1024
MAX_TEXT_FIELD = 4096
_GZIP_MAGIC = b"\x1f\x8b"


class UploadError(Exception):
    """A rejected upload: HTTP status, message, and the form field at fault (if any)."""

    def __init__(self, status_code: int, detail: str, field: str | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.field = field


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
                 text_fields: set[str]) -> None:
        self.dest = dest
        self.file_fields = file_fields
        self.text_fields = text_fields
        self.upload = Upload()
        self._header_field = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._fh: BinaryIO | None = None
        self._path: Path | None = None
        self._text: bytearray | None = None
        self._first = b""

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
        self._name = None

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
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
        if name in self.file_fields:
            spec = self.file_fields[name]
            self._path = self.dest / f"{spec.base}.upload"
            self._fh = open(self._path, "xb")  # noqa: SIM115 - closed in on_part_end
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
        elif self._text is not None:
            self._text += chunk
            if len(self._text) > MAX_TEXT_FIELD:
                raise UploadError(422, f"form field '{self._name}' is longer than "
                                       f"{MAX_TEXT_FIELD} bytes", self._name)

    def on_part_end(self) -> None:
        name = self._name
        if self._fh is not None:
            self._fh.close()
            self._fh = None
            spec = self.file_fields[name]
            if self._path.stat().st_size == 0:
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


async def _drain(stream: AsyncIterator[bytes], budget: int) -> None:
    drained = 0
    try:
        async for chunk in stream:
            drained += len(chunk)
            if drained > budget:
                return
    except Exception:  # the client went away: nothing to answer
        return


async def receive_multipart(request, dest: Path, *, file_fields: dict[str, FileField],
                            text_fields: set[str], max_bytes: int) -> Upload:
    """Stream a ``multipart/form-data`` request body into ``dest``.

    File parts are written to disk chunk by chunk as they arrive (never held in memory)
    under the server-chosen names of ``file_fields``; text parts are kept (4 KiB each at
    most). A body larger than ``max_bytes`` raises UploadError(413); a malformed body,
    an unknown, repeated, empty or missing field raises UploadError(422). The caller
    removes ``dest`` on error.
    """
    content_type = request.headers.get("content-type", "")
    mime, options = parse_options_header(content_type)
    if mime != b"multipart/form-data":
        raise UploadError(415, "the request body must be multipart/form-data "
                               f"(got {content_type or 'no Content-Type'})")
    if not options.get(b"boundary"):
        raise UploadError(415, "the multipart/form-data Content-Type has no boundary "
                               "parameter")
    limit_mb = max_bytes / (1024 * 1024)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        if int(declared) - max_bytes <= DRAIN_LIMIT:
            await _drain(request.stream(), DRAIN_LIMIT)
        raise UploadError(413, f"the upload is {int(declared) / 1048576:.1f} MiB, more than "
                               f"the server's limit of {limit_mb:.4g} MiB")
    receiver = _Receiver(dest, file_fields, text_fields)
    parser = MultipartParser(options[b"boundary"], receiver.callbacks())
    total = 0
    stream = request.stream()
    try:
        async for chunk in stream:
            total += len(chunk)
            if total > max_bytes:
                receiver.close()
                await _drain(stream, DRAIN_LIMIT)
                raise UploadError(413, f"the upload is larger than the server's limit of "
                                       f"{limit_mb:.4g} MiB")
            if chunk:
                try:
                    parser.write(chunk)
                except (UploadError, MultipartParseError):
                    receiver.close()
                    await _drain(stream, DRAIN_LIMIT)
                    raise
        parser.finalize()
    except MultipartParseError as exc:
        raise UploadError(422, f"malformed multipart body: {exc}") from None
    finally:
        receiver.close()
    receiver.upload.size = total
    for name, spec in file_fields.items():
        if spec.required and name not in receiver.upload.files:
            raise UploadError(422, f"missing file field '{name}'", name)
    return receiver.upload
