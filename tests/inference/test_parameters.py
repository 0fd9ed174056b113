"""The parameter sweep: every field of the openai SDK's chat-completion and completion requests is either
honoured (its entry below runs a request and asserts what the field changes) or refused with 400
`unsupported_parameter` naming it. A field the SDK adds fails `test_every_sdk_field_is_decided` until it is
decided here (and in control/protocol.py). The tiny adapters are random: the checks compare answers with each
other, never with expected text."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from control.protocol import REFUSED_CHAT, REFUSED_COMPLETION
from tests.inference.test_openai_api import HELLO, _error, _events

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
PROMPT = "Item 3 is"


def sdk_fields(module) -> set[str]:
    return set(module.CompletionCreateParamsNonStreaming.__annotations__) | set(
        module.CompletionCreateParamsStreaming.__annotations__
    )


def post(client, route: str, model: str, **kw):
    default = {"messages": HELLO} if route == CHAT else {"prompt": PROMPT}
    return client.post(route, json={"model": model, **default, "max_tokens": 8, **kw})


def ok(client, route: str, model: str, **kw) -> dict:
    r = post(client, route, model, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def text(body: dict) -> str:
    choice = body["choices"][0]
    return choice["message"]["content"] if "message" in choice else choice["text"]


def tokens(body: dict) -> list[str]:
    logprobs = body["choices"][0]["logprobs"]
    return [t["token"] for t in logprobs["content"]] if "content" in logprobs else logprobs["tokens"]


def logprobs_on(route: str) -> dict:
    return {"logprobs": True} if route == CHAT else {"logprobs": 0}


# ---- what each honoured field changes ----------------------------------------------------------------------------


def check_model(client, route, model, **_):
    assert post(client, route, "ft:nobody:never:x").status_code == 404
    assert ok(client, route, model)["model"] == model


def check_messages(client, route, model, **_):
    longer = [HELLO[0], {"role": "user", "content": HELLO[1]["content"] * 3}]
    assert (
        ok(client, route, model, messages=longer)["usage"]["prompt_tokens"]
        > ok(client, route, model)["usage"]["prompt_tokens"]
    )


def check_prompt(client, route, model, tokenizer, **_):
    alone = [text(ok(client, route, model, prompt=p, temperature=0)) for p in ("Item 3 is", "Colour:")]
    both = ok(client, route, model, prompt=["Item 3 is", "Colour:"], temperature=0)
    assert [c["index"] for c in both["choices"]] == [0, 1]
    assert [c["text"] for c in both["choices"]] == alone  # one choice per prompt, each its answer alone
    ids = [tokenizer(p)["input_ids"] for p in ("Item 3 is", "Colour:")]
    assert text(ok(client, route, model, prompt=ids[0], temperature=0)) == alone[0]  # token ids: the same prompt
    as_ids = ok(client, route, model, prompt=ids, temperature=0)
    assert [c["text"] for c in as_ids["choices"]] == alone
    assert as_ids["usage"]["prompt_tokens"] == sum(map(len, ids))
    outside = _error(post(client, route, model, prompt=[[1, 2, 10**7]]), 400, "invalid_prompt")
    assert outside["param"] == "prompt"


def check_n(client, route, model, **_):
    one = ok(client, route, model, temperature=1, seed=7)
    three = ok(client, route, model, temperature=1, seed=7, n=3)
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] if route == CHAT else c["text"] for c in three["choices"]]
    assert texts[0] == text(one) and len(set(texts)) == 3  # choice j samples with seed + j
    assert texts[1] == text(ok(client, route, model, temperature=1, seed=8))
    assert three["usage"]["prompt_tokens"] == one["usage"]["prompt_tokens"]  # the prompt counts once
    assert three["usage"]["completion_tokens"] > one["usage"]["completion_tokens"]
    events = _events(post(client, route, model, temperature=1, seed=7, n=3, stream=True))[:-1]
    streamed = ["", "", ""]
    for choice in (c for e in events for c in e["choices"]):
        streamed[choice["index"]] += (choice["delta"].get("content") or "") if route == CHAT else choice["text"]
    assert streamed == texts
    if route == COMPLETIONS:  # prompt by prompt, n choices each
        two = ok(client, route, model, prompt=[PROMPT, "Colour:"], temperature=1, seed=7, n=2)
        assert [c["index"] for c in two["choices"]] == [0, 1, 2, 3]
        assert two["choices"][0]["text"] == text(one)
        assert two["choices"][2]["text"] == text(ok(client, route, model, prompt="Colour:", temperature=1, seed=7))
    assert _error(post(client, route, model, n=129), 400, "invalid_request")["param"] == "n"


def check_max_tokens(client, route, model, **_):
    body = ok(client, route, model, max_tokens=3, temperature=0)
    assert body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"


def check_max_completion_tokens(client, route, model, **_):
    assert ok(client, route, model, max_tokens=9, max_completion_tokens=2)["usage"]["completion_tokens"] == 2


def check_temperature(client, route, model, **_):
    greedy = text(ok(client, route, model, temperature=0))
    assert text(ok(client, route, model, temperature=0)) == greedy
    assert text(ok(client, route, model, temperature=1.5, seed=1)) != greedy


def check_top_p(client, route, model, **_):
    greedy = text(ok(client, route, model, temperature=0))
    assert text(ok(client, route, model, temperature=1, seed=3, top_p=1e-6)) == greedy  # only the likeliest token
    assert text(ok(client, route, model, temperature=1, seed=3, top_p=1)) != greedy


def check_seed(client, route, model, **_):
    first = text(ok(client, route, model, temperature=1, seed=5))
    assert text(ok(client, route, model, temperature=1, seed=5)) == first
    assert text(ok(client, route, model, temperature=1, seed=6)) != first


def check_stop(client, route, model, **_):
    whole = text(ok(client, route, model, temperature=0, max_tokens=12))
    stop = whole[len(whole) // 2 :][:2]
    assert stop
    cut = ok(client, route, model, temperature=0, max_tokens=12, stop=stop)
    assert text(cut) == whole[: whole.find(stop)] and cut["choices"][0]["finish_reason"] == "stop"


def check_stream(client, route, model, **_):
    whole = text(ok(client, route, model, temperature=0))
    events = _events(post(client, route, model, temperature=0, stream=True))
    assert events[-1] == "[DONE]"
    pieces = [c["delta"].get("content") or "" if route == CHAT else c["text"] for e in events[:-1]
              for c in e["choices"]]  # fmt: skip
    assert "".join(pieces) == whole


def check_stream_options(client, route, model, **_):
    events = _events(post(client, route, model, stream=True, stream_options={"include_usage": True}))
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] >= 1
    assert all("usage" not in e for e in events[:-2])
    plain = _events(post(client, route, model, stream=True, stream_options={"include_usage": False}))
    assert all("usage" not in e for e in plain[:-1])
    obfuscated = post(client, route, model, stream=True, stream_options={"include_obfuscation": True})
    assert _error(obfuscated, 400, "unsupported_parameter")["param"] == "stream_options.include_obfuscation"


def check_logprobs(client, route, model, **_):
    body = ok(client, route, model, temperature=0, **logprobs_on(route))
    assert ok(client, route, model)["choices"][0]["logprobs"] is None
    n = body["usage"]["completion_tokens"]
    logprobs = body["choices"][0]["logprobs"]
    if route == CHAT:
        assert len(logprobs["content"]) == n
        for entry in logprobs["content"]:
            assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode())
            assert entry["top_logprobs"] == []
    else:
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == n and logprobs["top_logprobs"] is None
        assert all(lp <= 0 for lp in logprobs["token_logprobs"])
        assert logprobs["text_offset"] == sorted(logprobs["text_offset"]) and logprobs["text_offset"][0] == 0
        top = ok(client, route, model, temperature=0, logprobs=3)["choices"][0]["logprobs"]
        for chosen, alternatives in zip(top["tokens"], top["top_logprobs"], strict=True):
            assert len(alternatives) <= 3 and max(alternatives, key=alternatives.get) == chosen  # greedy: the top one


def check_top_logprobs(client, route, model, **_):
    body = ok(client, route, model, temperature=0, logprobs=True, top_logprobs=4)
    for entry in body["choices"][0]["logprobs"]["content"]:
        top = entry["top_logprobs"]
        assert len(top) == 4 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == entry["token"] and abs(top[0]["logprob"] - entry["logprob"]) < 1e-6
    assert _error(post(client, route, model, top_logprobs=2), 400, "invalid_request")["param"] == "top_logprobs"


def check_logit_bias(client, route, model, **_):
    plain = tokens(ok(client, route, model, temperature=0, **logprobs_on(route)))
    biased = tokens(ok(client, route, model, temperature=0, logit_bias={"260": 100}, **logprobs_on(route)))
    assert len(set(biased)) == 1 and biased != plain
    assert (
        _error(post(client, route, model, logit_bias={"999999999": 1}), 400, "invalid_prompt")["param"] == "logit_bias"
    )


def penalty_check(field: str) -> Callable:
    def check(client, route, model, **_):
        plain = tokens(ok(client, route, model, temperature=0, max_tokens=10, **logprobs_on(route)))
        rewarded = tokens(ok(client, route, model, temperature=0, max_tokens=10, **{field: -2}, **logprobs_on(route)))
        assert rewarded != plain and len(set(rewarded)) < len(rewarded)  # a negative penalty rewards repeats

    return check


def check_echo(client, route, model, **_):
    plain = text(ok(client, route, model, temperature=0))
    assert text(ok(client, route, model, temperature=0, echo=True)) == PROMPT + plain
    assert _error(post(client, route, model, echo=True, logprobs=1), 400, "unsupported_parameter")["param"] == "echo"


def end_user_check(field: str) -> Callable:
    def check(client, route, model, caplog, **_):
        with caplog.at_level(logging.INFO, logger="api.inference"):
            ok(client, route, model, **{field: "end-user-42"})
        assert any("end-user-42" in r.getMessage() for r in caplog.records)

    return check


# A schema whose every valid answer is short, so even the tiny random model ends it within the token budget.
DIGIT = {"type": "integer", "minimum": 0, "maximum": 9}
SMALL = {"type": "object", "properties": {"n": DIGIT, "ok": {"type": "boolean"}}, "required": ["n", "ok"],
         "additionalProperties": False}  # fmt: skip


def function(name: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"{name} a digit", "parameters": {
        "type": "object", "properties": {"n": DIGIT}, "required": ["n"], "additionalProperties": False}}}  # fmt: skip


TOOLS = [function("f"), function("g")]


def calls(body: dict) -> list[tuple[str, dict]]:
    message = body["choices"][0]["message"]
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message.get("tool_calls") or []]


def check_response_format(client, route, model, **_):
    for seed in range(3):
        asked = {"temperature": 1, "seed": seed, "max_tokens": 40}
        free = text(ok(client, route, model, **asked))
        fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL, "strict": True}}
        body = ok(client, route, model, response_format=fmt, **asked)
        answer = json.loads(text(body))  # the same request, constrained: schema-valid JSON
        assert set(answer) == {"n", "ok"} and answer["n"] in range(10) and isinstance(answer["ok"], bool)
        assert body["choices"][0]["finish_reason"] == "stop" and text(body) != free
    # Any object: the random model writes one endless string, so only its start is checked here;
    # tests/e2e/test_structured.py has SmolLM2 write whole objects.
    any_object = text(ok(client, route, model, temperature=0, response_format={"type": "json_object"}))
    assert any_object.startswith("{") and not text(ok(client, route, model, temperature=0)).startswith("{")
    assert text(ok(client, route, model, temperature=0, response_format={"type": "text"})) == text(
        ok(client, route, model, temperature=0)
    )
    broken = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "$ref": "#/nowhere"}}}
    assert _error(post(client, route, model, response_format=broken), 400, "invalid_schema")["param"] == (
        "response_format"
    )
    assert _error(post(client, route, model, response_format={"type": "xml"}), 400, "invalid_request")["param"] == (
        "response_format.type"
    )


def check_tools(client, route, model, **_):
    for seed in range(3):
        body = ok(client, route, model, tools=TOOLS, tool_choice="required", temperature=1, seed=seed, max_tokens=60)
        made = calls(body)
        assert made and all(name in ("f", "g") and args["n"] in range(10) for name, args in made)
        assert body["choices"][0]["finish_reason"] == "tool_calls" and body["choices"][0]["message"]["content"] is None
    # Streamed as OpenAI streams them: per call an entry with its id and name, then its arguments.
    asked = {"tools": TOOLS, "tool_choice": "required", "temperature": 0, "max_tokens": 60}
    events = _events(post(client, route, model, stream=True, **asked))[:-1]
    streamed: dict[int, dict] = {}
    for delta in (c["delta"] for e in events for c in e["choices"]):
        for entry in delta.get("tool_calls", []):
            call = streamed.setdefault(entry["index"], {"name": "", "arguments": ""})
            call["name"] += entry.get("function", {}).get("name", "")
            call["arguments"] += entry["function"].get("arguments", "")
            assert "id" not in entry or entry["id"].startswith("call")
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed.values()] == calls(ok(client, route, model,
                                                                                           **asked))  # fmt: skip
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    # The tools reach the model: its prompt is longer with them.
    assert (
        ok(client, route, model, tools=TOOLS)["usage"]["prompt_tokens"]
        > ok(client, route, model)["usage"]["prompt_tokens"]
    )
    custom = [{"type": "custom", "custom": {"name": "c"}}]
    assert _error(post(client, route, model, tools=custom), 400, "unsupported_parameter")["param"] == "tools.0.type"


def check_tool_choice(client, route, model, **_):
    for seed in range(3):
        named = ok(client, route, model, tools=TOOLS, temperature=1, seed=seed, max_tokens=60,
                   tool_choice={"type": "function", "function": {"name": "g"}})  # fmt: skip
        assert [name for name, _ in calls(named)] == ["g"]  # that function, once
    plain = ok(client, route, model, tools=TOOLS, tool_choice="none", temperature=0)
    assert calls(plain) == [] and plain["choices"][0]["finish_reason"] in ("stop", "length")
    assert text(plain) == text(ok(client, route, model, tools=TOOLS, tool_choice="none", temperature=0))
    assert _error(post(client, route, model, tool_choice="auto"), 400, "invalid_request")["param"] == "tool_choice"
    unknown = {"type": "function", "function": {"name": "h"}}
    assert (
        _error(post(client, route, model, tools=TOOLS, tool_choice=unknown), 400, "invalid_request")["param"]
        == "tool_choice"
    )


def check_parallel_tool_calls(client, route, model, tokenizer, **_):
    # With the end of the reply forbidden by logit_bias, a reply may only go on with another call where parallel
    # calls are allowed; with them off, the grammar ends it after one call whatever the bias says.
    # One tool, so that two calls fit the tiny model's 256-token context after the prompt that describes it.
    no_end = {"logit_bias": {str(tokenizer.eos_token_id): -100}, "tools": TOOLS[:1], "tool_choice": "required",
              "temperature": 0, "max_tokens": 80}  # fmt: skip
    assert len(calls(ok(client, route, model, parallel_tool_calls=False, **no_end))) == 1
    assert len(calls(ok(client, route, model, parallel_tool_calls=True, **no_end))) >= 2
    assert _error(post(client, route, model, parallel_tool_calls=True), 400, "invalid_request")["param"] == (
        "parallel_tool_calls"
    )


COMMON = {
    "model": check_model,
    "n": check_n,
    "max_tokens": check_max_tokens,
    "temperature": check_temperature,
    "top_p": check_top_p,
    "seed": check_seed,
    "stop": check_stop,
    "stream": check_stream,
    "stream_options": check_stream_options,
    "logprobs": check_logprobs,
    "logit_bias": check_logit_bias,
    "presence_penalty": penalty_check("presence_penalty"),
    "frequency_penalty": penalty_check("frequency_penalty"),
    "user": end_user_check("user"),
}
HONOURED = {
    CHAT: {
        **COMMON,
        "messages": check_messages,
        "max_completion_tokens": check_max_completion_tokens,
        "top_logprobs": check_top_logprobs,
        "safety_identifier": end_user_check("safety_identifier"),
        "response_format": check_response_format,
        "tools": check_tools,
        "tool_choice": check_tool_choice,
        "parallel_tool_calls": check_parallel_tool_calls,
    },
    COMPLETIONS: {**COMMON, "prompt": check_prompt, "echo": check_echo},
}
# Refused fields: a value that asks for something (each must answer 400 naming the field).
ASKING = {
    CHAT: {
        "audio": {"voice": "alloy", "format": "wav"},
        "function_call": "auto",
        "functions": [{"name": "f", "parameters": {}}],
        "metadata": {"k": "v"},
        "modalities": ["text", "audio"],
        "moderation": {"model": "omni-moderation-latest"},
        "prediction": {"type": "content", "content": "x"},
        "prompt_cache_key": "k",
        "prompt_cache_options": {"key": "k"},
        "prompt_cache_retention": "24h",
        "reasoning_effort": "low",
        "service_tier": "priority",
        "store": True,
        "verbosity": "low",
        "web_search_options": {},
    },
    COMPLETIONS: {"best_of": 2, "suffix": " and so on"},
}
PROTOCOL = {CHAT: REFUSED_CHAT, COMPLETIONS: REFUSED_COMPLETION}
SDK = {CHAT: sdk_fields(chat_params), COMPLETIONS: sdk_fields(completion_params)}
ROUTES = [CHAT, COMPLETIONS]


@pytest.mark.parametrize("route", ROUTES)
def test_every_sdk_field_is_decided(route):
    honoured, refused = set(HONOURED[route]), set(ASKING[route])
    assert not honoured & refused
    assert SDK[route] - honoured - refused == set(), "SDK fields neither honoured nor refused: decide them"
    assert honoured | refused <= SDK[route], "entries for fields the SDK no longer has"
    assert refused == set(PROTOCOL[route]), "the protocol's refusals and this table must agree"


@pytest.mark.parametrize(("route", "field"), [(r, f) for r in ROUTES for f in HONOURED[r]])
def test_honoured_field_changes_the_answer(client, service, tiny_tokenizer, caplog, route, field):
    HONOURED[route][field](client, route, service.chat_model, tokenizer=tiny_tokenizer, caplog=caplog)


@pytest.mark.parametrize(("route", "field"), [(r, f) for r in ROUTES for f in ASKING[r]])
def test_refused_field_answers_400_naming_it(client, service, route, field):
    error = _error(post(client, route, service.chat_model, **{field: ASKING[route][field]}), 400,
                   "unsupported_parameter")  # fmt: skip
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("route", "field"), [(r, f) for r in ROUTES for f in PROTOCOL[r] if PROTOCOL[r][f]])
def test_refused_field_at_its_neutral_value_asks_for_nothing_and_is_accepted(client, service, route, field):
    for neutral in PROTOCOL[route][field]:
        plain = ok(client, route, service.chat_model, temperature=0, max_tokens=3)
        assert text(ok(client, route, service.chat_model, temperature=0, max_tokens=3, **{field: neutral})) == text(
            plain
        )


@pytest.mark.parametrize("route", ROUTES)
def test_unknown_fields_are_refused_by_name(client, service, route):
    error = _error(post(client, route, service.chat_model, temprature=0.5), 400, "unknown_parameter")
    assert error["param"] == "temprature" and "temprature" in error["message"]


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_models["llama"])


@pytest.mark.parametrize("route", ROUTES)
def test_streamed_logprobs_are_the_whole_answers_chunk_by_chunk(client, service, route):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    asked = {"temperature": 0, "max_tokens": 10, **({"logprobs": True, "top_logprobs": 2} if route == CHAT else
                                                    {"logprobs": 2})}  # fmt: skip
    whole = ok(client, route, service.chat_model, **asked)
    (ChatCompletion if route == CHAT else Completion).model_validate(whole)  # the SDK's own types read it
    events = _events(post(client, route, service.chat_model, stream=True, **asked))[:-1]
    parts = [c["logprobs"] for e in events for c in e["choices"] if c["logprobs"] is not None]
    if route == CHAT:
        for event in events:
            ChatCompletionChunk.model_validate(event)
        assert [t for p in parts for t in p["content"]] == whole["choices"][0]["logprobs"]["content"]
    else:
        expected = whole["choices"][0]["logprobs"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [x for p in parts for x in p[key]] == expected[key], key
