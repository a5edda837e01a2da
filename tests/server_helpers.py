"""Helpers of the server tests: a real uvicorn server in a subprocess, keys, inputs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]


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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ServerProcess:
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
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)


def client(server: ServerProcess, key: str | None) -> httpx.Client:
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=60)


def upload_files(inputs: dict[str, Path]) -> dict[str, tuple[str, bytes]]:
    return {name: (path.name, path.read_bytes()) for name, path in inputs.items()}


def wait_for(http: httpx.Client, job_id: str, *, states=("succeeded", "failed", "cancelled"),
             timeout: float = 120.0) -> dict:
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
