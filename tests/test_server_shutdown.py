"""SIGTERM and SIGINT stop the server and its worker processes cleanly: a graceful exit, no
warning (no leaked semaphores from the worker pool), no traceback, no process left."""

from __future__ import annotations

import os
import signal
import time

import pytest

pytest.importorskip("fastapi")
from server_helpers import (  # noqa: E402
    WAIT_S,
    client,
    start_server,
    upload_files,
    wait_for,
    write_phantom,
)


def _children(pid: int) -> list[int]:
    try:
        text = open(f"/proc/{pid}/task/{pid}/children").read()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is gone for our purpose
        return open(f"/proc/{pid}/stat").read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_stops_server_and_workers_without_warnings(tmp_path, sig) -> None:
    phantom = write_phantom(tmp_path / "phantom")
    server = start_server(tmp_path / "data", "--workers", "1")
    keys = server.keys
    try:
        with client(server, keys["root"]) as http:  # the worker pool has done real work
            r = http.post("/v1/jobs", files=upload_files(phantom),
                          data={"model": "noddi", "dictionary_size": "500"})
            assert r.status_code in (200, 201, 202), r.text
            assert wait_for(http, r.json()["id"], timeout=WAIT_S)["status"] == "succeeded"
        workers = _children(server.proc.pid)
        server.proc.send_signal(sig)
        # uvicorn shuts down gracefully, then re-raises a SIGTERM so that the exit status
        # says what stopped it
        assert server.proc.wait(timeout=WAIT_S) in (0, -int(sig))
    finally:
        server.stop()
    log = server.log()
    for bad in ("leaked", "resource_tracker", "Traceback", "Warning", "ERROR"):
        assert bad not in log, log
    # the resource tracker leaves once the server is gone (a bound only a leftover
    # process reaches: a loaded machine may take a while)
    deadline = time.monotonic() + WAIT_S
    while [p for p in workers if _alive(p)] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [(p, open(f"/proc/{p}/cmdline").read().replace("\0", " ")[:120])
            for p in workers if _alive(p)]
    assert not left, f"processes outlived the server: {left}"
