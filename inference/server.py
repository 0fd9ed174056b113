"""The inference server's HTTP app: OpenAI's chat completions and completions (whole or streamed as server-sent
events), vLLM's dynamic adapters, our classifications, the models list, health and stats. Every route but
`/health` and `/metrics` needs `Authorization: Bearer <NEAT_INTERNAL_TOKEN>`: its callers are the API (and
operators), never customers; `/metrics` takes the metrics token instead (control.metrics), the one credential a
monitoring system holds. A caller that disconnects mid-stream cancels its generation (its row leaves the batch at
the next step).
Run with `python -m inference` or `uvicorn --factory inference.server:create_app`."""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import anyio
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool

from control.ids import now
from control.metrics import scrape
from control.protocol import (
    CALLER_HEADER,
    ChatRequest,
    ClassificationRequest,
    CompletionRequest,
    LoadAdapterRequest,
    LoadBaseModelRequest,
    UnloadAdapterRequest,
    named_param,
    refusal,
)
from control.settings import Settings, get_settings
from inference import answers, metrics
from inference.errors import InferenceError, Unauthorized
from inference.host import ModelHost, host_for
from inference.registry import AdapterRegistry
from neat_core.models.catalog import CAUSAL_LM, CLASSIFICATION

log = logging.getLogger("inference.server")
THREADS = 256  # each open stream waits for its next token on a worker thread


class _Counter:
    def __init__(self) -> None:
        self.value = 0
        self._lock = threading.Lock()

    def add(self) -> None:
        with self._lock:
            self.value += 1


def create_app(settings: Settings | None = None, host: ModelHost | None = None) -> FastAPI:
    settings = settings or get_settings()
    token = settings.internal_token
    if not token:
        raise RuntimeError("an inference server needs NEAT_INTERNAL_TOKEN (the API sends it as a Bearer token)")
    host = host or host_for(settings)
    registry = AdapterRegistry(host)
    served = _Counter()
    figures = CollectorRegistry()  # what /metrics shows (`registry` is the adapters')
    metrics.register(figures, host)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
        yield
        await run_in_threadpool(host.close)

    def authorised(authorization: Annotated[str | None, Header()] = None) -> None:
        given = (authorization or "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), token.encode()):  # constant time: no timing oracle
            raise Unauthorized("A valid internal token is required.")

    app = FastAPI(title="NEAT inference server", lifespan=lifespan)
    _install_error_handlers(app)
    auth = [Depends(authorised)]

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    def prometheus(authorization: Annotated[str | None, Header()] = None) -> Response:
        status, content_type, body = scrape(figures, settings, authorization)
        return Response(body, status_code=status, media_type=content_type)

    @app.get("/v1/models", dependencies=auth)
    def models() -> dict:
        names = registry.names() + sorted({e["base_model"] for e in host.stats()["engines"]})
        return {"object": "list", "data": [{"id": n, "object": "model", "created": now(), "owned_by": "neat"}
                                           for n in names]}  # fmt: skip

    @app.get("/stats", dependencies=auth)
    def stats() -> dict:
        return answers.stats(host, served.value, registry.names())

    @app.post("/v1/load_lora_adapter", dependencies=auth)
    def load_adapter(body: LoadAdapterRequest) -> PlainTextResponse:
        registry.load(body.lora_name, body.lora_path, body.owner, body.base_model_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/load_base_model", dependencies=auth)
    def load_base_model(body: LoadBaseModelRequest) -> PlainTextResponse:
        registry.load_base(body.model, body.path)
        return PlainTextResponse(f"Success: base model '{body.model}' added successfully.")

    @app.post("/v1/unload_lora_adapter", dependencies=auth)
    def unload_adapter(body: UnloadAdapterRequest) -> PlainTextResponse:
        registry.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    # The organisation the API says is asking: the engine shares its passes fairly between them.
    Caller = Annotated[str | None, Header(alias=CALLER_HEADER)]

    async def generate(request: ChatRequest | CompletionRequest, caller: str | None) -> Any:
        def start() -> Any:
            ref = dataclasses.replace(registry.resolve(request.model, CAUSAL_LM), caller=caller)
            generation = answers.start(host, ref, request)
            served.add()
            return generation

        generation = await run_in_threadpool(start)
        if not request.stream:
            return await run_in_threadpool(answers.answer, generation, request)
        return _event_stream(answers.events(generation, request), generation.cancel)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatRequest, caller: Caller = None) -> Any:
        return await generate(body, caller)

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, caller: Caller = None) -> Any:
        return await generate(body, caller)

    @app.post("/v1/classifications", dependencies=auth)
    def classifications(body: ClassificationRequest, caller: Caller = None) -> dict:
        try:
            ref = dataclasses.replace(registry.resolve(body.model, CLASSIFICATION), caller=caller)
            results, tokens = host.classify(ref, body.texts)
        except InferenceError as e:
            e.param = e.param or ("input" if e.status == 400 else None)
            raise
        served.add()
        return answers.classification(results, tokens, body.model)

    return app


def _event_stream(events: Iterator[dict], cancel: Callable[[], None]) -> StreamingResponse:
    async def encode() -> AsyncIterator[str]:
        failed = False
        try:
            while (event := await run_in_threadpool(next, events, None)) is not None:
                failed = "error" in event
                yield f"data: {json.dumps(event)}\n\n"
        finally:
            cancel()  # the caller went away (or the stream ended): the row leaves the batch at the next step
        if not failed:
            yield "data: [DONE]\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _install_error_handlers(app: FastAPI) -> None:
    """The one place this server's errors become responses, in OpenAI's error shape."""

    @app.exception_handler(InferenceError)
    async def _inference_error(_: Request, exc: InferenceError) -> JSONResponse:
        body = answers.error_body(exc.status, exc.message, exc.code, exc.param)
        retry_after = getattr(exc, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        loc = [str(p) for p in (errors[0].get("loc", ()) if errors else ()) if p != "body"]
        param = named_param(errors[0], ".".join(loc) or None) if errors else None
        message = errors[0].get("msg", "Invalid request.") if errors else "Invalid request."
        code, message = (refusal(errors[0], param) if errors else None) or ("invalid_request", message)
        return JSONResponse(answers.error_body(400, message, code, param), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(answers.error_body(500, "Internal server error.", "internal_error", None), 500)
