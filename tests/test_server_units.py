"""Unit tests of the server's store, keys, reconciliation, uploads and client helpers
(no HTTP server, no fitting)."""

from __future__ import annotations

import argparse
import asyncio
import io
import zipfile
from pathlib import Path

import pytest

from server.auth import create_key, hash_key, list_keys, revoke_key, verify_key
from server.config import Settings
from server.db import Database
from server.reconcile import reconcile
from server.storage import FileField, JobStorage, UploadError, receive_multipart


@pytest.fixture()
def db(tmp_path: Path) -> Database:
    database = Database(tmp_path / "data" / "fingerprint.sqlite3")
    database.initialize()
    return database


def test_settings_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FINGERPRINT_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("FINGERPRINT_MAX_UPLOAD_MB", "3")
    monkeypatch.setenv("FINGERPRINT_MAX_JOBS_PER_KEY", "7")
    settings = Settings(workers=2)
    assert settings.data_dir == tmp_path / "d"
    assert settings.max_upload_bytes == 3 * 1024 * 1024
    assert settings.max_jobs_per_key == 7
    assert settings.workers == 2
    assert settings.resolved_dictionary_dir in (tmp_path / "d" / "dictionaries",
                                                settings.dictionary_dir)
    with pytest.raises(ValueError):
        Settings(workers=0)


def test_wal_mode(db):
    assert db.connect().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.check_writable()


def test_keys_are_hashed_and_verified(db):
    record, token = create_key(db, "alice")
    assert token.startswith(f"fpk_{record.id}_")
    stored = db.get_key(record.id)
    assert stored["hash"] == hash_key(token) and token not in str(stored)
    assert verify_key(db, token).name == "alice"
    assert verify_key(db, token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert verify_key(db, None) is None and verify_key(db, "garbage") is None
    assert verify_key(db, f"fpk_00000000_{'x' * 43}") is None
    with pytest.raises(ValueError, match="already exists"):
        create_key(db, "alice")
    with pytest.raises(ValueError, match="invalid"):
        create_key(db, "../etc")
    admin, _ = create_key(db, "root", admin=True)
    assert admin.is_admin and not record.is_admin
    revoke_key(db, "alice")
    assert verify_key(db, token) is None
    assert [k.revoked is not None for k in list_keys(db)] == [True, False]
    with pytest.raises(ValueError, match="no API key"):
        revoke_key(db, "nobody")


def test_keys_cli_prints_the_key_last(tmp_path, capsys):
    from fingerprint.cli import keys

    parser = argparse.ArgumentParser()
    keys.add_parser(parser.add_subparsers())
    data = tmp_path / "data"
    args = parser.parse_args(["keys", "create", "--name", "carol", "--admin",
                              "--data-dir", str(data)])
    assert args.func(args) == 0
    token = capsys.readouterr().out.strip().splitlines()[-1]
    db = Database(data / "fingerprint.sqlite3")
    assert verify_key(db, token).is_admin
    args = parser.parse_args(["keys", "list", "--data-dir", str(data)])
    assert args.func(args) == 0
    listing = capsys.readouterr().out
    assert "carol" in listing and "admin" in listing and token not in listing
    args = parser.parse_args(["keys", "revoke", "carol", "--data-dir", str(data)])
    assert args.func(args) == 0
    assert verify_key(db, token) is None


def test_job_lifecycle_and_limits(db):
    ids = [db.new_job_id() for _ in range(3)]
    for job_id in ids[:2]:
        assert db.insert_job(job_id, owner="k1", kind="fit", model="noddi", options={},
                             inputs={}, max_active=2) is not None
    assert db.insert_job(ids[2], owner="k1", kind="fit", model="noddi", options={},
                         inputs={}, max_active=2) is None
    assert db.get_job(ids[2]) is None
    assert db.next_queued().id == ids[0]
    assert db.claim(ids[0]) and not db.claim(ids[0])
    db.set_progress(ids[0], 0.5)
    db.set_progress(ids[0], 0.25)  # progress never goes back
    job = db.get_job(ids[0])
    assert job.status == "running" and job.progress == 0.5 and job.attempts == 1
    assert db.next_queued(exclude={ids[0]}).id == ids[1]
    assert db.finish(ids[0], "succeeded", outputs=["a.nii.gz"])
    assert not db.finish(ids[0], "failed")  # already final
    assert db.get_job(ids[0]).outputs == ["a.nii.gz"]
    # a queued job is cancelled at once
    assert db.request_cancel(ids[1]).status == "cancelled"
    rows, total = db.list_jobs("k1", limit=1)
    assert total == 2 and rows[0].id == ids[1]
    rows, _ = db.list_jobs("k1", limit=5, before_seq=rows[0].seq)
    assert [r.id for r in rows] == [ids[0]]
    assert db.list_jobs("k2", limit=5) == ([], 0)


def _job(db: Database, storage: JobStorage, status: str, attempts: int = 1,
         outputs: bool = False) -> str:
    job_id = db.new_job_id()
    db.insert_job(job_id, owner="k", kind="fit", model="noddi", options={}, inputs={})
    inputs = storage.inputs_dir(job_id)
    inputs.mkdir(parents=True)
    (inputs / "dwi.nii.gz").write_bytes(b"x")
    for _ in range(attempts):
        db.requeue(job_id)
        db.claim(job_id)
    if status != "running":
        db.finish(job_id, status, outputs=["map.nii.gz"] if outputs else [])
    if outputs:
        out = storage.outputs_dir(job_id)
        out.mkdir()
        (out / "map.nii.gz").write_bytes(b"result")
    (storage.job_dir(job_id) / f"outputs.partial.{attempts}").mkdir()
    return job_id


def test_reconcile_after_a_crash(db, tmp_path):
    storage = JobStorage(db.path.parent)
    storage.ensure()
    done = _job(db, storage, "succeeded", outputs=True)
    interrupted = _job(db, storage, "running", attempts=1)
    exhausted = _job(db, storage, "running", attempts=3)
    queued = db.new_job_id()
    db.insert_job(queued, owner="k", kind="fit", model="noddi", options={}, inputs={})
    storage.inputs_dir(queued).mkdir(parents=True)
    lost = db.new_job_id()
    db.insert_job(lost, owner="k", kind="fit", model="noddi", options={}, inputs={})
    orphan = storage.jobs_dir / ("f" * 32)
    (orphan / "inputs").mkdir(parents=True)
    (storage.tmp_dir / "upload-1234").mkdir()
    (storage.tmp_dir / "upload-1234" / "dwi.upload").write_bytes(b"partial")

    report = reconcile(db, storage, max_attempts=3)

    assert report.requeued == [interrupted]
    assert db.get_job(interrupted).status == "queued"
    assert "re-queued" in db.get_job(interrupted).error
    job = db.get_job(exhausted)
    assert job.status == "failed" and "3 attempts" in job.error
    assert db.get_job(queued).status == "queued" and queued in report.resumed
    assert db.get_job(lost).status == "failed" and "missing" in db.get_job(lost).error
    assert not orphan.exists() and report.orphans_removed == [orphan.name]
    assert list(storage.tmp_dir.iterdir()) == []
    assert (storage.outputs_dir(done) / "map.nii.gz").read_bytes() == b"result"
    assert db.get_job(done).status == "succeeded"
    assert not list(storage.jobs_dir.glob("*/outputs.partial*"))


class _FakeRequest:
    def __init__(self, body: bytes, content_type: str, declare_length: bool = True) -> None:
        self._body = body
        self.headers = {"content-type": content_type}
        if declare_length:
            self.headers["content-length"] = str(len(body))

    async def stream(self):
        for i in range(0, len(self._body), 7):  # tiny chunks cross every boundary
            yield self._body[i:i + 7]


def _multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> bytes:
    out = io.BytesIO()
    for name, filename, data in parts:
        out.write(f"--{boundary}\r\n".encode())
        disposition = f'form-data; name="{name}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        out.write(f"Content-Disposition: {disposition}\r\n\r\n".encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue()


FIELDS = {"dwi": FileField("dwi", nifti=True), "bval": FileField("dwi.bval"),
          "mask": FileField("mask", nifti=True, required=False)}


def _receive(tmp_path: Path, body: bytes, max_bytes: int = 10_000, **kw):
    dest = tmp_path / "upload"
    dest.mkdir(parents=True, exist_ok=True)
    request = _FakeRequest(body, "multipart/form-data; boundary=b0undary", **kw)
    return asyncio.run(receive_multipart(request, dest, file_fields=FIELDS,
                                         text_fields={"model"}, max_bytes=max_bytes))


def test_multipart_streams_files_under_server_names(tmp_path):
    gz = b"\x1f\x8b" + b"n" * 500
    body = _multipart([("dwi", "../../evil name.nii.gz", gz), ("bval", "/etc/passwd", b"0 1000"),
                       ("model", None, b" noddi ")])
    upload = _receive(tmp_path, body)
    assert upload.fields == {"model": "noddi"}
    assert upload.files["dwi"] == tmp_path / "upload" / "dwi.nii.gz"
    assert upload.files["dwi"].read_bytes() == gz
    assert upload.files["bval"].name == "dwi.bval"
    assert sorted(p.name for p in (tmp_path / "upload").iterdir()) == ["dwi.bval", "dwi.nii.gz"]
    assert not (tmp_path / "evil name.nii.gz").exists()
    # an uncompressed NIfTI gets .nii
    upload = _receive(tmp_path / "2", _multipart([("dwi", "x", b"\x5c\x01rest"),
                                                  ("bval", "b", b"0")]))
    assert upload.files["dwi"].name == "dwi.nii"


@pytest.mark.parametrize("parts, status, field", [
    ([("dwi", "a", b"x" * 20_000), ("bval", "b", b"0")], 413, None),
    ([("bval", "b", b"0")], 422, "dwi"),
    ([("dwi", "a", b""), ("bval", "b", b"0")], 422, "dwi"),
    ([("dwi", "a", b"x"), ("dwi", "a", b"y"), ("bval", "b", b"0")], 422, "dwi"),
    ([("dwi", "a", b"x"), ("bval", "b", b"0"), ("other", None, b"1")], 422, "other"),
    ([("dwi", "a", b"x"), ("bval", "b", b"0"), ("model", None, b"m" * 5000)], 422, "model"),
])
def test_multipart_rejections(tmp_path, parts, status, field):
    with pytest.raises(UploadError) as info:
        _receive(tmp_path, _multipart(parts))
    assert info.value.status_code == status and info.value.field == field


def test_multipart_limit_without_content_length(tmp_path):
    body = _multipart([("dwi", "a", b"x" * 20_000), ("bval", "b", b"0")])
    with pytest.raises(UploadError) as info:
        _receive(tmp_path, body, declare_length=False)
    assert info.value.status_code == 413


def test_multipart_needs_form_content_type(tmp_path):
    request = _FakeRequest(b"{}", "application/json")
    with pytest.raises(UploadError) as info:
        asyncio.run(receive_multipart(request, tmp_path, file_fields=FIELDS, text_fields=set(),
                                      max_bytes=100))
    assert info.value.status_code == 415


def test_client_refuses_unsafe_archives(tmp_path):
    from fingerprint.client import _extract

    good = io.BytesIO()
    with zipfile.ZipFile(good, "w") as z:
        z.writestr("a_param-icvf_dwimap.json", "{}")
    good.seek(0)
    assert [p.name for p in _extract(good, tmp_path / "out")] == ["a_param-icvf_dwimap.json"]
    for name in ("../escape.txt", "/abs.txt", "sub/../../x"):
        bad = io.BytesIO()
        with zipfile.ZipFile(bad, "w") as z:
            z.writestr(name, "x")
        bad.seek(0)
        with pytest.raises(ValueError, match="unsafe"):
            _extract(bad, tmp_path / "out2")
    assert not (tmp_path / "escape.txt").exists()


def test_zip_stream_round_trip(tmp_path):
    from server.routers.jobs import _zip_stream

    (tmp_path / "a.nii.gz").write_bytes(bytes(range(256)) * 5000)
    (tmp_path / "a.json").write_text('{"x": 1}')
    data = b"".join(_zip_stream(tmp_path, ["a.nii.gz", "a.json"]))
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert z.read("a.nii.gz") == (tmp_path / "a.nii.gz").read_bytes()
        assert z.read("a.json") == b'{"x": 1}'


def _chunk_sum(shared, chunk, offset=0.0):
    import numpy as np

    assert isinstance(shared, np.ndarray) and isinstance(chunk, np.ndarray)
    return float(shared.sum() + chunk.sum() + offset)


def _sleep_then(value, seconds):
    import time

    time.sleep(seconds)
    return value


def test_dask_job_executor_ships_shared_data_once():
    import concurrent.futures as cf

    import numpy as np

    distributed = pytest.importorskip("distributed")
    from server.dask_executor import DaskJobExecutor

    shared = np.ones(300_000)  # 2.4 MB, passed to every task
    chunks = [np.full(200_000, float(i)) for i in range(6)]  # 1.6 MB, one task each
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster, set_as_default=False) as dask_client:
        executor = DaskJobExecutor(dask_client)
        futures = [executor.submit(_chunk_sum, shared, c, offset=0.5) for c in chunks]
        results = [f.result(timeout=60) for f in futures]
        assert results == [shared.sum() + c.sum() + 0.5 for c in chunks]
        assert executor.n_tasks == 6 and executor._max_workers == 2
        # the shared array was scattered once (when reused); each chunk went with its task
        assert executor.n_scattered == 1
        assert [e.value for e in executor._shipped.values()] == [shared]
        executor.shutdown()
        assert not executor._shipped
        with pytest.raises(RuntimeError, match="shutdown"):
            executor.submit(_chunk_sum, shared, chunks[0])

        # cancelling: tasks not run yet never run, and the caller sees them cancelled
        executor = DaskJobExecutor(dask_client)
        slow = [executor.submit(_sleep_then, i, 0.5) for i in range(8)]
        executor.shutdown(wait=False, cancel_futures=True)
        done, _ = cf.wait(slow, timeout=30)
        assert len(done) == 8
        assert sum(f.cancelled() for f in slow) >= 4
        # a task's exception reaches the caller
        executor = DaskJobExecutor(dask_client)
        with pytest.raises(AssertionError):
            executor.submit(_chunk_sum, "not an array", chunks[0]).result(timeout=30)
        executor.shutdown()


def test_job_errors_do_not_disclose_server_paths(tmp_path):
    from server.executor import JobSpec, public_message

    job_dir = tmp_path / "data" / "jobs" / ("a" * 32)
    spec = JobSpec(job_id="a" * 32, kind="fit", model="noddi", options={},
                   inputs={"dwi": "dwi.nii.gz", "bval": "dwi.bval", "bvec": "dwi.bvec"},
                   job_dir=str(job_dir), db_path=str(tmp_path / "data" / "fingerprint.sqlite3"),
                   dictionary_dir=str(tmp_path / "data" / "dictionaries"), threads=1, attempt=1)
    message = public_message(
        f"InputError: DWI file {job_dir}/inputs/dwi.nii.gz has NaN values; bvals "
        f"{job_dir}/inputs/dwi.bval; store {tmp_path}/data/dictionaries/noddi-1 broken; "
        f"{job_dir}/outputs.partial.1", spec)
    assert str(tmp_path) not in message
    assert "DWI file 'dwi' has NaN" in message and "bvals 'bval'" in message
    assert "<dictionaries>/noddi-1" in message and "<job>/outputs.partial.1" in message


def test_serve_flags_override_the_environment(monkeypatch, tmp_path, capsys):
    from fingerprint.cli import serve
    from fingerprint.cli.main import main

    monkeypatch.setenv("FINGERPRINT_WORKERS", "3")
    monkeypatch.setenv("FINGERPRINT_DASK_SCHEDULER", "tcp://env:8786")
    parser = argparse.ArgumentParser()
    serve.add_parser(parser.add_subparsers())
    args = parser.parse_args(["serve", "--data-dir", str(tmp_path), "--port", "9001"])
    settings = serve.settings_from_args(args)
    assert (settings.workers, settings.port, settings.data_dir) == (3, 9001, tmp_path)
    assert settings.dask_scheduler == "tcp://env:8786"
    args = parser.parse_args(["serve", "--workers", "2", "--dask-scheduler", "tcp://s:1"])
    settings = serve.settings_from_args(args)
    assert (settings.workers, settings.dask_scheduler) == (2, "tcp://s:1")
    # invalid settings: a one-line error and exit status 2, no server started
    assert main(["serve", "--workers", "0"]) == 2
    assert "workers" in capsys.readouterr().err


def _stubborn_job(spec):
    """A job that never looks at its cancellation flag."""
    import time

    time.sleep(300)
    return {"status": "succeeded", "error": None, "outputs": [], "result": {}}


def test_a_job_ignoring_its_cancellation_is_killed(tmp_path):
    import os
    import time

    from server.executor import PID_FILE, Dispatcher

    settings = Settings(data_dir=tmp_path / "data", workers=2, cancel_kill_seconds=0.5,
                        poll_interval=0.05)
    storage = JobStorage(settings.data_dir)
    storage.ensure()
    db = Database(settings.database_path)
    db.initialize()
    ids = []
    for _ in range(2):
        job_id = db.new_job_id()
        db.insert_job(job_id, owner="k", kind="fit", model="noddi", options={}, inputs={})
        storage.inputs_dir(job_id).mkdir(parents=True)
        ids.append(job_id)
    victim, bystander = ids
    dispatcher = Dispatcher(settings, db, storage)
    dispatcher.job_function = _stubborn_job
    dispatcher.start()
    try:
        deadline = time.monotonic() + 60
        while not all((storage.job_dir(i) / PID_FILE).exists() for i in ids):
            assert time.monotonic() < deadline, "the jobs did not start"
            time.sleep(0.05)
        pid = int((storage.job_dir(victim) / PID_FILE).read_text())
        storage.request_cancel(victim)
        db.request_cancel(victim)
        while db.get_job(victim).status == "running":
            assert time.monotonic() < deadline, "the cancelled job was not stopped"
            time.sleep(0.05)
        assert db.get_job(victim).status == "cancelled"
        with pytest.raises(ProcessLookupError):
            for _ in range(100):  # the killed worker disappears
                os.kill(pid, 0)
                time.sleep(0.05)
        # the other job lost its worker too: queued again, without losing an attempt
        job = db.get_job(bystander)
        assert job.status in ("queued", "running") and job.attempts <= 1
    finally:
        dispatcher.stop()
    assert db.get_job(bystander).status == "queued"
