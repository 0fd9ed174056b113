"""The FastAPI app: routers, error shape, nothing else. Run with `uvicorn api.main:app` (inference on the servers in
NEAT_INFERENCE_SERVERS) or `python -m launch` (the embedded default: inference in this process, injected as
`create_app(backend=...)`)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from api.bodies import InferenceBodyLimit
from api.errors import install_error_handlers
from api.metrics import instrument
from api.polling import PollingFastPath
from api.quotas import RateLimiter
from api.remote import configured
from api.request_id import RequestId, install_log_ids
from api.routes import admin, files, inference, jobs, methods, models, webhooks
from api.targets import preload
from control.backends import Backend
from control.db import session_scope, with_retries
from control.keys import add_key
from control.settings import Settings, get_settings
from control.sweeper import Sweeper

log = logging.getLogger("api.main")
# The web console (docs/console.md): static files shipped in the package, served from this origin, so that it needs
# no CORS, no CDN and no cookies (it sends the API key it keeps in the browser's session storage as the Bearer).
CONSOLE = Path(__file__).parent / "console"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if settings.bootstrap_api_key:  # distributed deployments hand the first key in by environment variable
        try:
            with session_scope(settings.resolved_database_url) as session:
                add_key(session, settings.bootstrap_org, settings.bootstrap_api_key)
        except (OperationalError, DBAPIError):
            # The database is away: start anyway (answering 503 until it is back) and add the key once it is.
            threading.Thread(target=_bootstrap_key, args=(settings,), name="bootstrap-key", daemon=True).start()
    # Temporary bytes a killed API process (or worker) left on the volume: removed now, and every sweep_seconds.
    sweeper = await asyncio.to_thread(Sweeper(settings).start)
    app.state.backend = configured(settings, app.state.backend)  # llama.cpp servers, if listed, go in front
    backend = app.state.backend
    if backend is not None and settings.serving and settings.serving_preload:  # the API answers meanwhile
        app.state.preloading = asyncio.create_task(preload(settings, backend))
    _freeze_startup_objects()
    yield
    sweeper.stop()
    if app.state.backend is not None:
        await app.state.backend.close()


_frozen = False


def _freeze_startup_objects() -> None:
    """Leaves what the process holds once started (its modules, the app) out of the garbage collector's scans.

    A burst of concurrent requests keeps enough objects alive to push them into the oldest generation, and each
    collection of that generation scanned every object of the process, about 150,000 once started: 40-90 ms of CPU
    a time, in the middle of a burst (docs/benchmarks.md, "API load"). Objects made later are collected as before.
    Once per process: the test suite starts many apps in one."""
    global _frozen
    if not _frozen:
        _frozen = True
        gc.collect()
        gc.freeze()


def _bootstrap_key(settings: Settings) -> None:
    def add(session: Session) -> None:
        add_key(session, settings.bootstrap_org, settings.bootstrap_api_key)

    try:
        with_retries(settings.resolved_database_url, add, seconds=3600)
    except Exception:
        log.exception("could not create the bootstrap API key")


class _App(FastAPI):
    def build_middleware_stack(self):  # noqa: ANN202
        # outermost, around Starlette's error middleware too: every response, a 500 included, carries the id
        return RequestId(super().build_middleware_stack())


def create_app(backend: Backend | None = None) -> FastAPI:
    """The app; `backend` serves inference (None: the inference servers settings list, else 503 for inference)."""
    install_log_ids()
    app = _App(
        title="NEAT fine-tuning",
        version="0.1.0",
        description="OpenAI-compatible fine-tuning with NEAT.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # innermost of ours (added first): inside the metrics middleware, so that the polls it answers are counted
    app.add_middleware(PollingFastPath, routes=jobs.router.routes, endpoints=(jobs.retrieve_job, jobs.list_events))
    app.add_middleware(InferenceBodyLimit)
    instrument(app)  # /metrics, and the registry (app.state.metrics) the launcher adds in-process serving to
    app.state.backend = backend  # None: created from settings on first use (api.routes.inference.get_backend)
    app.state.inference_rate = RateLimiter()  # requests per minute per organisation, in this process
    for module in (files, jobs, models, inference, methods, webhooks, admin):
        app.include_router(module.router)
    # Its page at `/` and its assets under `/console/` only: a catch-all mount at `/` would answer every unknown
    # path (and wrong method) itself, in place of the API's own 404 and 405 in OpenAI's shape.
    app.mount("/console", StaticFiles(directory=CONSOLE), name="console")

    @app.get("/", include_in_schema=False)
    def console() -> FileResponse:
        return FileResponse(CONSOLE / "index.html")

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    return app


app = create_app()
