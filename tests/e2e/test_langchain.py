"""LangChain end to end: the stock `langchain_openai` classes (`ChatOpenAI`, `OpenAI`) pointed at the service
(`base_url`, `api_key`), on the embedded topology (`python -m launch`, real processes), with the real SmolLM2 base
model answering. LangChain's own parsing is the judge: its `tool_calls`, its structured-output parsers and its
stream aggregation must get what they expect, and every response body also passes `tests/conformance.py` (the
`http_client` given to LangChain has it installed).

Deterministic answers (temperature 0) are compared across the ways of asking: a streamed answer concatenates to
the invoked one, and a batched prompt (several requests at once, so batch-mates in the engine) answers as it does
alone.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import tiktoken
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.runnables import RunnableParallel
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI, OpenAI
from pydantic import BaseModel, ConfigDict, Field

from tests import conformance
from tests.conftest import SMOLLM2
from tests.e2e import test_service_flow
from tests.e2e.test_service_flow import Service

# test_service_flow's fixture, on one topology to keep the module short (the distributed one answers through the
# same `inference` code, and test_service_flow runs both).
service = test_service_flow.service
pytestmark = pytest.mark.parametrize("service", ["embedded"], indirect=True)

COLOURS, SUM, GREETING = "Name three colours.", "What is 2 plus 2?", "Say hello to Ada."


@pytest.fixture(autouse=True)
def _no_tiktoken(monkeypatch):
    """LangChain's token counting asks tiktoken for an encoding, which it downloads; the suite has no network
    beyond package registries, so a path that counted tokens could hang or fail there. None of the paths used here
    may count: asking for an encoding fails the test at once instead."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"LangChain asked tiktoken for an encoding {args}: that would download it")

    monkeypatch.setattr(tiktoken, "get_encoding", refuse)
    monkeypatch.setattr(tiktoken, "encoding_for_model", refuse)


CHECKED: list[str] = []  # the responses the conformance-checked clients received, this test


@pytest.fixture(autouse=True)
def _through_the_checked_client():
    """Every answer below comes through `_http()`'s client, so conftest's conformance check sees each body; a
    LangChain that built its own client instead would leave this empty."""
    CHECKED.clear()
    yield
    assert CHECKED, "no response came through the conformance-checked http_client"


def _http() -> openai.DefaultHttpxClient:
    client = conformance.install(openai.DefaultHttpxClient(timeout=120))
    client.event_hooks["response"].append(lambda response: CHECKED.append(response.request.url.path))
    return client


def chat(service: Service, **kwargs) -> ChatOpenAI:
    settings = {"temperature": 0, "seed": 7, "max_tokens": 10, **kwargs}
    return ChatOpenAI(model=SMOLLM2, base_url=f"{service.url}/v1", api_key=service.key, max_retries=0,
                      http_client=_http(), **settings)  # fmt: skip


def _aggregate(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    assert len(chunks) > 1, f"not streamed: {chunks}"
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    return total


def test_chat_invoke_stream_and_batch(service):
    llm = chat(service)
    answers = {prompt: llm.invoke(prompt) for prompt in (COLOURS, SUM, GREETING)}
    for prompt, answer in answers.items():
        assert isinstance(answer, AIMessage) and answer.content.strip(), (prompt, answer)
        assert answer.response_metadata["finish_reason"] in ("stop", "length")
        assert answer.usage_metadata["output_tokens"] >= 1 and answer.usage_metadata["input_tokens"] > 1

    # A stream and a batch (LangChain sends its prompts concurrently) at once: batch-mates in the engine, which
    # must change no answer. Streamed, the chunks concatenate to the invoked answer and, asked for, the usage
    # arrives in the last chunk; batched, each prompt answers as it did alone.
    with ThreadPoolExecutor(1) as pool:
        streaming = pool.submit(lambda: list(chat(service, stream_usage=True).stream(COLOURS)))
        batched = llm.batch([COLOURS, SUM, GREETING])
        streamed = _aggregate(streaming.result())
    assert streamed.content == answers[COLOURS].content
    assert streamed.response_metadata["finish_reason"] == answers[COLOURS].response_metadata["finish_reason"]
    assert streamed.usage_metadata["output_tokens"] == answers[COLOURS].usage_metadata["output_tokens"]
    assert [b.content for b in batched] == [a.content for a in answers.values()]


class GetWeather(BaseModel):
    """Get the current weather in a city."""

    model_config = ConfigDict(extra="forbid")
    city: str = Field(description="The city's name")


@tool
def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def _valid_call(message: AIMessage, name: str) -> dict:
    """The message's single tool call, whose arguments validate (strictly: JSON types, no extra keys) against the
    tool's schema."""
    assert message.response_metadata["finish_reason"] == "tool_calls", message
    assert not message.invalid_tool_calls, message.invalid_tool_calls
    (call,) = message.tool_calls
    assert call["name"] == name and call["id"], call
    schema = GetWeather if name == "GetWeather" else multiply.args_schema
    schema.model_validate(call["args"], strict=True)
    assert set(call["args"]) == set(schema.model_fields), call["args"]
    return call


def test_bind_tools_calls_the_named_tool_and_answers_its_result(service):
    llm = chat(service, max_tokens=48)
    question = HumanMessage("What is 6 times 7?")
    called = llm.bind_tools([GetWeather, multiply], tool_choice="multiply").invoke([question])
    call = _valid_call(called, "multiply")

    # The tool runs (LangChain validates its arguments again) and its result goes back as a `role: tool` message.
    result = multiply.invoke(call)
    assert isinstance(result, ToolMessage) and result.tool_call_id == call["id"]
    assert result.content == str(call["args"]["a"] * call["args"]["b"])
    answering = chat(service, max_tokens=16).bind_tools([GetWeather, multiply], tool_choice="none")
    answer = answering.invoke([question, called, result])
    assert answer.content.strip() and not answer.tool_calls, answer
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    assert answer.usage_metadata["input_tokens"] > called.usage_metadata["input_tokens"]  # the call and the result


def test_bind_tools_required_streamed_aggregates_to_the_invoked_call(service):
    # One call per answer (`parallel_tool_calls=False`): with parallel calls allowed, SmolLM2 goes on to a second.
    llm = chat(service, max_tokens=48).bind_tools([GetWeather], tool_choice="required", parallel_tool_calls=False)
    prompt = "What's the weather like in Oslo?"
    with ThreadPoolExecutor(1) as pool:  # at once, to keep the module short
        streaming = pool.submit(lambda: list(llm.stream(prompt)))
        invoked = _valid_call(llm.invoke(prompt), "GetWeather")
        streamed = _aggregate(streaming.result())
    call = _valid_call(streamed, "GetWeather")
    assert call["args"] == invoked["args"]
    assert len(streamed.tool_call_chunks) == 1  # the pieces of one call, joined by its index


class Person(BaseModel):
    name: str
    age: int


PERSON = "Invent a person, with a name and an age."


def test_with_structured_output_gives_valid_objects(service):
    """Each of LangChain's methods, all sent at once: the default (json_schema; LangChain leaves `strict` false
    unless asked, so the odd seeds ask) with several seeds at temperature 1, JSON mode (`json_object`) and a forced
    tool call (function_calling)."""
    seeds = range(4)
    ways = {f"seed {seed}": chat(service, temperature=1.0, seed=seed, max_tokens=64)
            .with_structured_output(Person, strict=seed % 2 == 1) for seed in seeds}  # fmt: skip
    # JSON mode promises a JSON object, not its keys: given no schema, LangChain's parser returns the object.
    ways["json_mode"] = chat(service, max_tokens=48).with_structured_output(None, method="json_mode", include_raw=True)
    ways["function_calling"] = chat(service, max_tokens=48).with_structured_output(Person, method="function_calling")
    got = RunnableParallel(ways).invoke(PERSON + " Answer in JSON.")

    for seed in seeds:
        assert isinstance(got[f"seed {seed}"], Person), got
    raw = got["json_mode"]
    assert raw["parsing_error"] is None and isinstance(raw["parsed"], dict), raw
    assert json.loads(raw["raw"].content) == raw["parsed"]  # the whole answer is the object (no prose around it)
    assert isinstance(got["function_calling"], Person), got


def test_completions_invoke_and_batch(service):
    llm = OpenAI(model=SMOLLM2, base_url=f"{service.url}/v1", api_key=service.key, max_retries=0,
                 http_client=_http(), temperature=0, seed=7, max_tokens=6)  # fmt: skip
    prompts = ["The capital of France is", "One, two, three,"]
    alone = [llm.invoke(p) for p in prompts]
    assert all(isinstance(a, str) and a.strip() for a in alone), alone
    # LangChain's batch sends the prompts as one request with a list prompt: one choice per prompt, in order.
    assert llm.batch(prompts) == alone
    assert CHECKED == ["/v1/completions"] * (len(prompts) + 1)
