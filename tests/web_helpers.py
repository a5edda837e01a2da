"""Helpers of the web page's browser tests and of ``scripts/web_screenshots.py``: a
headless Chromium (the operating system's ``chromium`` and ``chromedriver``) driven by
Selenium, and the steps a user takes on the page."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["browser_unavailable", "create_key_in_page", "image_stats", "make_driver",
           "screenshot_element", "sign_in", "sign_out", "submit_files", "take_screenshots",
           "wait_until"]

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
DRIVER_NAMES = ("chromedriver",)


def _which(names: tuple[str, ...], env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    for folder in ("/usr/bin", "/usr/lib/chromium", "/usr/lib/chromium-browser"):
        for name in names:
            path = Path(folder) / name
            if path.is_file() and os.access(path, os.X_OK):
                return str(path)
    return None


def browser_unavailable() -> str | None:
    """Why no browser test can run here (None when one can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (python3 -m pip install selenium)"
    if _which(CHROMIUM_NAMES, "FINGERPRINT_CHROMIUM") is None:
        return "no Chromium found (apt-get install chromium chromium-driver)"
    if _which(DRIVER_NAMES, "FINGERPRINT_CHROMEDRIVER") is None:
        return "no chromedriver found (apt-get install chromium-driver)"
    return None


def make_driver(width: int = 1280, height: int = 800, download_dir: Path | None = None) -> Any:
    """A headless Chromium whose page area is ``width`` x ``height`` CSS pixels."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = _which(CHROMIUM_NAMES, "FINGERPRINT_CHROMIUM")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-extensions", "--disable-background-networking",
                "--hide-scrollbars", f"--window-size={width},{height}", "--lang=en-GB"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(_which(DRIVER_NAMES, "FINGERPRINT_CHROMEDRIVER"))
    driver = webdriver.Chrome(service=service, options=options)
    set_viewport(driver, width, height)
    if download_dir is not None:
        download_dir.mkdir(parents=True, exist_ok=True)
        driver.execute_cdp_cmd("Browser.setDownloadBehavior",
                               {"behavior": "allow", "downloadPath": str(download_dir)})
    driver.set_page_load_timeout(30)
    return driver


def set_viewport(driver: Any, width: int, height: int) -> None:
    """Make the page area exactly ``width`` x ``height`` (as a phone or a laptop)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})


def wait_until(condition: Callable[[], Any], timeout: float = 30.0, what: str = "condition",
               interval: float = 0.1) -> Any:
    """Poll ``condition`` until it returns something true; AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # the page may be between states
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}"
                         + (f" (last error: {last_error})" if last_error else ""))


def visible(driver: Any, element_id: str) -> bool:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.ID, element_id)
    return bool(found) and found[0].is_displayed()


def open_page(driver: Any, url: str) -> None:
    driver.get(url + "/")
    wait_until(lambda: driver.execute_script("return document.body.dataset.ready === '1'"),
               what="the page to start")


def sign_out(driver: Any, url: str) -> None:
    """Forget the key (session storage is per origin: cleared on a page of the server that
    runs no script, so no script of the page can write it back meanwhile)."""
    driver.get(url + "/healthz")
    driver.execute_script("sessionStorage.clear()")


def sign_in(driver: Any, url: str, key: str, *, expect_ok: bool = True) -> None:
    """Open the page (signed out) and sign in with ``key``."""
    from selenium.webdriver.common.by import By

    sign_out(driver, url)
    open_page(driver, url)
    box = driver.find_element(By.ID, "api-key")
    box.clear()
    box.send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()
    if expect_ok:
        wait_until(lambda: visible(driver, "view-jobs"), what="the jobs view after sign-in")


def submit_files(driver: Any, files: dict[str, Path], *, options: dict[str, str] | None = None,
                 model: str = "noddi", click: bool = True) -> None:
    """On the submit view: choose the files (by field), the model and options, upload."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.find_element(By.ID, "nav-submit").click()
    wait_until(lambda: visible(driver, "view-submit"), what="the submit view")
    for field, path in files.items():
        driver.find_element(By.ID, f"file-{field}").send_keys(str(Path(path).resolve()))
    Select(driver.find_element(By.ID, "model")).select_by_value(model)
    if options:
        details = driver.find_element(By.CSS_SELECTOR, "#submit-form details")
        if not details.get_attribute("open"):
            details.find_element(By.TAG_NAME, "summary").click()
        for name, value in options.items():
            box = driver.find_element(By.ID, name)
            if box.tag_name == "select":  # a fit option with choices
                Select(box).select_by_value(value)
                continue
            box.clear()
            box.send_keys(value)
    if click:
        driver.find_element(By.ID, "submit-button").click()


def create_key_in_page(driver: Any, name: str) -> str:
    """As a signed-in admin: open the admin view, create key ``name``; returns the key
    the page shows (once)."""
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "nav-admin").click()
    wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#keys-table tbody tr"),
               what="the keys table")
    driver.find_element(By.ID, "key-name").send_keys(name)
    driver.find_element(By.CSS_SELECTOR, "#key-form button[type=submit]").click()
    wait_until(lambda: visible(driver, "key-created"), what="the new key")
    return driver.find_element(By.ID, "key-created-value").get_attribute("value")


def image_stats(png: bytes) -> dict[str, float]:
    """Distinct colours and the standard deviation of a PNG's pixels."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=float)
    flat = pixels.reshape(-1, 3)
    return {"colours": float(len(np.unique(flat, axis=0))), "std": float(flat.std()),
            "width": float(pixels.shape[1]), "height": float(pixels.shape[0])}


def screenshot_element(driver: Any, element_id: str) -> bytes:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).screenshot_as_png


def canvas_png(driver: Any, element_id: str) -> bytes:
    """The pixels drawn on a canvas (not what covers it), as PNG bytes."""
    data = driver.execute_script(
        "return document.getElementById(arguments[0]).toDataURL('image/png')", element_id)
    return base64.b64decode(data.split(",", 1)[1])


def _small_png(png: bytes, path: Path, colours: int = 96) -> None:
    """Save a screenshot as a palette PNG (a fraction of the size of RGB)."""
    from PIL import Image

    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def take_screenshots(url: str, keys: dict[str, str], inputs: dict[str, Path],
                     out_dir: Path, *, dictionary_size: int = 2000) -> list[Path]:
    """Screenshots of each screen of the page (sign-in, submit, jobs, viewer, admin, and
    the viewer and jobs at phone width) into ``out_dir``; returns the files written.

    ``keys`` holds an ordinary key (``alice``) and an admin key (``root``); ``inputs``
    the DWI, bval, bvec and mask of a small phantom, which is submitted and fitted."""
    from selenium.webdriver.common.by import By

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def shot(name: str) -> None:
        time.sleep(0.3)
        path = out_dir / f"server-{name}.png"
        _small_png(driver.get_screenshot_as_png(), path)
        written.append(path)

    driver = make_driver(1280, 800)
    try:
        open_page(driver, url)
        driver.find_element(By.ID, "api-key").send_keys("fpk_00000000_not-a-real-key-000000000")
        driver.find_element(By.CSS_SELECTOR, "#signin-form button[type=submit]").click()
        wait_until(lambda: visible(driver, "signin-error"), what="the wrong-key message")
        shot("signin")
        sign_in(driver, url, keys["alice"])
        options = {"dictionary_size": str(dictionary_size), "prefix": "sub-01"}
        submit_files(driver, inputs, options=options)
        wait_until(lambda: visible(driver, "view-jobs"), timeout=120, what="the upload")
        wait_until(lambda: driver.find_elements(By.XPATH, "//button[text()='Open maps']"),
                   timeout=600, what="the job to finish")
        # the in-page checks, on a bval/bvec pair without its DWI
        submit_files(driver, {"bval": inputs["bval"], "bvec": inputs["bvec"]})
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#checks li"), what="checks")
        shot("submit")
        # a second job (with a larger dictionary to build), shown while it runs
        submit_files(driver, inputs, options={**options, "dictionary_size": "20000"})
        wait_until(lambda: visible(driver, "view-jobs"), timeout=120, what="the upload")

        def running() -> bool:  # the second job running (or, if it was quick, finished)
            return bool(driver.find_elements(By.CSS_SELECTOR, ".status-running")) or len(
                driver.find_elements(By.XPATH, "//button[text()='Open maps']")) >= 2

        wait_until(running, timeout=600, interval=0.05, what="the second job to run")
        try:  # some progress to show
            wait_until(lambda: any(float(b.get_attribute("value") or 0) > 0 for b in
                                   driver.find_elements(By.CSS_SELECTOR,
                                                        ".status-running progress")),
                       timeout=60, interval=0.2, what="progress")
        except AssertionError:
            pass
        driver.execute_script("window.scrollTo(0, 0)")
        shot("jobs")
        wait_until(lambda: len(driver.find_elements(By.XPATH, "//button[text()='Open maps']"))
                   >= 2, timeout=600, what="the second job to finish")
        driver.find_element(By.XPATH, "//button[text()='Open maps']").click()
        wait_until(lambda: driver.execute_script("return document.body.dataset.mapShown"),
                   what="a map")
        shot("viewer")
        set_viewport(driver, 390, 844)
        driver.execute_script("window.dispatchEvent(new Event('resize'))")
        shot("viewer-phone")
        driver.find_element(By.ID, "job-back").click()
        shot("jobs-phone")
        set_viewport(driver, 1280, 800)
        sign_in(driver, url, keys["root"])
        create_key_in_page(driver, "student1")
        wait_until(lambda: driver.find_elements(By.CSS_SELECTOR, "#queue-executor dd"),
                   what="the queue")
        shot("admin")
    finally:
        driver.quit()
    return written
