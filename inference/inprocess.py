"""The in-process backend (the embedded default): the inference tier's host inside the API's process, behind the
API's backend interface. The launcher builds it and hands it to `api.main.create_app(backend=...)`; api never
imports this module. It answers exactly as an inference server does (the same `answers` module), with the
inference tier's errors translated once, here, into the API's `BackendError`."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from starlette.concurrency import run_in_threadpool

from control.backends import BackendError, Target
from control.protocol import ChatRequest, ClassificationRequest, CompletionRequest
from control.settings import Settings
from inference import answers
from inference.errors import InferenceError
from inference.host import ModelHost, ModelRef, host_for

T = TypeVar("T")
_END = object()


class InProcessBackend:
    def __init__(self, settings: Settings | None = None, host: ModelHost | None = None):
        if host is None:
            assert settings is not None, "an in-process backend needs settings or a host"
            host = host_for(settings)
        self.host = host
        self._requests_served = 0
        self._lock = threading.Lock()

    async def complete(self, target: Target, request: ChatRequest | CompletionRequest) -> dict:
        def run() -> dict:
            with _translated():
                generation = answers.start(self.host, model_ref(target), request)
                self._count()
                return answers.answer(generation, request)

        return await run_in_threadpool(run)

    async def stream(self, target: Target, request: ChatRequest | CompletionRequest) -> AsyncIterator[dict]:
        def start() -> Any:
            with _translated():
                generation = answers.start(self.host, model_ref(target), request)
                self._count()
                return generation

        generation = await run_in_threadpool(start)
        return _async_events(answers.events(generation, request), generation.cancel)

    async def classify(self, target: Target, request: ClassificationRequest) -> dict:
        def run() -> dict:
            with _translated(param="input"):
                results, tokens = self.host.classify(model_ref(target), request.texts)
                self._count()
                return answers.classification(results, tokens, request.model)

        return await run_in_threadpool(run)

    async def load(self, target: Target) -> None:
        def run() -> None:
            with _translated():
                self.host.preload(model_ref(target))

        await run_in_threadpool(run)

    async def unload(self, name: str) -> None:
        self.host.evict(name)

    async def stats(self) -> list[dict[str, Any]]:
        return [{"server": "in-process", **answers.stats(self.host, self._requests_served, [])}]

    async def close(self) -> None:
        await run_in_threadpool(self.host.close)

    def _count(self) -> None:
        with self._lock:
            self._requests_served += 1


def model_ref(target: Target) -> ModelRef:
    """What the API resolved, as the host's reference (in process, the job's records stand for the manifest)."""
    artifact = None if target.artifact is None else Path(target.artifact)
    base_dir = None if target.base_dir is None else Path(target.base_dir)
    return ModelRef(target.name, target.task, target.base_model, artifact, target.owner, target.method, target.caller,
                    base_dir)  # fmt: skip


async def _async_events(events: Iterator[dict], cancel: Callable[[], None]) -> AsyncIterator[dict]:
    """`events` pulled on worker threads. Closed early (the client went away), the generation is cancelled: the
    thread waiting for its next token is released at the engine's next step."""
    try:
        while (event := await run_in_threadpool(next, events, _END)) is not _END:
            yield event
    finally:
        cancel()


@contextmanager
def _translated(param: str | None = None) -> Iterator[None]:
    """The inference tier's errors as the API's (their status, code and message carried over)."""
    try:
        yield
    except InferenceError as e:
        param = e.param or (param if e.status == 400 else None)
        raise BackendError(e.status, e.message, e.code, param, getattr(e, "retry_after", None)) from e
