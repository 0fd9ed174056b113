"""Leases and the reaper, transition by transition (control.jobs, worker.lease), against a real database: SQLite,
and Postgres where this machine has it. No worker process and no training: each test sets the row up, plays the
racing parties' conditional UPDATEs in a chosen order and checks who won, what the row says and what
`job_attempts` remembers. The crash tests (test_worker_crashes.py) prove the same rules end to end."""

from __future__ import annotations

import time

from sqlalchemy import select

from control import jobs
from control.db import session_scope
from control.ids import new_id
from control.jobs import AttemptOutcome, JobStatus, Lease
from control.orm import Job, JobAttempt, JobEvent
from control.settings import Settings
from tests.worker.conftest import ORG
from worker.lease import Heartbeat, reap, redeliver


def new_job(settings: Settings, **values) -> str:
    job = Job(id=new_id("ftjob"), organization_id=ORG, model="m", task="classification", training_file="file-x",
              seed=0, hyperparameters={}, adapter={"type": "neat"})  # fmt: skip
    with session_scope(settings.resolved_database_url) as session:
        jobs.create(session, job, default_max_active=settings.max_active_jobs)
        for name, value in values.items():
            setattr(job, name, value)
    return job.id


def run(settings: Settings, transition, *args, **kwargs):
    with session_scope(settings.resolved_database_url) as session:
        return transition(session, *args, **kwargs)


def row(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(Job).where(Job.id == job_id))


def attempts(settings: Settings, job_id: str) -> list[JobAttempt]:
    with session_scope(settings.resolved_database_url) as session:
        query = select(JobAttempt).where(JobAttempt.job_id == job_id).order_by(JobAttempt.seq)
        return list(session.scalars(query))


def events(settings: Settings, job_id: str) -> list[JobEvent]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


def expire_now(settings: Settings, job_id: str) -> None:
    """The lease ran out (its worker stopped renewing it a while ago)."""
    with session_scope(settings.resolved_database_url) as session:
        session.scalar(select(Job).where(Job.id == job_id)).lease_expires_at = time.time() - 1


def test_create_queues_and_claim_takes_a_lease_once(db):
    job_id = new_job(db)
    assert row(db, job_id).status == JobStatus.QUEUED and row(db, job_id).sent_at is not None
    before = time.time()
    assert run(db, jobs.claim, job_id, "w1", db.lease_seconds) == 1
    assert run(db, jobs.claim, job_id, "w2", db.lease_seconds) is None  # a duplicate delivery loses
    job = row(db, job_id)
    assert (job.status, job.lease_owner, job.attempts) == (JobStatus.RUNNING, "w1", 1)
    assert before + db.lease_seconds <= job.lease_expires_at <= time.time() + db.lease_seconds
    assert [(a.worker, a.attempt, a.ended_at) for a in attempts(db, job_id)] == [("w1", 1, None)]


def test_claim_and_cancel_race_one_wins(db):
    cancelled_first = new_job(db)
    assert run(db, jobs.cancel_unstarted, cancelled_first)
    assert run(db, jobs.claim, cancelled_first, "w1", db.lease_seconds) is None
    assert row(db, cancelled_first).status == JobStatus.CANCELLED and attempts(db, cancelled_first) == []

    claimed_first = new_job(db)
    assert run(db, jobs.claim, claimed_first, "w1", db.lease_seconds) == 1
    assert not run(db, jobs.cancel_unstarted, claimed_first)  # too late to cancel outright ...
    assert run(db, jobs.request_cancel, claimed_first)  # ... so the worker is asked to stop
    assert not run(db, jobs.request_cancel, claimed_first)
    assert row(db, claimed_first).status == JobStatus.CANCELLING


def test_heartbeat_renews_only_its_own_live_lease(db):
    job_id = new_job(db)
    run(db, jobs.claim, job_id, "w1", 5.0)
    first = row(db, job_id).lease_expires_at
    assert run(db, jobs.renew_lease, Lease(job_id, "w1", 1), 60.0)
    assert row(db, job_id).lease_expires_at > first + 50
    assert not run(db, jobs.renew_lease, Lease(job_id, "w2", 1), 60.0)  # not the owner
    assert not run(db, jobs.renew_lease, Lease(job_id, "w1", 2), 60.0)  # not this attempt
    assert run(db, jobs.fail, Lease(job_id, "w1", 1), {"code": "x", "message": "x", "param": None})
    assert not run(db, jobs.renew_lease, Lease(job_id, "w1", 1), 60.0)  # finished: nothing to renew


def test_heartbeat_thread_reports_a_lost_lease(db):
    job_id = new_job(db)
    run(db, jobs.claim, job_id, "w1", db.lease_seconds)
    fast = db.model_copy(update={"heartbeat_seconds": 0.05})
    with Heartbeat(Lease(job_id, "w1", 1), fast) as heartbeat:
        time.sleep(0.3)
        assert not heartbeat.lost.is_set()  # renewing fine
        for _ in range(20):  # another worker's reaper takes the job back ...
            expire_now(db, job_id)
            if reap(db) == [job_id]:
                break  # ... unless a renewal slipped in between (every 50 ms here): then the next round
        else:
            raise AssertionError("the reaper never took the job back")
        assert heartbeat.lost.wait(5), "the heartbeat did not notice that its lease was gone"


def test_reaper_requeues_an_expired_lease_and_leaves_live_ones(db):
    lost, alive = new_job(db), new_job(db)
    run(db, jobs.claim, lost, "dead", db.lease_seconds)
    run(db, jobs.claim, alive, "alive", db.lease_seconds)
    expire_now(db, lost)
    expired_at = row(db, lost).lease_expires_at
    assert reap(db) == [lost]
    job = row(db, lost)
    assert (job.status, job.lease_owner, job.lease_expires_at, job.attempts) == (JobStatus.QUEUED, None, None, 1)
    assert job.sent_at >= expired_at  # its message was sent again
    [attempt] = attempts(db, lost)
    # it ended at its last fenced write (here its claim), not when the lease ran out
    assert (attempt.outcome, attempt.ended_at) == (AttemptOutcome.LOST, attempt.last_write_at)
    assert attempt.ended_at == attempt.started_at
    assert events(db, lost)[-1].data == {"type": "job_restarted", "attempt": 1}
    assert row(db, alive).status == JobStatus.RUNNING and row(db, alive).lease_owner == "alive"

    # the next claim resumes it as attempt 2; the dead worker's late outcome changes nothing
    assert run(db, jobs.claim, lost, "next", db.lease_seconds) == 2
    dead = Lease(lost, "dead", 1)
    assert not run(db, jobs.succeed, dead, artifact_key="x", trained_tokens=1)
    assert not run(db, jobs.fail, dead, {"code": "x", "message": "x", "param": None})
    assert not run(db, jobs.release, dead)
    assert run(db, jobs.succeed, Lease(lost, "next", 2), artifact_key="k/adapter", trained_tokens=7)
    job = row(db, lost)
    assert (job.status, job.artifact_key, job.trained_tokens) == (JobStatus.SUCCEEDED, "k/adapter", 7)
    assert job.fine_tuned_model == f"ft:m:{ORG}::{lost}" and job.finished_at is not None
    first, second = attempts(db, lost)
    assert (first.worker, second.worker, second.outcome) == ("dead", "next", AttemptOutcome.SUCCEEDED)
    assert first.ended_at <= second.started_at  # never two holders at once


def test_reaper_fails_a_job_after_max_attempts(db):
    job_id = new_job(db)
    for n in range(1, db.max_attempts + 1):
        assert run(db, jobs.claim, job_id, f"w{n}", db.lease_seconds) == n
        expire_now(db, job_id)
        requeued = reap(db)
        assert requeued == ([job_id] if n < db.max_attempts else [])
    job = row(db, job_id)
    assert job.status == JobStatus.FAILED and job.error["code"] == "worker_lost" and job.finished_at is not None
    assert [a.outcome for a in attempts(db, job_id)] == [AttemptOutcome.LOST] * db.max_attempts
    assert events(db, job_id)[-1].level == "error"
    assert reap(db) == []  # finished: the reaper leaves it alone


def test_reaper_finishes_a_cancel_whose_worker_died(db):
    job_id = new_job(db)
    run(db, jobs.claim, job_id, "w1", db.lease_seconds)
    run(db, jobs.request_cancel, job_id)
    expire_now(db, job_id)
    assert reap(db) == []  # nothing to resend
    assert row(db, job_id).status == JobStatus.CANCELLED
    assert [a.outcome for a in attempts(db, job_id)] == [AttemptOutcome.LOST]


def test_reaper_holds_a_pause_whose_worker_died(db):
    """The worker died while pausing: the job is paused (its last checkpoint is where a resume continues), not
    requeued against the customer's wish, and not failed."""
    job_id = new_job(db)
    run(db, jobs.claim, job_id, "w1", db.lease_seconds)
    assert run(db, jobs.request_pause, job_id) == JobStatus.PAUSING
    expire_now(db, job_id)
    assert reap(db) == []  # nothing to resend
    job = row(db, job_id)
    assert (job.status, job.lease_owner, job.finished_at) == (JobStatus.PAUSED, None, None)
    assert [a.outcome for a in attempts(db, job_id)] == [AttemptOutcome.LOST]
    assert events(db, job_id)[-1].message == "Job paused; resume it to continue from its last checkpoint"
    assert run(db, jobs.resume, job_id) == JobStatus.QUEUED
    assert run(db, jobs.claim, job_id, "w2", db.lease_seconds) == 2  # a worker takes it up again


def test_racing_reapers_and_a_late_renewal(db):
    job_id = new_job(db)
    run(db, jobs.claim, job_id, "w1", db.lease_seconds)
    expire_now(db, job_id)
    [lease] = run(db, jobs.expired_leases, time.time())
    # a renewal between the reaper's look and its update: the lease is no longer the expired one, so it stays
    assert run(db, jobs.renew_lease, Lease(job_id, "w1", 1), db.lease_seconds)
    assert run(db, jobs.expire, lease, db.max_attempts, time.time()) is None
    assert row(db, job_id).status == JobStatus.RUNNING and row(db, job_id).lease_owner == "w1"

    expire_now(db, job_id)
    [lease] = run(db, jobs.expired_leases, time.time())
    # two reapers saw the same expired lease: one requeues it, the other finds nothing to do
    assert run(db, jobs.expire, lease, db.max_attempts, time.time()).status == JobStatus.QUEUED
    assert run(db, jobs.expire, lease, db.max_attempts, time.time()) is None
    assert len([e for e in events(db, job_id) if (e.data or {}).get("type") == "job_restarted"]) == 1


def test_release_puts_a_running_job_back_but_not_a_cancelling_one(db):
    running, cancelling = new_job(db), new_job(db)
    for job_id in (running, cancelling):
        run(db, jobs.claim, job_id, "w1", db.lease_seconds)
    run(db, jobs.request_cancel, cancelling)
    assert run(db, jobs.release, Lease(running, "w1", 1))
    assert row(db, running).status == JobStatus.QUEUED and row(db, running).lease_owner is None
    assert [a.outcome for a in attempts(db, running)] == [AttemptOutcome.RELEASED]
    assert not run(db, jobs.release, Lease(cancelling, "w1", 1))
    assert run(db, jobs.cancel, Lease(cancelling, "w1", 1), trained_tokens=3)
    assert (row(db, cancelling).status, row(db, cancelling).trained_tokens) == (JobStatus.CANCELLED, 3)
    assert not run(db, jobs.cancel, Lease(cancelling, "w1", 1))  # finished once


def test_redeliver_resends_a_stale_queued_job_once(db):
    stale = new_job(db, sent_at=time.time() - db.redeliver_seconds - 5)
    fresh = new_job(db)
    [(job_id, sent_at)] = run(db, jobs.unsent_queued, time.time() - db.redeliver_seconds)
    assert job_id == stale
    assert redeliver(db, time.time()) == [stale]
    assert redeliver(db, time.time()) == []  # just sent
    assert not run(db, jobs.mark_resent, stale, sent_at, time.time())  # a second reaper with the old view loses
    assert row(db, fresh).sent_at < row(db, stale).sent_at
