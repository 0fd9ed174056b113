"""The FastAPI app: routers, error shape, nothing else. Run with `uvicorn api.main:app` (or `python -m api.launch`)."""

from __future__ import annotations

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routes import files, inference, jobs, models


def create_app() -> FastAPI:
    app = FastAPI(title="NEAT fine-tuning", version="0.1.0", description="OpenAI-compatible fine-tuning with NEAT.")
    install_error_handlers(app)
    for module in (files, jobs, models, inference):
        app.include_router(module.router)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    return app


app = create_app()
