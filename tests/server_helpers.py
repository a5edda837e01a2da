"""Helpers of the server tests: a real uvicorn server in a subprocess, keys, inputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
#: Bound (s) of the waits of the server tests (a server ready or stopped, a job finished):
#: generous, so that a loaded machine only makes them slower, never fail; only a hung
#: server reaches it.
WAIT_S = 300.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(data_dir: Path) -> dict[str, str]:
    """Create keys alice, bob (users) and root (admin) in ``data_dir``'s database."""
    from server.auth import create_key
    from server.config import Settings
    from server.db import Database

    db = Database(Settings(data_dir=data_dir).database_path)
    db.initialize()
    keys = {}
    for name, admin in (("alice", False), ("bob", False), ("root", True)):
        _, token = create_key(db, name, admin=admin)
        keys[name] = token
    db.close()
    return keys


@dataclass
class ServerProcess:
    """A ``python -m server`` subprocess listening on 127.0.0.1:port."""

    data_dir: Path
    port: int = 0
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    #: API keys by name (alice, bob: users; root: admin) when made by start_server
    keys: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = WAIT_S) -> ServerProcess:
        if not self.port:
            self.port = free_port()
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
        self.log_path = self.data_dir.parent / f"server-{self.port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 - kept open while the server runs
        cmd = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(self.data_dir), "--log-level", "warning", *self.args]
        self.proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()}")

    def restarted(self, timeout: float = WAIT_S) -> ServerProcess:
        """A new server on the same data directory, flags and keys, started (after this
        one stopped or was killed)."""
        return ServerProcess(self.data_dir, args=list(self.args), env=dict(self.env),
                             keys=dict(self.keys)).start(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def kill9(self) -> None:
        """SIGKILL the server process (not its workers: they must notice on their own)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def start_server(data_dir: Path, *args: str, env: dict[str, str] | None = None
                 ) -> ServerProcess:
    """A started server on ``data_dir`` with ``args`` (flags of ``python -m server``) and
    keys alice, bob (users) and root (admin) in its ``keys``."""
    keys = make_keys(data_dir)
    proc = ServerProcess(data_dir, args=list(args), env=dict(env or {}), keys=keys)
    return proc.start()


def serve(tmp_path_factory, name: str, *args: str, env: dict[str, str] | None = None
          ) -> Iterator[ServerProcess]:
    """The body of a server fixture: ``yield from serve(tmp_path_factory, "name", ...)``
    starts a server in a fresh directory (:func:`start_server`) and stops it after."""
    proc = start_server(tmp_path_factory.mktemp(name) / "data", *args, env=env)
    try:
        yield proc
    finally:
        proc.stop()


def client(server: ServerProcess, key: str | None) -> httpx.Client:
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def upload_files(inputs: dict[str, Path]) -> dict[str, tuple[str, bytes]]:
    return {name: (path.name, path.read_bytes()) for name, path in inputs.items()}


def wait_for(http: httpx.Client, job_id: str, *, states=("succeeded", "failed", "cancelled"),
             timeout: float = WAIT_S) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in states:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job['status']} after {timeout} s")
        time.sleep(0.05)


def write_phantom(directory: Path, *, shape=(3, 3, 2), seed: int = 0) -> dict[str, Path]:
    """A small NODDI phantom (NIfTI + FSL bval/bvec + mask) written into ``directory``."""
    from fingerprint import phantoms

    directory.mkdir(parents=True, exist_ok=True)
    paths = phantoms.write_phantom(phantoms.noddi_phantom(shape=shape, seed=seed), directory,
                                   prefix="sub-01")
    return {k: Path(paths[k]) for k in ("dwi", "bval", "bvec", "mask")}


def nifti_gz(header_shape: tuple[int, ...], data: bytes | None = None, *,
             extra_zeros: int = 0, affine=None, dtype="float32") -> bytes:
    """A gzip NIfTI-1 whose header says ``header_shape`` and whose data block is ``data``
    (default: zeros of the declared size) followed by ``extra_zeros`` more bytes. The
    zeros are repeated gzip members of 1 MiB each (about 1 KB compressed), so a file that
    decompresses to gigabytes costs a few MB and a fraction of a second to make."""
    import gzip

    import nibabel as nib
    import numpy as np

    img = nib.Nifti1Image(np.zeros((1,) * len(header_shape), dtype),
                          np.eye(4) if affine is None else affine)
    img.header.set_data_shape(header_shape)
    img.header.set_data_dtype(dtype)
    head = img.header.binaryblock + b"\0" * 4  # 348 bytes + extension flag: data at 352
    zeros = extra_zeros
    if data is None:
        zeros += int(np.prod(header_shape)) * np.dtype(dtype).itemsize
        data = b""
    out = [gzip.compress(head + data, 6)]
    block = 1 << 20
    member = gzip.compress(b"\0" * block, 9)
    out.extend([member] * (zeros // block))
    if zeros % block:
        out.append(gzip.compress(b"\0" * (zeros % block), 9))
    return b"".join(out)


def raw_post(url_port: int, path: str, key: str, body_parts, *, boundary: str = "xx",
             chunked: bool = False, length: int | None = None, pause: float = 0.0,
             stop_when_answered: bool = False, timeout: float = 60.0
             ) -> tuple[int, dict[str, str], str, int]:
    """POST ``path`` on 127.0.0.1 over a raw socket, sending ``body_parts`` one by one
    (``pause`` s apart; with ``stop_when_answered``, no more once the server has answered).
    Returns (status, headers, body, bytes of body sent); status 0 if the server closed
    the connection without an answer."""
    sock = socket.create_connection(("127.0.0.1", url_port), timeout=timeout)
    try:
        head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{url_port}", f"X-API-Key: {key}",
                f"Content-Type: multipart/form-data; boundary={boundary}"]
        if chunked:
            head.append("Transfer-Encoding: chunked")
        else:
            total = length if length is not None else sum(len(p) for p in body_parts)
            head.append(f"Content-Length: {total}")
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        sent = 0
        finished = True
        for part in body_parts:
            if stop_when_answered:
                sock.setblocking(False)
                try:
                    answered = bool(sock.recv(1, socket.MSG_PEEK))
                except BlockingIOError:
                    answered = False
                sock.settimeout(timeout)
                if answered:
                    finished = False
                    break
            try:
                sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n" if chunked
                             else part)
            except OSError:  # the server answered and closed: stop sending
                finished = False
                break
            sent += len(part)
            if pause:
                time.sleep(pause)
        if finished and chunked:
            sock.sendall(b"0\r\n\r\n")
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        if not data:
            return 0, {}, "", sent
        head_text, _, rest = data.partition(b"\r\n\r\n")
        lines = head_text.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
        need = int(headers.get("content-length", "0"))
        while len(rest) < need:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        return status, headers, rest.decode("utf-8", "replace"), sent
    finally:
        sock.close()


def multipart_form(files: dict[str, bytes], boundary: str = "xx", *, close: bool = True,
                   drop_tail: int = 0, duplicate: str | None = None) -> bytes:
    """A multipart/form-data body of ``files`` (field -> content), optionally without its
    closing boundary, cut short by ``drop_tail`` bytes, or with one field twice."""
    out = b""
    for name, content in files.items():
        for _ in range(2 if name == duplicate else 1):
            out += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                    f"filename=\"f\"\r\n\r\n").encode() + content + b"\r\n"
    if close:
        out += f"--{boundary}--\r\n".encode()
    return out[: len(out) - drop_tail] if drop_tail else out
