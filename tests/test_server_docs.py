"""/docs and /redoc work offline: the pages reference only assets the server itself
serves from the installed package, never a CDN."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from server.app import create_app  # noqa: E402
from server.config import Settings  # noqa: E402


@pytest.fixture()
def http(tmp_path):
    # no lifespan: the documentation pages need neither the database nor workers
    return TestClient(create_app(Settings(data_dir=tmp_path / "data", workers=1)))


def _external(html: str) -> list[str]:
    return [u for u in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
            if re.match(r"(https?:)?//", u)]


@pytest.mark.parametrize("page,assets", [
    ("/docs", ("swagger-ui-bundle.js", "swagger-ui.css", "favicon.png")),
    ("/redoc", ("redoc.standalone.js",)),
])
def test_docs_pages_use_local_assets_only(http, page, assets) -> None:
    response = http.get(page)
    assert response.status_code == 200
    html = response.text
    assert "/openapi.json" in html
    assert not _external(html), _external(html)
    assert "fonts.googleapis" not in html and "cdn." not in html
    for name in assets:
        assert f"/docs-assets/{name}" in html
        asset = http.get(f"/docs-assets/{name}")
        assert asset.status_code == 200 and len(asset.content) > 1000, name
    scripts = [s for s in re.findall(r"""<script[^>]+src=["']([^"']+)""", html)]
    assert scripts and all(s.startswith("/docs-assets/") for s in scripts)


def test_docs_assets_are_javascript_and_css(http) -> None:
    js = http.get("/docs-assets/swagger-ui-bundle.js")
    css = http.get("/docs-assets/swagger-ui.css")
    assert "javascript" in js.headers["content-type"]
    assert css.headers["content-type"].startswith("text/css")
    assert "SwaggerUIBundle" in js.text
    assert http.get("/docs-assets/nothing.js").status_code == 404


def test_docs_pages_are_not_in_the_api_schema(http) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p in ("/docs", "/redoc") or p.startswith("/docs-assets")]
