"""OpenAI's inference request shapes (chat completions, completions) and ours (classifications), and vLLM's
dynamic adapter requests. The API validates its callers' requests with them; inference servers validate theirs
with the same models (this module imports nothing but pydantic, so the inference tier may share it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic_core import PydanticCustomError

# The header the API names the asking organisation in, to an inference server (whose share of an engine a request
# takes: neat_core.serving.scheduler). Internal: inference servers answer only the API's internal token.
CALLER_HEADER = "X-Neat-Organization"
MAX_TOKENS = 2048
MAX_INPUTS = 2048  # texts in one classification request
MAX_STOPS = 4
DEFAULT_MAX_TOKENS = 256
# Characters, checked before anything is tokenized (tokenizing is the expensive, memory-hungry step: three
# 4,000,000-word prompts took an API process to 8.8 GB). Generous for any context served here: 4 Mi characters of
# prompt is 16 characters per token of a 256k-token context. The inference tier also bounds a prompt by the model's
# own context (`inference.text.CHARS_PER_TOKEN`); these are the same for every model, so they stop a request
# before it leaves the API.
MAX_PROMPT_CHARS = 2**22  # a completion's prompt, or a chat's messages together
MAX_TEXT_CHARS = 2**15  # one classification text (32 Ki characters; a classifier reads 512 tokens at most)
MAX_INPUT_CHARS = 2**24  # a classification request's texts together (16 Mi characters)

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


def _too_long(what: str, count: int, limit: int) -> PydanticCustomError:
    return PydanticCustomError("too_long", "{what} is {count} characters; the limit is {limit}",
                               {"what": what, "count": count, "limit": limit})  # fmt: skip


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens; wins when both are sent

    @field_validator("messages")
    @classmethod
    def _bounded(cls, messages: list[Message]) -> list[Message]:
        count = sum(len(m.content) if isinstance(m.content, str) else sum(len(p.text) for p in m.content)
                    for m in messages)  # fmt: skip
        if count > MAX_PROMPT_CHARS:
            raise _too_long("the messages' content", count, MAX_PROMPT_CHARS)
        return messages

    @property
    def tokens_wanted(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS


class CompletionRequest(GenerationRequest):
    prompt: str

    @field_validator("prompt")
    @classmethod
    def _bounded(cls, prompt: str) -> str:
        if len(prompt) > MAX_PROMPT_CHARS:
            raise _too_long("the prompt", len(prompt), MAX_PROMPT_CHARS)
        return prompt


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
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        lengths = [len(t) for t in texts if isinstance(t, str)]
        if (longest := max(lengths, default=0)) > MAX_TEXT_CHARS:
            raise _too_long(f"text {lengths.index(longest)}", longest, MAX_TEXT_CHARS)
        if sum(lengths) > MAX_INPUT_CHARS:
            raise _too_long("the texts together", sum(lengths), MAX_INPUT_CHARS)
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
