"""Inference: /v1/chat/completions and /v1/completions in OpenAI's shapes, and /v1/classifications (ours).

Each route resolves the model the caller named (a catalog base model, or a succeeded fine-tuned model of the
caller's organisation), asks the serving engine, and shapes the answer. `stream: true` answers server-sent events.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any, Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sqlalchemy.orm import Session

from api.deps import CurrentOrg, SessionClosingRoute, SessionDep, StorageDep
from api.errors import APIError, error_body
from api.pagination import owned
from api.quotas import InferenceRate
from api.serving import EngineDep, Generation, ModelRef, PromptError, Sampling, ServingError, UnknownModel
from control.ids import new_id, now
from control.jobs import JobStatus
from control.orm import Job
from control.storage import Storage
from neat_core.models.catalog import CAUSAL_LM, CLASSIFICATION, entry

log = logging.getLogger("api.inference")
router = APIRouter(route_class=SessionClosingRoute, prefix="/v1", tags=["inference"])

MAX_TOKENS = 2048
MAX_INPUTS = 2048  # texts in one classification request

MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
MAX_STOPS = 4


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # e.g. `name`
    role: Literal["system", "developer", "user", "assistant"]  # `developer`: OpenAI's newer name for system
    content: str | list[TextPart]

    def plain(self) -> dict[str, str]:
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the SDK may send fields we don't act on (`user`, `logit_bias`, ...)
    model: Annotated[str, Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n is not None and n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > MAX_STOPS or not all(stops):
            raise ValueError(f"up to {MAX_STOPS} non-empty stop strings")
        return stop

    def sampling(self, max_tokens: int | None = None) -> Sampling:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return Sampling(
            max_tokens=max_tokens or self.max_tokens or 256,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=stop,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens; wins when both are sent


class CompletionRequest(_GenerationRequest):
    prompt: str


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1)]
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]


@router.post("/chat/completions")
def chat_completions(
    body: ChatRequest, session: SessionDep, org: CurrentOrg, storage: StorageDep, engine: EngineDep, _: InferenceRate
):
    ref = _resolve(session, org, storage, body.model, CAUSAL_LM)
    with _engine_errors("messages"):
        messages = [m.plain() for m in body.messages]
        generation = engine.generate(ref, messages, body.sampling(body.max_completion_tokens), caller=org)
        if body.stream:
            return _event_stream(_chat_chunks(generation, body.model, body.include_usage))
        content = generation.text()
    return _chat_completion(generation, body.model, content)


@router.post("/completions")
def completions(
    body: CompletionRequest,
    session: SessionDep,
    org: CurrentOrg,
    storage: StorageDep,
    engine: EngineDep,
    _: InferenceRate,
):
    ref = _resolve(session, org, storage, body.model, CAUSAL_LM)
    with _engine_errors("prompt"):
        generation = engine.generate(ref, body.prompt, body.sampling(), caller=org)
        if body.stream:
            return _event_stream(_completion_chunks(generation, body.model, body.include_usage))
        text = generation.text()
    return _text_completion(generation, body.model, text)


@router.get("/serving/stats")
def serving_stats(org: CurrentOrg, engine: EngineDep) -> dict:
    """What this process serves: per base model, adapters loaded and bytes used, cache hits and misses, batch
    sizes and queue depth. Only the caller's own adapters are named."""
    return engine.stats(caller=org)


@router.post("/classifications")
def classifications(
    body: ClassificationRequest,
    session: SessionDep,
    org: CurrentOrg,
    storage: StorageDep,
    engine: EngineDep,
    _: InferenceRate,
) -> dict:
    ref = _resolve(session, org, storage, body.model, CLASSIFICATION)
    texts = [body.input] if isinstance(body.input, str) else body.input
    with _engine_errors("input"):
        results, tokens = engine.classify(ref, texts, caller=org)
    return {
        "object": "list",
        "data": [{"index": i, "label": r["label"], "probabilities": r["probabilities"]} for i, r in enumerate(results)],
        "model": body.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def _resolve(session: Session, org: str, storage: Storage, model_id: str, task: str) -> ModelRef:
    """The model `model_id` names for this caller, checked against the endpoint's task. Another organisation's
    model answers exactly like a missing one. Closes the session: the generation that follows may take a while
    and needs no database connection."""
    try:
        base = entry(model_id)
        if base is not None:
            if task != CAUSAL_LM or CAUSAL_LM not in base.tasks:
                raise _wrong_endpoint(model_id, "a base model" if task == CLASSIFICATION else "a text encoder", task)
            return ModelRef(model_id, CAUSAL_LM, model_id)
        job = session.scalar(owned(Job, org).where(Job.fine_tuned_model == model_id, Job.status == JobStatus.SUCCEEDED))
    finally:
        session.close()
    if job is None or job.artifact_key is None:
        raise _model_not_found(model_id)
    if job.task != task:
        kind = "a classification model" if job.task == CLASSIFICATION else "a text-generation model"
        raise _wrong_endpoint(model_id, kind, task)
    return ModelRef.of_job(job, storage)


def _model_not_found(model_id: str) -> APIError:
    return APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")


def _wrong_endpoint(model_id: str, kind: str, task: str) -> APIError:
    if task == CLASSIFICATION:
        use = "/v1/classifications with a fine-tuned classification model"
    else:
        use = "/v1/chat/completions or /v1/completions with a text-generation model"
    message = f"The model '{model_id}' is {kind}; use {use}."
    return APIError(400, message, code="invalid_model_for_endpoint", param="model")


@contextmanager
def _engine_errors(prompt_param: str) -> Iterator[None]:
    """The serving engine's errors in the API's error shape."""
    try:
        yield
    except PromptError as e:
        raise APIError(400, str(e), code=e.code, param=prompt_param) from e
    except UnknownModel as e:
        raise _model_not_found(str(e)) from e
    except ServingError as e:
        raise APIError(500, str(e), code="model_error") from e


def _chat_completion(generation: Generation, model: str, content: str) -> dict:
    message = {"role": "assistant", "content": content, "refusal": None}
    return {
        "id": new_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "message": message, "finish_reason": generation.finish_reason, "logprobs": None}],
        "usage": _usage(generation),
    }


def _text_completion(generation: Generation, model: str, text: str) -> dict:
    return {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "system_fingerprint": None,
        "choices": [{"index": 0, "text": text, "finish_reason": generation.finish_reason, "logprobs": None}],
        "usage": _usage(generation),
    }


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _event_stream(events: Iterator[dict]) -> StreamingResponse:
    def encode() -> Iterator[str]:
        try:
            for event in events:
                yield f"data: {json.dumps(event)}\n\n"
        except ServingError as e:  # the status line is gone: the error goes in the stream (the SDK raises it)
            log.warning("stream failed: %s", e)
            yield f"data: {json.dumps(error_body(500, str(e), 'model_error', None))}\n\n"
            return
        yield "data: [DONE]\n\n"

    return StreamingResponse(encode(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _chat_chunks(generation: Generation, model: str, include_usage: bool) -> Iterator[dict]:
    base = {
        "id": new_id("chatcmpl"),
        "object": "chat.completion.chunk",
        "created": now(),
        "model": model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    yield chunk({"role": "assistant", "content": ""})
    for text in generation:
        yield chunk({"content": text})
    yield chunk({}, generation.finish_reason)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(generation)}


def _completion_chunks(generation: Generation, model: str, include_usage: bool) -> Iterator[dict]:
    base = {
        "id": new_id("cmpl"),
        "object": "text_completion",
        "created": now(),
        "model": model,
        "system_fingerprint": None,
    }

    def chunk(text: str, finish_reason: str | None = None) -> dict:
        return {**base, "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}

    for text in generation:
        yield chunk(text)
    yield chunk("", generation.finish_reason)
    if include_usage:
        yield {**base, "choices": [], "usage": _usage(generation)}
