"""How long the web page takes to open a large result in its slice viewer.

Writes a finished NODDI-like job with maps of ``--shape`` voxels (default 100 x 100 x 100,
one million) into a fresh server data directory, starts the server, and measures in
headless Chromium the time from clicking "Open maps" to the first slice drawn (job record,
summary, first map's bytes, drawing), cold (the server computes the viewer's cache) and
warm (cache on disk, page reloaded), plus switching to a second map. Also times the two
HTTP calls alone.

    python3 scripts/bench_web_viewer.py [--shape 100 100 100] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


def write_job(data_dir: Path, owner: str, shape: tuple[int, int, int]) -> str:
    import nibabel as nib

    from server.config import Settings
    from server.db import Database

    db = Database(Settings(data_dir=data_dir).database_path)
    db.initialize()
    job_id = db.new_job_id()
    out = data_dir / "jobs" / job_id / "outputs"
    (data_dir / "jobs" / job_id / "inputs").mkdir(parents=True)
    out.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    mask = (x**2 + y**2 + z**2) < 0.9
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    names = []
    maps = {
        "icvf": 0.3 + 0.5 * np.abs(x) + 0.05 * rng.standard_normal(shape),
        "odi": 0.1 + 0.6 * np.abs(y), "isovf": 0.05 + 0.3 * (z > 0.5),
        "s0": 1000 + 50 * rng.standard_normal(shape), "r2": 0.9 + 0.05 * x,
    }
    for label, data in maps.items():
        data = np.where(mask, data, 0).astype(np.float32)
        name = f"sub-01_model-noddi_param-{label}_dwimap.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), out / name)
        (out / name.replace(".nii.gz", ".json")).write_text(json.dumps(
            {"Parameter": label, "Units": "arbitrary" if label == "s0" else "n/a",
             "Description": label, "Model": {"Name": "noddi"}}))
        names += [name, name.replace(".nii.gz", ".json")]
    vectors = np.stack([x, y, np.ones(shape)], -1)
    vectors /= np.linalg.norm(vectors, axis=-1, keepdims=True)
    vectors = np.where(mask[..., None], vectors, 0).astype(np.float32)
    name = "sub-01_model-noddi_param-direction_dwimap.nii.gz"
    nib.save(nib.Nifti1Image(vectors, affine), out / name)
    names.append(name)
    db.insert_job(job_id, owner=owner, kind="fit", model="noddi", options={}, inputs={})
    db.claim(job_id)
    db.finish(job_id, "succeeded", outputs=sorted(names),
              result={"n_voxels": int(mask.sum()), "seconds": 1.0})
    db.close()
    return job_id


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(100, 100, 100))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import httpx
    from selenium.webdriver.common.by import By
    from server_helpers import ServerProcess, make_keys
    from web_helpers import browser_unavailable, make_driver, open_page, sign_in, wait_until

    reason = browser_unavailable()
    if reason:
        print(f"cannot run: {reason}")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "data"
        keys = make_keys(data_dir)
        from server.auth import verify_key
        from server.config import Settings
        from server.db import Database

        db = Database(Settings(data_dir=data_dir).database_path)
        owner = verify_key(db, keys["alice"]).id
        db.close()
        shape = tuple(args.shape)
        job_id = write_job(data_dir, owner, shape)
        print(f"job with {int(np.prod(shape)):,} voxels per map ({' x '.join(map(str, shape))})")
        server = ServerProcess(data_dir).start()
        driver = make_driver(1280, 800)
        try:
            def open_maps() -> tuple[float, float]:
                button = wait_until(lambda: driver.find_elements(
                    By.XPATH, "//button[text()='Open maps']"), what="the job list")[0]
                t0 = time.perf_counter()
                button.click()
                wait_until(lambda: driver.execute_script(
                    "return document.body.dataset.mapShown"), timeout=120, what="a map")
                wall = time.perf_counter() - t0
                inner = float(driver.execute_script("return document.body.dataset.viewerMs"))
                return wall, inner / 1000

            sign_in(driver, server.url, keys["alice"])
            wall, inner = open_maps()
            print(f"cold (server builds its cache): {inner:.2f} s in the page, "
                  f"{wall:.2f} s click to slice")
            for i in range(args.repeats):
                open_page(driver, server.url)
                wall, inner = open_maps()
                print(f"warm #{i + 1} (page reloaded): {inner:.2f} s in the page, "
                      f"{wall:.2f} s click to slice")
            t0 = time.perf_counter()
            driver.execute_script(
                "const s = document.getElementById('map-select'); s.value = 'odi';"
                "s.dispatchEvent(new Event('change'))")
            wait_until(lambda: driver.execute_script("return document.body.dataset.mapShown")
                       == "odi", what="odi")
            print(f"switch to a second map: {time.perf_counter() - t0:.2f} s")
            t0 = time.perf_counter()
            driver.execute_script(
                "const s = document.getElementById('slice'); for (let i = 0; i < 50; i++) {"
                "s.value = String(i); s.dispatchEvent(new Event('input')); }")
            print(f"50 slider steps: {time.perf_counter() - t0:.2f} s")
        finally:
            driver.quit()
        headers = {"X-API-Key": keys["alice"]}
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as http:
            t0 = time.perf_counter()
            http.get(f"/v1/jobs/{job_id}/summary").raise_for_status()
            t1 = time.perf_counter()
            size = len(http.get(f"/v1/jobs/{job_id}/maps/icvf/volume").content)
            t2 = time.perf_counter()
        print(f"HTTP, warm: summary {t1 - t0:.3f} s, one map {size / 1e6:.1f} MB in "
              f"{t2 - t1:.3f} s")
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
