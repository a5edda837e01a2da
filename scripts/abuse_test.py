"""Abuse test of the lab server: every probe of a careless or hostile user at once.

Starts a local server with a lab's limits (scaled to this test: 512 MiB of decompressed
DWI per job), then sends decompression bombs (three at once), a header that lies about
a large file, clients that hang up, stall or trickle, a chunked 3 GiB upload, malformed
multipart bodies, an over-sized dictionary request, a mask on another grid, and uploads
on a full disk; a normal job runs alongside. Prints each probe's answers and the peak
resident memory of the API process and of the job workers, and the peak disk use of the
data directory.

    python3 scripts/abuse_test.py            # about a minute
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import nibabel as nib
import numpy as np
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "tests"))

from server_helpers import (  # noqa: E402
    ServerProcess,
    make_keys,
    multipart_form,
    nifti_gz,
    raw_post,
    write_phantom,
)

MIB = 1024 * 1024


class Monitor:
    """Samples the server's memory (API process, worker processes) and disk use."""

    def __init__(self, pid: int, data_dir: Path, extra_dirs: tuple[Path, ...] = ()) -> None:
        self.proc = psutil.Process(pid)
        self.dirs = (data_dir, *extra_dirs)
        self.api_peak = 0
        self.worker_peak = 0
        self.disk_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _disk(self) -> int:
        total = 0
        for directory in self.dirs:
            for root, _, files in os.walk(directory):
                for name in files:
                    try:
                        total += os.lstat(os.path.join(root, name)).st_blocks * 512
                    except OSError:
                        pass
        return total

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            try:
                self.api_peak = max(self.api_peak, self.proc.memory_info().rss)
                for child in self.proc.children(recursive=True):
                    try:
                        self.worker_peak = max(self.worker_peak, child.memory_info().rss)
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            if tick % 5 == 0:
                self.disk_peak = max(self.disk_peak, self._disk())
            tick += 1
            self._stop.wait(0.1)

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)


def _post(url: str, key: str, files: dict[str, bytes], data: dict | None = None,
          timeout: float = 120) -> httpx.Response:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=timeout) as http:
        return http.post("/v1/jobs", files={k: (k, v) for k, v in files.items()},
                         data=data or {})


def _wait(url: str, key: str, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=60) as http:
        while True:
            job = http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                return job
            if time.monotonic() > deadline:
                return job
            time.sleep(0.2)


def _in_threads(calls: list) -> list:
    results: list = [None] * len(calls)

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except Exception as exc:  # reported as the probe's outcome
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    return results


def _statuses(results: list) -> str:
    codes = Counter(r[0] if isinstance(r, tuple) else getattr(r, "status_code", repr(r))
                    for r in results)
    return ", ".join(f"{n}x {c}" for c, n in sorted(codes.items(), key=str))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, help="keep the data here (default: temporary)")
    args = parser.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fingerprint-abuse-"))
    work.mkdir(parents=True, exist_ok=True)
    phantom = write_phantom(work / "phantom", shape=(3, 3, 2))
    files = {k: phantom[k].read_bytes() for k in ("dwi", "bval", "bvec", "mask")}
    img = nib.load(phantom["dwi"])
    n_vol = img.shape[3]
    data = np.asarray(img.dataobj, dtype=np.float32)
    data_dir = work / "data"
    dictionaries = work / "dictionaries"
    keys = make_keys(data_dir)
    limits = ["--workers", "1", "--max-upload-mb", "64", "--max-dwi-mb", "512",
              "--max-voxels", "100000", "--max-uploads-per-key", "2", "--max-uploads", "8",
              "--min-upload-rate-kb", "64", "--max-upload-seconds", "60",
              "--dictionary-cache-gb", "0.5", "--dictionary-dir", str(dictionaries)]
    server = ServerProcess(data_dir, args=limits,
                           env={"FINGERPRINT_UPLOAD_GRACE_SECONDS": "2"}).start()
    url, port = server.url, server.port
    rows: list[tuple[str, str, float]] = []

    def probe(name: str, func) -> None:
        t0 = time.monotonic()
        try:
            outcome = func()
        except Exception as exc:  # a probe that breaks is reported, not fatal
            outcome = f"probe error: {exc!r}"
        rows.append((name, outcome, time.monotonic() - t0))
        print(f"{name:<48} {time.monotonic() - t0:6.1f} s  {outcome}", flush=True)

    try:
        with Monitor(server.proc.pid, data_dir, (dictionaries,)) as monitor:
            normal = _post(url, keys["alice"], files, {"dictionary_size": "3000"})

            def bombs() -> str:
                bomb = nifti_gz((512, 512, 256, n_vol))  # 24 GiB declared
                rs = _in_threads([lambda k=k: _post(url, keys[k], {**files, "dwi": bomb})
                                  for k in ("alice", "bob", "root")])
                return f"{len(bomb) / 1e6:.1f} MB each: {_statuses(rs)}"

            def lying() -> str:
                shape = (128, 128, 64, n_vol)  # 384 MiB declared: checked by the job
                dwi = nifti_gz(shape, extra_zeros=2048 * MIB)
                upload = {k: v for k, v in files.items() if k != "mask"}
                r = _post(url, keys["bob"], {**upload, "dwi": dwi})
                if r.status_code != 202:
                    return f"{r.status_code}: {r.text[:100]}"
                job = _wait(url, keys["bob"], r.json()["id"])
                return f"202 then {job['status']}: {(job['error'] or '')[:90]}"

            def hang_ups() -> str:
                body = multipart_form({**files, "dwi": b"\0" * (8 * MIB)})

                def one() -> str:
                    import socket

                    s = socket.create_connection(("127.0.0.1", port))
                    s.sendall((f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nX-API-Key: "
                               f"{keys['root']}\r\nContent-Type: multipart/form-data; "
                               f"boundary=xx\r\nContent-Length: {len(body)}\r\n\r\n").encode()
                              + body[: len(body) // 2])
                    time.sleep(1.0)
                    s.close()
                    return "closed"

                _in_threads([one] * 5)
                time.sleep(1.0)
                left = list((data_dir / "tmp").iterdir())
                return f"5 clients hung up mid-upload: {len(left)} temporary entries left"

            def stalls() -> str:
                body = multipart_form(files)
                calls = [lambda k=k: raw_post(port, "/v1/jobs", keys[k], [body[:200]],
                                              length=len(body))
                         for k in ("alice", "bob", "root") * 10]
                return f"30 stalled uploads: {_statuses(_in_threads(calls))}"

            def trickle() -> str:
                body = multipart_form(files)
                pieces = [body[i:i + 256] for i in range(0, len(body), 256)][:200]
                r = raw_post(port, "/v1/jobs", keys["alice"], pieces, length=len(body),
                             pause=0.25, stop_when_answered=True)
                return f"1 KiB/s: {r[0]} after {r[3]:,} bytes"

            def chunked() -> str:
                block = b"\0" * (1 << 20)
                start = (b"--xx\r\nContent-Disposition: form-data; name=\"dwi\"; "
                         b"filename=\"a\"\r\n\r\n")
                parts = (start, *([block] * 3072))  # 3 GiB, sent until the server answers
                r = raw_post(port, "/v1/jobs", keys["alice"], parts, chunked=True,
                             stop_when_answered=True)
                return f"3 GiB chunked: {r[0]} after {r[3] / MIB:,.0f} MiB sent"

            def malformed() -> str:
                cases = {
                    "no closing boundary": multipart_form(files, close=False),
                    "truncated part": multipart_form(files, close=False, drop_tail=50),
                    "duplicated field": multipart_form(files, duplicate="bval"),
                }
                out = [f"{name} {raw_post(port, '/v1/jobs', keys['alice'], [b])[0]}"
                       for name, b in cases.items()]
                long = "b" * 300
                out.append("300-char boundary " + str(raw_post(
                    port, "/v1/jobs", keys["alice"], [multipart_form(files, long)],
                    boundary=long)[0]))
                return "; ".join(out)

            def big_dictionary() -> str:
                r = _post(url, keys["bob"], files, {"dictionary_size": "2000000"})
                return f"non-admin dictionary_size=2000000: {r.status_code}"

            def shifted_mask() -> str:
                affine = img.affine.copy()
                affine[:3, 3] += 2.0
                import gzip

                mask = gzip.compress(nib.Nifti1Image(np.ones(data.shape[:3], np.uint8),
                                                     affine).to_bytes())
                r = _post(url, keys["bob"], {**files, "mask": mask})
                return f"mask 2 mm off: {r.status_code}"

            for name, func in (("decompression bombs, 3 at once", bombs),
                               ("header that lies about a large DWI", lying),
                               ("clients hanging up mid-upload", hang_ups),
                               ("stalled uploads", stalls),
                               ("trickling upload", trickle),
                               ("chunked upload over the limit", chunked),
                               ("malformed multipart", malformed),
                               ("dictionary size above the default", big_dictionary),
                               ("mask on another grid", shifted_mask)):
                probe(name, func)
            ok = _wait(url, keys["alice"], normal.json()["id"]) if normal.status_code == 202 \
                else {"status": normal.status_code}
            probe("a normal job alongside", lambda: f"{normal.status_code}, {ok['status']}")
            with httpx.Client(base_url=url, headers={"X-API-Key": keys["bob"]}) as http:
                seen = len(http.get("/v1/dictionaries").json())
            probe("dictionaries listed to a key that built none", lambda: f"{seen}")
        leftovers = list((data_dir / "tmp").iterdir())
    finally:
        server.stop()
    probe("full disk", lambda: _full_disk(work, files))

    print()
    print(f"API process peak RSS   {monitor.api_peak / MIB:8.0f} MiB  (goal < 500 MiB)")
    print(f"worker peak RSS        {monitor.worker_peak / MIB:8.0f} MiB")
    print(f"data directory peak    {monitor.disk_peak / MIB:8.0f} MiB on disk")
    print(f"temporary entries left {len(leftovers)}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    return 0 if monitor.api_peak < 500 * MIB else 1


def _full_disk(work: Path, files: dict[str, bytes]) -> str:
    """Uploads on a full disk: a real 16 MiB tmpfs filled to the last byte when this runs
    as root, else a disk reserve larger than the free space."""
    disk = work / "disk"
    disk.mkdir(exist_ok=True)
    real = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
        capture_output=True).returncode == 0
    try:
        data_dir = disk / "data"
        keys = make_keys(data_dir)
        extra = ["--disk-reserve-mb", "0" if real else str(1 << 40)]
        server = ServerProcess(data_dir, args=extra).start()
        try:
            if real:
                with open(disk / "filler", "wb", buffering=0) as fh:
                    for size in (MIB, 4096, 1):
                        try:
                            while True:
                                fh.write(b"\0" * size)
                        except OSError:
                            continue
            r = _post(server.url, keys["alice"], files)
            left = len(list((data_dir / "tmp").iterdir()))
            how = "tmpfs filled" if real else "reserve above free space"
            return f"{how}: {r.status_code}, {left} temporary entries left"
        finally:
            server.stop()
    finally:
        if real:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)


if __name__ == "__main__":
    sys.exit(main())
