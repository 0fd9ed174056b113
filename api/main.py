"""The FastAPI app: routers, error shape, nothing else. Run with `uvicorn api.main:app` (or `python -m api.launch`)."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from api import serving
from api.errors import install_error_handlers
from api.quotas import RateLimiter
from api.routes import admin, files, inference, jobs, models
from control.db import session_scope, with_retries
from control.keys import add_key
from control.settings import Settings, get_settings

log = logging.getLogger("api.main")


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    settings = get_settings()
    if settings.bootstrap_api_key:  # distributed deployments hand the first key in by environment variable
        try:
            with session_scope(settings.resolved_database_url) as session:
                add_key(session, settings.bootstrap_org, settings.bootstrap_api_key)
        except (OperationalError, DBAPIError):
            # The database is away: start anyway (answering 503 until it is back) and add the key once it is.
            threading.Thread(target=_bootstrap_key, args=(settings,), name="bootstrap-key", daemon=True).start()
    if settings.serving and settings.serving_preload:  # in the background: the API answers meanwhile
        threading.Thread(target=serving.preload, args=(settings,), name="serving-preload", daemon=True).start()
    yield
    serving.shutdown()


def _bootstrap_key(settings: Settings) -> None:
    def add(session: Session) -> None:
        add_key(session, settings.bootstrap_org, settings.bootstrap_api_key)

    try:
        with_retries(settings.resolved_database_url, add, seconds=3600)
    except Exception:
        log.exception("could not create the bootstrap API key")


def create_app() -> FastAPI:
    app = FastAPI(
        title="NEAT fine-tuning",
        version="0.1.0",
        description="OpenAI-compatible fine-tuning with NEAT.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.state.inference_rate = RateLimiter()  # requests per minute per organisation, in this process
    for module in (files, jobs, models, inference, admin):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    return app


app = create_app()
