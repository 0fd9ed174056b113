"""The inference server's own HTTP surface, in process over ASGI: the internal token, vLLM's dynamic adapter
endpoints, OpenAI's shapes and stream, our classifications, models, stats and errors."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from api.targets import of_job
from control.db import session_scope
from control.orm import Job
from control.storage import Storage
from inference.server import create_app

TOKEN = "test-internal-token"
HELLO = [{"role": "user", "content": "What colour is item 3?"}]


@pytest.fixture(scope="module")
def server(service):
    settings = service.settings.model_copy(update={"internal_token": TOKEN})
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


def _artifact(service, model: str) -> str:
    with session_scope(service.settings.resolved_database_url) as session:
        job = session.scalar(select(Job).where(Job.fine_tuned_model == model))
        return of_job(job, Storage(service.settings.resolved_artifact_root)).artifact


def test_every_route_but_health_needs_the_internal_token(server):
    assert server.get("/health", headers={"Authorization": ""}).status_code == 200
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {TOKEN}x"}):
        for method, path in (("GET", "/stats"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/load_lora_adapter"), ("POST", "/v1/classifications")):  # fmt: skip
            r = server.request(method, path, headers=headers, json={})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, r.text)


def test_a_server_without_a_token_refuses_to_start(service):
    with pytest.raises(RuntimeError, match="NEAT_INTERNAL_TOKEN"):
        create_app(service.settings.model_copy(update={"internal_token": None}))


def test_an_adapter_is_served_after_load_and_unknown_after_unload(server, service):
    name = service.chat_model
    request = {"model": name, "messages": HELLO, "max_tokens": 4, "temperature": 0}
    missing = server.post("/v1/chat/completions", json=request)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"

    loaded = server.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": _artifact(service, name),
                                                        "owner": "org-a"})  # fmt: skip
    assert loaded.status_code == 200, loaded.text
    assert name in {m["id"] for m in server.get("/v1/models").json()["data"]}
    whole = server.post("/v1/chat/completions", json=request).json()
    assert whole["object"] == "chat.completion" and whole["usage"]["completion_tokens"] == 4

    streamed = server.post("/v1/chat/completions", json={**request, "stream": True})
    blocks = [b[6:] for b in streamed.text.split("\n\n") if b]
    assert blocks[-1] == "[DONE]"
    text = "".join(json.loads(b)["choices"][0]["delta"].get("content") or "" for b in blocks[:-1])
    assert text == whole["choices"][0]["message"]["content"]

    stats = server.get("/stats").json()
    assert name in stats["adapters_registered"] and stats["requests_served"] >= 2 and stats["rows_running"] == 0
    (engine,) = [e for e in stats["engines"] if e["task"] == "causal_lm"]
    assert {"id": name, "owner": "org-a"} in engine["adapters"] and engine["forward_passes"] > 0

    assert server.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200
    assert server.post("/v1/chat/completions", json=request).status_code == 404
    assert server.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 404


def test_classification_and_wrong_endpoint(server, service):
    name = service.classifier
    server.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": _artifact(service, name)})
    r = server.post("/v1/classifications", json={"model": name, "input": ["love it", "awful"]})
    assert r.status_code == 200, r.text
    assert [d["index"] for d in r.json()["data"]] == [0, 1] and r.json()["usage"]["prompt_tokens"] > 0
    wrong = server.post("/v1/chat/completions", json={"model": name, "messages": HELLO})
    assert wrong.status_code == 400 and wrong.json()["error"]["code"] == "invalid_model_for_endpoint"
    assert "/v1/classifications" in wrong.json()["error"]["message"]
    # The inference server refuses by name too (a request the API did not validate first).
    custom = [{"type": "custom", "custom": {"name": "c"}}]
    refused = server.post("/v1/chat/completions", json={"model": name, "messages": HELLO, "tools": custom})
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "unsupported_parameter"
    assert refused.json()["error"]["param"] == "tools.0.type"
    unknown = server.post("/v1/completions", json={"model": name, "prompt": "x", "sufix": "y"})
    assert unknown.json()["error"]["code"] == "unknown_parameter" and unknown.json()["error"]["param"] == "sufix"


def test_an_artifact_that_is_not_there_cannot_be_loaded(server, tmp_path):
    r = server.post("/v1/load_lora_adapter", json={"lora_name": "ft:x", "lora_path": str(tmp_path / "nothing")})
    assert r.status_code == 500 and r.json()["error"]["code"] == "model_error" and str(tmp_path) not in r.text
