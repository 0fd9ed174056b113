"""llama.cpp's llama-servers in front of the other inference backend (`NEAT_LLAMACPP_SERVERS`).

Why a second engine: on CPUs llama.cpp decodes 1-2x faster than ours at few streams (docs/benchmarks.md), and it
runs our adapters' exact LoRA exports with our greedy tokens. What it cannot do: load an adapter at run time (a
server holds the adapters named when it started), serve classifiers or methods without an exact LoRA export, or
honour every OpenAI field. So it goes in front (`LlamaCppFirst`): a request goes to a llama-server when one holds
its model and the request asks for nothing llama.cpp would not honour; everything else goes to the backend behind
it (our inference servers or vLLM, or the embedded in-process one). With nothing behind it, what it cannot serve is
answered: 404 for a model no server holds, 400 naming the field it would not honour.

What a server holds is fixed at its start: one base model (`-m base.gguf --alias <base model id>`) and the adapters
on its command line (`--lora <dir>/<gguf_adapter_file(model id)>`), both made by `python -m inference.gguf`. So for
each request the API asks the servers, in the base model's ranking, what they hold (`GET /v1/models`,
`GET /lora-adapters`) and sends it to the first that holds the model. It asks every time rather than caching: a
restarted server may list its adapters in another order, and a stale id would apply another customer's adapter.

The request is made explicit where llama-server's defaults differ from OpenAI's:
- adapters: every adapter the server holds is listed with its scale (the model's at 1.0, the others at 0.0).
  llama-server applies an adapter a request does not mention at its start-up scale, which is 1.0 in this build even
  with `--lora-init-without-apply`: a base-model request that listed none would run with every adapter on;
- sampling: OpenAI's defaults (temperature 1, top_p 1) and no other filters (llama-server would add top_k 40,
  min_p 0.05 and its own temperature 0.8).
Fields llama-server would ignore, or answer in another shape, are not sent to it (400 `unsupported_parameter`,
naming the field, when nothing is behind it). The answer names the model asked for (llama-server names its alias), in
OpenAI's shape (llama-server's `timings` dropped; a streamed completion's usage moved to its own final chunk).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from api.remote import RemoteBackend, request_path, sse_payloads
from control.backends import Backend, BackendError, Target, gguf_adapter_file
from control.protocol import REFUSED_CHAT, REFUSED_COMPLETION, ChatRequest, ClassificationRequest, CompletionRequest
from control.settings import Settings

log = logging.getLogger("api.llamacpp")

# Sent on as they are: llama-server reads them with OpenAI's meaning.
_SENT = {"prompt", "messages", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
         "presence_penalty", "frequency_penalty", "ignore_eos"}  # fmt: skip
_HANDLED_HERE = {"model", "max_completion_tokens", "user", "safety_identifier"}  # the two ids: logged by the API
# llama-server's seeds are 32-bit, and its largest (2**32 - 1) means "pick one at random".
_RANDOM_SEED = 2**32 - 1
# A field outside both sets is sent only at a value that asks for nothing, and then not sent at all.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1,),
    "logprobs": (False,),
    "top_logprobs": (0,),
    "echo": (False,),
    "response_format": ({"type": "text"},),
    **REFUSED_CHAT,
    **REFUSED_COMPLETION,
}


def llamacpp_body(request: ChatRequest | CompletionRequest) -> dict:
    """The llama-server request for `request`, without the adapter choice; BackendError 400 for a field it would
    not honour."""
    given = request.model_dump(exclude_none=True, by_alias=True)
    body = {key: value for key, value in given.items() if key in _SENT}
    for key, value in given.items():
        if key in _SENT or key in _HANDLED_HERE:
            continue
        if not any(value == v and type(value) is type(v) for v in _NEUTRAL.get(key, ())):
            raise _refused(key)
    if isinstance(request, ChatRequest):
        for message in request.messages:
            if message.role == "tool" or message.tool_calls:
                raise _refused("messages", "tool calls and tool results")
        if request.max_completion_tokens is not None:
            body["max_tokens"] = request.max_completion_tokens  # OpenAI's newer name wins when both are sent
    elif not isinstance(request.prompt, str) and request.prompt and not isinstance(request.prompt[0], int):
        if len(request.prompt) != 1:
            raise _refused("prompt", "several prompts in one request")
        body["prompt"] = request.prompt[0]
    if request.seed is not None and not 0 <= request.seed < _RANDOM_SEED:
        raise NotHere(400, f"'seed' must be between 0 and {_RANDOM_SEED - 1} on this deployment's inference "
                      "servers (llama.cpp)", "invalid_value", "seed")  # fmt: skip
    body.setdefault("temperature", 1.0)
    body.setdefault("top_p", 1.0)
    # Off (0): OpenAI's sampling has no top-k. Greedy requests take top_k 1 instead, the same argmax, so that
    # llama-server's last sampler does not softmax the whole vocabulary (49k logits) per token and slot.
    top_k = 1 if body["temperature"] == 0 else 0
    body.update(top_k=top_k, min_p=0.0, typical_p=1.0, repeat_penalty=1.0)  # the others off: not in OpenAI's sampling
    return body


class NotHere(BackendError):
    """What the llama.cpp servers cannot serve (a model none holds, a field llama.cpp would not honour, or no server
    answering): the backend behind them is asked instead, and when there is none this is the answer."""


def _refused(param: str, what: str | None = None) -> NotHere:
    subject = what or f"'{param}'"
    message = f"{subject} is not supported by this deployment's inference servers (llama.cpp)"
    return NotHere(400, message[0].upper() + message[1:], "unsupported_parameter", param)


class LlamaCppFirst:
    """The llama.cpp servers for what they hold and can honour; `behind` (None: nothing) for everything else."""

    def __init__(self, llama: LlamaCppBackend, behind: Backend | None):
        self.llama, self.behind = llama, behind

    async def complete(self, target: Target, request: ChatRequest | CompletionRequest) -> dict:
        try:
            return await self.llama.complete(target, request)
        except NotHere:
            if self.behind is None:
                raise
        return await self.behind.complete(target, request)

    async def stream(self, target: Target, request: ChatRequest | CompletionRequest) -> AsyncIterator[dict]:
        try:
            return await self.llama.stream(target, request)  # raises before anything is sent
        except NotHere:
            if self.behind is None:
                raise
        return await self.behind.stream(target, request)

    async def classify(self, target: Target, request: ClassificationRequest) -> dict:
        if self.behind is None:
            raise BackendError(501, "Classification is not served by this deployment.", "unsupported", "model")
        return await self.behind.classify(target, request)

    async def load(self, target: Target) -> None:
        try:
            await self.llama.load(target)
        except NotHere:
            if self.behind is None:
                raise
            await self.behind.load(target)

    async def unload(self, name: str) -> None:
        await self.llama.unload(name)
        if self.behind is not None:
            await self.behind.unload(name)

    async def stats(self) -> list[dict[str, Any]]:
        return await self.llama.stats() + (await self.behind.stats() if self.behind is not None else [])

    async def close(self) -> None:
        await self.llama.close()
        if self.behind is not None:
            await self.behind.close()


class LlamaCppBackend(RemoteBackend):
    """llama-servers over HTTP, as `api.remote` reaches ours: the base model's ranking, unreachable ones skipped."""

    def __init__(self, servers: list[str], token: str | None, **kwargs: Any):
        # No kept-alive connections: llama-server (cpp-httplib) gives each open connection one of its HTTP threads,
        # and idle ones kept by this client left streams waiting for a thread (32 streams, one pair of runs: 0.73 of
        # llama.cpp's tokens/s with them, 0.90 without). A loopback or LAN connect per request is well under 1 ms.
        super().__init__(servers, token, **{**kwargs, "kind": "llamacpp", "keepalive": 0})

    @classmethod
    def from_settings(cls, settings: Settings) -> LlamaCppBackend:
        return cls(settings.llamacpp_server_urls, settings.internal_token,
                   connect_timeout_s=settings.inference_connect_timeout_s,
                   timeout_s=settings.inference_timeout_s)  # fmt: skip

    async def complete(self, target: Target, request: ChatRequest | CompletionRequest) -> dict:
        response = await self._send(target, request_path(request), llamacpp_body(request))
        return _openai(response.json(), target)

    async def stream(self, target: Target, request: ChatRequest | CompletionRequest) -> AsyncIterator[dict]:
        response = await self._send(target, request_path(request), llamacpp_body(request), stream=True)
        usage = bool(request.stream_options and request.stream_options.include_usage)
        return _chunks(sse_payloads(response), target, usage)

    async def classify(self, target: Target, request: ClassificationRequest) -> dict:
        raise NotHere(501, "Classification is not served by this deployment.", "unsupported", "model")

    async def load(self, target: Target) -> None:
        """Nothing to load (a llama-server holds what it started with): NotHere unless some server holds it."""
        declined = 0
        for server in self.servers:
            try:
                if await self._adapter_ids(server, target) is not None:
                    return
                declined += 1
            except httpx.HTTPError as e:
                log.warning("inference server %s unreachable: %s", server, e)
        raise self._not_served(target, declined)

    async def unload(self, name: str) -> None:
        # A llama-server cannot drop an adapter while it runs; the API stops routing to a deleted model at once
        # (it no longer resolves), and the operator drops its --lora at the server's next restart.
        log.info("llama.cpp servers keep %s until they restart without it", name)

    async def stats(self) -> list[dict[str, Any]]:
        out = []
        for server in self.servers:
            try:
                slots, adapters, models = await asyncio.gather(
                    self._get(server, "/slots"), self._get(server, "/lora-adapters"), self._get(server, "/v1/models")
                )
            except httpx.HTTPError as e:
                out.append({"server": server, "kind": "llamacpp", "error": f"unreachable: {type(e).__name__}"})
                continue
            # One engine per server, with the figures every caller may see (api.routes.inference's allow-list);
            # the adapter files it holds name other organisations' models, so they stay in the operator's view.
            engine = {"base_model": models["data"][0]["id"], "task": "causal_lm",
                      "rows_running": sum(bool(s.get("is_processing")) for s in slots)}  # fmt: skip
            out.append({"server": server, "kind": "llamacpp", "slots": len(slots), "engines": [engine],
                        "adapters_held": [_file_name(a["path"]) for a in adapters]})  # fmt: skip
        return out

    def _told(self, target: Target) -> bool:
        return False  # nothing is loaded at run time; `_shape` finds the server that holds the model

    async def _shape(self, server: str, target: Target, body: dict) -> dict | None:
        ids = await self._adapter_ids(server, target)
        if ids is None:
            return None
        chosen, held = ids
        return {**body, "lora": [{"id": i, "scale": 1.0 if i == chosen else 0.0} for i in held]}

    async def _adapter_ids(self, server: str, target: Target) -> tuple[int | None, list[int]] | None:
        """(the id of `target`'s adapter on `server` (None: the base model itself), every adapter id it holds), or
        None when `server` does not hold `target`."""
        models, adapters = await asyncio.gather(self._get(server, "/v1/models"), self._get(server, "/lora-adapters"))
        if target.base_model not in {m["id"] for m in models.get("data", [])}:
            return None
        held = [a["id"] for a in adapters]
        if target.artifact is None:
            return None, held
        name = gguf_adapter_file(target.name)
        chosen = [a["id"] for a in adapters if _file_name(a["path"]) == name]
        return (chosen[0], held) if chosen else None

    async def _get(self, server: str, path: str) -> Any:
        response = await self._client.get(f"{server}{path}")
        if response.status_code != 200:
            # A llama-server still loading its model answers 503: not there yet, like one that is down (the next
            # server is tried; 503 with Retry-After when none can serve).
            raise httpx.ConnectError(f"{server}{path} answered {response.status_code}", request=response.request)
        return response.json()

    def _not_served(self, target: Target, declined: int) -> NotHere:
        if not declined:  # none could be reached: 503, retry
            unreachable = super()._not_served(target, declined)
            return NotHere(
                unreachable.status, unreachable.message, unreachable.code, retry_after=unreachable.retry_after
            )
        return NotHere(404, f"The model '{target.name}' is not served by this deployment's inference servers; "
                            "its llama.cpp servers hold the models they were started with.", "model_not_found",
                            "model")  # fmt: skip


def _file_name(path: str) -> str:
    """The file name in a path llama-server reports (as given on its command line)."""
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def _openai(answer: dict, target: Target) -> dict:
    """llama-server's answer in OpenAI's shape: the model asked for, without llama-server's own fields."""
    answer.pop("timings", None)
    answer["model"] = target.name
    if answer.get("object") == "text_completion" and str(answer.get("id", "")).startswith("chatcmpl-"):
        answer["id"] = "cmpl-" + answer["id"].removeprefix("chatcmpl-")  # OpenAI's prefix for completions
    return answer


async def _chunks(events: AsyncIterator[dict], target: Target, usage_asked: bool) -> AsyncIterator[dict]:
    """The stream's chunks in OpenAI's shape. A streamed completion's last chunk carries llama-server's usage
    whatever was asked: it goes to a chunk of its own (no choices) when `stream_options.include_usage` asked for
    it, as OpenAI sends it, and is dropped otherwise."""
    async for chunk in events:
        if "error" in chunk:
            yield chunk
            continue
        chunk = _openai(chunk, target)
        usage = chunk.pop("usage", None)
        if chunk.get("choices"):
            yield chunk
        if usage is not None and usage_asked:
            yield {**chunk, "choices": [], "usage": usage}
