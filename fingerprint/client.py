"""HTTP client of the fingerprint lab server (used by ``fingerprint submit``).

>>> from fingerprint.client import FingerprintClient
>>> with FingerprintClient("http://lab-server:8000", api_key) as client:
...     job = client.submit("dwi.nii.gz", "dwi.bval", "dwi.bvec", model="noddi")
...     job = client.wait(job["id"])
...     files = client.download(job["id"], "maps/")

Uploads are streamed from disk; results are downloaded as a ZIP to a temporary file and
extracted (member names are checked, nothing is written outside the output directory).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import zipfile
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path, PurePosixPath
from typing import Any

import httpx

logger = logging.getLogger(__name__)

__all__ = ["FingerprintClient", "ServerError"]

FINAL_STATES = ("succeeded", "failed", "cancelled")


class ServerError(Exception):
    """The server answered with an error status."""

    def __init__(self, status_code: int, detail: str, field: str | None = None) -> None:
        super().__init__(f"HTTP {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.field = field


def _raise_for(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    detail, field = response.reason_phrase or "error", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        raw = body.get("detail", detail)
        if isinstance(raw, list) and raw:  # FastAPI's validation error list
            first = raw[0]
            raw = first.get("msg", str(first)) if isinstance(first, dict) else str(first)
        detail, field = str(raw), body.get("field")
    raise ServerError(response.status_code, detail, field)


class FingerprintClient:
    """A session with one server and one API key."""

    def __init__(self, server: str, api_key: str, *, timeout: float = 60.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        if not server.startswith(("http://", "https://")):
            raise ValueError(f"server URL must start with http:// or https://, got {server!r}")
        self.server = server.rstrip("/")
        self._http = httpx.Client(base_url=self.server, headers={"X-API-Key": api_key},
                                  timeout=httpx.Timeout(timeout, connect=10.0),
                                  transport=transport)

    def __enter__(self) -> FingerprintClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, url, **kwargs)
        _raise_for(response)
        return response

    def models(self) -> list[dict[str, str]]:
        """The server's named models."""
        return self._request("GET", "/v1/models").json()

    def submit(self, dwi: str | os.PathLike, bval: str | os.PathLike, bvec: str | os.PathLike,
               mask: str | os.PathLike | None = None, *, model: str = "noddi",
               threads: int | None = None, dictionary_size: int | None = None,
               prefix: str | None = None, delta: float | None = None,
               Delta: float | None = None, TE: float | None = None,
               options: Mapping[str, bool | int | float | str] | None = None
               ) -> dict[str, Any]:
        """Upload the inputs (streamed from disk) and queue a fit; returns the job.

        ``delta``, ``Delta`` and ``TE`` (s) give the pulse timing that FSL files lack,
        for models that need it (e.g. ``activeax``). ``options``: fit options by name
        (``solver``, ``n_neighbors``, ``refine``, ``Ns``, ... as ``GET /v1/fit-options``
        lists them, and ``b0_threshold`` in s/mm²), sent as form fields; the server
        validates them (422 naming the field)."""
        data: dict[str, str] = {"model": model}
        for name, value in (("delta", delta), ("Delta", Delta), ("TE", TE)):
            if value is not None:
                data[name] = repr(float(value))
        if threads is not None:
            data["threads"] = str(int(threads))
        if dictionary_size is not None:
            data["dictionary_size"] = str(int(dictionary_size))
        if prefix is not None:
            data["prefix"] = prefix
        for name, option in (options or {}).items():
            if option is not None:
                data[name] = _form_value(option)
        paths = {"dwi": dwi, "bval": bval, "bvec": bvec}
        if mask is not None:
            paths["mask"] = mask
        with ExitStack() as stack:
            files = {}
            for field, path in paths.items():
                path = Path(path)
                if not path.is_file():
                    raise FileNotFoundError(f"--{field}: no such file {path}")
                files[field] = (path.name, stack.enter_context(open(path, "rb")),
                                "application/octet-stream")
            return self._request("POST", "/v1/jobs", data=data, files=files).json()

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's status."""
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def jobs(self, *, limit: int = 50, cursor: str | None = None) -> dict[str, Any]:
        """A page of the caller's jobs, newest first."""
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        return self._request("GET", "/v1/jobs", params=params).json()

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel (if active) and delete a job."""
        return self._request("DELETE", f"/v1/jobs/{job_id}").json()

    def wait(self, job_id: str, *, poll: float = 1.0, timeout: float | None = None,
             progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job is finished; ``progress`` gets every status seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if progress is not None:
                progress(job)
            if job["status"] in FINAL_STATES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout} s")
            time.sleep(poll)

    def download(self, job_id: str, out_dir: str | os.PathLike) -> list[Path]:
        """Download a succeeded job's maps into ``out_dir``; returns the files written."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile() as tmp:
            with self._http.stream("GET", f"/v1/jobs/{job_id}/results") as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                for chunk in response.iter_bytes(1 << 20):
                    tmp.write(chunk)
            tmp.seek(0)
            return _extract(tmp, out_dir)


def _form_value(value: bool | int | float | str) -> str:
    """A fit option as a form field (booleans as ``true`` / ``false``, floats exact)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _extract(fileobj: Any, out_dir: Path) -> list[Path]:
    written = []
    root = out_dir.resolve()
    with zipfile.ZipFile(fileobj) as archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if (info.is_dir() or name.is_absolute() or ".." in name.parts
                    or not name.parts or "\\" in info.filename):
                raise ValueError(f"refusing unsafe archive member {info.filename!r}")
            target = (root / Path(*name.parts)).resolve()
            if root not in target.parents:
                raise ValueError(f"refusing unsafe archive member {info.filename!r}")
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(info) as src, open(target, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            written.append(target)
    return written
