"""Server restarts after kill -9, and the Dask executor (real server subprocesses)."""

from __future__ import annotations

import gzip
import io
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from server_helpers import (
    ServerProcess,
    client,
    make_keys,
    start_server,
    upload_files,
    wait_for,
)
from test_server import SIZE, SLOW_SIZE

#: long end-to-end tests (real server processes); CI runs them, `-m "not slow"` skips
pytestmark = pytest.mark.slow


def _maps(zip_bytes: bytes) -> dict[str, np.ndarray]:
    out = {}
    with zipfile.ZipFile(io.BytesIO(zip_bytes)) as archive:
        for name in archive.namelist():
            if name.endswith(".nii.gz"):
                img = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(name)))
                out[name] = np.asarray(img.dataobj)
    return out


def _start(tmp_path, max_attempts: int) -> ServerProcess:
    return start_server(tmp_path / "data", "--workers", "1", "--max-attempts",
                        str(max_attempts), "--max-dictionary-size", str(SLOW_SIZE),
                        "--max-user-dictionary-size", str(SLOW_SIZE))


def test_kill9_during_a_job_then_restart(tmp_path, phantom):
    server = _start(tmp_path, max_attempts=2)
    data_dir, keys = server.data_dir, server.keys
    try:
        with client(server, keys["alice"]) as http:
            r = http.post("/v1/jobs", files=upload_files(phantom),
                          data={"dictionary_size": str(SIZE)})
            done = wait_for(http, r.json()["id"])
            assert done["status"] == "succeeded", done
            before = http.get(f"/v1/jobs/{done['id']}/results").content
            r = http.post("/v1/jobs", files=upload_files(phantom),
                          data={"dictionary_size": str(SLOW_SIZE)})
            victim = r.json()["id"]
            wait_for(http, victim, states=("running",))
        server.kill9()
    except BaseException:
        server.stop()
        raise
    # leftovers a crash can leave: an orphan job directory and a half-received upload
    orphan = data_dir / "jobs" / ("0" * 32)
    (orphan / "inputs").mkdir(parents=True)
    (data_dir / "tmp" / "upload-dead").mkdir()

    restarted = server.restarted()
    try:
        with client(restarted, keys["alice"]) as http:
            job = http.get(f"/v1/jobs/{victim}").json()
            assert job["status"] in ("queued", "running") and job["attempts"] >= 1
            assert http.get(f"/v1/jobs/{done['id']}/results").content == before
            assert not orphan.exists()
            assert list((data_dir / "tmp").iterdir()) == []
            # the re-run is interrupted too: the job then fails with the reason
            wait_for(http, victim, states=("running",))
        restarted.kill9()
        final = restarted.restarted()
        try:
            with client(final, keys["alice"]) as http:
                job = http.get(f"/v1/jobs/{victim}").json()
                assert job["status"] == "failed", job
                assert "2 attempts" in job["error"]
                assert http.get(f"/v1/jobs/{done['id']}/results").content == before
        finally:
            final.stop()
    finally:
        restarted.stop()


def test_graceful_stop_requeues_without_counting(tmp_path, phantom):
    server = _start(tmp_path, max_attempts=1)
    keys = server.keys
    try:
        with client(server, keys["alice"]) as http:
            job_id = http.post("/v1/jobs", files=upload_files(phantom),
                               data={"dictionary_size": str(SLOW_SIZE)}).json()["id"]
            wait_for(http, job_id, states=("running",))
    finally:
        server.stop()  # SIGINT: clean shutdown
    again = server.restarted()
    try:
        with client(again, keys["alice"]) as http:
            job = http.get(f"/v1/jobs/{job_id}").json()
            assert job["status"] in ("queued", "running"), job
            http.delete(f"/v1/jobs/{job_id}")
    finally:
        again.stop()


def test_dask_executor_gives_the_same_maps(tmp_path, phantom):
    distributed = pytest.importorskip("distributed")
    data_dir = tmp_path / "data"
    keys = make_keys(data_dir)
    with distributed.LocalCluster(n_workers=1, processes=False, threads_per_worker=2,
                                  protocol="tcp",
                                  dashboard_address=None) as cluster:
        dask_server = ServerProcess(data_dir, args=[
            "--dask-scheduler", cluster.scheduler_address,
            "--max-dictionary-size", str(SLOW_SIZE),
            "--max-user-dictionary-size", str(SLOW_SIZE)]).start()
        try:
            with client(dask_server, keys["alice"]) as http:
                ready = http.get("/readyz").json()
                assert "Dask" in ready["checks"]["executor"]
                r = http.post("/v1/jobs", files=upload_files(phantom),
                              data={"dictionary_size": str(SIZE)})
                job = wait_for(http, r.json()["id"])
                assert job["status"] == "succeeded", job
                dask_maps = _maps(http.get(f"/v1/jobs/{job['id']}/results").content)
                # the voxel chunks ran as tasks on the cluster
                prefixes = cluster.scheduler.task_prefixes
                assert "fit_chunk" in prefixes, sorted(prefixes)
                assert sum(prefixes["fit_chunk"].state_counts.values()) >= 1
                # cancelling a running job works the same with Dask
                slow = http.post("/v1/jobs", files=upload_files(phantom),
                                 data={"dictionary_size": str(SLOW_SIZE)}).json()
                wait_for(http, slow["id"], states=("running",))
                assert http.delete(f"/v1/jobs/{slow['id']}").status_code in (200, 202)
                assert http.get(f"/v1/jobs/{slow['id']}").status_code == 404
                deadline = time.monotonic() + 60
                while (data_dir / "jobs" / slow["id"]).exists():
                    assert time.monotonic() < deadline, "the cancelled job did not stop"
                    time.sleep(0.1)
                assert not cluster.scheduler.tasks  # nothing left on the cluster
        finally:
            dask_server.stop()
    local_dir = tmp_path / "local"
    from test_server import _size_kwargs

    from fingerprint.fitting.pipeline import fit_volume

    fit_volume("noddi", phantom["dwi"], phantom["bval"], phantom["bvec"], local_dir,
               mask=phantom["mask"], **_size_kwargs(fit_volume))
    local_maps = {p.name: np.asarray(nib.load(p).dataobj) for p in local_dir.glob("*.nii.gz")}
    assert {Path(n).name for n in dask_maps} == set(local_maps)
    for name, values in dask_maps.items():
        np.testing.assert_allclose(values, local_maps[Path(name).name], rtol=1e-6, atol=1e-6)
