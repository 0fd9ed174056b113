"""The job state machine: a job's statuses, the sets of them that mean something, and every transition.

    create            (new) → validating_files → queued     (the API, in one transaction, if the quota admits it)
    cancel_unstarted  validating_files | queued → cancelled  (the API)
    request_cancel    running → cancelling                   (the API)
    claim             queued → running, under a lease        (a worker)
    renew_lease       running | cancelling, same status      (the worker's heartbeat)
    succeed | fail    running | cancelling → succeeded | failed
    cancel            cancelling → cancelled                 (the worker, at a requested cancel)
    release           running → queued                       (the worker, shutting down mid-job)
    expire            running → queued | failed, cancelling → cancelled   (a reaper, once the lease expired)

Each transition is one conditional UPDATE (`WHERE status IN <from> [AND lease_owner = <me>]`) that returns whether
it happened: the API, any number of workers and their reapers race on the same row, and the row, not anyone's
memory of it, decides who wins. A worker's writes are fenced on its lease (worker.lease renews it), so a worker
that lost its job can no longer change it. Callers run these inside their own transaction (`session_scope`,
`with_retries`) and add the event that tells the customer what happened; the transitions whose event depends on
nothing but the transition (create, expire) write it themselves.

This is the only module that spells a status: tests/control/test_job_states.py fails on a status string anywhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from control.events import add_event
from control.ids import now
from control.keys import lock_organization
from control.orm import Job, JobAttempt


class JobStatus(StrEnum):
    """The public API's `status` strings (OpenAI's, plus `cancelling`): never renamed."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"  # a cancel was requested; the worker stops after its current step
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Not finished yet: what the per-organisation `max_active_jobs` quota counts.
UNFINISHED = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING})
# No worker has it: a cancel ends it at once.
NOT_STARTED = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED})
# A worker holds it under a lease, until that worker records the outcome or a reaper takes it back.
LEASED = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING})
# Final: nothing changes the row any more.
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class AttemptOutcome(StrEnum):
    """How one claim of a job ended (`job_attempts.outcome`)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RELEASED = "released"  # the worker shut down mid-job and put it back in the queue
    LOST = "lost"  # the worker vanished; its attempt ends when its lease expired


def fine_tuned_model_name(job: Job) -> str:
    """The `fine_tuned_model` a succeeded job gets (OpenAI's `ft:<base>:<org>:<suffix>:<id>` shape)."""
    return f"ft:{job.model}:{job.organization_id}:{job.suffix or ''}:{job.id}"


def status_of(session: Session, job_id: str) -> JobStatus | None:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return None if status is None else JobStatus(status)


def is_cancelling(session: Session, job_id: str) -> bool:
    return status_of(session, job_id) == JobStatus.CANCELLING


# --- the web tier's transitions -------------------------------------------------------------------------------


class ActiveJobLimit(Exception):
    """The organisation already has `limit` unfinished jobs: the new one was not admitted (nothing written)."""

    def __init__(self, active: int, limit: int):
        super().__init__(f"{active} unfinished jobs; the limit is {limit}")
        self.active, self.limit = active, limit


def create(session: Session, job: Job, *, default_max_active: int) -> Job:
    """Admit a new job (its files already validated by the caller) under its organisation's `max_active_jobs`
    (else `default_max_active`), insert it and queue it: `sent_at` is now, because the caller sends its message
    right after the commit. Raises ActiveJobLimit, having written nothing, when the organisation is at its limit.

    Admission is counted under a per-organisation lock held until the caller's commit, so concurrent creations
    (in any number of API processes) take turns and each counts every job committed before it: 50 at once against
    a limit of 20 admit exactly 20. See `_lock_organization` for how each database takes the lock. (Not a counter
    column: every transition out of UNFINISHED would have to decrement it, and one that did not would drift the
    quota for good; the count of rows is the truth.)"""
    own_limit = _lock_organization(session, job.organization_id)
    limit = default_max_active if own_limit is None else own_limit
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.organization_id == job.organization_id,
                                                    Job.status.in_(UNFINISHED))
    )  # fmt: skip
    if active >= limit:
        raise ActiveJobLimit(active, limit)
    job.status = JobStatus.VALIDATING_FILES
    session.add(job)
    add_event(session, job.id, f"Created fine-tuning job: {job.id}")
    job.status, job.sent_at = JobStatus.QUEUED, time.time()
    add_event(session, job.id, "Files validated; job queued")
    return job


def _lock_organization(session: Session, org: str) -> int | None:
    """Lock `org` for a job admission until the transaction ends (control.keys.lock_organization, the same lock
    that admits an upload's bytes); returns its own `max_active_jobs`."""
    row = lock_organization(session, org)
    return None if row is None else row.max_active_jobs


def cancel_unstarted(session: Session, job_id: str) -> bool:
    """validating_files | queued → cancelled. A worker's claim races this one: one of the two wins."""
    return _update(session, job_id, NOT_STARTED, status=JobStatus.CANCELLED, finished_at=now())


def request_cancel(session: Session, job_id: str) -> bool:
    """running → cancelling: the worker sees it between steps, saves a checkpoint and records `cancel`."""
    return _update(session, job_id, {JobStatus.RUNNING}, status=JobStatus.CANCELLING)


# --- a worker's transitions, fenced on its lease ----------------------------------------------------------------


def claim(session: Session, job_id: str, owner: str, lease_seconds: float) -> int | None:
    """queued → running under a lease for `owner`, and a `job_attempts` row. One conditional UPDATE decides
    between racing deliveries of the same id and the API's cancel. Returns the attempt number (1 for the first
    claim), or None if the job was not queued."""
    t = time.time()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, attempts=Job.attempts + 1, lease_owner=owner,
                lease_expires_at=t + lease_seconds)
    ).rowcount  # fmt: skip
    if not claimed:
        return None
    job = session.scalar(select(Job).where(Job.id == job_id))
    if job.started_at is None:
        job.started_at = int(t)
    session.add(JobAttempt(job_id=job_id, attempt=job.attempts, worker=owner, started_at=t))
    return job.attempts


def renew_lease(session: Session, job_id: str, owner: str, lease_seconds: float) -> bool:
    """The heartbeat: push `owner`'s lease forward. False once the lease is gone (a reaper took the job back, or it
    left the leased states): the worker must stop training it."""
    return _update(session, job_id, LEASED, owner=owner, lease_expires_at=time.time() + lease_seconds)


def succeed(session: Session, job_id: str, owner: str, *, artifact_key: str, trained_tokens: int) -> bool:
    """running | cancelling → succeeded: a cancel that arrives during the last step is too late, the adapter is
    complete."""
    job = session.scalar(select(Job).where(Job.id == job_id))
    return _finish(session, job_id, owner, LEASED, JobStatus.SUCCEEDED, artifact_key=artifact_key,
                   fine_tuned_model=fine_tuned_model_name(job), trained_tokens=trained_tokens)  # fmt: skip


def fail(session: Session, job_id: str, owner: str, error: dict[str, Any]) -> bool:
    """running | cancelling → failed, with the OpenAI-shaped `error` ({code, message, param})."""
    return _finish(session, job_id, owner, LEASED, JobStatus.FAILED, error=error)


def cancel(session: Session, job_id: str, owner: str, *, trained_tokens: int | None = None) -> bool:
    """cancelling → cancelled: the worker stopped at a requested cancel (its last checkpoint kept)."""
    values = {} if trained_tokens is None else {"trained_tokens": trained_tokens}
    return _finish(session, job_id, owner, {JobStatus.CANCELLING}, JobStatus.CANCELLED, **values)


def release(session: Session, job_id: str, owner: str, *, resend_later_from: float | None = None) -> bool:
    """running → queued: the worker is shutting down mid-job; the redelivered message resumes it from its last
    checkpoint. (A job being cancelled is not released: the caller `cancel`s it instead.)

    `resend_later_from` (a time): the job's message counts as sent then, and nobody sends it now, so the reapers
    send it once it has waited `redeliver_seconds`: how a job that hit a full disk waits for space."""
    later = {} if resend_later_from is None else {"sent_at": resend_later_from}
    released = _update(session, job_id, {JobStatus.RUNNING}, owner=owner, status=JobStatus.QUEUED,
                       estimated_finish=None, lease_owner=None, lease_expires_at=None, **later)  # fmt: skip
    if released:
        _end_attempt(session, job_id, owner, AttemptOutcome.RELEASED)
    return released


# --- the reaper's transitions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiredLease:
    job_id: str
    owner: str
    expires_at: float
    attempts: int
    status: JobStatus


def expired_leases(session: Session, at: float) -> list[ExpiredLease]:
    rows = session.execute(
        select(Job.id, Job.lease_owner, Job.lease_expires_at, Job.attempts, Job.status).where(
            Job.status.in_(LEASED), Job.lease_expires_at < at
        )
    ).all()
    return [ExpiredLease(i, o, e, a, JobStatus(s)) for i, o, e, a, s in rows]


def expire(session: Session, lease: ExpiredLease, max_attempts: int, at: float) -> JobStatus | None:
    """Take a job back from a worker whose lease expired: cancelling → cancelled; running → queued to be resumed
    (its caller sends the message again), or → failed once it has been claimed `max_attempts` times. Conditional
    on the same expired lease, so of several reapers one acts and a lease renewed meanwhile is left alone. Returns
    the new status, or None if this reaper lost."""
    if lease.status == JobStatus.CANCELLING:
        target, values = JobStatus.CANCELLED, {"finished_at": int(at)}
    elif lease.attempts >= max_attempts:
        error = {
            "code": "worker_lost",
            "message": f"The job's worker stopped unexpectedly {lease.attempts} times; it was not retried again.",
            "param": None,
        }
        target, values = JobStatus.FAILED, {"error": error, "finished_at": int(at)}
    else:
        target, values = JobStatus.QUEUED, {"sent_at": at}
    won = session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_owner == lease.owner, Job.lease_expires_at == lease.expires_at)
        .where(Job.status.in_(LEASED))
        .values(status=target, lease_owner=None, lease_expires_at=None, estimated_finish=None, **values)
    ).rowcount
    if not won:
        return None
    _end_attempt(session, lease.job_id, lease.owner, AttemptOutcome.LOST, at=lease.expires_at)
    if target == JobStatus.QUEUED:
        add_event(session, lease.job_id, f"Job restarted: its worker stopped unexpectedly (attempt {lease.attempts} "
                  f"of {max_attempts}); resuming from the last complete checkpoint", level="warn",
                  data={"type": "job_restarted", "attempt": lease.attempts})  # fmt: skip
    elif target == JobStatus.FAILED:
        add_event(session, lease.job_id, f"Fine-tuning job failed: {values['error']['message']}", level="error")
    else:
        add_event(session, lease.job_id, "Job cancelled; last checkpoint kept")
    return target


def unsent_queued(session: Session, sent_before: float) -> list[tuple[str, float | None]]:
    """(id, sent_at) of queued jobs whose message went out before `sent_before` (rows from before `sent_at`
    existed count as sent when created)."""
    query = select(Job.id, Job.sent_at).where(
        Job.status == JobStatus.QUEUED, func.coalesce(Job.sent_at, Job.created_at) < sent_before
    )
    return [(job_id, sent_at) for job_id, sent_at in session.execute(query)]


def mark_resent(session: Session, job_id: str, sent_at: float | None, at: float) -> bool:
    """Still queued and not resent by another reaper since `sent_at`: record that its message goes out again now.
    The winner sends it."""
    same = Job.sent_at.is_(None) if sent_at is None else Job.sent_at == sent_at
    return bool(
        session.execute(
            update(Job).where(Job.id == job_id, Job.status == JobStatus.QUEUED, same).values(sent_at=at)
        ).rowcount
    )


# --- the one UPDATE shape ---------------------------------------------------------------------------------------


def _update(session: Session, job_id: str, from_statuses: frozenset | set, *, owner: str | None = None,
            **values: Any) -> bool:  # fmt: skip
    query = update(Job).where(Job.id == job_id, Job.status.in_(from_statuses))
    if owner is not None:
        query = query.where(Job.lease_owner == owner)
    return bool(session.execute(query.values(**values)).rowcount)


def _finish(session: Session, job_id: str, owner: str, from_statuses: frozenset | set, status: JobStatus,
            **values: Any) -> bool:  # fmt: skip
    done = _update(session, job_id, from_statuses, owner=owner, status=status, finished_at=now(),
                   estimated_finish=None, lease_expires_at=None, **values)  # fmt: skip
    if done:
        _end_attempt(session, job_id, owner, AttemptOutcome(status.value))
    return done


def _end_attempt(session: Session, job_id: str, owner: str, outcome: AttemptOutcome, at: float | None = None) -> None:
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == job_id, JobAttempt.worker == owner, JobAttempt.ended_at.is_(None))
        .values(ended_at=at or time.time(), outcome=outcome)
    )
