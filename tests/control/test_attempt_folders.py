"""The attempt folders of a finished job (control.attempts, run by the sweeper): the folders of attempts that lost
are removed, the attempt whose adapter the job publishes and the one holding its newest recorded checkpoint stay,
nothing of a job that is not final (or only just final) is touched, and what a zombie writes after the removal is
removed by the next sweep."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import select, update

from control.attempts import attempt_key
from control.db import session_scope
from control.ids import new_id
from control.jobs import JobStatus
from control.orm import Checkpoint, Job
from control.settings import Settings
from control.storage import Storage, job_key
from control.sweeper import Sweeper
from tests.worker.conftest import ORG, get_job, insert_job, make_settings

LONG_AGO = 3600


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "data", lease_seconds=60.0)


def job_with_attempts(settings: Settings, status: str, checkpoints: dict[int, list[int]], *,
                      adapter_attempt: int | None = None, finished_ago: float | None = LONG_AGO) -> str:  # fmt: skip
    """A job whose attempts (1..n) left folders, each with its recorded checkpoints' directories and rows
    (`checkpoints`: attempt -> steps), and `adapter_attempt`'s adapter as the job's artifact."""
    storage = Storage(settings.resolved_artifact_root)
    finished_at = None if finished_ago is None else int(time.time() - finished_ago)
    job_id = insert_job(settings, Path("model"), [], status=status, attempts=len(checkpoints), finished_at=finished_at)
    with session_scope(settings.resolved_database_url) as session:
        for attempt, steps in checkpoints.items():
            folder = attempt_key(ORG, job_id, attempt)
            storage.path(f"{folder}/checkpoints").mkdir(parents=True)
            for step in steps:
                key = f"{folder}/checkpoints/step-{step:06d}"
                storage.path(key).mkdir()
                (storage.path(key) / "state.json").write_text("{}")
                session.add(Checkpoint(id=new_id("ftckpt"), job_id=job_id, step_number=step, metrics={},
                                       storage_key=key, pruned=False))  # fmt: skip
        if adapter_attempt is not None:
            key = f"{attempt_key(ORG, job_id, adapter_attempt)}/adapter"
            storage.path(key).mkdir()
            (storage.path(key) / "adapter_model.safetensors").write_bytes(b"weights")
            session.execute(update(Job).where(Job.id == job_id).values(artifact_key=key))
    return job_id


def folders(settings: Settings, job_id: str) -> list[str]:
    job_dir = Storage(settings.resolved_artifact_root).path(job_key(ORG, job_id))
    return sorted(p.name for p in job_dir.iterdir())


def pruned(settings: Settings, job_id: str) -> dict[int, bool]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.execute(select(Checkpoint.step_number, Checkpoint.pruned).where(Checkpoint.job_id == job_id))
        return dict(rows.all())


def sweep(settings: Settings) -> None:
    Sweeper(settings).sweep()


def test_a_succeeded_job_keeps_only_its_adapters_attempt_and_a_zombies_late_write_goes_too(settings):
    # attempt 1 lost after step 2; attempt 2 lost after step 4 (it resumed from 2); attempt 3 resumed from 4,
    # checkpointed 6 and published the adapter.
    job_id = job_with_attempts(settings, JobStatus.SUCCEEDED, {1: [2], 2: [4], 3: [6]}, adapter_attempt=3)
    storage = Storage(settings.resolved_artifact_root)
    zombie = storage.path(f"{attempt_key(ORG, job_id, 2)}/checkpoints/step-000005")  # written after the hand-over
    zombie.mkdir()

    sweep(settings)
    assert folders(settings, job_id) == ["attempt-3"]
    assert pruned(settings, job_id) == {2: True, 4: True, 6: False}  # no row points at a removed folder
    assert (storage.path(get_job(settings, job_id).artifact_key) / "adapter_model.safetensors").is_file()

    # The zombie, resumed, finishes the write it was inside when it was paused: the next sweep removes it.
    zombie.mkdir(parents=True)
    (zombie / "state.json").write_text("{}")
    sweep(settings)
    assert folders(settings, job_id) == ["attempt-3"]


def test_a_cancelled_job_keeps_the_attempt_with_its_last_checkpoint(settings):
    # attempt 2 resumed from attempt 1's step 4 and was cancelled before checkpointing anything of its own
    job_id = job_with_attempts(settings, JobStatus.CANCELLED, {1: [2, 4], 2: []})
    sweep(settings)
    assert folders(settings, job_id) == ["attempt-1"]
    assert pruned(settings, job_id) == {2: False, 4: False}


def test_a_failed_job_without_checkpoints_keeps_nothing(settings):
    job_id = job_with_attempts(settings, JobStatus.FAILED, {1: [], 2: [], 3: []})
    sweep(settings)
    assert folders(settings, job_id) == []


def test_jobs_not_final_or_only_just_final_are_left_alone(settings):
    running = job_with_attempts(settings, JobStatus.RUNNING, {1: [2], 2: []}, finished_ago=None)
    queued = job_with_attempts(settings, JobStatus.QUEUED, {1: [2], 2: [4]}, finished_ago=None)
    just_now = job_with_attempts(settings, JobStatus.SUCCEEDED, {1: [2], 2: [4]}, adapter_attempt=2, finished_ago=1)
    sweep(settings)
    assert folders(settings, running) == ["attempt-1", "attempt-2"]
    assert folders(settings, queued) == ["attempt-1", "attempt-2"]
    assert folders(settings, just_now) == ["attempt-1", "attempt-2"]  # within the grace (the lease, 60 s)
    sweep(settings.model_copy(update={"lease_seconds": 0.0}))
    assert folders(settings, just_now) == ["attempt-2"]
    assert folders(settings, running) == ["attempt-1", "attempt-2"]
