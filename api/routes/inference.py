"""Inference: /v1/chat/completions and /v1/completions in OpenAI's shapes, and /v1/classifications (ours).

Each route resolves the model the caller named from the API's records (`api.targets`: ownership checked here,
before anything leaves this process), then hands the validated request to the backend (in-process or remote
inference servers) and relays its answer. `stream: true` answers server-sent events; a caller that goes away
closes the backend's stream, which cancels the generation.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentOrg, SessionClosingRoute, SessionDep, SettingsDep, StorageDep
from api.quotas import InferenceRate
from api.remote import NoBackend, configured
from api.targets import resolve
from control.backends import Backend, Target
from control.protocol import ChatRequest, ClassificationRequest, CompletionRequest
from neat_core.models.catalog import CAUSAL_LM, CLASSIFICATION

log = logging.getLogger("api.inference")
# Async routes (they await the backend); their session is closed by `resolve`, in the thread that used it.
router = APIRouter(route_class=SessionClosingRoute, prefix="/v1", tags=["inference"])


def get_backend(request: Request, settings: SettingsDep) -> Backend:
    """The backend the launcher injected; else remote inference servers when configured; else none (503)."""
    state = request.app.state
    if state.backend is None:
        state.backend = configured(settings)
    return state.backend or NoBackend()


BackendDep = Annotated[Backend, Depends(get_backend)]


@router.post("/chat/completions")
async def chat_completions(
    body: ChatRequest,
    session: SessionDep,
    org: CurrentOrg,
    storage: StorageDep,
    backend: BackendDep,
    rate: InferenceRate,
):
    target = await run_in_threadpool(resolve, session, org, storage, body.model, CAUSAL_LM)
    return await _generate(backend, target, body, rate)


@router.post("/completions")
async def completions(
    body: CompletionRequest,
    session: SessionDep,
    org: CurrentOrg,
    storage: StorageDep,
    backend: BackendDep,
    rate: InferenceRate,
):
    target = await run_in_threadpool(resolve, session, org, storage, body.model, CAUSAL_LM)
    return await _generate(backend, target, body, rate)


# What every organisation may see of an engine: its load and batching, which identify no one.
SHARED_FIGURES = ("base_model", "task", "bytes_budget", "queue_depth", "rows_running", "forward_passes",
                  "mean_batch_size", "max_batch_size", "batch_sizes")  # fmt: skip
# The adapter cache's figures, shown for the caller's own adapters only: everyone's totals would tell an
# organisation how many adapters others have loaded, how big, and how often they are used.
OWN_FIGURES = {"adapters_loaded": 0, "adapters_pinned": 0, "bytes_used": 0, "hits": 0, "misses": 0, "evictions": 0,
               "mean_load_ms": 0.0}  # fmt: skip


@router.get("/serving/stats")
async def serving_stats(org: CurrentOrg, backend: BackendDep) -> dict:
    """What the inference tier serves: per base model (and server) its batch sizes and queue depth, and the caller's
    own adapters in its cache (their count, bytes, hits and misses). Nothing about another organisation's: the
    servers report cache figures per owner, and only the caller's are passed on (an allow-list, so a figure added
    to the servers' stats stays internal until it is listed here)."""
    engines, solo = [], 0
    for server in await backend.stats():
        for engine in server.get("engines", []):
            mine = sorted(a["id"] for a in engine.get("adapters", []) if a.get("owner") == org)
            own = {**OWN_FIGURES, **engine.get("owners", {}).get(org, {})}
            shared = {k: engine[k] for k in SHARED_FIGURES if k in engine}
            engines.append({"server": server["server"], **shared, **{k: own[k] for k in OWN_FIGURES},
                            "your_adapters": mine})  # fmt: skip
        solo += sum(1 for owner in server.get("solo_owners", {}).values() if owner == org)
    return {"object": "serving.stats", "engines": engines, "solo_models_loaded": solo}


@router.post("/classifications")
async def classifications(
    body: ClassificationRequest,
    session: SessionDep,
    org: CurrentOrg,
    storage: StorageDep,
    backend: BackendDep,
    _: InferenceRate,
) -> dict:
    target = await run_in_threadpool(resolve, session, org, storage, body.model, CLASSIFICATION)
    return await backend.classify(target, body)


async def _generate(backend: Backend, target: Target, body: ChatRequest | CompletionRequest, rate: dict[str, str]):
    end_user = body.user or getattr(body, "safety_identifier", None)
    if end_user:  # OpenAI's `user` / `safety_identifier`: which of the caller's users asked, for abuse tracing
        log.info("inference request of %s on %s for end user %r", target.caller, target.name, end_user)
    if not body.stream:
        return await backend.complete(target, body)
    events = await backend.stream(target, body)  # raises (and answers with a status) before anything is sent

    async def encode() -> AsyncIterator[str]:
        failed = False
        try:
            async for event in events:
                failed = "error" in event
                yield f"data: {json.dumps(event)}\n\n"
        finally:
            await events.aclose()  # the caller went away: the backend cancels the generation
        if not failed:
            yield "data: [DONE]\n\n"

    # A response of its own: the rate headers the dependency set on the default response do not reach it.
    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", **rate})
