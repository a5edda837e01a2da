"""The web page at ``/`` (with its assets under ``/static``) and the model catalogue it
shows (``/v1/catalogue``).

Every asset is package data of :mod:`server` (``server/static``): the page works with no
internet, needs no build step, and is plain HTML, CSS and JavaScript modules. The page
and its assets are sent with a Content-Security-Policy that allows only the server's own
scripts and styles (no inline script, no ``eval``), no framing and no third-party
connections; the API key lives in the browser's session storage and travels only in the
``X-API-Key`` header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import FileResponse
from pydantic import BaseModel, Field
from starlette.staticfiles import StaticFiles

from ..dependencies import CallerKey
from ..schemas import ErrorBody

__all__ = ["CONTENT_SECURITY_POLICY", "STATIC_DIR", "ModelDetails", "catalogue_router",
           "install"]

#: Directory of the page's files (package data).
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

#: Sent with the page and its assets.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'; object-src 'none'"
)

_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

catalogue_router = APIRouter(tags=["models"])


class ModelDetails(BaseModel):
    """A named model as the page's catalogue shows it."""

    name: str
    summary: str = Field(..., description="first line of the description")
    description: str
    reference: str = ""
    requires_timing: bool = Field(..., description="jobs must give delta and Delta (s)")
    timing_fields: list[str] = Field(default_factory=list,
                                     description="form fields the model needs")
    maps: list[str] = Field(default_factory=list, description="labels of its output maps")
    dictionary_size: int | None = Field(None, description="default atoms of its dictionary")


@catalogue_router.get("/catalogue", response_model=list[ModelDetails],
                      summary="The named models with their scheme requirements",
                      responses={401: {"model": ErrorBody}})
def catalogue(key: CallerKey) -> list[ModelDetails]:
    """Every named model with its description, reference, whether it needs the pulse
    timing of the acquisition (``delta`` and ``Delta``, seconds), its output maps and
    default dictionary size."""
    from fingerprint.models import available_models, get_recipe, requires_timing

    out = []
    for name, summary in available_models().items():
        recipe = get_recipe(name)
        try:
            timing = bool(requires_timing(name))
        except Exception:  # a recipe that does not build: trust its declaration
            timing = bool(recipe.requires_timing)
        size = dict(recipe.sampling).get("size")
        out.append(ModelDetails(
            name=name, summary=summary, description=" ".join(recipe.description.split()),
            reference=recipe.reference or "", requires_timing=timing,
            timing_fields=["delta", "Delta"] if timing else [],
            maps=list(recipe.maps), dictionary_size=int(size) if size else None))
    return out


def _page() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html",
                        headers={"Cache-Control": "no-cache"})


def install(app: FastAPI) -> None:
    """Serve the page at ``/`` and its assets at ``/static``, with security headers."""
    app.add_api_route("/", _page, methods=["GET"], include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    @app.middleware("http")
    async def _security_headers(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        path = request.url.path
        if path == "/" or path.startswith("/static/"):
            for name, value in _SECURITY_HEADERS.items():
                response.headers.setdefault(name, value)
        return response
