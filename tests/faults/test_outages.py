"""Outages under a running job, with real processes on loopback: Redis restarted (losing everything it held),
Postgres stopped and started again, the API process restarted. The job finishes `succeeded` with the adapter of
an uninterrupted run, every step's metrics event is there, and while the database is away the API answers 503 in
OpenAI's error shape with `Retry-After`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from control.queue import enqueue
from tests.conftest import classification_rows
from tests.faults.test_worker_crashes import (
    adapter,
    assert_never_held_twice,
    attempts,
    start_worker,
    stop,
    wait_for,
    wait_until_finished,
)
from tests.services import free_port, postgres_ctl, restart_redis
from tests.worker.conftest import ORG, ROOT, get_events, get_job, insert_job, make_settings
from worker.runner import run_job

EPOCHS = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}  # 48 rows: 24 steps
KEY = "sk-outage-test"


def start_api(settings, log: Path, port: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "NEAT_DATA_DIR": str(settings.data_dir),
        "NEAT_DATABASE_URL": settings.resolved_database_url,
        "NEAT_BROKER_URL": settings.resolved_broker_url,
        "NEAT_QUEUE": settings.queue,
        "NEAT_SERVING": "false",
        "NEAT_BOOTSTRAP_API_KEY": KEY,
        "NEAT_BOOTSTRAP_ORG": ORG,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
    wait_for(lambda: _up(port), 60, "the API to start", log)
    return proc


def _up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _steps_seen(settings, job_id: str) -> int:
    try:
        steps = [e.data["step"] for e in get_events(settings, job_id) if e.type == "metrics"]
    except Exception:  # the database is away
        return 0
    return max(steps, default=0)


@pytest.mark.usefixtures("servers")
def test_a_running_job_survives_redis_postgres_and_api_restarts(settings, tiny_models, tmp_path):
    rows = classification_rows(48)
    reference_settings = make_settings(tmp_path / "reference")
    reference = insert_job(reference_settings, tiny_models["bert"], rows, hyperparameters=EPOCHS)
    assert run_job(reference, reference_settings) == "succeeded"

    job_id = insert_job(settings, tiny_models["bert"], rows, hyperparameters=EPOCHS)
    log = tmp_path / "services.log"
    port = free_port()
    api = start_api(settings, log, port)
    worker = start_worker(settings, log, NEAT_FAULT_POINT="pace:400", NEAT_LEASE_SECONDS="20")
    try:
        enqueue(job_id, settings)
        wait_for(lambda: _steps_seen(settings, job_id) >= 3, 120, "training to start", log)

        restart_redis(settings.resolved_broker_url)  # the worker's broker connection drops; its job goes on
        at = _steps_seen(settings, job_id)
        wait_for(lambda: _steps_seen(settings, job_id) >= at + 2, 60, "training to go on after Redis", log)

        postgres_ctl(settings.resolved_database_url, "stop")
        try:
            r = httpx.get(
                f"http://127.0.0.1:{port}/v1/fine_tuning/jobs/{job_id}",
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=30,
            )
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) > 0
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
            time.sleep(3)  # a few steps' writes wait for the database
        finally:
            postgres_ctl(settings.resolved_database_url, "start")

        stop(api)  # the API restarted mid-job: the job is the worker's business
        api = start_api(settings, log, port)
        status = wait_until_finished(settings, job_id, log, timeout=180)
        r = httpx.get(
            f"http://127.0.0.1:{port}/v1/fine_tuning/jobs/{job_id}/events?limit=100",
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=30,
        )
    finally:
        stop(worker)
        stop(api)

    job = get_job(settings, job_id)
    assert status == "succeeded", job.error
    assert r.status_code == 200 and "The job has successfully completed" in [e["message"] for e in r.json()["data"]]
    steps = sorted(e.data["step"] for e in get_events(settings, job_id) if e.type == "metrics")
    assert steps == list(range(1, 25)), "every step's metrics event was written, none lost in the outage"
    assert_never_held_twice(attempts(settings, job_id))
    ours, expected = adapter(settings, job_id), adapter(reference_settings, reference)
    assert max((ours[k] - expected[k]).abs().max().item() for k in ours) <= 1e-6


def test_reading_the_job_right_after_its_claim_waits_out_a_database_restart(settings, tiny_models):
    """The chaos soak's finding: Postgres restarted between a job's claim and the read of its spec, and the job
    failed with `training_error` (connection refused). The read now waits for the database, like every write."""
    import threading

    from control import jobs
    from control.db import session_scope
    from control.storage import Storage
    from worker.trainspec import train_spec

    job_id = insert_job(settings, tiny_models["bert"], classification_rows(8))
    url = settings.resolved_database_url
    with session_scope(url) as session:
        attempt = jobs.claim(session, job_id, "test-worker", 60.0)
    lease = jobs.Lease(job_id, "test-worker", attempt)
    postgres_ctl(url, "stop")
    restarted = threading.Timer(2.0, postgres_ctl, args=(url, "start"))
    restarted.start()
    try:
        spec = train_spec(url, lease, settings, Storage(settings.resolved_artifact_root))
    finally:
        restarted.join()
    assert spec.base_model == str(tiny_models["bert"]) and spec.training_file.is_file()
