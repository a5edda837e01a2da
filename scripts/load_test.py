"""Load test of the lab server: many small fits from concurrent clients.

Starts a local server in a temporary data directory (or targets one with --url), submits
--jobs fits of a tiny NODDI phantom from --clients concurrent clients (each with its own
API key when the server is local), polls their status, and reports throughput (jobs per
minute, from the first submission to the last completion) and status-call latency
(median, p95, max).

    python3 scripts/load_test.py                       # 50 jobs, 10 clients, local server
    python3 scripts/load_test.py --workers 2 --jobs 20 --clients 5
    python3 scripts/load_test.py --url http://lab:8000 --api-key fpk_...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from tests.server_helpers import ServerProcess, write_phantom  # noqa: E402


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[index]


def _client_loop(url: str, key: str, n_jobs: int, files: dict[str, Path], data: dict[str, str],
                 poll: float, latencies: list[float], results: list[dict],
                 lock: threading.Lock) -> None:
    with httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=120) as http:
        for _ in range(n_jobs):
            while True:
                handles = {k: (p.name, p.read_bytes()) for k, p in files.items()}
                r = http.post("/v1/jobs", files=handles, data=data)
                if r.status_code == 429:  # per-key limit: wait for a slot
                    time.sleep(poll)
                    continue
                r.raise_for_status()
                job_id = r.json()["id"]
                break
            while True:
                t0 = time.perf_counter()
                r = http.get(f"/v1/jobs/{job_id}")
                dt = time.perf_counter() - t0
                r.raise_for_status()
                job = r.json()
                with lock:
                    latencies.append(dt)
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    with lock:
                        results.append(job)
                    break
                time.sleep(poll)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="target this server instead of starting one")
    parser.add_argument("--api-key", help="key for --url (all clients share it)")
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1, help="server workers (local)")
    parser.add_argument("--dictionary-size", type=int, default=2000)
    parser.add_argument("--shape", default="3,3,2", help="phantom shape X,Y,Z")
    parser.add_argument("--poll", type=float, default=0.2, help="status poll period (s)")
    parser.add_argument("--dask-scheduler", help="local server: use this Dask scheduler")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="fingerprint-load-"))
    shape = tuple(int(v) for v in args.shape.split(","))
    files = write_phantom(work / "inputs", shape=shape)
    files.pop("mask", None)
    data = {"model": "noddi", "dictionary_size": str(args.dictionary_size)}

    server = None
    if args.url:
        if not args.api_key:
            parser.error("--url needs --api-key")
        url, keys = args.url.rstrip("/"), [args.api_key] * args.clients
    else:
        from server.auth import create_key
        from server.config import Settings
        from server.db import Database

        data_dir = work / "data"
        db = Database(Settings(data_dir=data_dir).database_path)
        db.initialize()
        keys = [create_key(db, f"load{i}")[1] for i in range(args.clients)]
        db.close()
        extra = ["--workers", str(args.workers), "--max-jobs-per-key", "4"]
        if args.dask_scheduler:
            extra += ["--dask-scheduler", args.dask_scheduler]
        env = {"FINGERPRINT_DICTIONARY_DIR": str(work / "dictionaries")}
        server = ServerProcess(data_dir, args=extra, env=env).start()
        url = server.url
        # build the dictionary once so the figures measure fitting, not the first build
        with httpx.Client(base_url=url, headers={"X-API-Key": keys[0]}, timeout=300) as http:
            r = http.post("/v1/jobs", files={k: (p.name, p.read_bytes())
                                             for k, p in files.items()}, data=data)
            r.raise_for_status()
            job_id = r.json()["id"]
            while http.get(f"/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
                time.sleep(0.2)

    shares = [args.jobs // args.clients + (1 if i < args.jobs % args.clients else 0)
              for i in range(args.clients)]
    latencies: list[float] = []
    results: list[dict] = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_client_loop,
                                args=(url, keys[i], shares[i], files, data, args.poll,
                                      latencies, results, lock))
               for i in range(args.clients)]
    t0 = time.perf_counter()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        wall = time.perf_counter() - t0
        if server is not None:
            server.stop()
    statuses = {s: sum(1 for r in results if r["status"] == s)
                for s in ("succeeded", "failed", "cancelled")}
    figures = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{platform.system()} {platform.release()}, Python {platform.python_version()}",
        "jobs": args.jobs, "clients": args.clients, "workers": args.workers,
        "executor": "dask" if args.dask_scheduler else ("remote" if args.url else "processes"),
        "phantom_shape": list(shape), "dictionary_size": args.dictionary_size,
        "wall_seconds": round(wall, 2),
        "throughput_jobs_per_min": round(60 * len(results) / wall, 1),
        "status_calls": len(latencies),
        "status_latency_ms": {
            "median": round(1000 * statistics.median(latencies), 2) if latencies else None,
            "p95": round(1000 * _percentile(latencies, 95), 2),
            "max": round(1000 * max(latencies), 2) if latencies else None,
        },
        "outcomes": statuses,
        "errors": sorted({r["error"] for r in results if r["status"] == "failed"})[:5],
    }
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if statuses["succeeded"] == args.jobs else 1


if __name__ == "__main__":
    sys.exit(main())
