"""OpenAI's inference request shapes (chat completions, completions) and ours (classifications), and vLLM's
dynamic adapter requests. The API validates its callers' requests with them; inference servers validate theirs
with the same models (this module imports nothing but pydantic, so the inference tier may share it)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
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

MAX_ROWS = 128  # rows one request may ask for: its prompts (a completion may send a list) times n
MAX_LOGIT_BIAS = 300  # tokens one request may bias (OpenAI's bound)
MAX_TOP_LOGPROBS = 20  # alternatives per token, chat (OpenAI's bound)
MAX_COMPLETION_LOGPROBS = 5  # alternatives per token, completions (OpenAI's bound)

MaxTokens = Annotated[int, Field(ge=1, le=MAX_TOKENS)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


# Content parts and roles of OpenAI's messages that no model here can take: refused by name, never dropped.
PART_KINDS = {"image_url": "image", "input_audio": "audio", "file": "file", "refusal": "refusal"}
LEGACY_ROLES = ("function",)  # OpenAI's deprecated function-calling role: `tool` replaced it
MAX_TOOLS = 128  # OpenAI's bound
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # a function's or a response format's name (OpenAI's rule)


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(min_length=1)]
    arguments: str  # a JSON object, as a string (OpenAI's shape)

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str) -> str:
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be a JSON object, as a string")
        return arguments


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(min_length=1)]
    type: Literal["function"]
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]  # `developer`: OpenAI's newer name for system
    content: str | list[TextPart] | None = None  # None: an assistant message that only calls tools
    tool_calls: Annotated[list[ToolCall], Field(min_length=1)] | None = None  # an assistant's calls
    tool_call_id: Annotated[str, Field(min_length=1)] | None = None  # a tool message: the call it answers
    # OpenAI's message fields with nothing to act on here: refused unless null.
    name: Any = None
    function_call: Any = None
    audio: Any = None
    refusal: Any = None

    @field_validator("role", mode="before")
    @classmethod
    def _legacy_roles(cls, role: Any) -> Any:
        if isinstance(role, str) and role in LEGACY_ROLES:  # anything else is for the type check to refuse
            raise PydanticCustomError("unsupported_parameter", "{role} messages are not supported by this service; "
                                      "use tool messages", {"role": role})  # fmt: skip
        return role

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else []:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind in PART_KINDS:  # a dict or list `type` is not hashable
                raise PydanticCustomError("unsupported_parameter", "{kind} inputs are not supported by this model",
                                          {"kind": PART_KINDS[kind]})  # fmt: skip
        return content

    @field_validator("tool_calls", mode="before")
    @classmethod
    def _no_calls(cls, calls: Any) -> Any:
        return None if calls == [] else calls  # an empty list asks for nothing (clients send one)

    @field_validator("name", "function_call", "audio", "refusal", mode="before")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_neutral(f"message {info.field_name}", value, ())

    @model_validator(mode="after")
    def _fields_of_its_role(self) -> Message:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.tool_call_id is None) != (self.role != "tool"):
            raise ValueError("a tool message needs tool_call_id (the call it answers), and only it has one")
        if self.content is None and self.tool_calls is None:
            raise ValueError("content is missing (only an assistant message with tool_calls may leave it out)")
        return self

    @property
    def chars(self) -> int:
        text = len(self.content) if isinstance(self.content, str) else sum(len(p.text) for p in self.content or [])
        return text + sum(len(c.function.arguments) + len(c.function.name) for c in self.tool_calls or [])


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object; None: no arguments
    strict: bool | None = None  # honoured always: the arguments are constrained to the schema either way


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition

    @field_validator("type", mode="before")
    @classmethod
    def _functions_only(cls, kind: Any) -> Any:
        return _function_kind(kind, ("custom",), "{kind} tools are")  # free-form tools: their grammars are not offered


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction

    @field_validator("type", mode="before")
    @classmethod
    def _functions_only(cls, kind: Any) -> Any:
        return _function_kind(kind, ("allowed_tools", "custom"), "tool_choice {kind} is")


def _function_kind(kind: Any, refused: tuple[str, ...], what: str) -> Any:
    """Function tools only: OpenAI's other kinds are refused by name (anything else is for the type check)."""
    if kind in refused:
        raise PydanticCustomError("unsupported_parameter", f"{what} not supported by this service yet",
                                  {"kind": kind})  # fmt: skip
    return kind


class JsonSchemaFormat(BaseModel):
    # `schema` is the field's name on the wire; the attribute is `schema_` (pydantic's BaseModel has `schema`).
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None  # honoured always: the output is constrained to the schema either way


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.json_schema is None) == (self.type == "json_schema"):
            raise ValueError("json_schema goes with type json_schema, and only with it")
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: Any = None  # refused unless false (`_refused`): no random padding is added to chunks

    @field_validator("include_obfuscation", mode="before")
    @classmethod
    def _no_obfuscation(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_neutral(f"stream_options.{info.field_name}", value, (False,))


# OpenAI's request fields this service does not act on (yet). Each is accepted only at a value that asks for
# nothing (None, and the neutral values listed); any other value is refused with 400 `unsupported_parameter`
# naming the field, never accepted and ignored. docs/serving.md has the table; tests/inference/test_parameters.py
# goes through every field of the openai SDK's request types, so a new SDK field fails until it is decided.
REFUSED_CHAT: dict[str, tuple[Any, ...]] = {
    "audio": (),
    "function_call": ("none",),
    "functions": ([],),
    "metadata": ({},),  # tags a stored completion; nothing is stored (`store`)
    "modalities": (["text"],),
    "moderation": (),
    "prediction": (),
    "prompt_cache_key": (),  # no prompt cache whose routing it could steer
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
    "reasoning_effort": (),
    "service_tier": ("auto", "default"),
    "store": (False,),
    "verbosity": (),
    "web_search_options": (),
}
REFUSED_COMPLETION: dict[str, tuple[Any, ...]] = {"best_of": (1,), "suffix": ("",)}


def refuse_unless_neutral(name: str, value: Any, neutral: tuple[Any, ...]) -> Any:
    if value is None or any(value == v and type(value) is type(v) for v in neutral):
        return value
    raise PydanticCustomError("unsupported_parameter", "{name} is not supported by this service yet",
                              {"name": name})  # fmt: skip


def named_param(error: dict, param: str | None) -> str | None:
    """The field a validation error is about: the one it names (`invalid_field`, a check across fields), else `param`
    (where it was raised)."""
    return (error.get("ctx") or {}).get("param") or param


def refusal(error: dict, param: str | None) -> tuple[str, str] | None:
    """(code, message) when a validation error refuses a parameter by name (an unsupported value, or a field
    outside the protocol), else None. Both tiers' error handlers answer these the same way."""
    if error.get("type") == "unsupported_parameter":
        return "unsupported_parameter", str(error.get("msg"))
    if error.get("type") == "extra_forbidden":
        return "unknown_parameter", f"Unrecognized request argument supplied: {param}"
    return None


class GenerationRequest(BaseModel):
    # Unknown fields are refused (400 naming them, `unknown_parameter`): a misspelt option must not pass silently.
    model_config = ConfigDict(extra="forbid")
    model: Annotated[str, Field(min_length=1)]
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**64)] | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # the caller's end user: logged with the request
    ignore_eos: bool | None = None  # vLLM's extension: generate exactly max_tokens (benchmarks, tests)
    n: Annotated[int, Field(ge=1, le=MAX_ROWS)] | None = None  # choices per prompt: a row each in the batch

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        if bias is not None:
            if len(bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"at most {MAX_LOGIT_BIAS} tokens may be biased")
            if not all(k.isdigit() for k in bias):
                raise ValueError("keys must be token ids (as strings)")
        return bias

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

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), v) for k, v in (self.logit_bias or {}).items())

    @property
    def top_logprobs_wanted(self) -> int | None:
        """None: no log-probabilities; else how many alternatives per token (0: the chosen token's only)."""
        raise NotImplementedError


def invalid_field(param: str, message: str, code: str = "invalid_field") -> PydanticCustomError:
    """An error from a check across fields: `param` names the field it is about (`named_param` reads it)."""
    return PydanticCustomError(code, "{text}", {"text": message, "param": param})


def _too_long(what: str, count: int, limit: int) -> PydanticCustomError:
    return PydanticCustomError("too_long", "{what} is {count} characters; the limit is {limit}",
                               {"what": what, "count": count, "limit": limit})  # fmt: skip


class ChatRequest(GenerationRequest):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: MaxTokens | None = None  # OpenAI's newer name for max_tokens; wins when both are sent
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    safety_identifier: Annotated[str, Field(max_length=256)] | None = None  # like `user`: logged
    # Constrained decoding (neat_core.serving.grammar): the reply follows the format, or is tool calls.
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Refused unless neutral (REFUSED_CHAT).
    audio: Any = None
    function_call: Any = None
    functions: Any = None
    metadata: Any = None
    modalities: Any = None
    moderation: Any = None
    prediction: Any = None
    prompt_cache_key: Any = None
    prompt_cache_options: Any = None
    prompt_cache_retention: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    store: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    @field_validator(*REFUSED_CHAT, mode="before")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_neutral(info.field_name, value, REFUSED_CHAT[info.field_name])

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @field_validator("messages")
    @classmethod
    def _bounded(cls, messages: list[Message]) -> list[Message]:
        count = sum(m.chars for m in messages)
        if count > MAX_PROMPT_CHARS:
            raise _too_long("the messages' content", count, MAX_PROMPT_CHARS)
        called: set[str] = set()
        for i, m in enumerate(messages):
            called |= {c.id for c in m.tool_calls or []}
            if m.tool_call_id is not None and m.tool_call_id not in called:
                raise ValueError(f"message {i} answers tool call {m.tool_call_id!r}, which no earlier message made")
        return messages

    @model_validator(mode="after")
    def _tools_asked_for(self) -> ChatRequest:
        names = [t.function.name for t in self.tools or []]
        if len(set(names)) < len(names):
            raise invalid_field("tools", "function names must be unique")
        if not names and (self.tool_choice is not None or self.parallel_tool_calls is not None):
            raise invalid_field("tool_choice" if self.tool_choice is not None else "parallel_tool_calls",
                                "only allowed when tools are given")  # fmt: skip
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise invalid_field(
                "tool_choice", f"names {self.tool_choice.function.name!r}, which is not one of the tools"
            )
        if self.calls_tools and self.logprobs:
            raise invalid_field("logprobs", "logprobs with tools is not supported by this service yet",
                                "unsupported_parameter")  # fmt: skip
        return self

    @property
    def calls_tools(self) -> bool:
        """Whether the reply may be tool calls (tools given, and tool_choice is not "none")."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def choice(self) -> str | None:
        """tool_choice as one string: "none", "auto", "required", a function's name, or None (auto)."""
        named = isinstance(self.tool_choice, NamedToolChoice)
        return self.tool_choice.function.name if named else self.tool_choice

    @property
    def tokens_wanted(self) -> int:
        return self.max_completion_tokens or self.max_tokens or DEFAULT_MAX_TOKENS

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


# A completion's prompt: a string, a list of strings, a list of token ids, or a list of lists of token ids. Each
# prompt of a list is one choice. Token ids are checked against the model's vocabulary by the inference tier.
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = str | Annotated[list[str], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class CompletionRequest(GenerationRequest):
    prompt: Prompt
    logprobs: Annotated[int, Field(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool | None = None
    # Refused unless neutral (REFUSED_COMPLETION).
    best_of: Any = None
    suffix: Any = None

    @field_validator(*REFUSED_COMPLETION, mode="before")
    @classmethod
    def _refused(cls, value: Any, info: ValidationInfo) -> Any:
        return refuse_unless_neutral(info.field_name, value, REFUSED_COMPLETION[info.field_name])

    @field_validator("echo")
    @classmethod
    def _echo_alone(cls, echo: bool | None, info: ValidationInfo) -> bool | None:
        if echo and info.data.get("logprobs") is not None:  # would need the prompt's own log-probabilities
            raise PydanticCustomError(
                "unsupported_parameter", "echo with logprobs is not supported by this service yet"
            )
        return echo

    @field_validator("prompt", mode="before")
    @classmethod
    def _bounded(cls, prompt: object) -> object:
        # Before the union, so an oversized list is refused before its items are validated (as classifications).
        prompts = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        if len(prompts) > MAX_ROWS:
            raise PydanticCustomError("too_long", "at most {limit} prompts, got {count}",
                                      {"limit": MAX_ROWS, "count": len(prompts)})  # fmt: skip
        # A token id counts as a character: a token is at least one, so the bound stays as tight.
        count = sum(len(p) for p in prompts if isinstance(p, str | list))
        if count > MAX_PROMPT_CHARS:
            raise _too_long("the prompt", count, MAX_PROMPT_CHARS)
        return prompt

    @model_validator(mode="after")
    def _rows_bounded(self) -> CompletionRequest:
        if len(self.prompts) * (self.n or 1) > MAX_ROWS:
            raise PydanticCustomError("too_long", "prompts times n is {count}; at most {limit} choices per request",
                                      {"count": len(self.prompts) * (self.n or 1), "limit": MAX_ROWS})  # fmt: skip
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: one choice each, in order."""
        p = self.prompt
        return [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs


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
    """vLLM's `POST /v1/load_lora_adapter`; `owner` and `base_model_path` are ours (vLLM ignores them): the
    organisation the API's records name as the adapter's owner, reported back in the stats, and where its base
    model loads from when that is a registered one (control.models)."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[str, Field(min_length=1)]
    lora_path: Annotated[str, Field(min_length=1)]
    owner: str | None = None
    base_model_path: str | None = None


class LoadBaseModelRequest(BaseModel):
    """Ours, `POST /v1/load_base_model`: a registered base model's directory on shared storage, told to a server
    before the first request for that base model goes there (the inference tier reads no database)."""

    model_config = ConfigDict(extra="ignore")
    model: Annotated[str, Field(min_length=1)]
    path: Annotated[str, Field(min_length=1)]


class UnloadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Annotated[str, Field(min_length=1)]
