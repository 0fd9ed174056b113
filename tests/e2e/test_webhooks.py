"""Webhooks end to end, with real processes, on both topologies: embedded (`python -m launch`: its training worker and
its webhook worker, on the SQLite broker) and distributed (Postgres, Redis, a training worker, a webhooks worker and
uvicorn, as docker-compose.yml runs them); and receivers started here (tests.webhook_receiver, on loopback, so the
operator setting NEAT_WEBHOOKS_ALLOW_PRIVATE is on). Endpoints are registered with the stock `openai` SDK
(`client.webhooks.create`), and what arrives is verified with it (`client.webhooks.unwrap` with the secret).

- a job that succeeds: its endpoint gets `fine_tuning.job.succeeded` (and ours, `fine_tuning.job.checkpoint.created`);
- a job cancelled: a receiver that answers 500 twice gets `fine_tuning.job.cancelled` on the third attempt, after
  the (test-short) backoff, and the three attempts are visible at /v1/webhook_endpoints/{id}/deliveries.

The refusal of a loopback endpoint with the setting off: tests/api/test_webhooks.py (the app the API suite builds).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import ExitStack

import pytest

from tests.conftest import MINILM, classification_rows
from tests.e2e.test_service_flow import (
    Service,
    _assert_nothing_left_running,
    _jsonl,
    _process,
    _wait_for,
    _wait_healthy,
)
from tests.services import free_port, postgres, redis
from tests.webhook_receiver import receiver

SUCCEEDED, CANCELLED = "fine_tuning.job.succeeded", "fine_tuning.job.cancelled"
CHECKPOINT = "fine_tuning.job.checkpoint.created"


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def service(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"webhooks-{request.param}")
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "NEAT_DATA_DIR": str(tmp / "data"),
        "NEAT_PORT": str(port),
        "NEAT_CHECKPOINT_EVERY": "2",
        "NEAT_SERVING": "false",  # no inference here: the API process stays small
        "NEAT_WEBHOOKS_ALLOW_PRIVATE": "true",  # the receivers are on loopback
        "NEAT_WEBHOOKS_BACKOFF_SECONDS": "1",  # 1 s, then 2 s
    }
    url = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        if request.param == "embedded":
            logs = [tmp / "launch.log"]
            stack.enter_context(_process([sys.executable, "-m", "launch"], env, logs[0]))
            _wait_healthy(url, logs[0])
            key = re.search(r"API key: (\S+)", logs[0].read_text()).group(1)
        else:
            env["DATABASE_URL"] = stack.enter_context(postgres(tmp / "pg"))
            env["BROKER_URL"] = stack.enter_context(redis(tmp / "redis"))
            env["NEAT_BOOTSTRAP_API_KEY"] = key = "sk-e2e-webhooks-key"
            subprocess.run([sys.executable, "-m", "control.migrate", "upgrade"], env=env, check=True, timeout=120)
            logs = [tmp / "worker.log", tmp / "webhooks.log", tmp / "api.log"]
            celery = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--without-gossip"]
            training = ["--pool=prefork", "--concurrency=1", "-Q", "training"]
            hooks = ["--pool=threads", "--concurrency=4", "-Q", "webhooks", "-n", "webhooks@%h"]
            stack.enter_context(_process([*celery, *training], env, logs[0]))
            stack.enter_context(_process([*celery, *hooks], env, logs[1]))
            uvicorn = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
            stack.enter_context(_process(uvicorn, env, logs[2]))
            _wait_healthy(url, logs[2])
        yield Service(url, key, logs)
    _assert_nothing_left_running(env["NEAT_DATA_DIR"])


def test_job_events_reach_their_endpoints_signed_and_retried(service):
    client = service.client()
    with receiver() as ok, receiver([500, 500]) as flaky:
        ok_endpoint = client.webhooks.create(name="ci", url=ok.url, event_types=[SUCCEEDED, CHECKPOINT])
        flaky_endpoint = client.webhooks.create(name="flaky", url=flaky.url, event_types=[CANCELLED])
        assert ok_endpoint.signing_secret.startswith("whsec_")

        training = client.files.create(file=("t.jsonl", _jsonl(classification_rows(16))), purpose="fine-tune")
        method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}}
        trained = client.fine_tuning.jobs.create(model=MINILM, training_file=training.id, method=method,
                                                 extra_body={"adapter": {"type": "neat", "r": 4}})  # fmt: skip
        # queued behind the first on the one training worker: cancelled before it starts
        cancelled = client.fine_tuning.jobs.create(model=MINILM, training_file=training.id, method=method)
        assert client.fine_tuning.jobs.cancel(cancelled.id).status == "cancelled"

        # The flaky receiver: 500, 500 (1 s and 2 s of backoff), then 200, all while the first job trains.
        received = flaky.wait(3, timeout=60)
        assert [r.status for r in received] == [500, 500, 200]
        assert len({r.headers["webhook-id"] for r in received}) == 1  # one message, retried
        for request in received:
            event = client.webhooks.unwrap(request.body, request.headers, secret=flaky_endpoint.signing_secret)
            assert event.type == CANCELLED and event.data.id == cancelled.id and event.object == "event"

        _wait_for(client, trained.id, {"succeeded"}, service)
        deadline = time.monotonic() + 30
        while not any(json.loads(r.body)["type"] == SUCCEEDED for r in ok.received):
            assert time.monotonic() < deadline, f"no {SUCCEEDED} delivered\n{service.tail()}"
            time.sleep(0.2)

    events = [client.webhooks.unwrap(r.body, r.headers, secret=ok_endpoint.signing_secret) for r in ok.received]
    (succeeded,) = [e for e in events if e.type == SUCCEEDED]
    assert succeeded.data.id == trained.id and succeeded.id.startswith("evt_")
    checkpoints = [json.loads(r.body) for r in ok.received if json.loads(r.body)["type"] == CHECKPOINT]
    steps = {c.step_number for c in client.fine_tuning.jobs.checkpoints.list(trained.id).data}
    assert checkpoints and {c["data"]["step_number"] for c in checkpoints} >= steps
    assert all(c["data"]["id"] == trained.id for c in checkpoints)

    # Every attempt, as the organisation sees it.
    with service.http() as http:
        deliveries = http.get(f"/v1/webhook_endpoints/{flaky_endpoint.id}/deliveries").json()["data"]
        (delivery,) = deliveries
        assert delivery["event_type"] == CANCELLED and delivery["status"] == "delivered"
        assert [(a["attempt"], a["status_code"]) for a in delivery["attempts"]] == [(1, 500), (2, 500), (3, 200)]
        assert delivery["id"] == received[0].headers["webhook-id"]
        ok_deliveries = http.get(f"/v1/webhook_endpoints/{ok_endpoint.id}/deliveries").json()["data"]
        assert {d["status"] for d in ok_deliveries} == {"delivered"}
        assert len(ok_deliveries) == len(ok.received)

    # The rest of the SDK's endpoint calls, against this service.
    assert {e.id for e in client.webhooks.list()} == {ok_endpoint.id, flaky_endpoint.id}
    renamed = client.webhooks.update(flaky_endpoint.id, name="renamed")
    assert renamed.name == client.webhooks.retrieve(flaky_endpoint.id).name == "renamed"
    assert CHECKPOINT in client.webhooks.event_types.list().data
    assert client.webhooks.delete(flaky_endpoint.id).deleted
    assert [e.id for e in client.webhooks.list()] == [ok_endpoint.id]
