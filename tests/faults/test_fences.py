"""Fenced worker writes and the retry rule (control.jobs), against a real database: SQLite, and Postgres where this
machine has it. Like test_leases.py, no worker process: each test plays the parties' statements in a chosen order.

- Every write a worker makes for a job (progress fields, events, checkpoint rows, the outcome) lands only while its
  lease (owner and attempt) holds the job, and records the attempt's last write.
- On Postgres the fence is in the writing statement itself: a write racing the reaper's hand-over waits for it
  and then writes nothing.
- Infrastructure losses are retried with a backoff that doubles while the job makes no progress; only a job lost
  `max_attempts` times in a row at the same checkpoint (a poison job) fails, with `worker_lost`.
- A worker paused inside a write keeps the job's row locked: the reaper does not wait for it forever.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from control import jobs
from control.db import session_factory, session_scope
from control.ids import new_id
from control.jobs import JobStatus, Lease
from control.orm import Checkpoint, JobEvent
from tests.faults.test_leases import attempts, events, expire_now, new_job, row, run
from worker.lease import reap


def checkpoint(settings, lease: Lease, step: int) -> bool:
    """Record a checkpoint row as the worker does (worker.progress): fenced on `lease`."""
    key = f"org/jobs/{lease.job_id}/attempt-{lease.attempt}/checkpoints/step-{step:06d}"
    return run(settings, jobs.insert_fenced, lease, Checkpoint, id=new_id("ftckpt"), job_id=lease.job_id,
               step_number=step, metrics={"step": step}, storage_key=key, created_at=0, pruned=False)  # fmt: skip


def checkpoint_steps(settings, job_id: str) -> list[int]:
    with session_scope(settings.resolved_database_url) as session:
        query = select(Checkpoint.step_number).where(Checkpoint.job_id == job_id).order_by(Checkpoint.seq)
        return list(session.scalars(query))


def lose(settings, job_id: str, *, backoff: float = 0.0) -> jobs.Expiry:
    """The job's worker vanished: its lease runs out and a reaper takes the job back."""
    expire_now(settings, job_id)
    [lease] = run(settings, jobs.expired_leases, time.time())
    return run(settings, jobs.expire, lease, settings.max_attempts, time.time(), backoff_seconds=backoff,
               backoff_max_seconds=backoff * 4)  # fmt: skip


def test_a_lost_lease_writes_nothing_and_the_new_owner_writes(db):
    job_id = new_job(db)
    run(db, jobs.claim, job_id, "w1", db.lease_seconds)
    old = Lease(job_id, "w1", 1)
    assert run(db, jobs.record_progress, old, trained_tokens=10, estimated_finish=123)
    assert run(db, jobs.add_fenced_event, old, "Step 1/8", type="metrics", data={"step": 1})
    assert checkpoint(db, old, 2)
    [first] = attempts(db, job_id)
    assert first.started_at <= first.last_write_at and first.ended_at is None

    assert lose(db, job_id).status == JobStatus.QUEUED
    assert run(db, jobs.claim, job_id, "w2", db.lease_seconds) == 2
    new = Lease(job_id, "w2", 2)
    n_events = len(events(db, job_id))

    # the old owner, resumed: every write is refused and nothing lands
    assert not run(db, jobs.record_progress, old, trained_tokens=99, estimated_finish=999)
    assert not run(db, jobs.add_fenced_event, old, "Step 3/8", type="metrics", data={"step": 3})
    assert not checkpoint(db, old, 4)
    assert not run(db, jobs.renew_lease, old, db.lease_seconds)
    assert not run(db, jobs.succeed, old, artifact_key="x", trained_tokens=1)
    # the same owner name with a stale attempt number is refused too (a worker that claimed the job again)
    assert not run(db, jobs.record_progress, Lease(job_id, "w2", 1), trained_tokens=99)
    job = row(db, job_id)
    assert (job.trained_tokens, job.estimated_finish, job.lease_owner) == (10, None, "w2")
    assert len(events(db, job_id)) == n_events and checkpoint_steps(db, job_id) == [2]
    lost = attempts(db, job_id)[0]
    assert (lost.outcome, lost.ended_at, lost.checkpoint_step) == ("lost", first.last_write_at, 2)

    # the new owner writes
    assert run(db, jobs.record_progress, new, trained_tokens=20)
    assert run(db, jobs.add_fenced_event, new, "Step 3/8", type="metrics", data={"step": 3})
    assert checkpoint(db, new, 4)
    assert run(db, jobs.succeed, new, artifact_key="k", trained_tokens=40)
    assert checkpoint_steps(db, job_id) == [2, 4] and events(db, job_id)[-1].message == "Step 3/8"
    done = attempts(db, job_id)[1]
    assert done.outcome == "succeeded" and done.ended_at == done.last_write_at >= lost.ended_at
    assert not run(db, jobs.add_fenced_event, new, "late")  # finished: no lease left to write under


def test_a_write_racing_the_hand_over_waits_for_it_and_writes_nothing(db):
    """Postgres, READ COMMITTED: the reaper's UPDATE has taken the job back but not committed yet. A plain
    EXISTS check would still see the old lease and insert; the fenced INSERT ... FOR SHARE waits for the reaper's
    commit, re-reads the row and inserts nothing."""
    if not db.resolved_database_url.startswith("postgresql"):
        pytest.skip("SQLite runs one writer at a time: there is no such race to lose")
    job_id = new_job(db)
    run(db, jobs.claim, job_id, "w1", db.lease_seconds)
    expire_now(db, job_id)
    [expired] = run(db, jobs.expired_leases, time.time())

    reaper = session_factory(db.resolved_database_url)()
    try:
        assert jobs.expire(reaper, expired, db.max_attempts, time.time()).status == JobStatus.QUEUED  # not committed
        result: dict[str, bool] = {}
        writer = threading.Thread(
            target=lambda: result.update(written=run(db, jobs.add_fenced_event, Lease(job_id, "w1", 1), "Step 9"))
        )
        writer.start()
        writer.join(1.0)
        assert writer.is_alive(), "the fenced write did not wait for the hand-over in progress"
        reaper.commit()
    finally:
        reaper.close()
    writer.join(10)
    assert result == {"written": False}
    with session_scope(db.resolved_database_url) as session:
        assert session.scalar(select(JobEvent).where(JobEvent.message == "Step 9")) is None


def test_losses_between_which_the_job_progresses_never_fail_it(db):
    """max_attempts = 3 in these tests; five losses, each after a new checkpoint: five restarts, no failure. The
    backoff doubles while losses repeat at the same point and starts over once the job got further."""
    job_id = new_job(db)
    delays = []
    for attempt in range(1, 6):
        assert run(db, jobs.claim, job_id, f"w{attempt}", db.lease_seconds) == attempt
        assert checkpoint(db, Lease(job_id, f"w{attempt}", attempt), 2 * attempt)  # progress, then the loss
        expiry = lose(db, job_id, backoff=1.0)
        assert expiry.status == JobStatus.QUEUED
        delays.append(expiry.retry_in)
    assert delays == [1.0] * 5
    restarted = [e for e in events(db, job_id) if (e.data or {}).get("type") == "job_restarted"]
    assert [e.data["attempt"] for e in restarted] == [1, 2, 3, 4, 5]
    assert "from its checkpoint at step 10" in restarted[-1].message

    # now the job keeps taking its worker down at the same point (after step 10): a poison job
    assert run(db, jobs.claim, job_id, "w6", db.lease_seconds) == 6
    assert lose(db, job_id, backoff=1.0) == jobs.Expiry(JobStatus.QUEUED, 2.0)  # twice at step 10: 2 s
    assert run(db, jobs.claim, job_id, "w7", db.lease_seconds) == 7
    assert lose(db, job_id, backoff=1.0) == jobs.Expiry(JobStatus.FAILED, 0.0)  # three times: failed
    job = row(db, job_id)
    assert job.status == JobStatus.FAILED and job.error["code"] == "worker_lost"
    assert "3 times in a row" in job.error["message"] and "step 10" in job.error["message"]
    assert [a.checkpoint_step for a in attempts(db, job_id)] == [2, 4, 6, 8, 10, 10, 10]


def test_backoff_doubles_at_the_same_point_up_to_its_cap(db):
    db = db.model_copy(update={"max_attempts": 10})
    job_id = new_job(db)
    delays = []
    for attempt in range(1, 6):
        run(db, jobs.claim, job_id, f"w{attempt}", db.lease_seconds)
        delays.append(lose(db, job_id, backoff=1.0).retry_in)  # cap: 4 s
    assert delays == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert row(db, job_id).sent_at >= time.time() + 3  # the retry's message is due then; redelivery counts from it


def test_a_release_breaks_a_run_of_losses(db):
    """A worker that shut down cleanly (SIGTERM) is no loss: the losses around it are not 'in a row'."""
    job_id = new_job(db)
    for attempt, how in enumerate(["lost", "lost", "released", "lost", "lost"], start=1):
        run(db, jobs.claim, job_id, f"w{attempt}", db.lease_seconds)
        if how == "released":
            assert run(db, jobs.release, Lease(job_id, f"w{attempt}", attempt))
        else:
            assert lose(db, job_id).status == JobStatus.QUEUED
    assert [a.outcome for a in attempts(db, job_id)] == ["lost", "lost", "released", "lost", "lost"]


def test_a_row_locked_by_a_paused_writer_does_not_stop_the_reaper(db):
    """A worker paused in the middle of one of its writes holds the job's row locked while it is paused. On
    Postgres the reaper waits for that lock a few seconds at most, takes back every other expired job, and takes
    this one once the lock is gone."""
    if not db.resolved_database_url.startswith("postgresql"):
        pytest.skip("SQLite: a paused writer holds the whole database, and its busy timeout bounds every wait")
    stuck, other = new_job(db), new_job(db)
    for job_id, owner in ((stuck, "paused"), (other, "dead")):
        run(db, jobs.claim, job_id, owner, db.lease_seconds)
        expire_now(db, job_id)
    paused = session_factory(db.resolved_database_url)()
    try:
        # its lease has run out but no reaper has acted yet, so the write goes through, and stays uncommitted
        assert jobs.add_fenced_event(paused, Lease(stuck, "paused", 1), "Step 1/8")
        started = time.monotonic()
        assert reap(db) == [other]
        assert time.monotonic() - started < 15
        assert row(db, stuck).status == JobStatus.RUNNING
    finally:
        paused.rollback()
        paused.close()
    assert reap(db) == [stuck]
