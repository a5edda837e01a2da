"""Limits that keep one API key from exhausting the server, probed on a real server:
decompression bombs and lying headers, mask limits, dictionary sizes, strict multipart,
slow and stalled clients, uploads in flight, chunked uploads over the limit."""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from server_helpers import (
    WAIT_S,
    ServerProcess,
    client,
    make_keys,
    multipart_form,
    nifti_gz,
    raw_post,
    serve,
    start_server,
    upload_files,
    wait_for,
)

#: DWI limit of the test server (MiB) and its voxel limit
MAX_DWI_MB = 1
MAX_VOXELS = 12


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, "limits", "--workers", "1", "--max-upload-mb", "4",
                     "--max-dwi-mb", str(MAX_DWI_MB), "--max-voxels", str(MAX_VOXELS),
                     "--max-uploads-per-key", "1", "--max-uploads", "2",
                     "--min-upload-rate-kb", "64", "--max-upload-seconds", "20",
                     env={"FINGERPRINT_UPLOAD_GRACE_SECONDS": "1"})


def _leftovers(server: ServerProcess) -> tuple[list[str], list[str]]:
    return (sorted(p.name for p in (server.data_dir / "tmp").iterdir()),
            sorted(p.name for p in (server.data_dir / "jobs").iterdir()))


def _nifti_gz(header_shape, data=None, *, extra_zeros=0, affine=None, dtype=np.float32):
    return nifti_gz(header_shape, data, extra_zeros=extra_zeros, affine=affine, dtype=dtype)


def _phantom_data(phantom) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(phantom["dwi"])
    return np.asarray(img.dataobj, dtype=np.float32), img.affine


def test_decompression_bomb_is_refused_from_its_header(server, phantom):
    n = _phantom_data(phantom)[0].shape[3]
    bomb = _nifti_gz((256, 256, 64, n))  # 1.5 GiB once decompressed
    assert len(bomb) < 4 * 1024 * 1024
    with client(server, server.keys["alice"]) as http:
        files = upload_files(phantom)
        files["dwi"] = ("bomb.nii.gz", bomb)
        t0 = time.monotonic()
        r = http.post("/v1/jobs", files=files)
        elapsed = time.monotonic() - t0
    assert r.status_code == 413, r.text
    body = r.json()
    assert body["field"] == "dwi" and f"limit of {MAX_DWI_MB:.1f} MiB" in body["detail"]
    assert "1,536.0 MiB" in body["detail"]
    print(f"bomb of {len(bomb) / 1e6:.1f} MB refused in {elapsed:.2f} s")
    assert _leftovers(server) == ([], [])


def test_headers_that_lie_about_the_data_size_are_caught(server, phantom):
    data, affine = _phantom_data(phantom)
    raw = np.asfortranarray(data).tobytes(order="F")
    cases = {
        # the header describes the phantom, the stream holds 1.5 MB more
        "longer": _nifti_gz(data.shape, raw, extra_zeros=1_500_000, affine=affine),
        # a valid gzip stream that ends half-way through the data block
        "shorter": _nifti_gz(data.shape, raw[: len(raw) // 2], affine=affine),
    }
    with client(server, server.keys["alice"]) as http:
        for label, dwi in cases.items():
            files = upload_files(phantom)
            del files["mask"]  # (over the voxel limit of this server)
            files["dwi"] = ("dwi.nii.gz", dwi)
            r = http.post("/v1/jobs", files=files)
            assert r.status_code == 422, (label, r.text)
            detail = r.json()["detail"]
            assert r.json()["field"] == "dwi", (label, detail)
            if label == "longer":
                assert "more than the" in detail and "header declares" in detail
            else:
                assert "truncated" in detail
    assert _leftovers(server) == ([], [])


def test_job_checks_catch_a_lying_header_in_bounded_memory(tmp_path, phantom):
    """The checks a job makes before fitting (for DWIs too large to check while the
    client waits): the stream is read in blocks and stops once past the header's size."""
    import resource

    from fingerprint.errors import InputError
    from server.limits import InputLimits, check_job_inputs

    data, affine = _phantom_data(phantom)
    raw = np.asfortranarray(data).tobytes(order="F")
    bomb = tmp_path / "dwi.nii.gz"
    bomb.write_bytes(_nifti_gz(data.shape, raw, extra_zeros=400 * 1024 * 1024, affine=affine))
    limits = InputLimits(max_voxels=1000, max_dwi_bytes=1 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(InputError, match="decompresses to more than"):
        check_job_inputs(bomb, phantom["bval"], phantom["bvec"], None, {}, limits)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, grown_mb  # the 400 MB stream was never held in memory
    # a valid input: the default mask comes back, limited to max_voxels
    mask = check_job_inputs(phantom["dwi"], phantom["bval"], phantom["bvec"], None, {}, limits)
    assert mask is not None and mask.shape == data.shape[:3] and mask.sum() == 18
    with pytest.raises(InputError, match="18 voxels, more than the server's limit of 10"):
        check_job_inputs(phantom["dwi"], phantom["bval"], phantom["bvec"], None, {},
                         InputLimits(max_voxels=10, max_dwi_bytes=1 << 20))


def _mask_gz(values: np.ndarray, affine: np.ndarray) -> bytes:
    return gzip.compress(nib.Nifti1Image(values.astype(np.uint8), affine).to_bytes())


def test_mask_limits_and_affine(server, phantom):
    data, affine = _phantom_data(phantom)
    shape = data.shape[:3]
    with client(server, server.keys["alice"]) as http:
        files = upload_files(phantom)
        files["mask"] = ("m.nii.gz", _mask_gz(np.ones(shape), affine))
        r = http.post("/v1/jobs", files=files)
        assert r.status_code == 422 and r.json()["field"] == "mask", r.text
        assert f"18 voxels, more than the server's limit of {MAX_VOXELS}" in r.json()["detail"]

        shifted = affine.copy()
        shifted[:3, 3] += 2.0  # 2 mm off
        small = np.zeros(shape)
        small[:2, :2, :] = 1
        files["mask"] = ("m.nii.gz", _mask_gz(small, shifted))
        r = http.post("/v1/jobs", files=files)
        assert r.status_code == 422 and r.json()["field"] == "mask", r.text
        assert "different affine" in r.json()["detail"]

        # no mask: the default mask (18 voxels) is over the limit; the job says so
        files = upload_files(phantom)
        del files["mask"]
        r = http.post("/v1/jobs", files=files, data={"dictionary_size": "3000"})
        assert r.status_code == 202, r.text
        job = wait_for(http, r.json()["id"])
        assert job["status"] == "failed" and "more than the server's limit of 12" in \
            job["error"], job
    assert _leftovers(server)[0] == []


def test_dictionary_sizes_above_the_default_are_for_admins(server, phantom):
    with client(server, server.keys["alice"]) as http:
        r = http.post("/v1/jobs", files=upload_files(phantom),
                      data={"dictionary_size": "100001"})
        assert r.status_code == 403, r.text
        assert r.json()["field"] == "dictionary_size" and "100,000" in r.json()["detail"]
    assert _leftovers(server)[0] == []


def _raw_request(server: ServerProcess, key: str, body_parts, **kw):
    return raw_post(server.port, "/v1/jobs", key, body_parts, **kw)


def _form(phantom, boundary: str = "xx", **kw) -> bytes:
    files = {name: phantom[name].read_bytes() for name in ("dwi", "bval", "bvec", "mask")}
    return multipart_form(files, boundary, **kw)


def test_strict_multipart(server, phantom):
    key = server.keys["alice"]
    before = _leftovers(server)
    cases = {
        "no closing boundary": (_form(phantom, close=False), "xx", 400, "closing boundary"),
        "truncated part": (_form(phantom, close=False, drop_tail=50), "xx", 400,
                           "'mask' is cut off"),
        "boundary over 70 characters": (_form(phantom, "b" * 300), "b" * 300, 400,
                                        "at most 70"),
        "duplicated field": (_form(phantom, duplicate="bval"), "xx", 422, "more than once"),
    }
    for label, (body, boundary, status, words) in cases.items():
        got, _, text, _ = _raw_request(server, key, [body], boundary=boundary)
        assert got == status and words in text, (label, got, text)
        assert _leftovers(server) == before, label


def test_slow_and_stalled_uploads_get_408(server, phantom):
    before = _leftovers(server)
    body = _form(phantom)
    # a trickle: 200 bytes every 0.25 s, far below 64 KiB/s
    pieces = [body[i:i + 200] for i in range(0, 200 * 40, 200)]
    status, _, text, sent = _raw_request(server, server.keys["alice"], pieces,
                                         length=len(body), pause=0.25,
                                         stop_when_answered=True)
    assert status == 408 and "too slow" in text, text
    assert sent < len(body)
    # a stall: half the body, then nothing
    status, _, text, _ = _raw_request(server, server.keys["alice"], [body[:len(body) // 2]],
                                      length=len(body))
    assert status == 408 and "no data arrived" in text, text
    assert _leftovers(server) == before


def test_uploads_in_flight_are_bounded_per_key_and_in_total(tmp_path, phantom):
    import threading

    # a server of its own whose slow uploads may pause as long as the test needs (the
    # module's server answers a pause of a second with 408); the same upload limits
    server = start_server(tmp_path / "data", "--workers", "1", "--max-upload-mb", "4",
                          "--max-dwi-mb", str(MAX_DWI_MB), "--max-voxels", str(MAX_VOXELS),
                          "--max-uploads-per-key", "1", "--max-uploads", "2",
                          "--min-upload-rate-kb", "0", "--max-upload-seconds", "600",
                          env={"FINGERPRINT_UPLOAD_GRACE_SECONDS": "300"})
    body = _form(phantom)
    release = threading.Event()
    results = {}

    def held_pieces():  # the body's start, then the rest once the checks below are done
        yield body[:100]
        release.wait(WAIT_S)
        yield body[100:]

    def slow(name: str) -> None:  # holds one upload slot until released
        results[name] = _raw_request(server, server.keys[name], held_pieces(),
                                     length=len(body), timeout=WAIT_S)

    threads = [threading.Thread(target=slow, args=(n,), daemon=True) for n in ("alice", "bob")]
    try:
        for t in threads:
            t.start()
        # both uploads hold their slots once the server has made their upload directories
        deadline = time.monotonic() + WAIT_S
        while len(_leftovers(server)[0]) < 2:
            assert time.monotonic() < deadline, "the slow uploads never started"
            assert not results, results  # none was answered before it was released
            time.sleep(0.05)
        with client(server, server.keys["alice"]) as http:
            r = http.post("/v1/jobs", files=upload_files(phantom))
            assert r.status_code == 429 and "uploads in progress" in r.json()["detail"], r.text
            assert int(r.headers["retry-after"]) > 0
        with client(server, server.keys["root"]) as http:
            r = http.post("/v1/jobs", files=upload_files(phantom))
            assert r.status_code == 429 and "receiving 2 uploads" in r.json()["detail"], r.text
            assert int(r.headers["retry-after"]) > 0
        assert not results, results  # the slow uploads were still in flight throughout
    finally:
        release.set()
        for t in threads:
            t.join(WAIT_S)
        server.stop()
    # the slow uploads themselves were then received and checked: the mask is over the
    # voxel limit
    for name in ("alice", "bob"):
        status, _, text, sent = results[name]
        assert status == 422 and "voxels" in text and sent == len(body), (name, text)
    assert _leftovers(server) == ([], [])


def test_chunked_upload_is_refused_as_soon_as_it_passes_the_limit(server, phantom):
    before = _leftovers(server)
    block = b"\0" * 65536
    start = (b"--xx\r\nContent-Disposition: form-data; name=\"dwi\"; filename=\"a\"\r\n\r\n")
    pieces = [start] + [block] * 3200  # 200 MiB against a 4 MiB limit
    status, _, text, sent = _raw_request(server, server.keys["alice"], pieces, chunked=True,
                                         stop_when_answered=True)
    assert status == 413 and "limit of 4 MiB" in text, text
    # answered before the client was done (the server drains at most a bounded amount)
    assert sent < sum(len(p) for p in pieces)
    assert _leftovers(server) == before


# ------------------------------------------------------------------ dictionary cache
def _fake_store(directory: Path, name: str, nbytes: int, used: float) -> Path:
    store = directory / name
    store.mkdir(parents=True)
    (store / "zarr.json").write_text("{}")
    (store / "data").write_bytes(b"\0" * nbytes)
    from fingerprint.dictionary.cache import in_use

    with in_use(store):
        pass
    import os

    os.utime(directory / ".locks" / f"{name}.use", (used, used))
    return store


def test_cache_budget_evicts_least_recently_used_never_in_use(tmp_path):
    from fingerprint.dictionary.cache import cache_size, evict_to_budget, in_use

    old = _fake_store(tmp_path, "a.zarr", 1000, 100.0)
    index = tmp_path / "a.zarr.hnsw32.faiss"  # a search index kept beside the store
    index.write_bytes(b"\0" * 500)
    held = _fake_store(tmp_path, "b.zarr", 1000, 200.0)
    mid = _fake_store(tmp_path, "c.zarr", 1000, 300.0)
    new = _fake_store(tmp_path, "d.zarr", 1000, 400.0)
    assert cache_size(tmp_path) > 4500
    with in_use(held):  # oldest after a.zarr, but in use: skipped
        removed = evict_to_budget(tmp_path, 2500, keep=(new,))
    assert removed == [old, mid]
    assert held.exists() and new.exists() and not old.exists() and not mid.exists()
    assert not index.exists()
    # room for a new dictionary: the least recently used one goes, unless kept
    assert evict_to_budget(tmp_path, 2500, need=1000, keep=(new,)) == [held]
    assert evict_to_budget(tmp_path, 0, keep=(new,)) == [] and new.exists()
    assert not [p for p in tmp_path.iterdir() if ".trash-" in p.name]


def test_stale_build_leftovers_are_cleaned(tmp_path):
    import os

    from fingerprint.dictionary.cache import cleanup_stale_builds

    dead = tmp_path / ".abc.zarr.tmp-999999999-00ff"
    alive = tmp_path / f".abc.zarr.tmp-{os.getpid()}-00ff"
    trash = tmp_path / ".def.zarr.trash-1234"
    for p in (dead, alive, trash):
        (p / "c").mkdir(parents=True)
    assert cleanup_stale_builds(tmp_path) == 2
    assert alive.exists() and not dead.exists() and not trash.exists()


@pytest.fixture(scope="module")
def cache_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("cache") / "data"
    # about 1.5 MiB: one test dictionary (3000 atoms, about 1 MB) at a time
    proc = start_server(data_dir, "--workers", "1", "--dictionary-cache-gb", "0.0015",
                        "--max-user-dictionary-size", "5000",
                        "--dictionary-dir", str(data_dir / "dictionaries"))
    yield proc
    proc.stop()


def test_cache_budget_on_the_server(cache_server, phantom):
    server = cache_server
    directory = server.data_dir / "dictionaries"
    names = []
    with client(server, server.keys["alice"]) as alice:
        for size in (3000, 3001):
            r = alice.post("/v1/jobs", files=upload_files(phantom),
                           data={"dictionary_size": str(size)})
            assert r.status_code == 202, r.text
            job = wait_for(alice, r.json()["id"])
            assert job["status"] == "succeeded", job
            names.append(job["result"]["dictionary"])
            # the job held its own dictionary (the lock the evictor respects)
            assert (directory / ".locks" / f"{names[-1]}.use").exists()
        stored = sorted(p.name for p in directory.glob("*.zarr"))
        assert stored == [names[1]], (stored, names)  # the first was evicted for the second
        assert [d["name"] for d in alice.get("/v1/dictionaries").json()] == [names[1]]
    with client(server, server.keys["bob"]) as bob:  # bob's jobs used none
        assert bob.get("/v1/dictionaries").json() == []
    with client(server, server.keys["root"]) as root:
        assert [d["name"] for d in root.get("/v1/dictionaries").json()] == [names[1]]
        # an admin may ask for more than the default, but not for more than the budget
        scheme = {k: phantom[k] for k in ("bval", "bvec")}
        r = root.post("/v1/dictionaries", files=upload_files(scheme), data={"size": "200000"})
        assert r.status_code == 202, r.text
        job = wait_for(root, r.json()["id"])
        assert job["status"] == "failed" and "dictionary cache budget" in job["error"], job
    assert sorted(p.name for p in directory.glob("*.zarr")) == [names[1]]
    assert not [p for p in directory.iterdir() if ".tmp-" in p.name]


# ------------------------------------------------------------------ full disk
def _mount_tmpfs(path: Path, size_mb: int) -> bool:
    """Mount a small tmpfs at ``path`` (root only; False where the machine forbids it)."""
    import os
    import subprocess

    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs",
                           str(path)], capture_output=True)
    return done.returncode == 0


def _umount(path: Path) -> None:
    import subprocess

    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` up to the last byte."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    fh.write(b"\0" * size)
            except OSError:
                continue
    return filler


def test_full_disk_is_a_clean_507_and_a_reason_in_words(tmp_path, phantom):
    disk, dicts = tmp_path / "disk", tmp_path / "dicts"
    real = _mount_tmpfs(disk, 24)
    real = real and _mount_tmpfs(dicts, 1)
    try:
        data_dir = disk / "data"
        keys = make_keys(data_dir)
        args = ["--workers", "1", "--dictionary-dir", str(dicts)]
        # a real full disk (no reserve), or where no tmpfs can be mounted, a disk reserve
        # larger than any free space
        args += ["--disk-reserve-mb", "0" if real else str(1 << 40)]
        server = ServerProcess(data_dir, args=args).start()
        try:
            with client(server, keys["alice"]) as http:
                if real:
                    # the dictionary disk is full: the job fails with the reason in words
                    _fill(dicts)
                    r = http.post("/v1/jobs", files=upload_files(phantom),
                                  data={"dictionary_size": "3000"})
                    assert r.status_code == 202, r.text
                    job = wait_for(http, r.json()["id"])
                    assert job["status"] == "failed", job
                    assert "not enough disk space" in job["error"], job
                    assert not [p for p in dicts.iterdir() if p.name != "filler"
                                and not p.name.startswith(".lock")], list(dicts.iterdir())
                    filler = _fill(disk)
                r = http.post("/v1/jobs", files=upload_files(phantom))
                assert r.status_code == 507, r.text
                assert "not enough disk space" in r.json()["detail"]
                assert int(r.headers["retry-after"]) > 0
                assert list((data_dir / "tmp").iterdir()) == []
                jobs = sorted(p.name for p in (data_dir / "jobs").iterdir())
                if real:  # space comes back: uploads are accepted again
                    filler.unlink()
                    r = http.post("/v1/jobs", files=upload_files(phantom),
                                  data={"dictionary_size": "3000"})
                    assert r.status_code == 202, r.text
                    assert len(list((data_dir / "jobs").iterdir())) == len(jobs) + 1
            assert "Traceback" not in server.log()
        finally:
            server.stop()
    finally:
        if real:
            _umount(dicts)
            _umount(disk)


def test_job_creation_on_a_full_disk_leaves_nothing(tmp_path):
    import sqlite3
    from types import SimpleNamespace

    from server.dependencies import ApiError
    from server.routers.jobs import accept_job
    from server.storage import JobStorage

    class FullDatabase:
        def new_job_id(self) -> str:
            return "a" * 32

        def insert_job(self, *args, **kwargs):
            raise sqlite3.OperationalError("database or disk is full")

    storage = JobStorage(tmp_path)
    storage.ensure()
    upload = storage.new_upload_dir()
    (upload / "dwi.nii").write_bytes(b"x")
    ctx = SimpleNamespace(storage=storage, db=FullDatabase(), settings=SimpleNamespace(
        disk_reserve_bytes=0, max_jobs_per_key=4))
    with pytest.raises(ApiError) as info:
        accept_job(ctx, "k", upload, kind="fit", model="noddi", options={}, inputs={})
    assert info.value.status_code == 507 and "not enough disk space" in info.value.detail
    assert list(storage.jobs_dir.iterdir()) == []


def test_restart_removes_stale_worker_files(tmp_path):
    from server.db import Database
    from server.reconcile import reconcile
    from server.storage import JobStorage

    db = Database(tmp_path / "db.sqlite3")
    db.initialize()
    storage = JobStorage(tmp_path)
    storage.ensure()
    job_id = db.new_job_id()
    db.insert_job(job_id, owner="k", kind="fit", model="noddi", options={}, inputs={},
                  max_active=4)
    (storage.inputs_dir(job_id)).mkdir(parents=True)
    (storage.job_dir(job_id) / "worker.pid").write_text("12345")
    reconcile(db, storage, max_attempts=3)
    assert not (storage.job_dir(job_id) / "worker.pid").exists()
    assert db.get_job(job_id).status == "queued"


def test_upload_checks_stop_when_the_client_leaves_or_time_is_up(tmp_path, phantom):
    from server.dependencies import ApiError
    from server.limits import InputLimits, Stopped, check_fit_upload

    n = _phantom_data(phantom)[0].shape[3]
    dwi = tmp_path / "dwi.nii.gz"
    dwi.write_bytes(nifti_gz((64, 64, 64, n)))
    mask = tmp_path / "mask.nii.gz"
    mask.write_bytes(_mask_gz(np.ones((64, 64, 64)), np.eye(4)))
    files = {"dwi": dwi, "bval": phantom["bval"], "bvec": phantom["bvec"], "mask": mask}
    limits = InputLimits(max_voxels=10**9, max_dwi_bytes=1 << 30)
    with pytest.raises(Stopped):  # the client went away: the mask is not read further
        check_fit_upload(files, {}, limits, deadline=time.monotonic() + 60,
                         should_stop=lambda: True)
    with pytest.raises(ApiError) as info:  # out of time
        check_fit_upload(files, {}, limits, deadline=time.monotonic() - 1)
    assert info.value.status_code == 422 and "time limit" in info.value.detail
    with pytest.raises(ApiError) as info:  # counted in blocks, against the voxel limit
        check_fit_upload(files, {}, InputLimits(max_voxels=1000, max_dwi_bytes=1 << 30),
                         deadline=time.monotonic() + 60)
    assert "262,144 voxels" in info.value.detail and info.value.field == "mask"
