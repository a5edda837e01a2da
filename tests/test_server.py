"""End-to-end tests of the lab server: a real uvicorn server (subprocess) on a free port,
the real library fitting a small NODDI phantom."""

from __future__ import annotations

import argparse
import gzip
import io
import json
import logging
import os
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from server_helpers import (
    client,
    serve,
    upload_files,
    wait_for,
)

#: atoms of the test dictionary: small, so the first build is quick
SIZE = 3000
#: a dictionary size whose build takes long enough to cancel or interrupt it
SLOW_SIZE = 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, "server", "--workers", "1", "--max-upload-mb", "1",
                     "--max-jobs-per-key", "2", "--max-dictionary-size", str(SLOW_SIZE),
                     "--max-user-dictionary-size", str(SLOW_SIZE))


@pytest.fixture(scope="module")
def finished_job(server, phantom):
    """A job fitted by the server (shared by several tests)."""
    with client(server, server.keys["alice"]) as http:
        r = http.post("/v1/jobs", files=upload_files(phantom),
                      data={"model": "noddi", "dictionary_size": str(SIZE),
                            "prefix": "sub-01"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert r.headers["location"] == f"/v1/jobs/{job['id']}"
        assert job["status"] == "queued" and job["progress"] == 0
        seen = []
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            job = http.get(f"/v1/jobs/{job['id']}").json()
            seen.append(job)
            time.sleep(0.02)
    assert job["status"] == "succeeded", job
    return job, seen


def _read_maps(directory: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(nib.load(p).dataobj)
            for p in sorted(directory.glob("*.nii.gz"))}


def test_fit_matches_the_library(server, phantom, finished_job, tmp_path):
    from fingerprint.client import FingerprintClient
    from fingerprint.fitting.pipeline import fit_volume

    job, seen = finished_job
    assert job["started"] and job["finished"] and job["created"] <= job["started"]
    assert job["progress"] == 1.0 and job["attempts"] == 1 and job["error"] is None
    progress = [j["progress"] for j in seen]
    assert progress == sorted(progress) and all(0 <= p <= 1 for p in progress)
    assert any(name.endswith(".json") for name in job["files"])

    with FingerprintClient(server.url, server.keys["alice"]) as api:
        files = api.download(job["id"], tmp_path / "server")
    assert sorted(p.name for p in files) == sorted(job["files"])

    fit_volume("noddi", phantom["dwi"], phantom["bval"], phantom["bvec"], tmp_path / "local",
               mask=phantom["mask"], prefix="sub-01", **_size_kwargs(fit_volume))
    ours = _read_maps(tmp_path / "server")
    theirs = _read_maps(tmp_path / "local")
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-6, atol=1e-6,
                                   err_msg=name)
    for sidecar in (tmp_path / "server").glob("*.json"):
        assert json.loads(sidecar.read_text()) is not None


def _size_kwargs(fit_volume) -> dict:
    import inspect

    params = inspect.signature(fit_volume).parameters
    for name in ("dictionary_size", "size"):
        if name in params:
            return {name: SIZE}
    return {}


def test_single_result_file_and_zip(server, finished_job):
    job, _ = finished_job
    with client(server, server.keys["alice"]) as http:
        r = http.get(f"/v1/jobs/{job['id']}/results")
        assert r.status_code == 200 and r.headers["content-type"] == "application/zip"
        archive = zipfile.ZipFile(io.BytesIO(r.content))
        assert sorted(archive.namelist()) == sorted(job["files"])
        name = next(n for n in job["files"] if n.endswith(".nii.gz"))
        r = http.get(f"/v1/jobs/{job['id']}/results/{name}")
        assert r.status_code == 200 and r.content == archive.read(name)
        assert gzip.decompress(r.content)[:4]  # a gzipped NIfTI
        for bad in ("../../fingerprint.sqlite3", "inputs%2Fdwi.nii.gz", "nope.nii.gz",
                    "..%2F..%2Ffingerprint.sqlite3"):
            assert http.get(f"/v1/jobs/{job['id']}/results/{bad}").status_code == 404


def test_authentication(server, finished_job):
    job, _ = finished_job
    with client(server, None) as anonymous, client(server, "fpk_00000000_" + "x" * 43) as bad:
        for http in (anonymous, bad):
            for method, url in (("GET", "/v1/jobs"), ("GET", f"/v1/jobs/{job['id']}"),
                                ("GET", "/v1/models"), ("GET", "/v1/dictionaries"),
                                ("DELETE", f"/v1/jobs/{job['id']}"), ("POST", "/v1/jobs"),
                                ("POST", "/v1/dictionaries")):
                r = http.request(method, url)
                assert r.status_code == 401, (method, url, r.text)
                assert "API key" in r.json()["detail"]
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/docs").status_code == 200  # interactive OpenAPI docs
        schema = anonymous.get("/openapi.json").json()
        assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results",
                "/v1/jobs/{job_id}/results/{file_name}", "/v1/models", "/v1/dictionaries",
                "/healthz", "/readyz"} <= set(schema["paths"])
        ready = anonymous.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ok"
    with client(server, server.keys["alice"]) as http:
        models = {m["name"] for m in http.get("/v1/models").json()}
        assert {"noddi", "ball_stick"} <= models


def test_keys_see_only_their_own_jobs(server, finished_job):
    job, _ = finished_job
    with client(server, server.keys["bob"]) as bob:
        for method, suffix in (("GET", ""), ("GET", "/results"),
                               ("GET", f"/results/{job['files'][0]}"), ("DELETE", "")):
            r = bob.request(method, f"/v1/jobs/{job['id']}{suffix}")
            assert r.status_code == 404, (method, suffix)
        assert job["id"] not in {j["id"] for j in bob.get("/v1/jobs").json()["items"]}
    with client(server, server.keys["alice"]) as alice:
        assert alice.get(f"/v1/jobs/{job['id']}").status_code == 200  # still there


def test_listing_pages(server, finished_job, phantom):
    with client(server, server.keys["alice"]) as http:
        page = http.get("/v1/jobs", params={"limit": 1}).json()
        assert page["limit"] == 1 and len(page["items"]) == 1 and page["total"] >= 1
        ids = [page["items"][0]["id"]]
        while page["next_cursor"]:
            page = http.get("/v1/jobs", params={"limit": 1, "cursor": page["next_cursor"]}).json()
            ids += [j["id"] for j in page["items"]]
        assert len(ids) == len(set(ids)) == page["total"]
        assert http.get("/v1/jobs", params={"limit": 0}).status_code == 422
        assert http.get("/v1/jobs", params={"cursor": "x"}).status_code == 422


def test_oversized_upload_is_refused_and_removed(server, phantom):
    tmp = server.data_dir / "tmp"
    before = {p.name for p in (server.data_dir / "jobs").iterdir()}
    big = np.random.default_rng(0).bytes(3 * 1024 * 1024)
    with client(server, server.keys["alice"]) as http:
        files = upload_files(phantom)
        files["dwi"] = ("big.nii.gz", big)
        r = http.post("/v1/jobs", files=files)
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        # the same without a Content-Length (chunked body): refused while streaming
        def body():
            yield b"--xx\r\nContent-Disposition: form-data; name=\"dwi\"; filename=\"a\"\r\n\r\n"
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]
            yield b"\r\n--xx--\r\n"
        r = http.post("/v1/jobs", content=body(),
                      headers={"content-type": "multipart/form-data; boundary=xx"})
        assert r.status_code == 413
    assert list(tmp.iterdir()) == []
    assert {p.name for p in (server.data_dir / "jobs").iterdir()} == before


def _corrupt(phantom: dict[str, Path], tmp: Path) -> list[tuple[str, dict, dict, str | None]]:
    cases = []
    dwi = phantom["dwi"].read_bytes()
    cases.append(("truncated NIfTI", {"dwi": ("dwi.nii.gz", dwi[: len(dwi) // 3])}, {}, "dwi"))
    cases.append(("not a NIfTI", {"dwi": ("dwi.nii.gz", b"hello world" * 40)}, {}, "dwi"))
    bvals = np.loadtxt(phantom["bval"]).ravel()
    cases.append(("one b-value missing",
                  {"bval": ("b", (" ".join(f"{b:g}" for b in bvals[:-1]) + "\n").encode())},
                  {}, None))
    cases.append(("b-values in s/m²",
                  {"bval": ("b", (" ".join(f"{b * 1e6:g}" for b in bvals) + "\n").encode())},
                  {}, "bval"))
    cases.append(("bvec not numbers", {"bvec": ("v", b"a b c\n")}, {}, "bvec"))
    # scheme checks (fingerprint.core.scheme_checks): NODDI on a single shell, no b=0
    single = np.where(bvals > 1500, 1000.0, bvals)
    cases.append(("NODDI on a single shell",
                  {"bval": ("b", (" ".join(f"{b:g}" for b in single) + "\n").encode())},
                  {}, "bval"))
    no_b0 = np.where(bvals < 10, 15.0, bvals)  # their bvecs are zero: named, with the fix
    cases.append(("no b=0 (b0_threshold suggested)",
                  {"bval": ("b", (" ".join(f"{b:g}" for b in no_b0) + "\n").encode())},
                  {}, "bvec"))
    cases.append(("negative b0_threshold", {}, {"b0_threshold": "-1"}, "b0_threshold"))
    mask = nib.Nifti1Image(np.ones((2, 2, 2), np.uint8), np.eye(4))
    buf = io.BytesIO(gzip.compress(mask.to_bytes()))
    cases.append(("mask of another shape", {"mask": ("m.nii.gz", buf.getvalue())}, {}, "mask"))
    cases.append(("unknown model", {}, {"model": "nodi"}, "model"))
    cases.append(("bad option", {}, {"threads": "many"}, "threads"))
    cases.append(("pulse timing in ms", {}, {"delta": "10.5"}, "delta"))
    cases.append(("bad prefix", {}, {"prefix": "../x"}, "prefix"))
    cases.append(("unknown field", {}, {"colour": "red"}, "colour"))
    return cases


def test_invalid_inputs_are_422_naming_the_field(server, phantom, tmp_path):
    jobs_before = {p.name for p in (server.data_dir / "jobs").iterdir()}
    with client(server, server.keys["alice"]) as http:
        for label, files, data, field in _corrupt(phantom, tmp_path):
            upload = upload_files(phantom)
            upload.update(files)
            r = http.post("/v1/jobs", files=upload, data=data)
            assert r.status_code == 422, (label, r.status_code, r.text)
            body = r.json()
            assert body["detail"], label
            if field is not None:
                assert body.get("field") == field or f"'{field}'" in body["detail"], \
                    (label, body)
            assert "/tmp" not in body["detail"] and str(server.data_dir) not in body["detail"]
            if label.startswith("no b=0"):
                assert "b0_threshold=15 s/mm²" in body["detail"], body
            if label.startswith("NODDI on a single shell"):
                assert "2 diffusion-weighted shells" in body["detail"], body
        r = http.post("/v1/jobs", json={"dwi": "x"})
        assert r.status_code == 415
        missing = upload_files(phantom)
        del missing["bvec"]
        r = http.post("/v1/jobs", files=missing)
        assert r.status_code == 422 and r.json()["field"] == "bvec"
    assert {p.name for p in (server.data_dir / "jobs").iterdir()} == jobs_before
    assert list((server.data_dir / "tmp").iterdir()) == []


def test_results_of_unfinished_job_and_dictionary_rights(server, phantom):
    scheme = {k: phantom[k] for k in ("bval", "bvec")}
    with client(server, server.keys["bob"]) as bob:
        r = bob.post("/v1/dictionaries", files=upload_files(scheme), data={"size": "100"})
        assert r.status_code == 403
        assert bob.get("/v1/dictionaries").status_code == 200
    with client(server, server.keys["root"]) as root:
        r = root.post("/v1/dictionaries", files=upload_files(scheme),
                      data={"model": "noddi", "size": str(SIZE)})
        assert r.status_code == 202, r.text
        job = wait_for(root, r.json()["id"])
        assert job["kind"] == "dictionary" and job["status"] == "succeeded", job
        assert root.get(f"/v1/jobs/{job['id']}/results").status_code == 409
        listed = root.get("/v1/dictionaries").json()
        assert job["result"]["dictionary"] in {d["name"] for d in listed}
        bad = upload_files(scheme)
        bad["bval"] = ("b", b"0 1000 nonsense\n")
        assert root.post("/v1/dictionaries", files=bad).status_code == 422


def test_cancel_queued_and_running_jobs_and_the_per_key_limit(server, phantom):
    with client(server, server.keys["bob"]) as http:
        slow = http.post("/v1/jobs", files=upload_files(phantom),
                         data={"dictionary_size": str(SLOW_SIZE)}).json()
        queued = http.post("/v1/jobs", files=upload_files(phantom),
                           data={"dictionary_size": str(SIZE)}).json()
        wait_for(http, slow["id"], states=("running",))
        r = http.post("/v1/jobs", files=upload_files(phantom))
        assert r.status_code == 429 and "2 queued or running" in r.json()["detail"]

        r = http.delete(f"/v1/jobs/{queued['id']}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        assert r.json()["started"] is None  # never ran
        r = http.delete(f"/v1/jobs/{slow['id']}")
        assert r.status_code in (200, 202)
        assert r.json()["cancel_requested"]
        for job_id in (queued["id"], slow["id"]):
            assert http.get(f"/v1/jobs/{job_id}").status_code == 404
        deadline = time.monotonic() + 60
        while (server.data_dir / "jobs" / slow["id"]).exists():
            assert time.monotonic() < deadline, "files of the cancelled job were not removed"
            time.sleep(0.1)
        assert not (server.data_dir / "jobs" / queued["id"]).exists()
        # the cancelled build left no half-built dictionary
        dictionaries = Path(os.environ["FINGERPRINT_DICTIONARY_DIR"])
        assert not [p for p in dictionaries.iterdir() if ".tmp-" in p.name]
        # the slot is free again
        r = http.post("/v1/jobs", files=upload_files(phantom),
                      data={"dictionary_size": str(SIZE)})
        assert r.status_code == 202
        assert wait_for(http, r.json()["id"])["status"] == "succeeded"


def test_status_stays_responsive_while_a_job_runs(server, phantom):
    with client(server, server.keys["bob"]) as http:
        job = http.post("/v1/jobs", files=upload_files(phantom),
                        data={"dictionary_size": str(SLOW_SIZE)}).json()
        wait_for(http, job["id"], states=("running",))
        latencies = []
        for _ in range(20):
            t0 = time.perf_counter()
            r = http.get(f"/v1/jobs/{job['id']}")
            latencies.append(time.perf_counter() - t0)
            assert r.status_code == 200
            assert http.get("/v1/jobs").status_code == 200
        # every status call was answered while the fit was still running
        assert len(latencies) == 20
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
        assert http.delete(f"/v1/jobs/{job['id']}").status_code in (200, 202)
    logging.getLogger(__name__).info(
        "status latency while running: median %.1f ms, max %.1f ms",
        1000 * np.median(latencies), 1000 * max(latencies))


def test_submit_command(server, phantom, tmp_path, capsys):
    from fingerprint.cli import submit
    from fingerprint.cli.main import CLIError

    parser = argparse.ArgumentParser()
    submit.add_parser(parser.add_subparsers())
    base = ["submit", "--server", server.url, "--dwi", str(phantom["dwi"]),
            "--bval", str(phantom["bval"]), "--bvec", str(phantom["bvec"]), "--no-progress"]
    args = parser.parse_args([*base, "--api-key", server.keys["alice"], "--dictionary-size",
                              str(SIZE), "--mask", str(phantom["mask"]),
                              "--out", str(tmp_path / "maps")])
    assert args.func(args) == 0
    written = capsys.readouterr().out.split()
    assert written and all(Path(p).is_file() for p in written)
    assert {Path(p).parent for p in written} == {tmp_path / "maps"}
    # the BIDS entities of the DWI file name prefix the maps
    assert all(Path(p).name.startswith("sub-01_model-noddi_") for p in written)

    args = parser.parse_args([*base, "--api-key", "fpk_00000000_" + "y" * 43])
    with pytest.raises(CLIError, match="401"):
        args.func(args)
    args = parser.parse_args([*base, "--api-key", server.keys["alice"], "--model", "nope"])
    with pytest.raises(CLIError, match="422.*model"):
        args.func(args)
