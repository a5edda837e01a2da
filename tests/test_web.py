"""The web page at ``/``: its assets and security headers, the endpoints it needs (viewer
summary and volumes, catalogue, admin), and end-to-end runs in a real headless Chromium
against a real server (skipped, with the reason, when no browser is installed)."""

from __future__ import annotations

import gzip
import re
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
    write_phantom,
)
from web_helpers import (
    browser_unavailable,
    canvas_png,
    create_key_in_page,
    image_stats,
    make_driver,
    open_page,
    set_viewport,
    sign_in,
    sign_out,
    submit_files,
    visible,
    wait_until,
)

from server.routers.web import CONTENT_SECURITY_POLICY, STATIC_DIR

#: atoms of the test dictionary: small, so the build is quick
SIZE = 2000
#: a dictionary whose build takes long enough to cancel the job while it runs
SLOW_SIZE = 1_500_000

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ static checks
def test_assets_are_local_and_scripts_are_files():
    html = (STATIC_DIR / "index.html").read_text()
    # no inline script: every <script> has a src on this server and no body
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, flags=re.S)
    assert scripts, "the page loads its code as a module"
    for attrs, body in scripts:
        assert body.strip() == ""
        assert re.search(r'src="/static/[a-z]+\.js"', attrs)
    assert not re.search(r"\son[a-z]+=", html), "no inline event handlers"
    assert "style=" not in html, "no inline styles (the CSP forbids them)"
    for path in STATIC_DIR.iterdir():
        text = path.read_text()
        # no asset from another host: no CDN, no web font, nothing fetched at run time
        for url in re.findall(r"(?:src|href|import[^\"']*from|url\()\s*=?\s*[\"']?(https?://[^\"')\s]+)",
                              text):
            pytest.fail(f"{path.name} loads {url} from another host")
        if path.suffix == ".js":
            assert "innerHTML" not in text and "insertAdjacentHTML" not in text, \
                f"{path.name} must build the DOM with textContent"
            assert "eval(" not in text and "new Function" not in text
            assert "localStorage" not in text, "the key lives in sessionStorage only"


def test_static_files_are_package_data():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'server\s*=\s*\[\s*"static/\*"', text)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> dict[str, Path]:
    return write_phantom(tmp_path_factory.mktemp("web-phantom"), shape=(6, 5, 3))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from serve(tmp_path_factory, "web-server", "--workers", "1",
                     "--max-dictionary-size", str(SLOW_SIZE),
                     "--max-user-dictionary-size", str(SLOW_SIZE))


@pytest.fixture(scope="module")
def finished(server, phantom) -> dict:
    with client(server, server.keys["alice"]) as http:
        r = http.post("/v1/jobs", files=upload_files(phantom),
                      data={"model": "noddi", "dictionary_size": str(SIZE), "prefix": "sub-01"})
        assert r.status_code == 202, r.text
        job = wait_for(http, r.json()["id"], timeout=600)
        assert job["status"] == "succeeded", job
        return job


# ------------------------------------------------------------------ HTTP level
@pytest.mark.slow
def test_page_and_headers(server):
    with client(server, None) as http:
        page = http.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert page.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert "'unsafe-inline'" not in CONTENT_SECURITY_POLICY
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["x-frame-options"] == "DENY"
        for name in ("app.js", "api.js", "checks.js", "viewer.js", "colormaps.js", "app.css"):
            r = http.get(f"/static/{name}")
            assert r.status_code == 200, name
            assert "content-security-policy" in r.headers
        assert http.get("/static/app.js").headers["content-type"].startswith(
            ("text/javascript", "application/javascript"))
        assert http.get("/static/../app.py").status_code == 404
        # the API itself still needs a key
        assert http.get("/v1/catalogue").status_code == 401
        assert http.get("/v1/me").status_code == 401


@pytest.mark.slow
def test_catalogue_and_me(server):
    with client(server, server.keys["alice"]) as http:
        me = http.get("/v1/me").json()
        assert me["name"] == "alice" and me["is_admin"] is False
        models = {m["name"]: m for m in http.get("/v1/catalogue").json()}
        from fingerprint.models import available_models, requires_timing

        assert set(models) == set(available_models())
        assert models["noddi"]["requires_timing"] is False
        assert models["noddi"]["timing_fields"] == []
        assert set(models["noddi"]["maps"]) == {"icvf", "odi", "isovf", "direction"}
        for name, m in models.items():
            assert m["requires_timing"] == requires_timing(name)
            assert m["description"]
        timed = [m for m in models.values() if m["requires_timing"]]
        assert timed and all(m["timing_fields"] == ["delta", "Delta"] for m in timed)


@pytest.mark.slow
def test_summary_and_volumes_match_the_maps(server, finished, phantom):
    job_id = finished["id"]
    with client(server, server.keys["alice"]) as http:
        summary = http.get(f"/v1/jobs/{job_id}/summary").json()
        mask = np.asarray(nib.load(phantom["mask"]).dataobj) > 0
        assert summary["shape"] == list(mask.shape)
        zooms = nib.load(phantom["dwi"]).header.get_zooms()[:3]
        assert summary["voxel_size"] == pytest.approx([float(z) for z in zooms])
        assert summary["mask_voxels"] == int(mask.sum())
        assert summary["model"]["name"] == "noddi"
        assert summary["model"]["class"] and "class_" not in summary["model"]
        assert summary["solver"]["dictionary_atoms"] == SIZE
        assert summary["solver"]["name"] == "fingerprint"
        shells = {s["bval"]: s["count"] for s in summary["scheme"]["shells"]}
        bvals = np.loadtxt(phantom["bval"])
        assert summary["scheme"]["measurements"] == bvals.size
        assert sum(shells.values()) == bvals.size
        assert summary["timing"]["fitted_voxels"] == int(mask.sum())
        labels = {m["label"]: m for m in summary["maps"]}
        assert {"icvf", "odi", "isovf", "direction", "s0", "r2", "odi-uncertainty"} <= set(labels)
        # a direction map has no display range (the keys are left out, not null)
        assert labels["direction"]["kind"] == "direction" and "min" not in labels["direction"]
        assert set(labels["odi"]["histogram"]) == {"edges", "counts"}
        for label in ("odi", "icvf"):
            entry = labels[label]
            r = http.get(f"/v1/jobs/{job_id}/results/{entry['file']}")
            assert r.status_code == 200
            path = Path(server.data_dir) / "jobs" / job_id / "outputs" / entry["file"]
            data = np.asarray(nib.load(path).dataobj, dtype=np.float32)
            inside = data[mask]
            assert entry["kind"] == "scalar" and entry["units"] == "n/a"
            assert entry["min"] == pytest.approx(float(inside.min()), rel=1e-6)
            assert entry["max"] == pytest.approx(float(inside.max()), rel=1e-6)
            assert sum(entry["histogram"]["counts"]) == int(mask.sum())
            assert len(entry["histogram"]["edges"]) == len(entry["histogram"]["counts"]) + 1
            counts, _ = np.histogram(inside, bins=len(entry["histogram"]["counts"]),
                                     range=(entry["min"], entry["max"]))
            assert list(counts) == entry["histogram"]["counts"]
            vol = http.get(f"/v1/jobs/{job_id}/maps/{label}/volume")
            assert vol.status_code == 200
            assert vol.headers["content-type"] == "application/octet-stream"
            q = np.frombuffer(vol.content, dtype=np.uint8).reshape(mask.shape)
            assert (q[~mask] == 0).all() and (q[mask] >= 1).all()
            back = entry["min"] + (q[mask].astype(float) - 1) / 254 * (entry["max"] - entry["min"])
            step = (entry["max"] - entry["min"]) / 254
            assert np.abs(back - inside).max() <= step / 2 + 1e-6
        direction = labels["direction"]
        assert direction["kind"] == "direction"
        vol = http.get(f"/v1/jobs/{job_id}/maps/direction/volume").content
        rgb = np.frombuffer(vol, dtype=np.uint8).reshape(*mask.shape, 3)
        path = Path(server.data_dir) / "jobs" / job_id / "outputs" / direction["file"]
        vectors = np.asarray(nib.load(path).dataobj, dtype=np.float32)
        assert np.abs(rgb[mask] - np.abs(vectors[mask]) * 255).max() <= 0.51
        # cached: a second call answers the same bytes
        assert http.get(f"/v1/jobs/{job_id}/maps/direction/volume").content == vol
        assert http.get(f"/v1/jobs/{job_id}/maps/nope/volume").status_code == 404
        assert http.get(f"/v1/jobs/{job_id}/maps/..%2Fx/volume").status_code == 404
    with client(server, server.keys["bob"]) as other:  # another key: not found
        assert other.get(f"/v1/jobs/{job_id}/summary").status_code == 404
        assert other.get(f"/v1/jobs/{job_id}/maps/odi/volume").status_code == 404


@pytest.mark.slow
def test_admin_endpoints(server):
    with client(server, server.keys["bob"]) as bob:
        for method, path in (("GET", "/v1/admin/keys"), ("GET", "/v1/admin/queue"),
                             ("DELETE", "/v1/admin/keys/alice")):
            assert bob.request(method, path).status_code == 403
        assert bob.post("/v1/admin/keys", json={"name": "x"}).status_code == 403
    with client(server, server.keys["root"]) as root:
        names = [k["name"] for k in root.get("/v1/admin/keys").json()]
        assert names[:3] == ["alice", "bob", "root"]
        r = root.post("/v1/admin/keys", json={"name": "dave"})
        assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
        created = r.json()
        assert created["key"].startswith("fpk_") and created["is_admin"] is False
        assert "key" not in root.get("/v1/admin/keys").json()[-1]
        assert root.post("/v1/admin/keys", json={"name": "dave"}).status_code == 409
        bad = root.post("/v1/admin/keys", json={"name": "<b>x</b>"})
        assert bad.status_code == 422 and bad.json()["field"] == "name"
        with client(server, created["key"]) as dave:
            assert dave.get("/v1/me").json()["name"] == "dave"
            assert root.delete(f"/v1/admin/keys/{created['id']}").json()["revoked"]
            assert dave.get("/v1/me").status_code == 401
        assert root.delete("/v1/admin/keys/nobody").status_code == 404
        own = root.get("/v1/me").json()["id"]
        assert root.delete(f"/v1/admin/keys/{own}").status_code == 409
        queue = root.get("/v1/admin/queue").json()
        for row in queue["running"] + queue["queued"]:
            assert row["stage"] in ("queued", "building dictionary", "fitting", "writing maps")
        assert queue["executor"]["healthy"] is True
        assert queue["executor"]["workers"] == 1
        assert isinstance(queue["running"], list) and isinstance(queue["queued"], list)


# ------------------------------------------------------------------ in a real browser
_NO_BROWSER = browser_unavailable()
browser = pytest.mark.skipif(_NO_BROWSER is not None, reason=f"no browser: {_NO_BROWSER}")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    if _NO_BROWSER is not None:
        pytest.skip(f"no browser: {_NO_BROWSER}")
    downloads = tmp_path_factory.mktemp("downloads")
    drv = make_driver(1280, 800, download_dir=downloads)
    drv.downloads = downloads
    yield drv
    drv.quit()


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "favicon" not in e["message"]
            and "401" not in e["message"] and "404" not in e["message"]]


@pytest.mark.slow
@browser
def test_browser_wrong_key(server, driver):
    from selenium.webdriver.common.by import By

    sign_out(driver, server.url)
    open_page(driver, server.url)
    assert visible(driver, "view-signin")
    driver.find_element(By.ID, "api-key").send_keys("fpk_12345678_wrong-key-wrong-key-wrong")
    driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()
    wait_until(lambda: visible(driver, "signin-error"), what="the message")
    message = driver.find_element(By.ID, "signin-error").text
    assert "not valid" in message and "revoked" in message
    assert driver.execute_script("return sessionStorage.length") == 0
    assert "fpk_" not in driver.current_url
    assert not visible(driver, "nav")


@pytest.mark.slow
@browser
def test_browser_upload_watch_view_download(server, driver, phantom):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    sign_in(driver, server.url, server.keys["alice"])
    assert driver.execute_script("return sessionStorage.getItem('fingerprint.apiKey')") \
        == server.keys["alice"]
    assert server.keys["alice"] not in driver.current_url
    submit_files(driver, phantom, options={"dictionary_size": str(SIZE)})
    # the upload goes through; the jobs view then follows the job until it finishes
    wait_until(lambda: visible(driver, "view-jobs"), timeout=120, what="the jobs view")
    # the new job's card, labelled with the DWI's name (older jobs were not sent by the page)
    banner = wait_until(lambda: driver.find_element(By.ID, "banner").text, what="the banner")
    job_id_short = re.search(r"Job ([0-9a-f]{8}) queued", banner).group(1)

    def card():
        for li in driver.find_elements(By.CSS_SELECTOR, "#jobs-list li"):
            if li.get_attribute("data-job").startswith(job_id_short):
                return li
        return None

    assert wait_until(card, what="the job card").find_element(
        By.CLASS_NAME, "label").text == phantom["dwi"].name
    seen = set()

    def finished():
        first = card()
        seen.add(first.find_element(By.CLASS_NAME, "badge").text.lower())
        return first.find_elements(By.XPATH, ".//button[text()='Open maps']")

    button = wait_until(finished, timeout=600, what="the job to succeed")[0]
    assert "succeeded" in seen
    facts = card().find_element(By.CLASS_NAME, "facts").text
    assert "elapsed" in facts and "stage" in facts
    button.click()
    wait_until(lambda: driver.execute_script("return document.body.dataset.mapShown"),
               timeout=60, what="a map in the viewer")
    assert job_id_short in driver.find_element(By.ID, "job-title").text
    # the slice: drawn, not blank; the colour bar with its range and units
    stats = image_stats(canvas_png(driver, "slice-canvas"))
    assert stats["colours"] > 5 and stats["std"] > 10, stats
    shown = image_stats(driver.find_element(By.ID, "slice-canvas").screenshot_as_png)
    assert shown["colours"] > 5, shown
    bar = image_stats(driver.find_element(By.ID, "colourbar").screenshot_as_png)
    assert bar["colours"] > 30, bar
    assert driver.find_element(By.ID, "cbar-units").text == "dimensionless"
    assert driver.find_element(By.ID, "cbar-max").text
    assert driver.find_element(By.ID, "cbar-min").text
    # the value under the pointer
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).move_to_element(driver.find_element(By.ID, "slice-canvas")).perform()
    wait_until(lambda: "voxel (" in driver.find_element(By.ID, "probe").text, what="the probe")
    hist = image_stats(canvas_png(driver, "hist-canvas"))
    assert hist["colours"] > 3
    details = driver.find_element(By.ID, "job-details").text
    assert "noddi" in details and "96 measurements" in details and "2,000 atoms" in details
    assert f"Fit options\ndictionary_size = {SIZE}" in details  # as the job recorded them
    # other planes and the slider; the direction map as colour
    before = canvas_png(driver, "slice-canvas")
    driver.find_element(By.CSS_SELECTOR, "input[name=plane][value=sagittal]").click()
    assert driver.find_element(By.ID, "slice").get_attribute("max") == "5"
    assert canvas_png(driver, "slice-canvas") != before
    Select(driver.find_element(By.ID, "map-select")).select_by_value("direction")
    wait_until(lambda: driver.execute_script("return document.body.dataset.mapShown")
               == "direction", what="the direction map")
    assert "|x|" in driver.find_element(By.ID, "cbar-units").text
    dec = image_stats(canvas_png(driver, "slice-canvas"))
    assert dec["colours"] > 5
    # download the zip through the page and check its maps
    driver.find_element(By.ID, "download-zip").click()
    zips = wait_until(lambda: [p for p in driver.downloads.glob("*.zip")], timeout=60,
                      what="the zip download")
    wait_until(lambda: not list(driver.downloads.glob("*.crdownload")), what="the download")
    with zipfile.ZipFile(zips[0]) as archive:
        names = archive.namelist()
        odi = next(n for n in names if n.endswith("param-odi_dwimap.nii.gz"))
        img = nib.Nifti1Image.from_bytes(gzip.decompress(archive.read(odi)))
        data = np.asarray(img.dataobj)
    assert data.shape == (6, 5, 3)
    mask = np.asarray(nib.load(phantom["mask"]).dataobj) > 0
    assert np.all((data[mask] >= 0) & (data[mask] <= 1)) and data[mask].std() > 0
    assert any(n.endswith("param-direction_dwimap.nii.gz") for n in names)
    # one map alone
    sidecar = next(n for n in names if n.endswith("param-odi_dwimap.json"))
    Select(driver.find_element(By.ID, "file-select")).select_by_value(sidecar)
    driver.find_element(By.ID, "download-file").click()
    got = wait_until(lambda: [p for p in driver.downloads.glob("*.json")], timeout=60,
                     what="the single-file download")
    wait_until(lambda: not list(driver.downloads.glob("*.crdownload")), what="the download")
    with zipfile.ZipFile(zips[0]) as archive:
        assert got[0].read_bytes() == archive.read(sidecar)
    assert not _console_errors(driver)


@pytest.mark.slow
@browser
def test_browser_cancel_running_job(server, driver, phantom, finished):
    from selenium.webdriver.common.by import By

    # the admin key: allowed a dictionary large enough to still be building when cancelled
    sign_in(driver, server.url, server.keys["root"])
    # per-key isolation: alice's jobs are not in root's list
    with client(server, server.keys["alice"]) as http:
        alice_jobs = {j["id"] for j in http.get("/v1/jobs").json()["items"]}
    assert alice_jobs
    time.sleep(0.5)
    shown = {li.get_attribute("data-job") for li in
             driver.find_elements(By.CSS_SELECTOR, "#jobs-list li")}
    assert not shown & alice_jobs
    submit_files(driver, phantom, options={"dictionary_size": str(SLOW_SIZE)})
    wait_until(lambda: visible(driver, "view-jobs"), timeout=120, what="the jobs view")

    def running_card():
        for li in driver.find_elements(By.CSS_SELECTOR, "#jobs-list li"):
            if li.find_element(By.CLASS_NAME, "badge").text.lower() == "running":
                return li
        return None

    card = wait_until(running_card, timeout=120, what="the job to run")
    job_id = card.get_attribute("data-job")
    # its stage, from the server: the large dictionary is being built
    wait_until(lambda: "stage: building dictionary" in driver.find_element(
        By.CSS_SELECTOR, f"li[data-job='{job_id}'] .facts").text, timeout=60,
        what="the stage")
    button = card.find_element(By.CSS_SELECTOR, "button[data-action=cancel]")
    button.click()  # first click arms the button
    armed = driver.find_element(By.CSS_SELECTOR,
                                f"li[data-job='{job_id}'] button[data-action=cancel]")
    assert "Confirm" in armed.text
    armed.click()
    wait_until(lambda: not driver.find_elements(By.CSS_SELECTOR, f"li[data-job='{job_id}']")
               or "stopping" in driver.find_element(By.ID, "banner").text, timeout=60,
               what="the job to be cancelled")
    with client(server, server.keys["root"]) as http:
        deadline = time.monotonic() + 60
        while http.get(f"/v1/jobs/{job_id}").status_code != 404:
            assert time.monotonic() < deadline, "the cancelled job was not deleted"
            time.sleep(0.2)
    wait_until(lambda: not driver.find_elements(By.CSS_SELECTOR, f"li[data-job='{job_id}']"),
               timeout=30, what="the job to leave the list")


@pytest.mark.slow
@browser
def test_browser_script_file_name_is_text(server, driver, phantom, tmp_path):
    from selenium.webdriver.common.by import By

    evil = tmp_path / "<script>window.__pwned=1<\\script><img src=x onerror=window.__pwned=2>.bval"
    evil.write_text("0 1000 2000\n")  # 3 b-values: disagrees with the bvec
    sign_in(driver, server.url, server.keys["alice"])
    submit_files(driver, {"dwi": phantom["dwi"], "bval": evil, "bvec": phantom["bvec"]})
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#checks li.error"),
               what="the check messages")
    chosen = driver.find_element(By.ID, "chosen-bval").text
    assert chosen.startswith(evil.name)
    errors = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#checks li.error")]
    assert any(e.startswith(evil.name) and "3 b-values" in e for e in errors), errors
    assert driver.execute_script("return window.__pwned") is None
    assert driver.execute_script("return document.querySelectorAll('img').length") == 0
    assert driver.execute_script(
        "return Array.from(document.scripts).every(s => s.src.endsWith('/static/app.js'))")
    assert visible(driver, "submit-error")


@pytest.mark.slow
@browser
def test_browser_server_refusal_in_words(server, driver, phantom, tmp_path):
    from selenium.webdriver.common.by import By

    sign_in(driver, server.url, server.keys["alice"])
    # passes the page's checks, refused by the server: an output prefix that is not BIDS
    submit_files(driver, phantom, options={"prefix": "sub 01/<b>"})
    wait_until(lambda: visible(driver, "submit-error"), timeout=60, what="the refusal")
    text = driver.find_element(By.ID, "submit-error").text
    assert text.startswith("The server refused the input.") and "'prefix'" in text
    assert "(field: prefix)" in text


@pytest.mark.slow
@browser
def test_browser_fit_options_from_the_library(server, driver, phantom):
    """The page's "More options" offer the fit options the server lists (from the
    library's specs); the values chosen reach the job, and a bad one is refused in words
    naming the field."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    with client(server, server.keys["bob"]) as http:
        offered = http.get("/v1/fit-options").json()
    sign_in(driver, server.url, server.keys["bob"])
    driver.find_element(By.ID, "nav-submit").click()
    wait_until(lambda: visible(driver, "view-submit"), what="the submit view")
    inputs = driver.find_elements(By.CSS_SELECTOR, "#fit-options [data-fit-option]")
    assert [i.get_attribute("id") for i in inputs] == [o["name"] for o in offered]
    solver = Select(driver.find_element(By.ID, "solver"))
    assert [o.get_attribute("value") for o in solver.options] == [
        "", "fingerprint", "brute2fine", "mix"]
    # (inside the closed "More options": read as textContent)
    assert "default fingerprint" in solver.options[0].get_attribute("textContent")
    assert driver.find_element(By.ID, "Ns").get_attribute("max") == "100"
    assert "brute2fine" in driver.find_element(By.ID, "Ns-help").get_attribute("textContent")

    submit_files(driver, phantom, options={"n_neighbors": "0"})
    wait_until(lambda: visible(driver, "submit-error"), timeout=60, what="the refusal")
    assert "(field: n_neighbors)" in driver.find_element(By.ID, "submit-error").text

    submit_files(driver, phantom, options={"dictionary_size": str(SIZE), "n_neighbors": "6",
                                           "solver": "fingerprint", "refine": "false",
                                           "b0_threshold": "20"})
    wait_until(lambda: visible(driver, "view-jobs"), timeout=120, what="the jobs view")
    with client(server, server.keys["bob"]) as http:
        newest = http.get("/v1/jobs", params={"limit": 1}).json()["items"][0]
        assert newest["options"] == {"dictionary_size": SIZE, "n_neighbors": 6,
                                     "solver": "fingerprint", "refine": False,
                                     "b0_threshold": 20e6}
        assert wait_for(http, newest["id"], timeout=600)["status"] == "succeeded"
    # (the browser logs the refusal's 422 it was asked for)
    assert [e for e in _console_errors(driver) if "(Unprocessable Entity)" not in e] == []


@pytest.mark.slow
@browser
def test_browser_admin_and_revoked_key(server, driver, phantom):
    from selenium.webdriver.common.by import By

    sign_in(driver, server.url, server.keys["alice"])
    assert not visible(driver, "nav-admin")
    sign_in(driver, server.url, server.keys["root"])
    key = create_key_in_page(driver, "erin")
    assert key.startswith("fpk_")
    driver.find_element(By.ID, "key-hide").click()
    assert driver.find_element(By.ID, "key-created-value").get_attribute("value") == ""
    wait_until(lambda: any("erin" in r.text for r in
                           driver.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr")),
               what="erin in the table")
    assert key not in driver.page_source
    wait_until(lambda: "healthy" in driver.find_element(By.ID, "queue-executor").text,
               what="the executor")
    # prebuild a small dictionary for the phantom's scheme (a job of the admin's key)
    driver.find_element(By.ID, "pb-bval").send_keys(str(phantom["bval"]))
    driver.find_element(By.ID, "pb-bvec").send_keys(str(phantom["bvec"]))
    driver.find_element(By.ID, "pb-size").send_keys("500")
    driver.find_element(By.CSS_SELECTOR, "#prebuild-form button[type=submit]").click()
    wait_until(lambda: "queued as job" in driver.find_element(By.ID, "pb-status").text,
               timeout=60, what="the build to be queued")
    with client(server, server.keys["root"]) as root:
        builds = root.get("/v1/jobs", params={"kind": "dictionary"}).json()["items"]
        assert builds and builds[0]["options"]["size"] == 500
        wait_for(root, builds[0]["id"], timeout=300)
    # erin signs in, then the admin revokes her key: her page says so
    sign_in(driver, server.url, key)
    with client(server, server.keys["root"]) as root:
        assert root.delete("/v1/admin/keys/erin").status_code == 200
    driver.find_element(By.ID, "jobs-refresh").click()
    wait_until(lambda: visible(driver, "signin-error"), what="the revoked-key message")
    assert "revoked" in driver.find_element(By.ID, "signin-error").text


@pytest.mark.slow
@browser
def test_browser_phone_width_and_keyboard(server, driver, finished):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    sign_in(driver, server.url, server.keys["alice"])
    try:
        set_viewport(driver, 390, 844)
        for view in ("nav-submit", "nav-jobs"):
            driver.find_element(By.ID, view).click()
            time.sleep(0.2)
            width = driver.execute_script("return document.documentElement.scrollWidth")
            assert width <= 390, f"{view}: the page is {width} px wide on a 390-px screen"
        open_button = wait_until(lambda: driver.find_elements(
            By.XPATH, "//button[text()='Open maps']"), what="a finished job")[0]
        open_button.send_keys(Keys.ENTER)  # keyboard: buttons work with Enter
        wait_until(lambda: driver.execute_script("return document.body.dataset.mapShown"),
                   what="the viewer")
        assert driver.execute_script("return document.documentElement.scrollWidth") <= 390
        slider = driver.find_element(By.ID, "slice")
        before = slider.get_attribute("value")
        slider.send_keys(Keys.ARROW_RIGHT)
        assert slider.get_attribute("value") != before
        # every form control has a label
        unlabelled = driver.execute_script("""
            return Array.from(document.querySelectorAll('input, select'))
              .filter(e => e.type !== 'hidden' && !e.classList.contains('visually-hidden'))
              .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label'))
              .map(e => e.id || e.name);""")
        assert unlabelled == []
    finally:
        set_viewport(driver, 1280, 800)


@pytest.mark.slow
@browser
def test_browser_drop_sorts_files(server, driver):
    from selenium.webdriver.common.by import By

    sign_in(driver, server.url, server.keys["alice"])
    driver.find_element(By.ID, "nav-submit").click()
    # a drop of four files (made in the page: a browser test cannot drag from the desktop)
    driver.execute_script("""
        const dt = new DataTransfer();
        for (const name of ['sub-02_dwi.nii.gz', 'sub-02_dwi.bvec', 'sub-02_dwi.bval',
                            'sub-02_desc-brain_mask.nii', 'notes.txt'])
          dt.items.add(new File(['0 1000'], name));
        document.getElementById('drop-zone').dispatchEvent(
          new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));""")
    wait_until(lambda: driver.find_element(By.ID, "chosen-dwi").text, what="the sorted files")
    assert driver.find_element(By.ID, "chosen-dwi").text.startswith("sub-02_dwi.nii.gz")
    assert driver.find_element(By.ID, "chosen-bval").text.startswith("sub-02_dwi.bval")
    assert driver.find_element(By.ID, "chosen-bvec").text.startswith("sub-02_dwi.bvec")
    assert driver.find_element(By.ID, "chosen-mask").text.startswith("sub-02_desc-brain_mask")
    left_out = driver.find_element(By.ID, "checks").text
    assert "notes.txt" in left_out and "left out" in left_out
    # a model that needs pulse timing shows its fields and asks for them
    from selenium.webdriver.support.ui import Select

    assert not visible(driver, "timing")
    timed = [m["name"] for m in driver.execute_script(
        "return fetch('/v1/catalogue', {headers: {'X-API-Key': "
        "sessionStorage.getItem('fingerprint.apiKey')}}).then(r => r.json())")
        if m["requires_timing"]]
    Select(driver.find_element(By.ID, "model")).select_by_value(timed[0])
    assert visible(driver, "timing")
    assert "pulse timing" in driver.find_element(By.ID, "model-info").text
    driver.find_element(By.ID, "submit-button").click()
    wait_until(lambda: "needs δ" in driver.find_element(By.ID, "checks").text,
               what="the timing check")
    # the fake DWI is caught by the page's checks, naming the file
    driver.find_element(By.ID, "submit-button").click()
    wait_until(lambda: "sub-02_dwi.nii.gz" in driver.find_element(By.ID, "checks").text
               and "gzip" in driver.find_element(By.ID, "checks").text,
               what="the DWI check")
