"""Prometheus metrics with real processes (docs/metrics.md): Postgres, Redis, a `celery worker` serving its own
metrics port (multiprocess mode), an inference server and the API, each scraped on its `/metrics` with the metrics
token during one run: two fine-tuning jobs (one of them taken back from a dead worker by the reaper), streams that
queue in the engine, a finished chat, classifications that load, reuse and unload adapters. Every family the issue
lists shows a non-zero value; a scrape without the token, or with another credential, is refused in OpenAI's
error shape."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MINILM, SMOLLM2, classification_rows
from tests.e2e.test_service_flow import ROOT, Service, _jsonl, _process, _wait_for, _wait_healthy
from tests.services import free_port, postgres, redis

METRICS_TOKEN = "metrics-scrape-token"
INTERNAL_TOKEN = "metrics-internal-token"
KEY = "sk-metrics-e2e"

# Every family the issue asks for, by the process that serves it. docs/metrics.md lists each of them.
API_FAMILIES = ("neat_api_http_requests", "neat_api_http_request_duration_seconds", "neat_api_requests_in_flight",
                "neat_jobs", "neat_jobs_oldest_age_seconds")  # fmt: skip
INFERENCE_FAMILIES = (
    "neat_inference_queue_depth",
    "neat_inference_rows_running",
    "neat_inference_rows_per_pass",
    "neat_inference_time_to_first_token_seconds",
    "neat_inference_tokens_per_second",
    "neat_inference_generated_tokens",
    "neat_inference_adapter_cache_bytes",
    "neat_inference_adapters_loaded",
    "neat_inference_adapter_cache_hits",
    "neat_inference_adapter_cache_misses",
    "neat_inference_adapter_cache_evictions",
    "neat_inference_prompt_tokens",
    "neat_inference_prefix_cache_hit_tokens",
    "neat_inference_models_loaded",
)
WORKER_FAMILIES = ("neat_worker_jobs", "neat_worker_step_seconds", "neat_worker_trained_tokens",
                   "neat_worker_lease_renewals", "neat_worker_reaper_requeues")  # fmt: skip


class Targets:
    def __init__(self, api: Service, inference: str, worker: str, database_url: str):
        self.api, self.inference, self.worker, self.database_url = api, inference, worker, database_url

    def scrape(self, base: str, token: str | None = METRICS_TOKEN) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(f"{base}/metrics", headers=headers, timeout=30)

    def values(self, base: str) -> dict[str, float]:
        """Per family, the largest value among its samples (a histogram's: its count), from a scrape parsed with
        prometheus_client's own parser."""
        response = self.scrape(base)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(response.text):
            wanted = "_count" if family.type == "histogram" else ""
            samples = [s for s in family.samples if s.name == family.name + wanted or s.name.endswith("_total")]
            out[family.name] = max((s.value for s in samples), default=0.0)
        return out

    def labelled(self, base: str, family: str) -> dict[tuple, float]:
        response = self.scrape(base)
        (found,) = [f for f in text_string_to_metric_families(response.text) if f.name == family]
        return {tuple(sorted(s.labels.items())): s.value for s in found.samples if not s.name.endswith("_created")}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NEAT_DATA_DIR": str(tmp / "data"),
           "NEAT_DEVICE": "cpu", "NEAT_INTERNAL_TOKEN": INTERNAL_TOKEN, "NEAT_METRICS_TOKEN": METRICS_TOKEN,
           "NEAT_BOOTSTRAP_API_KEY": KEY, "NEAT_ARTIFACT_ROOT": str(tmp / "shared-artifacts")}  # fmt: skip
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with ExitStack() as stack:
        env["DATABASE_URL"] = stack.enter_context(postgres(tmp / "pg"))
        env["BROKER_URL"] = stack.enter_context(redis(tmp / "redis"))
        subprocess.run([sys.executable, "-m", "control.migrate", "upgrade"], env=env, cwd=ROOT, check=True, timeout=120)
        logs = [tmp / "worker.log", tmp / "inference.log", tmp / "api.log"]
        (tmp / "worker-prometheus").mkdir()
        worker_port = free_port()
        worker_env = {**env, "PROMETHEUS_MULTIPROC_DIR": str(tmp / "worker-prometheus"),
                      "NEAT_WORKER_METRICS_PORT": str(worker_port),
                      # quick beats and reaping, so that the run renews leases and the reaper takes a job back
                      "NEAT_HEARTBEAT_SECONDS": "0.5", "NEAT_REAPER_SECONDS": "0.5",
                      "NEAT_RETRY_BACKOFF_SECONDS": "0.1"}  # fmt: skip
        worker = ["celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1", "-Q", "training"]
        stack.enter_context(_process([sys.executable, "-m", *worker], worker_env, logs[0]))
        inference_port = free_port()
        # One row per pass and none reserved: a second stream waits in the engine's queue while the first runs.
        inference_env = {**env, "NEAT_SERVING_MAX_BATCH": "1", "NEAT_SERVING_RESERVED_ROWS": "0"}
        server = [sys.executable, "-m", "inference", "--port", str(inference_port)]
        stack.enter_context(_process(server, inference_env, logs[1]))
        inference = f"http://127.0.0.1:{inference_port}"
        env["NEAT_INFERENCE_SERVERS"] = inference
        port = free_port()
        api = ["uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
        stack.enter_context(_process([sys.executable, "-m", *api], env, logs[2]))
        _wait_healthy(inference, logs[1], path="/health")
        _wait_healthy(f"http://127.0.0.1:{port}", logs[2])
        service = Service(f"http://127.0.0.1:{port}", KEY, logs)
        worker_url = f"http://127.0.0.1:{worker_port}"
        deadline = time.monotonic() + 60
        while True:  # the worker's port opens as it starts
            try:
                httpx.get(f"{worker_url}/metrics", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, service.tail()
                time.sleep(0.3)
        yield Targets(service, inference, worker_url, env["DATABASE_URL"])


def test_scraping_needs_the_metrics_token(targets):
    for base in (targets.api.url, targets.inference, targets.worker):
        for token in (None, "wrong", INTERNAL_TOKEN, KEY):  # not the internal token, not a customer's key either
            response = targets.scrape(base, token)
            assert response.status_code == 401, (base, token, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "authentication_error"
            assert set(error) == {"message", "type", "param", "code"}
        assert targets.scrape(base).status_code == 200


def _ghost_job(database_url: str, like: str) -> str:
    """A copy of job `like` that a worker claimed and then died with (its lease already expired), as a SIGKILLed
    worker leaves it: the reaper's to take back."""
    from sqlalchemy import select

    from control.db import session_scope
    from control.ids import new_id
    from control.jobs import JobStatus
    from control.orm import Job

    with session_scope(database_url) as session:
        job = session.scalar(select(Job).where(Job.id == like))
        ghost = Job(id=new_id("ftjob"), organization_id=job.organization_id, model=job.model, task=job.task,
                    training_file=job.training_file, suffix="ghost", seed=job.seed,
                    hyperparameters=job.hyperparameters, adapter=job.adapter, status=JobStatus.RUNNING, attempts=1,
                    lease_owner="ghost-host:1:dead", lease_expires_at=time.time() - 1)  # fmt: skip
        session.add(ghost)
    return ghost.id


def test_every_family_shows_a_value_during_a_run(targets):
    api, inference, worker = targets.api.url, targets.inference, targets.worker
    client = targets.api.client()
    file = client.files.create(file=("tweets.jsonl", _jsonl(classification_rows(16))), purpose="fine-tune")
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}
    first = client.fine_tuning.jobs.create(model=MINILM, training_file=file.id, method=method, suffix="first",
                                           extra_body={"adapter": {"type": "neat", "r": 4}})  # fmt: skip
    ghost = _ghost_job(targets.database_url, first.id)

    # While jobs are unfinished, the database census ages the oldest of them.
    deadline = time.monotonic() + 60
    while (early := targets.values(api))["neat_jobs_oldest_age_seconds"] <= 0:
        assert time.monotonic() < deadline, early
        time.sleep(0.5)
    first = _wait_for(client, first.id, {"succeeded"}, targets.api)
    second = _wait_for(client, ghost, {"succeeded"}, targets.api)

    # Two streams on one-row passes: one generates, the other waits in the engine's queue; both are in flight.
    chat = [{"role": "user", "content": "Tell me a long story about colours."}]
    streams = []
    for _ in range(2):
        streams.append(client.chat.completions.create(model=SMOLLM2, messages=chat, max_tokens=400, temperature=0,
                                                      stream=True, extra_body={"ignore_eos": True}))  # fmt: skip
    for chunk in streams[0]:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    deadline = time.monotonic() + 30
    while (busy := targets.values(inference))["neat_inference_queue_depth"] < 1:
        assert time.monotonic() < deadline, busy
        time.sleep(0.1)
    assert busy["neat_inference_rows_running"] >= 1
    busy_api = targets.values(api)
    in_flight = targets.labelled(api, "neat_api_requests_in_flight")
    assert in_flight[(("handler", "/v1/chat/completions"),)] == 2, in_flight
    for stream in streams:
        stream.close()

    # A generation that runs to its end (its speed is measured), and adapters loaded, reused and unloaded.
    reply = client.chat.completions.create(model=SMOLLM2, messages=chat, max_tokens=6, temperature=0)
    assert reply.usage.completion_tokens > 1
    with targets.api.http() as http:
        for model in (first.fine_tuned_model, first.fine_tuned_model, second.fine_tuned_model):
            response = http.post("/v1/classifications", json={"model": model, "input": ["love it", "awful"]})
            assert response.status_code == 200, response.text
    assert client.models.delete(second.fine_tuned_model).deleted  # unloaded from the server: an eviction

    # Every family non-zero in some scrape of its process: the census while jobs waited, the queue and the requests
    # in flight while the streams ran, the rest now.
    seen = {api: [early, busy_api, targets.values(api)], inference: [busy, targets.values(inference)],
            worker: [targets.values(worker)]}  # fmt: skip
    tiers = ((api, API_FAMILIES), (inference, INFERENCE_FAMILIES), (worker, WORKER_FAMILIES))
    zero = [f"{name} ({base})" for base, families in tiers for name in families
            if max(scrape.get(name, 0.0) for scrape in seen[base]) <= 0]  # fmt: skip
    assert not zero, f"families without a non-zero value: {zero}"

    # The figures say what happened, under route templates (one series per route, not per job).
    requests = targets.labelled(api, "neat_api_http_requests")
    jobs_route = (("handler", "/v1/fine_tuning/jobs/{job_id}"), ("method", "GET"), ("status", "200"))
    assert requests[jobs_route] >= 2 and not any(first.id in str(labels) for labels in requests)
    assert targets.labelled(api, "neat_jobs")[(("status", "succeeded"),)] == 2
    assert targets.labelled(worker, "neat_worker_jobs")[(("status", "succeeded"),)] == 2
    assert targets.labelled(worker, "neat_worker_reaper_requeues")[(("reason", "lease_expired"),)] == 1
    cache = (("base_model", MINILM), ("task", "classification"))
    # each adapter loaded once (when the API registers it on the server), every request after that a hit
    assert targets.labelled(inference, "neat_inference_adapter_cache_misses")[cache] == 2
    assert targets.labelled(inference, "neat_inference_adapter_cache_hits")[cache] >= 3
    assert targets.labelled(inference, "neat_inference_adapter_cache_evictions")[cache] == 1
    assert targets.labelled(inference, "neat_inference_adapters_loaded")[cache] == 1


def test_the_docs_list_every_family_and_the_dashboard_shows_only_those():
    documented = (ROOT / "docs" / "metrics.md").read_text()
    missing = [f for f in (*API_FAMILIES, *INFERENCE_FAMILIES, *WORKER_FAMILIES) if f"`{f}" not in documented]
    assert not missing, missing
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    used = {re.sub(r"_(total|bucket|count|sum)$", "", name) for q in queries for name in re.findall(r"neat_\w+", q)}
    assert used >= {*API_FAMILIES, *INFERENCE_FAMILIES, *WORKER_FAMILIES}
    assert not [name for name in used if f"`{name}`" not in documented], "the dashboard queries undocumented families"
