"""The error every route answers client mistakes with (no imports of the rest of the server,
so that checks such as :mod:`server.limits` and :mod:`server.validation` can raise it
without importing the dispatcher)."""

from __future__ import annotations

__all__ = ["ApiError"]


class ApiError(Exception):
    """An error answered as ``{"detail": ..., "field": ...}`` with ``status_code``."""

    def __init__(self, status_code: int, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.field = field
        self.headers = headers
