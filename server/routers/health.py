"""Liveness and readiness probes (no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..dependencies import Context
from ..schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness")
def healthz() -> Health:
    """The process answers HTTP."""
    return Health(status="ok")


@router.get("/readyz", response_model=Health, summary="Readiness",
            responses={503: {"model": Health, "description": "not ready"}})
def readyz(ctx: Context) -> JSONResponse:
    """The database is writable and the executor is alive."""
    checks: dict[str, str] = {}
    ready = True
    try:
        ctx.db.check_writable()
        checks["database"] = "ok"
    except Exception as exc:
        ready = False
        checks["database"] = f"not writable: {exc}"
    ok, message = ctx.dispatcher.health()
    checks["executor"] = "ok: " + message if ok else message
    ready = ready and ok
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
