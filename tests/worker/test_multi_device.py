"""Multi-device jobs through the worker (neat_core.train.distributed, docs/operations.md "Multi-device jobs"): a
job of `n_devices` 2 trains as 2 gloo processes under run_job, with its progress, checkpoints and cancel as a
single-process job has them; through the API and a real `celery worker` advertising 2 devices it succeeds, while
a job asking for more devices than any worker has stays queued."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from api.main import create_app
from control import jobs
from control.db import session_scope
from control.keys import add_key
from control.orm import Job
from control.queue import training_queue
from control.settings import get_settings
from tests.conftest import MINILM, classification_rows
from tests.neat_core.test_distributed import ranks_of
from tests.worker.conftest import ORG, get_events, get_job, insert_job, make_settings, start_worker
from tests.worker.test_runner import checkpoints, step_events
from worker.progress import DbProgress
from worker.runner import run_job

TWO_DEVICES = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto", "n_devices": 2}


def test_a_job_goes_to_the_queue_of_its_device_count(settings):
    assert training_queue(settings) == training_queue(settings, 1) == settings.queue
    assert training_queue(settings, 2) == f"{settings.queue}-n2"


@pytest.mark.parametrize("request_", ["cancelling", "pausing"])
def test_a_two_device_job_cancelled_or_paused_mid_run_stops_every_rank(settings, tiny_models, monkeypatch, request_):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16), hyperparameters=TWO_DEVICES)
    original = DbProgress.on_step_end

    def on_step_end(self, loop, metrics):  # the API's cancel or pause, right after step 3 (callbacks run here)
        original(self, loop, metrics)
        if loop.step == 3:
            with session_scope(settings.resolved_database_url) as session:
                session.execute(update(Job).where(Job.id == job_id).values(status=request_))

    monkeypatch.setattr(DbProgress, "on_step_end", on_step_end)
    monkeypatch.setattr(DbProgress, "poll_seconds", 0.0)
    two_devices = settings.model_copy(update={"worker_devices": 2})
    stopped = {"cancelling": "cancelled", "pausing": "paused"}[request_]
    assert run_job(job_id, two_devices) == stopped

    job = get_job(settings, job_id)
    assert job.status == stopped and job.artifact_key is None
    assert job.resolved_hyperparameters["n_devices"] == 2  # reported back: it trained on 2
    events = get_events(settings, job_id)
    assert events[-1].message.startswith(f"Job {stopped} at step 3")
    assert step_events(events) == [1, 2, 3]
    assert [r.step_number for r in checkpoints(settings, job_id)] == [2, 3]  # the scheduled one, and the stop's
    assert ranks_of(os.getpid()) == []  # no rank outlives the job
    if stopped == "paused":  # resumed, it continues from step 3 on 2 devices, to the end
        monkeypatch.undo()
        with session_scope(settings.resolved_database_url) as session:
            assert jobs.resume(session, job_id) == "queued"
        assert run_job(job_id, two_devices) == "succeeded"
        assert step_events(get_events(settings, job_id)) == [1, 2, 3, 4, 5, 6, 7, 8]


def test_a_worker_with_fewer_devices_leaves_the_job_queued(settings, tiny_models):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16), hyperparameters=TWO_DEVICES)
    assert run_job(job_id, settings) == "skipped"  # worker_devices 1
    job = get_job(settings, job_id)
    assert (job.status, job.attempts) == ("queued", 0)


@pytest.fixture
def service(tmp_path, monkeypatch):
    """The API (in process) and a real `celery worker` (prefork: its pool child is daemonic, and launches the
    ranks) that advertises 2 devices, on one SQLite database, broker and storage."""
    settings = make_settings(tmp_path / "data", min_examples=10)
    with session_scope(settings.resolved_database_url) as session:
        key = add_key(session, ORG)
    monkeypatch.setenv("NEAT_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    app = create_app(backend=None)
    app.dependency_overrides[get_settings] = lambda: settings
    client = TestClient(app, headers={"Authorization": f"Bearer {key}"})
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log, pool="prefork", NEAT_WORKER_DEVICES="2")
    try:
        wait_for(lambda: "ready." in log.read_text(), 60, "the worker to start", log)
        yield client, settings, log
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        get_settings.cache_clear()


def wait_for(predicate, timeout: float, what: str, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.3)
    pytest.fail(f"gave up waiting for {what}\n{log.read_text()[-4000:]}")


def test_an_api_job_on_two_devices_trains_on_a_two_device_worker_and_one_on_three_waits(service):
    client, settings, log = service
    body = "".join(json.dumps(row) + "\n" for row in classification_rows(10))
    files = {"file": ("train.jsonl", body, "application/jsonl")}
    upload = client.post("/v1/files", files=files, data={"purpose": "fine-tune"})
    assert upload.status_code == 200, upload.text

    def create(n: int) -> dict:
        hyperparameters = {"n_epochs": 1, "batch_size": 4, "n_devices": n}
        response = client.post(
            "/v1/fine_tuning/jobs",
            json={
                "model": MINILM,
                "training_file": upload.json()["id"],
                "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            },
        )
        assert response.status_code == 200, response.text
        return response.json()

    three, two = create(3), create(2)  # the one nobody can take first: it must not hold up the other
    assert two["method"]["supervised"]["hyperparameters"]["n_devices"] == 2
    done = wait_for(
        lambda: get_job(settings, two["id"]).status in ("succeeded", "failed") and two["id"],
        240,
        "the 2-device job",
        log,
    )
    job = get_job(settings, done)
    assert job.status == "succeeded", job.error
    assert client.get(f"/v1/fine_tuning/jobs/{done}").json()["hyperparameters"]["n_devices"] == 2
    waiting = get_job(settings, three["id"])
    assert (waiting.status, waiting.attempts) == ("queued", 0)  # no worker has 3 devices: it waits, not fails
