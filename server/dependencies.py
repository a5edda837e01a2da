"""FastAPI dependencies: the server context, the caller's API key, error helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyHeader

from .auth import ApiKey, verify_key
from .config import Settings
from .db import Database
from .errors import ApiError
from .executor import Dispatcher
from .limits import UploadGate
from .storage import JobStorage

__all__ = ["AdminKey", "ApiError", "CallerKey", "Context", "ServerContext", "get_context",
           "require_admin", "require_key"]


@dataclass
class ServerContext:
    """Everything the routes need, created by the application's lifespan."""

    settings: Settings
    db: Database
    storage: JobStorage
    dispatcher: Dispatcher
    #: uploads in flight per key and in total (server.limits.UploadGate); set at start-up
    gate: UploadGate | None = field(default=None)


def get_context(request: Request) -> ServerContext:
    ctx = getattr(request.app.state, "ctx", None)
    if ctx is None:  # pragma: no cover - only before start-up completes
        raise ApiError(503, "the server is starting")
    return ctx


Context = Annotated[ServerContext, Depends(get_context)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                               description="API key created with `fingerprint keys create`")


def require_key(ctx: Context, token: Annotated[str | None, Depends(_api_key_header)]) -> ApiKey:
    """The caller's active API key (401 when missing, unknown or revoked)."""
    if not token:
        raise ApiError(401, "missing API key: send it in the X-API-Key header",
                       headers={"WWW-Authenticate": "X-API-Key"})
    key = verify_key(ctx.db, token)
    if key is None:
        raise ApiError(401, "invalid or revoked API key",
                       headers={"WWW-Authenticate": "X-API-Key"})
    return key


CallerKey = Annotated[ApiKey, Depends(require_key)]


def require_admin(key: CallerKey) -> ApiKey:
    """The caller's key, which must be an admin key (403 otherwise)."""
    if not key.is_admin:
        raise ApiError(403, "this operation needs an admin API key")
    return key


AdminKey = Annotated[ApiKey, Depends(require_admin)]
