"""The remote backend: inference servers over HTTP (`python -m inference`, or vLLM started with `--enable-lora`;
llama.cpp's llama-server: `api.llamacpp`, built on this).

Routing: each base model goes to the server that ranks it highest by rendezvous hashing (highest
hash(server, base model) first), so one base model is loaded on as few servers as possible and its adapter cache
stays warm there; the other servers, in the same ranking, are its failover order. A server that cannot be reached
is skipped; when none can be, the answer is 503 with Retry-After. An adapter is loaded on a server (vLLM's
`load_lora_adapter`, with the artifact location from the API's records, never a customer's) before the first
request for it goes there, and again when the server answers 404 for it (it restarted, or unloaded it).

The servers are listed in configuration (`NEAT_INFERENCE_SERVERS`) rather than registering themselves: the list is
the deployment's one statement of where inference runs, every API process routes by the same ranking without
sharing state, and a server that dies needs no deregistration (it is skipped while unreachable).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx

from control.backends import Backend, BackendError, Target, unavailable
from control.protocol import CALLER_HEADER, ChatRequest, ClassificationRequest, CompletionRequest
from control.settings import Settings

log = logging.getLogger("api.remote")

# Failures that mean "this server is not there" (refused, reset, gone mid-answer): the next server is tried. A
# read timeout is not among them: the server is there, slow, and a second server would only double the load.
_UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
RETRY_AFTER_S = 5


def rank(servers: list[str], base_model: str) -> list[str]:
    """Rendezvous hashing: the servers in the order `base_model` prefers them (stable as servers come and go:
    only the base models of a removed server move)."""

    def score(server: str) -> int:
        return int.from_bytes(hashlib.sha256(f"{server}\0{base_model}".encode()).digest()[:8], "big")

    return sorted(servers, key=score, reverse=True)


class RemoteBackend:
    def __init__(
        self,
        servers: list[str],
        token: str | None,
        *,
        kind: str = "ours",
        connect_timeout_s: float = 3.0,
        timeout_s: float = 600.0,
        keepalive: int = 256,
    ):
        if not servers:
            raise ValueError("a remote backend needs at least one inference server")
        self.servers, self.kind = servers, kind
        self._client = httpx.AsyncClient(
            headers={"Authorization": f"Bearer {token}"} if token else {},
            timeout=httpx.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx.Limits(max_connections=1024, max_keepalive_connections=keepalive),
        )
        self._loaded: set[tuple[str, str]] = set()  # (server, adapter name) this process has loaded there

    @classmethod
    def from_settings(cls, settings: Settings) -> RemoteBackend:
        return cls(
            settings.inference_server_urls,
            settings.internal_token,
            kind=settings.inference_server_kind,
            connect_timeout_s=settings.inference_connect_timeout_s,
            timeout_s=settings.inference_timeout_s,
        )

    async def complete(self, target: Target, request: ChatRequest | CompletionRequest) -> dict:
        response = await self._send(target, request_path(request), _body(request))
        return response.json()

    async def stream(self, target: Target, request: ChatRequest | CompletionRequest) -> AsyncIterator[dict]:
        response = await self._send(target, request_path(request), _body(request), stream=True)
        return sse_payloads(response)

    async def classify(self, target: Target, request: ClassificationRequest) -> dict:
        if self.kind == "vllm":
            raise BackendError(501, "Classification is not served by this deployment.", "unsupported", "model")
        response = await self._send(target, "/v1/classifications", request.model_dump(exclude_none=True))
        return response.json()

    async def load(self, target: Target) -> None:
        if not self._told(target):
            return  # a catalog base model loads on its first request
        for server in rank(self.servers, target.base_model):
            try:
                await self._load(server, target)
                return
            except _UNREACHABLE as e:
                log.warning("inference server %s unreachable: %s", server, e)
        raise _none_reachable()

    async def unload(self, name: str) -> None:
        for server in self.servers:
            if (server, name) in self._loaded:
                self._loaded.discard((server, name))
                try:
                    await self._client.post(f"{server}/v1/unload_lora_adapter", json={"lora_name": name})
                except httpx.HTTPError as e:
                    log.warning("cannot unload %s from %s: %s", name, server, e)

    async def stats(self) -> list[dict[str, Any]]:
        out = []
        for server in self.servers:
            if self.kind == "vllm":  # vLLM reports through /metrics (Prometheus), not in this shape
                out.append({"server": server, "kind": "vllm"})
                continue
            try:
                response = await self._client.get(f"{server}/stats")
                response.raise_for_status()
                out.append({"server": server, **response.json()})
            except httpx.HTTPError as e:
                out.append({"server": server, "error": f"unreachable: {type(e).__name__}"})
        return out

    async def close(self) -> None:
        await self._client.aclose()

    async def _send(self, target: Target, path: str, body: dict, *, stream: bool = False) -> httpx.Response:
        """POST to the first reachable server in `target`'s ranking (its adapter loaded there first); a non-2xx
        answer is raised as the BackendError it carries."""
        declined = 0  # servers that answered but do not hold the model
        for server in rank(self.servers, target.base_model):
            try:
                if self._told(target) and (server, target.name) not in self._loaded:
                    await self._load(server, target)
                shaped = await self._shape(server, target, body)
                if shaped is None:  # this server does not hold the model (llama.cpp servers hold a fixed set)
                    declined += 1
                    continue
                response = await self._post(server, path, shaped, stream, target.caller)
                if response.status_code == 404 and self._told(target):
                    await response.aclose()  # the server forgot the adapter (a restart): load it again, once
                    self._loaded.discard((server, target.name))
                    await self._load(server, target)
                    response = await self._post(server, path, shaped, stream, target.caller)
            except _UNREACHABLE as e:
                log.warning("inference server %s unreachable, trying the next: %s", server, e)
                self._loaded = {(s, n) for s, n in self._loaded if s != server}  # it may come back empty
                continue
            except httpx.TimeoutException as e:
                raise BackendError(504, "The inference server did not answer in time.", "timeout") from e
            if response.status_code >= 400:
                await response.aread()
                await response.aclose()
                raise _error(response, target)
            return response
        raise self._not_served(target, declined)

    async def _shape(self, server: str, target: Target, body: dict) -> dict | None:
        """The body `server` is sent for `target`, or None when that server cannot serve it (then the next is
        tried). Our servers and vLLM take the request as it is."""
        return body

    def _not_served(self, target: Target, declined: int) -> BackendError:
        """The answer when no server in the ranking served `target` (`declined` of them answered that they do not
        hold it): for our servers and vLLM, none could be reached."""
        return _none_reachable()

    async def _post(self, server: str, path: str, body: dict, stream: bool, caller: str | None) -> httpx.Response:
        headers = {CALLER_HEADER: caller} if caller else None  # whose share of the engine the request takes
        request = self._client.build_request("POST", f"{server}{path}", json=body, headers=headers)
        return await self._client.send(request, stream=stream)

    def _told(self, target: Target) -> bool:
        """Whether a server must be told of `target` before serving it: an adapter (its artifact), or, on our own
        servers, a registered base model (its directory; vLLM serves the one base model it was started with)."""
        return target.artifact is not None or (target.base_dir is not None and self.kind != "vllm")

    async def _load(self, server: str, target: Target) -> None:
        path = "/v1/load_lora_adapter"
        if self.kind == "vllm":
            body = {"lora_name": target.name, "lora_path": target.lora}
        elif target.artifact is None:  # a registered base model
            path, body = "/v1/load_base_model", {"model": target.name, "path": target.base_dir}
        else:
            body = {"lora_name": target.name, "lora_path": target.artifact, "owner": target.owner,
                    "base_model_path": target.base_dir}  # fmt: skip
        response = await self._client.post(f"{server}{path}", json=body)
        if response.status_code >= 400 and "already been loaded" not in response.text:  # vLLM's "already there"
            log.warning("loading %s on %s failed: %s %s", target.name, server, response.status_code, response.text)
            error = _error(response, target)
            if error.status < 500:  # the artifact is not servable there: the server's fault as the customer sees it
                error = BackendError(500, f"The model '{target.name}' could not be loaded.", "model_error")
            raise error
        self._loaded.add((server, target.name))


async def sse_payloads(response: httpx.Response) -> AsyncIterator[dict]:
    """The upstream event stream's payloads, up to `[DONE]`. Closing this early closes the upstream connection,
    which cancels the generation on the server."""
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)
    except httpx.HTTPError as e:
        log.warning("inference stream broke: %s", e)
        failure = {"message": "The inference server failed while generating.", "type": "server_error"}
        yield {"error": {**failure, "param": None, "code": "model_error"}}
    finally:
        await response.aclose()


def request_path(request: ChatRequest | CompletionRequest) -> str:
    return "/v1/chat/completions" if isinstance(request, ChatRequest) else "/v1/completions"


def _body(request: Any) -> dict:
    return request.model_dump(exclude_none=True)


def _error(response: httpx.Response, target: Target) -> BackendError:
    """An inference server's error answer (ours: OpenAI's shape; vLLM: OpenAI's, or its older flat one)."""
    try:
        body = response.json()
        error = body.get("error", body) if isinstance(body, dict) else {}
    except ValueError:
        error = {}
    if response.status_code == 404:
        return BackendError(404, f"The model '{target.name}' does not exist.", "model_not_found", "model")
    message = error.get("message") if isinstance(error.get("message"), str) else "The inference server failed."
    code = error.get("code") if isinstance(error.get("code"), str) else None
    retry = response.headers.get("retry-after", "")
    retry_after = int(retry) if retry.isdigit() else None  # e.g. a 429 for an organisation's full queue share
    return BackendError(response.status_code, message, code, error.get("param"), retry_after)


def _none_reachable() -> BackendError:
    return BackendError(503, "No inference server is reachable right now; retry shortly.", "serving_unavailable",
                        retry_after=RETRY_AFTER_S)  # fmt: skip


def configured(settings: Settings, injected: Backend | None = None) -> Backend | None:
    """The backend the settings describe: `injected` (the launcher's in-process one) or else the listed inference
    servers, behind the listed llama.cpp servers when there are any (api.llamacpp). None: nothing serves."""
    if not settings.serving:
        return injected
    behind = injected
    if behind is None and settings.inference_server_urls:
        behind = RemoteBackend.from_settings(settings)
    if settings.llamacpp_server_urls:
        from api.llamacpp import LlamaCppBackend, LlamaCppFirst

        return LlamaCppFirst(LlamaCppBackend.from_settings(settings), behind)
    return behind


class NoBackend:
    """A deployment that serves no inference (`NEAT_SERVING=false`, or no inference server configured)."""

    async def complete(self, target: Target, request: Any) -> dict:
        raise unavailable()

    async def stream(self, target: Target, request: Any) -> AsyncIterator[dict]:
        raise unavailable()

    async def classify(self, target: Target, request: Any) -> dict:
        raise unavailable()

    async def load(self, target: Target) -> None:
        raise unavailable()

    async def unload(self, name: str) -> None:
        raise unavailable()

    async def stats(self) -> list[dict[str, Any]]:
        raise unavailable()

    async def close(self) -> None:
        return None
