"""The request a llama-server is sent (`api.llamacpp.llamacpp_body`): OpenAI's sampling made explicit, fields it
would not honour refused by name. The servers themselves: tests/e2e/test_llamacpp_tier.py."""

from __future__ import annotations

import pytest

from api.llamacpp import llamacpp_body
from control.backends import BackendError, gguf_adapter_file
from control.protocol import ChatRequest, CompletionRequest

CHAT = [{"role": "user", "content": "hi"}]


def chat(**fields) -> ChatRequest:
    return ChatRequest(model="m", messages=CHAT, **fields)


def test_openai_sampling_is_stated_and_llamacpp_filters_are_off():
    body = llamacpp_body(chat())
    assert body["temperature"] == 1.0 and body["top_p"] == 1.0  # OpenAI's defaults, not llama-server's 0.8 / 0.95
    assert body["top_k"] == 0 and body["min_p"] == 0.0 and body["repeat_penalty"] == 1.0
    assert llamacpp_body(chat(temperature=0))["top_k"] == 1  # greedy: the same argmax, without a full softmax
    body = llamacpp_body(chat(temperature=0.3, top_p=0.5, seed=7, stop=["x"], presence_penalty=0.5, user="u1"))
    assert body["top_k"] == 0
    assert (body["temperature"], body["top_p"], body["seed"], body["stop"]) == (0.3, 0.5, 7, ["x"])
    assert body["presence_penalty"] == 0.5 and "user" not in body and "model" not in body
    assert body["messages"] == CHAT


def test_max_completion_tokens_wins_and_a_one_prompt_list_is_unwrapped():
    assert llamacpp_body(chat(max_tokens=5, max_completion_tokens=9))["max_tokens"] == 9
    assert llamacpp_body(CompletionRequest(model="m", prompt=["one prompt"]))["prompt"] == "one prompt"
    assert llamacpp_body(CompletionRequest(model="m", prompt=[1, 2, 3]))["prompt"] == [1, 2, 3]


def test_fields_that_ask_for_nothing_are_accepted_and_not_sent():
    body = llamacpp_body(chat(n=1, logprobs=False, store=False, service_tier="auto"))
    assert not {"n", "logprobs", "store", "service_tier"} & set(body)


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (chat(n=2), "n"),
        (chat(logprobs=True), "logprobs"),
        (chat(logit_bias={"1": 5}), "logit_bias"),
        (chat(response_format={"type": "json_object"}), "response_format"),
        (chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
        (chat(seed=2**32 - 1), "seed"),  # llama-server's "random seed"
        (chat(seed=-1), "seed"),
        (
            ChatRequest(
                model="m",
                messages=[
                    *CHAT,
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    },
                    {"role": "tool", "tool_call_id": "c1", "content": "1"},
                ],
            ),
            "messages",
        ),  # fmt: skip
        (CompletionRequest(model="m", prompt="x", echo=True), "echo"),
        (CompletionRequest(model="m", prompt="x", logprobs=0), "logprobs"),
        (CompletionRequest(model="m", prompt=["a", "b"]), "prompt"),
    ],
)
def test_what_llamacpp_would_not_honour_is_refused_by_name(request_, param):
    with pytest.raises(BackendError) as refused:
        llamacpp_body(request_)
    assert refused.value.status == 400 and refused.value.param == param
    assert refused.value.code in ("unsupported_parameter", "invalid_value") and "llama.cpp" in refused.value.message


def test_adapter_file_names_carry_the_whole_model_id():
    a, b = "ft:org/base:acme:bot:ftjob-1", "ft:org/base:acme:bot:ftjob-2"
    assert gguf_adapter_file(a) == "ft:org--base:acme:bot:ftjob-1.gguf" and gguf_adapter_file(b) != gguf_adapter_file(a)
    assert "/" not in gguf_adapter_file(a)
