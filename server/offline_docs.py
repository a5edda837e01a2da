"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) served without the internet.

FastAPI's default pages load their scripts and styles from a public CDN, so on a lab's
closed network they stay blank. The same pages are served here with the assets taken from
the installed ``fastapi-offline`` package, which ships Swagger UI's bundle and style sheet
and ReDoc's standalone script; nothing is fetched from outside and no web fonts are
requested.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

__all__ = ["ASSETS_URL", "assets_dir", "install_offline_docs"]

#: Where the documentation assets are served.
ASSETS_URL = "/docs-assets"
#: The asset files the two pages need.
ASSETS = ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")


def assets_dir() -> Path:
    """The folder of the installed package's Swagger UI / ReDoc assets."""
    folder = Path(str(resources.files("fastapi_offline") / "static"))
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"the fastapi-offline package lacks {', '.join(missing)} in "
                           f"{folder}; reinstall it (pip install fastapi-offline)")
    return folder


def install_offline_docs(app: FastAPI, *, docs_url: str = "/docs",
                         redoc_url: str = "/redoc") -> None:
    """Serve ``docs_url`` and ``redoc_url`` with local assets (the app must be created
    with ``docs_url=None, redoc_url=None``)."""
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")
    openapi_url = app.openapi_url or "/openapi.json"
    title = app.title

    @app.get(docs_url, include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url, title=f"{title} - API docs",
            swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS_URL}/favicon.png")

    @app.get(redoc_url, include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url, title=f"{title} - ReDoc",
            redoc_js_url=f"{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS_URL}/favicon.png", with_google_fonts=False)
