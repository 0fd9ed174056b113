"""Where the API's inference requests are served: one interface, two kinds.

- in-process (the embedded default): the inference tier's host inside this process, injected at start-up by the
  launcher (`python -m launch`) as `create_app(backend=...)`; api itself never imports the inference tier;
- remote: inference servers over HTTP (`api.remote`), listed in `NEAT_INFERENCE_SERVERS`.

The API resolves and authorises the model first (a `Target`, from its records), then hands the validated request
on. Every backend failure is a `BackendError` carrying the HTTP answer; `api.errors` maps it, once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

from control.protocol import ChatRequest, ClassificationRequest, CompletionRequest


@dataclass(frozen=True)
class Target:
    """A model to serve, as the API resolved it (ownership already checked)."""

    name: str  # the public model id: a catalog base model, or a fine-tuned model (the adapter's name when loaded)
    task: str  # causal_lm | classification
    base_model: str
    artifact: str | None = None  # the adapter artifact's location on shared storage; None: the base model itself
    owner: str | None = None  # the organisation that owns the adapter
    method: str | None = None  # the adapter's method, as the job recorded it
    caller: str | None = None  # the organisation asking: the engine shares its passes fairly between callers
    base_dir: str | None = None  # a registered base model's directory on shared storage (control.models)

    @property
    def lora(self) -> str | None:
        """The artifact's exact LoRA export (what a vLLM server loads)."""
        return None if self.artifact is None else f"{self.artifact.rstrip('/')}/lora"


def gguf_adapter_file(model_id: str) -> str:
    """The file name a fine-tuned model's LoRA GGUF has on llama.cpp inference servers (the `llamacpp` kind): the
    API finds the adapter among a server's `GET /lora-adapters` by it, so the name carries the whole model id (its
    job id makes it unique). Model ids hold `/` (the base model's); it becomes `--`, as in Hugging Face's cache."""
    return model_id.replace("/", "--") + ".gguf"


class BackendError(Exception):
    """A request the backend could not serve, as the HTTP answer the API gives (OpenAI's error shape)."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        param: str | None = None,
        retry_after: int | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.retry_after = status, message, code, param, retry_after


def unavailable(message: str = "Inference is not served by this deployment right now; retry later.") -> BackendError:
    return BackendError(503, message, "serving_unavailable", retry_after=30)


class Backend(Protocol):
    async def complete(self, target: Target, request: ChatRequest | CompletionRequest) -> dict:
        """The whole chat completion / completion, in OpenAI's shape."""

    async def stream(self, target: Target, request: ChatRequest | CompletionRequest) -> AsyncIterator[dict]:
        """Start a generation (raising BackendError before anything is sent) and return its event payloads (an
        error payload may end them). Closing the iterator early cancels the generation."""

    async def classify(self, target: Target, request: ClassificationRequest) -> dict:
        """Our classification answer ({"object": "list", "data": [...], "model", "usage"})."""

    async def load(self, target: Target) -> None:
        """Make an adapter ready to serve (vLLM's load_lora_adapter), e.g. at start-up (`serving_preload`)."""

    async def unload(self, name: str) -> None:
        """Forget an adapter (vLLM's unload_lora_adapter)."""

    async def stats(self) -> list[dict[str, Any]]:
        """Per inference server (one for in-process): its stats (running rows, engines with batch sizes and
        loaded adapters with their owners, requests served)."""

    async def close(self) -> None: ...
