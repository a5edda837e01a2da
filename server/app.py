"""The FastAPI application: ``create_app(settings)``.

Start-up (lifespan): lock the data directory (one server per directory), open the
database (WAL), reconcile it with the job directories, start the dispatcher. Shut-down:
stop the dispatcher (running jobs go back to the queue) and release the lock.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fingerprint import __version__

from . import API_PREFIX
from .config import Settings
from .db import Database
from .dependencies import ApiError, ServerContext
from .executor import Dispatcher
from .limits import UploadGate
from .offline_docs import install_offline_docs
from .reconcile import reconcile
from .routers import admin, dictionaries, health, jobs, maps, models, web
from .storage import JobStorage, is_disk_full

logger = logging.getLogger(__name__)

__all__ = ["DataDirLock", "DataDirLocked", "create_app"]

DESCRIPTION = """
Lab server of **fingerprint**: upload a diffusion MRI volume, fit a microstructure model
(NODDI, Ball-Stick, ...) by dictionary matching, download the parameter maps.

Every `/v1` call needs an API key in the `X-API-Key` header (create one with
`fingerprint keys create --name NAME`).
"""


class DataDirLocked(RuntimeError):
    """Another server process is using the data directory."""


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/server.lock`` (released by the kernel when
    the process dies, even on kill -9)."""

    def __init__(self, data_dir: Path) -> None:
        self.path = Path(data_dir) / "server.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise DataDirLocked(f"another fingerprint server is using {self.path.parent}") \
                from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _preload_library() -> None:
    try:
        for name in ("fingerprint.models", "fingerprint.fitting.pipeline"):
            importlib.import_module(name)
    except Exception:  # reported by the routes that need it
        logger.debug("library preload failed", exc_info=True)


def _clean_dictionary_builds(directory: Path) -> None:
    """Remove what builds interrupted by a crash left in the dictionary directory."""
    try:
        from fingerprint.dictionary.cache import cleanup_stale_builds

        removed = cleanup_stale_builds(directory)
    except Exception:  # best effort
        logger.debug("cleaning dictionary build leftovers failed", exc_info=True)
        return
    if removed:
        logger.info("removed %d leftovers of interrupted dictionary builds", removed)


def _error(status: int, detail: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


def _install_handlers(app: FastAPI) -> None:
    from fingerprint.errors import DictionaryError, InputError
    from fingerprint.fitting.options import OptionError

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status_code, exc.detail, exc.field, exc.headers)

    @app.exception_handler(InputError)
    async def _input_error(request: Request, exc: InputError) -> JSONResponse:
        return _error(422, str(exc), exc.option if isinstance(exc, OptionError) else None)

    @app.exception_handler(DictionaryError)
    async def _dictionary_error(request: Request, exc: DictionaryError) -> JSONResponse:
        return _error(409, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = loc[-1] if loc else None
        message = first.get("msg", "invalid request")
        detail = f"{field}: {message}" if field else message
        return _error(422, detail, field)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_disk_full(exc):  # a full disk is the server's state, not a bug: 507
            logger.warning("disk full on %s %s: %s", request.method, request.url.path, exc)
            return _error(507, "not enough disk space on the server; try again later",
                          headers={"Retry-After": "60"})
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error")


def create_app(settings: Settings | None = None) -> FastAPI:
    """The server application for ``settings`` (default: from the environment)."""
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lock = DataDirLock(settings.data_dir)
        lock.acquire()
        dispatcher = None
        try:
            storage = JobStorage(settings.data_dir)
            storage.ensure()
            settings.resolved_dictionary_dir.mkdir(parents=True, exist_ok=True)
            _clean_dictionary_builds(settings.resolved_dictionary_dir)
            db = Database(settings.database_path)
            db.initialize()
            reconcile(db, storage, max_attempts=settings.max_attempts)
            dispatcher = Dispatcher(settings, db, storage)
            dispatcher.start()
            app.state.ctx = ServerContext(
                settings=settings, db=db, storage=storage, dispatcher=dispatcher,
                gate=UploadGate(settings.max_uploads_per_key, settings.max_uploads))
            threading.Thread(target=_preload_library, name="fingerprint-preload",
                             daemon=True).start()
            logger.info("fingerprint server ready: data in %s, %s", settings.data_dir,
                        dispatcher.health()[1])
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            app.state.ctx = None
            lock.release()

    app = FastAPI(title="fingerprint lab server", version=__version__,
                  description=DESCRIPTION, lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url="/openapi.json")
    app.state.ctx = None
    app.state.settings = settings
    _install_handlers(app)
    install_offline_docs(app)  # /docs and /redoc with local assets (no CDN)
    app.include_router(health.router)
    for module in (jobs, models, dictionaries):
        app.include_router(module.router, prefix=API_PREFIX)
    app.include_router(models.options_router, prefix=API_PREFIX)
    # the web page and the endpoints it alone needs (viewer, catalogue, admin)
    for router in (maps.router, web.catalogue_router, admin.router, admin.me_router):
        app.include_router(router, prefix=API_PREFIX)
    web.install(app)
    return app
