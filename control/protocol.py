"""OpenAI's inference request shapes (chat completions, completions) and ours (classifications), and vLLM's
dynamic adapter requests. The API validates its callers' requests with them; inference servers validate theirs
with the same models (this module imports nothing but pydantic, so the inference tier may share it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

MAX_TOKENS = 2048
MAX_INPUTS = 2048  # texts in one classification request
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 256

MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]


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


class GenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # the SDK may send fields we don't act on (`user`, `logit_bias`, ...)
    model: Annotated[str, Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = None  # vLLM's extension: generate exactly max_tokens (benchmarks, tests)

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

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def tokens_wanted(self) -> int:
        return self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens; wins when both are sent

    @property
    def tokens_wanted(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class CompletionRequest(GenerationRequest):
    prompt: str


class ClassificationRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1)]
    input: str | Annotated[list[str], Field(min_length=1, max_length=MAX_INPUTS)]

    @field_validator("input", mode="before")
    @classmethod
    def _bounded(cls, value: object) -> object:
        # Before the union: a list over the bound would otherwise be reported by the union's first branch
        # ("input.str: Input should be a valid string"), and only after validating every one of its items.
        if isinstance(value, list) and len(value) > MAX_INPUTS:
            raise PydanticCustomError("too_long", "at most {limit} texts, got {count}",
                                      {"limit": MAX_INPUTS, "count": len(value)})  # fmt: skip
        return value

    @property
    def texts(self) -> list[str]:
        return [self.input] if isinstance(self.input, str) else self.input


class LoadAdapterRequest(BaseModel):
    """vLLM's `POST /v1/load_lora_adapter`; `owner` is ours (vLLM ignores it): the organisation the API's records
    name as the adapter's owner, reported back in the stats."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)]
    owner: str | None = None


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[str, Field(min_length=1)]
