"""Fault injection with real processes on loopback: Postgres, Redis and `celery worker` processes that are
SIGKILLed at six points of a job's life (worker.faults). The job must end `succeeded` with the adapter an
uninterrupted run gives (≤ 1e-6), a `job_restarted` event per lost worker, and a claim history in which no two
workers ever held the job at once; a job whose workers keep dying fails after `max_attempts` with a clear error.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlalchemy import select

from control.db import session_scope
from control.orm import JobAttempt
from control.queue import enqueue
from control.settings import Settings
from control.storage import Storage
from tests.conftest import classification_rows
from tests.services import restart_redis
from tests.worker.conftest import TWO_EPOCHS, get_events, get_job, insert_job, make_settings, sixteen_rows
from tests.worker.conftest import start_worker as start_celery_worker
from worker.runner import run_job

# One job, killed at each point in turn (a fresh worker each time), then finished by a worker without a fault.
KILL_POINTS = ["claimed", "loading", "step:3", "checkpoint:1", "artifact", "trained"]
LEASE = {
    "NEAT_LEASE_SECONDS": "3",
    "NEAT_HEARTBEAT_SECONDS": "0.5",
    "NEAT_REAPER_SECONDS": "0.5",
    "NEAT_RETRY_BACKOFF_SECONDS": "0.2",
    "NEAT_RETRY_BACKOFF_MAX_SECONDS": "1",
}


def start_worker(settings: Settings, log: Path, **env: str) -> subprocess.Popen:
    """A worker with short leases, so that a dead one's job is picked up within seconds."""
    return start_celery_worker(settings, log, **{**LEASE, **env})


def wait_until_finished(settings: Settings, job_id: str, log: Path, timeout: float = 120) -> str:
    def finished() -> str | None:
        status = get_job(settings, job_id).status
        return status if status in ("succeeded", "failed") else None

    return wait_for(finished, timeout, "the job to finish", log)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def wait_for(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}; worker log:\n{log.read_text(errors='replace')[-4000:]}")


def attempts(settings: Settings, job_id: str) -> list[JobAttempt]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.started_at))
        return list(rows)


def assert_never_held_twice(history: list[JobAttempt]) -> None:
    """Each claim ended (its outcome recorded, or its lease expired) before the next began."""
    for earlier, later in zip(history, history[1:], strict=False):
        assert earlier.ended_at is not None and earlier.ended_at <= later.started_at, (earlier, later)
        assert earlier.worker != later.worker


def adapter(settings: Settings, job_id: str) -> dict[str, torch.Tensor]:
    key = get_job(settings, job_id).artifact_key
    return load_file(Storage(settings.resolved_artifact_root).path(key) / "adapter_model.safetensors")


# The last checkpoint recorded when a worker killed at each point died (None: none yet); steps 2, 4, 6, 8 save one.
CHECKPOINT_AT_DEATH = {"claimed": None, "loading": None, "step:3": 2, "checkpoint:1": 2, "artifact": 8, "trained": 8}


# A DPO job (its reference: the same model, adapter off) is killed mid-training, after its first checkpoint and while
# writing its next: the points where resuming must restore DPO's run exactly; the others are the objective's not.
@pytest.mark.parametrize("objective, points", [("supervised", KILL_POINTS), ("dpo", ["step:3", "checkpoint:1"])])
def test_a_job_survives_its_worker_being_killed_at_every_point(settings, tiny_models, tmp_path, objective, points):
    reference_settings = make_settings(tmp_path / "reference")
    reference = insert_job(reference_settings, **sixteen_rows(tiny_models, objective))
    assert run_job(reference, reference_settings) == "succeeded"

    job_id = insert_job(settings, **sixteen_rows(tiny_models, objective))
    enqueue(job_id, settings)
    log = tmp_path / "workers.log"
    # Six losses with max_attempts 3: infrastructure losses never fail a job on their own. Only losses in a row at
    # the same checkpoint count, and here at most two are (claimed + loading before the first checkpoint; step:3
    # + checkpoint:1 after step 2's; artifact + trained after step 8's).
    for n, point in enumerate(points, start=1):
        worker = start_worker(settings, log, NEAT_FAULT_POINT=point, NEAT_MAX_ATTEMPTS="3")
        try:
            # The first worker gets the message; each later one gets it from the reaper once the lease expired.
            wait_for(lambda w=worker: w.poll() is not None, 120, f"the worker to die at {point}", log)
        finally:
            stop(worker)
        assert worker.returncode == -signal.SIGKILL, f"{point}: the worker exited with {worker.returncode}"
        assert get_job(settings, job_id).attempts == n, point
    worker = start_worker(settings, log, NEAT_MAX_ATTEMPTS="3")
    try:
        status = wait_until_finished(settings, job_id, log)
    finally:
        stop(worker)

    job = get_job(settings, job_id)
    assert status == "succeeded", job.error
    assert job.attempts == len(points) + 1
    restarted = [e for e in get_events(settings, job_id) if (e.data or {}).get("type") == "job_restarted"]
    assert len(restarted) == len(points)
    history = attempts(settings, job_id)
    assert [a.outcome for a in history] == ["lost"] * len(points) + ["succeeded"]
    assert [a.checkpoint_step for a in history] == [CHECKPOINT_AT_DEATH[p] for p in points] + [None]
    assert_never_held_twice(history)

    ours, expected = adapter(settings, job_id), adapter(reference_settings, reference)
    assert ours.keys() == expected.keys()
    assert max((ours[k] - expected[k]).abs().max().item() for k in ours) <= 1e-6


def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(settings, tiny_models, tmp_path):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16), hyperparameters=TWO_EPOCHS)
    enqueue(job_id, settings)
    log = tmp_path / "workers.log"
    for _ in range(2):
        worker = start_worker(settings, log, NEAT_FAULT_POINT="claimed", NEAT_MAX_ATTEMPTS="2")
        try:
            wait_for(lambda w=worker: w.poll() is not None, 120, "the worker to die", log)
        finally:
            stop(worker)
    reaper = start_worker(settings, log, NEAT_MAX_ATTEMPTS="2")  # a healthy worker: its reaper gives up on it
    try:
        wait_for(lambda: get_job(settings, job_id).status == "failed", 60, "the job to fail", log)
    finally:
        stop(reaper)
    job = get_job(settings, job_id)
    assert job.attempts == 2 and job.error["code"] == "worker_lost" and "2 times" in job.error["message"]
    assert get_events(settings, job_id)[-1].level == "error"
    assert_never_held_twice(attempts(settings, job_id))


def test_a_queued_job_whose_message_redis_lost_is_sent_again_and_runs_once(settings, tiny_models, tmp_path):
    """Redis restarts (without persistence, as after a crash) while a job waits in the queue: its message is
    gone. A worker's reaper sends it again once the job has waited `redeliver_seconds` since its message went
    out, and the job runs, once."""
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16), sent_at=time.time())
    enqueue(job_id, settings)
    restart_redis(settings.resolved_broker_url)  # the message is lost before any worker took it
    log = tmp_path / "worker.log"
    worker = start_worker(settings, log, NEAT_REDELIVER_SECONDS="3")
    try:
        assert wait_until_finished(settings, job_id, log) == "succeeded"
        time.sleep(2)  # a few more reaper rounds: a succeeded job is never sent again
    finally:
        stop(worker)
    history = attempts(settings, job_id)
    assert len(history) == 1 and history[0].outcome == "succeeded"
    assert "sent it again" in log.read_text()
