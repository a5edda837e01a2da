"""Fuzzing the server's OpenAPI schema with schemathesis: no request may cause a 5xx."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.server_helpers import ServerProcess, make_keys

schemathesis = pytest.importorskip(
    "schemathesis", reason="schemathesis is not installed (pip install schemathesis, or the "
                           "project's 'fuzz' extra)")


def test_openapi_fuzz_has_no_server_errors(tmp_path):
    data_dir = tmp_path / "data"
    keys = make_keys(data_dir)
    server = ServerProcess(data_dir, args=["--max-upload-mb", "1", "--max-jobs-per-key", "2",
                                           "--max-dictionary-size", "1000"]).start()
    report = tmp_path / "report"
    try:
        result = subprocess.run(
            [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
             # the admin key reaches every operation (dictionaries too)
             "--header", f"X-API-Key: {keys['root']}",
             "--checks", "not_a_server_error",
             "--phases", "examples,coverage,fuzzing",
             "--max-time", "15", "--workers", "2", "--request-timeout", "30",
             "--report", "ndjson", "--report-dir", str(report)],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout
    assert "Internal Server Error" not in server.log() and "Traceback" not in server.log()
    for line in _events(report):
        assert "ServerError" not in line


def _events(report_dir):
    for path in sorted(report_dir.glob("*.ndjson")) if report_dir.exists() else []:
        with open(path) as fh:
            for line in fh:
                yield json.dumps(json.loads(line))
