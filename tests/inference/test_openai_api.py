"""Inference through the API (with the in-process backend, as the embedded launcher builds it) with real (tiny,
randomly initialised) adapters: OpenAI's shapes, streaming, the stock openai client, stop sequences,
classification, model resolution and errors. The models are random, so the tests
check shapes and behaviours, never the text itself."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from neat_core.serving.prefix import BLOCK
from tests.conftest import MINILM, SMOLLM2
from tests.inference.conftest import KEY_A, KEY_B, make_client

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is item 3?"}]
ERROR_KEYS = {"message", "type", "param", "code"}


def _chat(client, model, **kw):
    return client.post("/v1/chat/completions", json={"model": model, "messages": HELLO, **kw})


def _events(response) -> list:
    """The `data:` payloads of a server-sent event stream, [DONE] kept as a string."""
    assert response.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in response.text.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), blocks
    return [b[6:] if b[6:] == "[DONE]" else json.loads(b[6:]) for b in blocks]


def _error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= ERROR_KEYS and error["code"] == code
    return error


# --- chat completions -------------------------------------------------------------------------------------------


def test_chat_completion_shape_and_usage(client, service):
    r = _chat(client, service.chat_model, max_tokens=6, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == service.chat_model and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_max_tokens_reached_finishes_with_length(client, service):
    body = _chat(client, service.chat_model, max_tokens=3, temperature=0).json()
    # A random model over a 49k vocabulary does not pick its eos within 3 greedy steps.
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    # The newer field name is honoured too, and wins over max_tokens.
    body = _chat(client, service.chat_model, max_tokens=9, max_completion_tokens=2, temperature=0).json()
    assert body["usage"]["completion_tokens"] == 2


def test_content_parts_render_like_a_string(client, service):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What colour is item 3?"}]}]
    as_parts = client.post(
        "/v1/chat/completions", json={"model": service.chat_model, "messages": parts, "max_tokens": 5, "temperature": 0}
    )
    as_string = client.post(
        "/v1/chat/completions",
        json={"model": service.chat_model, "max_tokens": 5, "temperature": 0, "messages": [HELLO[1]]},
    )
    assert as_parts.status_code == 200, as_parts.text
    assert as_parts.json()["choices"] == as_string.json()["choices"]


def test_stream_matches_the_non_streamed_greedy_answer(client, service):
    request = {"max_tokens": 12, "temperature": 0, "stream_options": {"include_usage": True}, "user": "u-1"}
    whole = _chat(client, service.chat_model, **request).json()
    events = _events(_chat(client, service.chat_model, stream=True, **request))

    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    *content, final, usage = chunks[1:]
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert "".join(c["choices"][0]["delta"]["content"] for c in content) == whole["choices"][0]["message"]["content"]
    assert final["choices"][0]["delta"] == {}
    assert final["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == whole["usage"]["total_tokens"]
    assert usage["usage"]["prompt_tokens"] == whole["usage"]["prompt_tokens"]
    # The same prompt a second time: its whole blocks (the chat template's system prompt and more) were cached.
    cached = usage["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == (whole["usage"]["prompt_tokens"] - 1) // BLOCK * BLOCK > 0  # its last token is computed


def test_stream_without_include_usage_sends_no_usage_chunk(client, service):
    events = _events(_chat(client, service.chat_model, stream=True, max_tokens=3))
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in e for e in events[:-1])


def test_stop_sequence_cuts_the_text(client, service):
    full = _chat(client, service.chat_model, max_tokens=16, temperature=0).json()["choices"][0]["message"]["content"]
    assert len(full) >= 4, full
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    expected = full[: full.find(stop)]

    body = _chat(client, service.chat_model, max_tokens=16, temperature=0, stop=[stop, "\u2603never"]).json()
    assert body["choices"][0]["message"]["content"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"

    events = _events(_chat(client, service.chat_model, max_tokens=16, temperature=0, stop=stop, stream=True))
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert streamed == expected and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_sampling_with_a_seed_is_reproducible(client, service):
    request = {"max_tokens": 8, "temperature": 1.5, "top_p": 0.9, "seed": 1234}
    first, second = (_chat(client, service.chat_model, **request).json() for _ in range(2))
    assert first["choices"][0]["message"] == second["choices"][0]["message"]


# --- the stock openai client ---------------------------------------------------------------------------------------


def _openai(client, key=KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=client, max_retries=0)


def test_openai_client_chat_with_and_without_stream(client, service):
    sdk = _openai(client)
    completion = sdk.chat.completions.create(model=service.chat_model, messages=HELLO, max_tokens=5, temperature=0)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 5

    stream = sdk.chat.completions.create(
        model=service.chat_model,
        messages=HELLO,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    assert chunks[-1].usage.total_tokens == completion.usage.total_tokens


def test_openai_client_completions_and_errors(client, service):
    sdk = _openai(client)
    completion = sdk.completions.create(model=service.chat_model, prompt="The colour of the sky is", max_tokens=4)
    assert completion.object == "text_completion" and completion.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.NotFoundError) as caught:
        sdk.chat.completions.create(model=service.other_org_model, messages=HELLO, max_tokens=2)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=service.chat_model, messages=HELLO, reasoning_effort="low")
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "reasoning_effort"


# --- /v1/completions -------------------------------------------------------------------------------------------------


def test_completions_shape_and_stream(client, service):
    request = {"model": service.chat_model, "prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    body = client.post("/v1/completions", json=request).json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert set(choice) == {"index", "text", "finish_reason", "logprobs"} and choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 6

    events = _events(client.post("/v1/completions", json={**request, "stream": True}))
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


# --- classifications -------------------------------------------------------------------------------------------------


def test_classification_of_a_string_and_of_a_list(client, service):
    one = client.post("/v1/classifications", json={"model": service.classifier, "input": "love it"})
    assert one.status_code == 200, one.text
    body = one.json()
    assert body["object"] == "list" and body["model"] == service.classifier
    (row,) = body["data"]
    assert row["index"] == 0 and set(row["probabilities"]) == {"negative", "positive"}
    assert math.isclose(sum(row["probabilities"].values()), 1.0, rel_tol=1e-5)
    assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0

    texts = ["love it", "awful support", "superb quality"]
    many = client.post("/v1/classifications", json={"model": service.classifier, "input": texts}).json()
    assert [r["index"] for r in many["data"]] == [0, 1, 2]
    assert many["data"][0]["probabilities"] == pytest.approx(row["probabilities"], rel=1e-4)  # batching is exact
    assert many["usage"]["prompt_tokens"] > body["usage"]["prompt_tokens"]


# --- model resolution and errors ------------------------------------------------------------------------------------


def test_another_orgs_model_answers_like_a_missing_one(client, service):
    theirs = _chat(client, service.other_org_model, max_tokens=2)
    missing_id = service.other_org_model.replace("org-b", "org-x")
    missing = _chat(client, missing_id, max_tokens=2)
    error = _error(theirs, 404, "model_not_found")
    assert error == {**_error(missing, 404, "model_not_found"), "message": error["message"]}
    assert error["message"].replace(service.other_org_model, "M") == missing.json()["error"]["message"].replace(
        missing_id, "M"
    )
    # The owner can use it, so the 404 above is about ownership, not a broken model.
    assert _chat(make_client(service.settings, KEY_B), service.other_org_model, max_tokens=2).status_code == 200
    _error(_chat(client, service.running_model, max_tokens=2), 404, "model_not_found")


def test_model_for_the_wrong_endpoint_names_the_right_one(client, service):
    on_causal = client.post("/v1/classifications", json={"model": service.chat_model, "input": "x"})
    error = _error(on_causal, 400, "invalid_model_for_endpoint")
    assert error["param"] == "model" and "/v1/chat/completions" in error["message"]
    error = _error(_chat(client, service.classifier), 400, "invalid_model_for_endpoint")
    assert "/v1/classifications" in error["message"] and "/v1/chat" not in error["message"]
    error = _error(
        client.post("/v1/completions", json={"model": service.classifier, "prompt": "x"}),
        400,
        "invalid_model_for_endpoint",
    )
    assert "/v1/classifications" in error["message"] and "/v1/completions" not in error["message"]
    error = _error(_chat(client, MINILM), 400, "invalid_model_for_endpoint")  # an encoder cannot generate
    assert "/v1/classifications" in error["message"] and "fine-tune" in error["message"]
    error = _error(
        client.post("/v1/classifications", json={"model": SMOLLM2, "input": "x"}), 400, "invalid_model_for_endpoint"
    )  # a base model has no trained head
    assert "/v1/chat/completions" in error["message"]


def test_inference_answers_carry_the_rate_limit_headers(client, service):
    def window(r) -> tuple[int, int, float]:
        assert r.status_code == 200, r.text
        h = r.headers
        reset = float(h["x-ratelimit-reset-requests"].removesuffix("s"))
        return int(h["x-ratelimit-limit-requests"]), int(h["x-ratelimit-remaining-requests"]), reset

    limit, first, reset = window(_chat(client, service.chat_model, max_tokens=1))
    assert limit == service.settings.inference_rpm and 0 <= first < limit and 0 < reset <= 60
    _, second, _ = window(_chat(client, service.chat_model, max_tokens=1, stream=True))  # a response of its own
    _, third, _ = window(
        client.post("/v1/completions", json={"model": service.chat_model, "prompt": "x", "max_tokens": 1})
    )
    _, fourth, _ = window(client.post("/v1/classifications", json={"model": service.classifier, "input": "x"}))
    assert [second, third, fourth] == [first - 1, first - 2, first - 3]


@pytest.mark.parametrize(
    ("field", "value"),
    [("n", 0), ("temperature", 3), ("top_p", 0), ("max_tokens", 4096), ("stop", ["a", "b", "c", "d", "e"])],
)
def test_invalid_sampling_parameters_answer_400_in_openai_shape(client, service, field, value):
    error = _error(_chat(client, service.chat_model, **{field: value}), 400, "invalid_request")
    assert error["type"] == "invalid_request_error" and error["param"] == field


def test_unsupported_content_part_is_rejected(client, service):
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    r = client.post("/v1/chat/completions", json={"model": service.chat_model, "messages": image})
    error = _error(r, 400, "unsupported_parameter")
    assert error["message"] == "image inputs are not supported by this model" and error["param"] == "messages.0.content"


@pytest.mark.parametrize(
    ("message", "param", "says"),
    [
        ({"role": "function", "content": "42", "name": "f"}, "messages.1.role", "function messages"),
        ({"role": "user", "content": "hi", "name": "ada"}, "messages.1.name", "message name"),
        ({"role": "assistant", "content": "", "audio": {"id": "a1"}}, "messages.1.audio", "message audio"),
        ({"role": "user", "content": "hi", "colour": "red"}, "messages.1.colour", "colour"),
    ],
)
def test_message_fields_that_cannot_be_honoured_are_refused_by_name(client, service, message, param, says):
    r = client.post("/v1/chat/completions", json={"model": service.chat_model, "messages": [HELLO[1], message]})
    error = _error(r, 400, "unknown_parameter" if "colour" in param else "unsupported_parameter")
    assert error["param"] == param and says in error["message"]
    neutral = {"role": "assistant", "content": "ok", "name": None, "tool_calls": [], "refusal": None}
    ok = client.post("/v1/chat/completions", json={"model": service.chat_model, "messages": [HELLO[1], neutral],
                                                   "max_tokens": 1})  # fmt: skip
    assert ok.status_code == 200, ok.text


def test_a_conversation_with_tool_calls_and_their_results_is_rendered_for_the_model(client, service):
    call = {"id": "call-1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}
    asked = {"role": "user", "content": "Weather in Paris?"}
    result = {"role": "tool", "tool_call_id": "call-1", "content": "18 degrees and sunny, a long sunny afternoon"}
    turns = [asked, {"role": "assistant", "content": None, "tool_calls": [call]}, result]
    answered = client.post("/v1/chat/completions", json={"model": service.chat_model, "messages": turns,
                                                         "max_tokens": 2})  # fmt: skip
    assert answered.status_code == 200, answered.text
    shorter = [*turns[:2], {**result, "content": "18"}]
    brief = client.post("/v1/chat/completions", json={"model": service.chat_model, "messages": shorter,
                                                      "max_tokens": 2})  # fmt: skip
    # The call and its result reach the model's prompt: a longer result, a longer prompt.
    assert answered.json()["usage"]["prompt_tokens"] > brief.json()["usage"]["prompt_tokens"]
    for bad, says in [
        ([asked, {**result, "tool_call_id": "call-9"}], "which no earlier message made"),
        ([asked, {"role": "tool", "content": "18"}], "tool_call_id"),
        ([asked, {"role": "assistant", "content": None}], "content is missing"),
        ([asked, {"role": "assistant", "tool_calls": [{**call, "function": {"name": "w", "arguments": "[1]"}}]}],
         "JSON object"),
    ]:  # fmt: skip
        r = client.post("/v1/chat/completions", json={"model": service.chat_model, "messages": bad})
        error = _error(r, 400, "invalid_request")
        assert error["param"].startswith("messages") and says in error["message"], error


def test_a_model_that_cannot_load_answers_500_in_openai_shape(client, service):
    error = _error(_chat(client, service.broken_model, max_tokens=2), 500, "model_error")
    assert error["type"] == "server_error" and service.broken_model in error["message"]
    assert "Traceback" not in error["message"] and "/jobs/" not in error["message"].replace(service.broken_model, "")


def test_serving_disabled_answers_503(service):
    client = make_client(service.settings.model_copy(update={"serving": False}))
    r = _chat(client, service.chat_model, max_tokens=2)
    _error(r, 503, "serving_unavailable")
    assert r.headers["Retry-After"]


def test_requests_need_a_key(service):
    client = make_client(service.settings, key="sk-wrong")
    _error(_chat(client, service.chat_model), 401, "invalid_api_key")


@pytest.mark.real_model
def test_base_model_chat_with_smollm2(client):
    body = _chat(client, SMOLLM2, max_tokens=3, temperature=0).json()
    assert body["model"] == SMOLLM2 and body["usage"]["completion_tokens"] <= 3
    assert body["choices"][0]["message"]["content"].strip()  # a trained model says something printable


def test_web_tier_imports_no_torch_and_no_inference_tier():
    code = (
        "import sys, api.main, api.routes.inference, control.backends, api.remote; "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'inference') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], check=True, timeout=60)
