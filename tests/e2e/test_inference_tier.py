"""The inference tier with real processes: Postgres, Redis, a celery worker, two inference servers
(`python -m inference`) and the API (`uvicorn api.main:app`) configured with both, driven by the stock `openai`
client. Requests for one base model land on one server; when it is SIGKILLed the other serves; a client that
leaves mid-stream frees its row on the server; another organisation's model never reaches a server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import openai
import pytest

from api.remote import rank
from tests import conformance
from tests.conftest import MINILM, SMOLLM2, classification_rows
from tests.e2e.test_service_flow import ROOT, Service, _jsonl, _process, _wait_for, _wait_healthy
from tests.services import free_port, postgres, redis

TOKEN = "tier-internal-token"
KEY_A, KEY_B = "sk-tier-org-a", "sk-tier-org-b"
CHAT = [{"role": "user", "content": "Name three colours."}]


class Tier:
    def __init__(self, api: Service, servers: dict[str, subprocess.Popen]):
        self.api, self.servers = api, servers

    def stats(self, server: str) -> dict:
        r = httpx.get(f"{server}/stats", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def served(self) -> dict[str, int]:
        return {s: self.stats(s)["requests_served"] for s in self.servers}


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tier")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NEAT_DATA_DIR": str(tmp / "data"),
           "NEAT_DEVICE": "cpu", "NEAT_INTERNAL_TOKEN": TOKEN, "NEAT_BOOTSTRAP_API_KEY": KEY_A,
           "NEAT_ARTIFACT_ROOT": str(tmp / "shared-artifacts")}  # fmt: skip
    with ExitStack() as stack:
        env["DATABASE_URL"] = stack.enter_context(postgres(tmp / "pg"))
        env["BROKER_URL"] = stack.enter_context(redis(tmp / "redis"))
        subprocess.run([sys.executable, "-m", "control.migrate", "upgrade"], env=env, cwd=ROOT, check=True, timeout=120)
        worker = ["celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1", "-Q", "training"]
        logs = [tmp / "worker.log", tmp / "api.log"]
        stack.enter_context(_process([sys.executable, "-m", *worker], env, logs[0]))
        servers = {}
        for i in range(2):
            port = free_port()
            url, log = f"http://127.0.0.1:{port}", tmp / f"inference-{i}.log"
            servers[url] = stack.enter_context(
                _process([sys.executable, "-m", "inference", "--port", str(port)], env, log)
            )
            logs.append(log)
        env["NEAT_INFERENCE_SERVERS"] = ",".join(servers)
        port = free_port()
        api = ["uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
        stack.enter_context(_process([sys.executable, "-m", *api], env, logs[1]))
        for url, log in zip(servers, logs[2:], strict=True):
            _wait_healthy(url, log, path="/health")
        _wait_healthy(f"http://127.0.0.1:{port}", logs[1])
        from control.db import session_scope
        from control.keys import add_key

        with session_scope(env["DATABASE_URL"]) as session:
            add_key(session, "org-b", KEY_B)
        yield Tier(Service(f"http://127.0.0.1:{port}", KEY_A, logs), servers)


def test_inference_tier_routes_fails_over_cancels_and_keeps_tenants_apart(tier):
    client = tier.api.client()
    first, second = rank(list(tier.servers), SMOLLM2)

    # A classifier trained by the worker (its artifact on shared storage), then classified through the tier.
    upload = client.files.create(file=("t.jsonl", _jsonl(classification_rows(16))), purpose="fine-tune")
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}
    job = client.fine_tuning.jobs.create(model=MINILM, training_file=upload.id, method=method)
    job = _wait_for(client, job.id, {"succeeded"}, tier.api, timeout=120)
    with tier.api.http() as http:
        r = http.post("/v1/classifications", json={"model": job.fine_tuned_model, "input": ["love it", "awful"]})
        assert r.status_code == 200, r.text
        assert [d["index"] for d in r.json()["data"]] == [0, 1]
    classifier_home = rank(list(tier.servers), MINILM)[0]
    assert job.fine_tuned_model in tier.stats(classifier_home)["adapters_registered"]

    # Streaming chat on SmolLM2: every request lands on the server that ranks SmolLM2 first.
    before = tier.served()
    for _ in range(3):
        stream = client.chat.completions.create(model=SMOLLM2, messages=CHAT, max_tokens=4, temperature=0, stream=True)
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    after = tier.served()
    assert after[first] - before[first] == 3 and after[second] == before[second]
    assert any(e["base_model"] == SMOLLM2 for e in tier.stats(first)["engines"])
    assert not any(e["base_model"] == SMOLLM2 for e in tier.stats(second)["engines"])

    # The request's parameters reach the server intact: a list prompt, n, logprobs, logit_bias; refusals too.
    completion = client.completions.create(model=SMOLLM2, prompt=["The sky is", "Grass is"], n=2, max_tokens=3,
                                           temperature=0, logprobs=2, logit_bias={"260": 100})  # fmt: skip
    assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    for choice in completion.choices:
        assert len(choice.logprobs.tokens) == 3 and len(set(choice.logprobs.tokens)) == 1  # token 260, every step
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    # Tools and a schema reach the server too: a forced call comes back as OpenAI's tool_calls.
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    called = client.chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "What is the weather in Paris?"}], temperature=0,
        tools=[{"type": "function", "function": {"name": "weather", "parameters": weather}}], tool_choice="required",
    )  # fmt: skip
    assert called.choices[0].finish_reason == "tool_calls"
    assert called.choices[0].message.tool_calls[0].function.name == "weather"
    assert "city" in json.loads(called.choices[0].message.tool_calls[0].function.arguments)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SMOLLM2, messages=CHAT, reasoning_effort="low")
    assert refused.value.code == "unsupported_parameter" and refused.value.param == "reasoning_effort"

    # A client that leaves mid-stream frees its row on the server within a few decode steps.
    stream = client.chat.completions.create(model=SMOLLM2, messages=CHAT, max_tokens=1000, temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})  # fmt: skip
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert tier.stats(first)["rows_running"] == 1
    stream.close()
    deadline = time.monotonic() + 10
    while tier.stats(first)["rows_running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    (engine,) = [e for e in tier.stats(first)["engines"] if e["base_model"] == SMOLLM2]
    assert tier.stats(first)["rows_running"] == 0, "the row stayed in the batch after its client left"
    assert engine["forward_passes"] < 100, "the generation ran on instead of stopping"

    # Another organisation's model answers 404 and never reaches a server.
    before = tier.served()
    other = openai.OpenAI(
        base_url=f"{tier.api.url}/v1",
        api_key=KEY_B,
        max_retries=0,
        http_client=conformance.install(openai.DefaultHttpxClient()),
    )
    with pytest.raises(openai.NotFoundError):
        other.chat.completions.create(model=job.fine_tuned_model, messages=CHAT, max_tokens=2)
    with conformance.install(httpx.Client(base_url=tier.api.url, headers={"Authorization": f"Bearer {KEY_B}"})) as http:
        r = http.post("/v1/classifications", json={"model": job.fine_tuned_model, "input": "x"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert tier.served() == before

    # SIGKILL the server SmolLM2 lives on: the next requests are served by the other (503 + Retry-After at worst).
    os.killpg(tier.servers[first].pid, signal.SIGKILL)
    tier.servers[first].wait(timeout=10)
    deadline = time.monotonic() + 60
    while True:
        try:
            reply = client.chat.completions.create(model=SMOLLM2, messages=CHAT, max_tokens=3, temperature=0)
            break
        except openai.APIStatusError as e:
            assert e.status_code == 503 and e.response.headers.get("Retry-After"), e
            assert time.monotonic() < deadline
            time.sleep(1)
    assert reply.usage.completion_tokens >= 1
    stats = tier.stats(second)
    assert stats["requests_served"] >= 1 and any(e["base_model"] == SMOLLM2 for e in stats["engines"])
