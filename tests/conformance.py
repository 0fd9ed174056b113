"""OpenAI conformance of every response the API and end-to-end suites receive.

Each JSON body (and each event of a `text/event-stream`) is validated, with pydantic validation (never
`construct`), against the `openai` SDK's own type for its route: a body the stock client would mis-read fails the
test that received it, whichever test that is. Error bodies are validated against the SDK's `ErrorObject` on every
route, ours included. A route of ours that OpenAI has no type for is listed in `UNTYPED`; a 2xx JSON body from a
route in neither table is itself a mismatch, so a new route must be decided here.

`install(client)` hooks an httpx client (a `TestClient` is one; so is the `http_client` given to `openai.OpenAI`).
The body is checked as it is read, so streams a test abandons halfway are checked as far as they were read.
A mismatch raises `NonConforming` where the body is read and is also recorded in `MISMATCHES`, which the suites'
autouse fixture asserts empty after each test (a test that expects an exception, or the SDK wrapping one, cannot
swallow it).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any, Literal

import httpx
from openai.pagination import SyncCursorPage, SyncPage
from openai.types import FileDeleted, FileObject, Model, ModelDeleted
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.completion import Completion
from openai.types.completion_choice import CompletionChoice
from openai.types.fine_tuning import FineTuningJob, FineTuningJobEvent
from openai.types.fine_tuning.jobs import FineTuningJobCheckpoint
from openai.types.shared import ErrorObject
from openai.types.webhooks import (
    DeletedWebhookEndpoint,
    WebhookEndpoint,
    WebhookEndpointList,
    WebhookEndpointWithSecret,
    WebhookEventTypeList,
)
from pydantic import BaseModel, ConfigDict, StrictBool, ValidationError


class NonConforming(AssertionError):
    pass


class _StreamedCompletionChoice(CompletionChoice):
    finish_reason: Literal["stop", "length", "content_filter"] | None  # type: ignore[assignment]


class CompletionChunk(Completion):
    """A `/v1/completions` stream event: the SDK parses each as a `Completion`, whose choices' `finish_reason` is
    declared non-null, yet OpenAI's own API sends `null` on every event before a choice's last one (as the chat
    chunks' type declares). That one field is loosened, explicitly here; everything else is `Completion`'s."""

    choices: list[_StreamedCompletionChoice]  # type: ignore[assignment]


class FineTuningJobWithPause(FineTuningJob):
    """A job: the SDK's `FineTuningJob`, whose status enum predates OpenAI's pause; `paused` is what OpenAI's pause
    answers with, so that one value is added, explicitly here."""

    status: Literal["validating_files", "queued", "running", "succeeded", "failed", "cancelled", "paused"]  # type: ignore[assignment]


class _Error(BaseModel):
    model_config = ConfigDict(extra="forbid")  # OpenAI's error body holds `error` and nothing else
    error: ErrorObject


class _List(BaseModel):
    """What every OpenAI list holds besides `data` (the SDK's page types leave `object` and `has_more` loose)."""

    object: Literal["list"]
    has_more: StrictBool


class _FilesList(_List):
    # the files list names its first and last ids (null on an empty page), as the spec's ListFilesResponse does
    first_id: str | None
    last_id: str | None


def _page(item: type, *shape: type[BaseModel]) -> Callable[[Any], None]:
    def check(body: Any) -> None:
        SyncCursorPage[item].model_validate(body)
        for model in shape:
            model.model_validate(body)

    return check


def _one(model: type[BaseModel]) -> Callable[[Any], None]:
    return model.model_validate


def _models_page(body: Any) -> None:
    SyncPage[Model].model_validate(body)
    if body.get("object") != "list":
        raise ValueError(f"object must be 'list', got {body.get('object')!r}")


_ID = r"[^/]+"
JOBS = "/v1/fine_tuning/jobs"
# (method, path pattern) -> the check of a 2xx JSON body; `stream` -> the SDK type of each SSE event
ROUTES: dict[tuple[str, str], Callable[[Any], None]] = {
    ("POST", "/v1/files"): _one(FileObject),
    ("GET", "/v1/files"): _page(FileObject, _FilesList),
    ("GET", f"/v1/files/{_ID}"): _one(FileObject),
    ("DELETE", f"/v1/files/{_ID}"): _one(FileDeleted),
    ("POST", JOBS): _one(FineTuningJobWithPause),
    ("GET", JOBS): _page(FineTuningJobWithPause, _List),
    ("GET", f"{JOBS}/{_ID}"): _one(FineTuningJobWithPause),
    ("POST", f"{JOBS}/{_ID}/cancel"): _one(FineTuningJobWithPause),
    ("POST", f"{JOBS}/{_ID}/pause"): _one(FineTuningJobWithPause),
    ("POST", f"{JOBS}/{_ID}/resume"): _one(FineTuningJobWithPause),
    ("GET", f"{JOBS}/{_ID}/events"): _page(FineTuningJobEvent, _List),
    ("GET", f"{JOBS}/{_ID}/checkpoints"): _page(FineTuningJobCheckpoint, _List),
    ("GET", "/v1/models"): _models_page,
    ("GET", "/v1/models/.+"): _one(Model),
    ("DELETE", "/v1/models/.+"): _one(ModelDeleted),
    ("POST", "/v1/chat/completions"): _one(ChatCompletion),
    ("POST", "/v1/completions"): _one(Completion),
    ("POST", "/v1/webhook_endpoints"): _one(WebhookEndpointWithSecret),
    ("GET", "/v1/webhook_endpoints"): _page(WebhookEndpoint, WebhookEndpointList),
    ("GET", f"/v1/webhook_endpoints/{_ID}"): _one(WebhookEndpoint),
    ("POST", f"/v1/webhook_endpoints/{_ID}"): _one(WebhookEndpoint),
    ("DELETE", f"/v1/webhook_endpoints/{_ID}"): _one(DeletedWebhookEndpoint),
    ("GET", "/v1/webhook_event_types"): _one(WebhookEventTypeList),
}
STREAMS: dict[tuple[str, str], type[BaseModel]] = {
    ("POST", "/v1/chat/completions"): ChatCompletionChunk,
    ("POST", "/v1/completions"): CompletionChunk,
}
# Our own routes, which OpenAI has no type for: their success bodies are not checked (their errors are).
UNTYPED: list[tuple[str, str]] = [
    ("POST", "/v1/classifications"),  # our classification extension
    ("GET", "/v1/serving/stats"),  # the serving tier's state
    ("GET", "/v1/methods"),  # the adapter methods and their hyperparameters
    ("GET", f"{JOBS}/{_ID}/adapter"),  # the adapter download (a tarball)
    ("GET", f"/v1/files/{_ID}/content"),  # the file's own bytes (JSONL)
    ("GET", f"/v1/webhook_endpoints/{_ID}/deliveries"),  # each delivery and its attempts (control.webhooks)
    ("*", "/v1/admin/.*"),  # the operators' API
    ("GET", "/healthz"),
]

MISMATCHES: list[str] = []


def _lookup(table, method: str, path: str):
    for (m, pattern), value in table.items() if isinstance(table, dict) else ((k, True) for k in table):
        if m in (method, "*") and re.fullmatch(pattern, path):
            return value
    return None


def check_body(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    """Raises NonConforming when a complete (non-streamed) body does not validate as its route's SDK type."""
    if content_type.split(";")[0].strip().lower() != "application/json":  # (application/jsonl is a file's bytes)
        if 200 <= status < 300 and _lookup(ROUTES, method, path) and not _lookup(UNTYPED, method, path):
            raise NonConforming(f"{method} {path}: {status} with content-type {content_type!r}, not JSON")
        return
    if not body:
        return
    data = json.loads(body)
    if status >= 400:
        check = _Error.model_validate
    elif (check := _lookup(ROUTES, method, path)) is None:
        if _lookup(UNTYPED, method, path):
            return
        raise NonConforming(f"{method} {path}: no SDK type is declared for this route (tests/conformance.py)")
    _validate(check, data, f"{method} {path} ({status})")


def _validate(check: Callable[[Any], None], data: Any, where: str) -> None:
    try:
        check(data)
    except (ValidationError, ValueError, TypeError) as e:
        raise NonConforming(f"{where}: the body does not conform to OpenAI's type:\n{e}\nbody: {data!r:.2000}") from e


class _Events:
    """Splits a server-sent-event stream into its `data:` payloads as the bytes arrive."""

    def __init__(self) -> None:
        self.buffer = b""

    def feed(self, chunk: bytes) -> Iterator[str]:
        self.buffer += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            lines = [line[5:].lstrip() for line in event.decode().split("\n") if line.startswith("data:")]
            if lines:
                yield "\n".join(lines)


class _Checked:
    """The response's byte stream, checked as it is read (mixed into the stream class of the client's httpx: the
    `openai` SDK and Starlette's TestClient use the `httpx2` fork, other clients `httpx`)."""

    def __init__(self, inner: Any, response: httpx.Response, path: str) -> None:
        self.inner, self.response, self.path = inner, response, path
        self.method = response.request.method
        self.content_type = response.headers.get("content-type", "")
        self.events = _Events() if self.content_type.startswith("text/event-stream") else None
        self.body = b""

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self.inner:
            if self.events is not None:
                for data in self.events.feed(chunk):
                    self._event(data)
            else:
                self.body += chunk
            yield chunk
        if self.events is None:  # read to the end: the whole body is here
            _record(lambda: check_body(self.method, self.path, self.response.status_code, self.content_type,
                                       self.body))  # fmt: skip

    def _event(self, data: str) -> None:
        if data == "[DONE]":
            return
        where = f"{self.method} {self.path} (stream event)"
        payload = json.loads(data)
        if "error" in payload:
            _record(lambda: _validate(_Error.model_validate, payload, where))
            return
        model = _lookup(STREAMS, self.method, self.path)
        if model is None:
            _record(lambda: _raise(f"{where}: no SDK type is declared for this route's stream events"))
            return
        _record(lambda: _validate(model.model_validate, payload, where))

    def close(self) -> None:
        self.inner.close()


def _raise(message: str) -> None:
    raise NonConforming(message)


def _record(check: Callable[[], None]) -> None:
    try:
        check()
    except NonConforming as e:
        MISMATCHES.append(str(e))
        raise


_checked_classes: dict[type, type] = {}


def hook(response: httpx.Response) -> None:
    """httpx response hook: wraps the body's stream so it is checked while read."""
    base = next((c for c in type(response.stream).__mro__ if c.__name__ == "SyncByteStream"), None)
    if base is None:
        raise NonConforming(f"cannot check a {type(response.stream)} (an async client?)")
    if base not in _checked_classes:
        _checked_classes[base] = type("Checked" + base.__name__, (_Checked, base), {})
    response.stream = _checked_classes[base](response.stream, response, response.request.url.path)


def install(client: httpx.Client) -> httpx.Client:
    client.event_hooks = {**client.event_hooks, "response": [*client.event_hooks["response"], hook]}
    return client


def assert_no_mismatches() -> None:
    found, MISMATCHES[:] = list(MISMATCHES), []
    assert not found, "responses that do not conform to OpenAI's types:\n\n" + "\n\n".join(found)
