"""Constrained decoding on the real SmolLM2, in the batching engine: seeded rows asking for a JSON schema always
answer schema-valid JSON, rows forced to call a tool always make a valid call, and the unconstrained rows that
share their batch answer exactly what they answer alone."""

from __future__ import annotations

import json
from typing import Literal

import pytest
from pydantic import BaseModel, ConfigDict, Field

from neat_core.data.chat import parse_tool_calls, reply_grammar
from neat_core.serving import BatchEngine, SamplingParams
from tests.conftest import SMOLLM2

pytestmark = pytest.mark.real_model


class Person(BaseModel):
    # The schema the rows ask for is this model's own JSON schema; pydantic (strict) then judges each answer.
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    age: int = Field(ge=0, le=120)
    city: str
    languages: list[str] = Field(min_length=1, max_length=3)


class Weather(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    city: str
    unit: Literal["celsius", "fahrenheit"]


class Clock(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    timezone: Literal["UTC", "Europe/Paris", "Asia/Tokyo"]


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                      "parameters": Weather.model_json_schema()}},
    {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                      "parameters": Clock.model_json_schema()}},
]  # fmt: skip
ARGUMENTS = {"get_weather": Weather, "get_time": Clock}


@pytest.fixture(scope="module")
def engine(model_cache):
    from neat_core.models.loading import load_base

    model, tokenizer = load_base(SMOLLM2, task="causal_lm", cache_dir=model_cache)
    engine = BatchEngine(model, tokenizer, "causal_lm", window_s=0.5, max_batch=32)
    yield engine
    engine.close()


def chat(engine: BatchEngine, text: str, tools: list[dict] | None = None) -> list[int]:
    return engine.encode(engine.chat_prompt([{"role": "user", "content": text}], tools), add_special_tokens=False)


def test_schema_rows_are_always_valid_and_their_unconstrained_batch_mates_answer_as_alone(engine):
    grammar = reply_grammar(json_reply=True, schema=Person.model_json_schema())
    asked = chat(engine, "Invent a person: name, age, city and the languages they speak. Answer in JSON.")
    free = [chat(engine, q) for q in ("Name three colours.", "What is 2 + 2?", "Say hello in French.")]

    def unconstrained(i: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=0.8, seed=100 + i)

    before = dict(engine.batch_sizes)
    constrained = [engine.generate(asked, None, SamplingParams(max_tokens=120, temperature=0.8, seed=s,
                                                               grammar=grammar)) for s in range(20)]  # fmt: skip
    mates = [engine.generate(free[i % 3], None, unconstrained(i)) for i in range(6)]
    answers = [engine.decode(list(s)) for s in constrained]
    mixed = [list(s) for s in mates]
    widest = max(size for size, n in engine.batch_sizes.items() if n > before.get(size, 0))
    assert widest >= 20, "the rows should have shared their passes"

    for stream, answer in zip(constrained, answers, strict=True):  # 20 of 20
        assert stream.finish_reason == "stop", answer
        Person.model_validate_json(answer)
    assert len(set(answers)) > 10, "seeded sampling still varies the answers"
    for i, tokens in enumerate(mixed):
        assert list(engine.generate(free[i % 3], None, unconstrained(i))) == tokens  # alone: the same answer
    alone = engine.decode(list(engine.generate(asked, None, SamplingParams(max_tokens=120, temperature=0.8, seed=3,
                                                                           grammar=grammar))))  # fmt: skip
    assert alone == answers[3]  # a constrained row does not depend on its batch either


def test_required_tool_choice_always_makes_a_valid_call(engine):
    questions = ["What is the weather in Paris?", "What time is it in Tokyo?", "Is it raining in Oslo?",
                 "Tell me the time in UTC.", "How warm is it in Lima, in fahrenheit?"]  # fmt: skip
    streams = [
        engine.generate(chat(engine, questions[s % 5], TOOLS), None, SamplingParams(
            max_tokens=48, temperature=0.8, seed=s, grammar=reply_grammar(tools=TOOLS, choice="required")))
        for s in range(8)
    ]  # fmt: skip
    for stream in streams:
        text = engine.decode(list(stream))
        # Parallel calls are allowed, so the model may go on calling until max_tokens ("length"); every complete
        # call it made is valid, and the first is always complete.
        calls = parse_tool_calls(text)
        assert calls, text
        for name, arguments in calls:
            ARGUMENTS[name].model_validate(json.loads(arguments))
