"""OpenAI's protocol on the host: a validated request started on a model, answered whole or as the payloads of a
server-sent event stream, in OpenAI's shapes. The server and the in-process backend both answer through here, so
an answer is the same whichever way it travels."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from control.ids import new_id, now
from control.protocol import ChatRequest, CompletionRequest, GenerationRequest
from inference.errors import PromptError, ServingError
from inference.host import ModelHost, ModelRef
from inference.text import Generation
from neat_core.serving import SamplingParams

log = logging.getLogger("inference.answers")


def start(host: ModelHost, ref: ModelRef, request: ChatRequest | CompletionRequest) -> Generation:
    """Start the generation `request` asks for. Raises PromptError (naming the prompt's field), UnknownModel or
    ServingError before anything is generated."""
    chat = isinstance(request, ChatRequest)
    prompt = [m.plain() for m in request.messages] if chat else request.prompt
    sampling = SamplingParams(
        max_tokens=request.tokens_wanted,
        temperature=1.0 if request.temperature is None else request.temperature,  # OpenAI's default
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        ignore_eos=bool(request.ignore_eos),
    )
    try:
        return host.generate(ref, prompt, sampling, request.stops)
    except PromptError as e:
        e.param = e.param or ("messages" if chat else "prompt")
        raise


def answer(generation: Generation, request: GenerationRequest) -> dict:
    """The whole completion (runs the generation to its end)."""
    text = generation.text()
    base = {"created": now(), "model": request.model, "system_fingerprint": None, "usage": _usage(generation)}
    if isinstance(request, ChatRequest):
        message = {"role": "assistant", "content": text, "refusal": None}
        choice = {"index": 0, "message": message, "finish_reason": generation.finish_reason, "logprobs": None}
        return {"id": new_id("chatcmpl"), "object": "chat.completion", **base, "choices": [choice]}
    choice = {"index": 0, "text": text, "finish_reason": generation.finish_reason, "logprobs": None}
    return {"id": new_id("cmpl"), "object": "text_completion", **base, "choices": [choice]}


def events(generation: Generation, request: GenerationRequest) -> Iterator[dict]:
    """The payloads of the event stream, without the closing `[DONE]` (the transport's). A model that fails
    midway ends it with an error payload (the status line is gone; the SDK raises it)."""
    chat = isinstance(request, ChatRequest)
    base = {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": now(),
        "model": request.model,
        "system_fingerprint": None,
    }

    def chunk(text: str | None, finish_reason: str | None = None) -> dict:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**base, "choices": [choice]}

    try:
        if chat:
            first = chunk("")
            first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
            yield first
        for text in generation:
            yield chunk(text)
    except ServingError as e:
        log.warning("stream failed: %s", e)
        yield error_body(e.status, e.message, e.code, None)
        return
    yield chunk(None, generation.finish_reason)
    if request.include_usage:
        yield {**base, "choices": [], "usage": _usage(generation)}


def classification(results: list[dict], tokens: int, model: str) -> dict:
    return {
        "object": "list",
        "data": [{"index": i, "label": r["label"], "probabilities": r["probabilities"]} for i, r in enumerate(results)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def stats(host: ModelHost, requests_served: int, adapters: list[str]) -> dict:
    """This server's figures: rows generating now, per engine its batch sizes and loaded adapters (with owners),
    the adapters registered by name, and how many requests reached a model."""
    return {"object": "inference.stats", "rows_running": host.running(), "requests_served": requests_served,
            "adapters_registered": adapters, **host.stats()}  # fmt: skip
