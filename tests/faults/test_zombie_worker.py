"""A zombie worker: paused (SIGSTOP) past its lease while it trains, its job handed to another worker, then
resumed (SIGCONT) while that worker trains. Real Postgres, Redis and `celery worker` processes on loopback.

The resumed worker must write nothing more: no event, no checkpoint row, no file in any checkpoint or adapter
folder, no job field (control.jobs fences every worker write on the lease; the runner stops at the first refusal,
and before every checkpoint it renews the lease itself). The job must still end with the adapter of a quiet run
(≤ 1e-6), and `job_attempts` must show the first attempt ending at its last write, before the second began.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from sqlalchemy import select

from control.db import session_scope
from control.orm import Checkpoint
from control.queue import enqueue
from control.settings import Settings
from control.storage import Storage, job_key
from tests.conftest import classification_rows
from tests.faults.test_worker_crashes import (
    TWO_EPOCHS,
    adapter,
    assert_never_held_twice,
    attempts,
    start_worker,
    stop,
    wait_for,
    wait_until_finished,
)
from tests.worker.conftest import ORG, get_events, get_job, insert_job, make_settings
from worker.runner import run_job

PAUSE_AT_STEP = 4  # a checkpoint is due right after it (NEAT_CHECKPOINT_EVERY=2): the resumed zombie's next write


def step_events(events) -> list[int]:
    return [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]


def checkpoint_rows(settings: Settings, job_id: str) -> list[tuple]:
    with session_scope(settings.resolved_database_url) as session:
        rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.seq))
        return [(r.id, r.step_number, r.storage_key, r.pruned, r.metrics) for r in rows]


def files_under(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under `folder`: (size, mtime in ns), to tell whether anything was written."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def test_a_paused_worker_resumed_after_the_hand_over_writes_nothing(settings, tiny_models, tmp_path):
    rows = classification_rows(16)
    reference_settings = make_settings(tmp_path / "reference")
    reference = insert_job(reference_settings, tiny_models["bert"], rows, hyperparameters=TWO_EPOCHS)
    assert run_job(reference, reference_settings) == "succeeded"

    job_id = insert_job(settings, tiny_models["bert"], rows, hyperparameters=TWO_EPOCHS)
    enqueue(job_id, settings)
    zombie_log, successor_log = tmp_path / "zombie.log", tmp_path / "successor.log"
    # A slow first worker (a second per step), so that it is surely asleep after its step's writes when paused.
    zombie = start_worker(settings, zombie_log, NEAT_FAULT_POINT="pace:1000")
    successor = None
    try:
        wait_for(lambda: PAUSE_AT_STEP in step_events(get_events(settings, job_id)), 120, "step 4", zombie_log)
        os.killpg(zombie.pid, signal.SIGSTOP)
        paused_at = time.time()
        first_owner = get_job(settings, job_id).lease_owner

        # The second worker's reaper finds the lease expired and requeues the job; the second worker claims it.
        successor = start_worker(settings, successor_log, NEAT_FAULT_POINT="pace:300")
        wait_for(lambda: get_job(settings, job_id).attempts == 2, 120, "the hand-over", successor_log)
        assert get_job(settings, job_id).lease_owner != first_owner

        storage = Storage(settings.resolved_artifact_root)
        first_folder = storage.path(f"{job_key(ORG, job_id)}/attempt-1")
        first_key = storage.key(first_folder)
        before_files = files_under(first_folder)
        before_rows = [r for r in checkpoint_rows(settings, job_id) if r[2].startswith(f"{first_key}/")]
        [first_attempt, _] = attempts(settings, job_id)
        os.killpg(zombie.pid, signal.SIGCONT)  # while the successor trains

        dropped = "leaving the job to its new worker"  # worker.runner, once its training stopped
        wait_for(lambda: dropped in zombie_log.read_text(), 60, "the zombie to drop the job", zombie_log)
        status = wait_until_finished(settings, job_id, successor_log)
        assert zombie.poll() is None, "the zombie worker process died instead of dropping the job"
    finally:
        stop(zombie)  # SIGKILL ends a stopped process too
        if successor is not None:
            stop(successor)

    job = get_job(settings, job_id)
    assert status == "succeeded", job.error
    expected_job = get_job(reference_settings, reference)
    assert (job.trained_tokens, job.estimated_finish) == (expected_job.trained_tokens, None)

    # Nothing of the first attempt's, row or file, changed after the hand-over ...
    after_rows = [r for r in checkpoint_rows(settings, job_id) if r[2].startswith(f"{first_key}/")]
    assert after_rows == before_rows
    assert files_under(first_folder) == before_files
    assert f"checkpoints/step-{PAUSE_AT_STEP:06d}" not in before_files  # its due checkpoint was never written
    # ... and the events tell one story: the first attempt's steps, the restart, the second attempt's steps once.
    events = get_events(settings, job_id)
    [restart] = [i for i, e in enumerate(events) if (e.data or {}).get("type") == "job_restarted"]
    before, after = events[:restart], events[restart + 1 :]
    [resumed] = [int(e.message.rsplit(" ", 1)[1]) for e in after if e.message.startswith("Resuming from checkpoint")]
    assert step_events(before) == list(range(1, PAUSE_AT_STEP + 1))
    assert step_events(after) == list(range(resumed + 1, 9))  # a zombie's step would repeat one or come last
    saved_after = [e.data["step"] for e in after if e.message.startswith("Checkpoint saved")]
    assert saved_after == [s for s in (2, 4, 6, 8) if s > resumed]
    assert after[-1].message == "The job has successfully completed"

    # The first attempt ended at its last fenced write, before the pause, and before the second attempt began.
    history = attempts(settings, job_id)
    assert [a.outcome for a in history] == ["lost", "succeeded"]
    assert history[0].ended_at == history[0].last_write_at == first_attempt.last_write_at
    assert history[0].ended_at <= paused_at
    assert_never_held_twice(history)

    ours, expected = adapter(settings, job_id), adapter(reference_settings, reference)
    assert ours.keys() == expected.keys()
    assert max((ours[k] - expected[k]).abs().max().item() for k in ours) <= 1e-6
