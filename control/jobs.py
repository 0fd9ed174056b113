"""The job state machine: a job's statuses, the sets of them that mean something, and every transition.

    create            (new) → validating_files → queued     (the API, in one transaction, if the quota admits it)
    cancel_unstarted  validating_files | queued | paused → cancelled  (the API)
    request_cancel    running | pausing → cancelling         (the API)
    request_pause     running → pausing; validating_files | queued → paused   (the API)
    resume            paused → queued; pausing → running     (the API)
    claim             queued → running, under a lease        (a worker)
    renew_lease       running | cancelling | pausing, same status   (the worker's heartbeat)
    succeed | fail    running | cancelling | pausing → succeeded | failed
    cancel            cancelling → cancelled                 (the worker, at a requested cancel)
    pause             pausing → paused                       (the worker, at a requested pause: its lease let go)
    release           running → queued                       (the worker, shutting down mid-job)
    expire            running → queued | failed, cancelling → cancelled, pausing → paused   (a reaper)

and the worker's fenced writes while it trains: record_progress (job fields), insert_fenced / add_fenced_event /
add_checkpoint (events, checkpoint rows).

Every move into a final status, and every checkpoint row, emits its webhook event (control.webhooks) here, in the
transition's own transaction: the event exists exactly when the transition does.

Each transition is one conditional UPDATE (`WHERE status IN <from> [AND lease_owner = <me>]`) that returns whether
it happened: the API, any number of workers and their reapers race on the same row, and the row, not anyone's
memory of it, decides who wins.

Every write a worker makes for a job is *fenced* on its `Lease` (owner and attempt number) in the statement that
writes: an UPDATE of the job row `WHERE lease_owner = me AND attempts = mine AND status IN (running,
cancelling)`, or an INSERT ... SELECT ... FROM jobs WHERE <the same> FOR SHARE for events and checkpoint rows. A
worker paused past its lease and resumed (SIGSTOP, a VM migration, a GC pause) therefore writes nothing once a
reaper has taken the job back: each fenced write returns False, and the worker stops (`LeaseLost`). The fenced
statement also locks the job row until the transaction commits (UPDATE, or FOR SHARE on Postgres; SQLite runs one
writer at a time), so the rest of that transaction cannot be overtaken by a hand-over either.

Callers run these inside their own transaction (`session_scope`, `with_retries`) and add the event that tells the
customer what happened; the transitions whose event depends on nothing but the transition (create, expire) write
it themselves.

This is the only module that spells a status: tests/control/test_job_states.py fails on a status string anywhere else.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sqlalchemy import func, insert, literal, select, update
from sqlalchemy.orm import Session

from control import webhooks
from control.events import add_event
from control.ids import new_id, now
from control.keys import lock_organization
from control.orm import Checkpoint, Job, JobAttempt, JobEvent


class JobStatus(StrEnum):
    """The public API's `status` strings (OpenAI's, plus `cancelling`): never renamed."""

    VALIDATING_FILES = "validating_files"
    QUEUED = "queued"
    RUNNING = "running"
    CANCELLING = "cancelling"  # a cancel was requested; the worker stops after its current step
    PAUSING = "pausing"  # a pause was requested; the worker saves a checkpoint after its step and lets go
    PAUSED = "paused"  # no worker holds it; `resume` queues it again, to continue from its last checkpoint
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Not finished yet: what the per-organisation `max_active_jobs` quota counts.
UNFINISHED = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.CANCELLING,
                        JobStatus.PAUSING, JobStatus.PAUSED})  # fmt: skip
# Not started by a worker: a pause holds it at once.
NOT_STARTED = frozenset({JobStatus.VALIDATING_FILES, JobStatus.QUEUED})
# No worker has it: a cancel ends it at once.
UNHELD = NOT_STARTED | {JobStatus.PAUSED}
# A worker holds it under a lease, until that worker records the outcome or a reaper takes it back.
LEASED = frozenset({JobStatus.RUNNING, JobStatus.CANCELLING, JobStatus.PAUSING})
# A worker holds it and was asked to stop after its current step.
STOPPING = frozenset({JobStatus.CANCELLING, JobStatus.PAUSING})
# Final: nothing changes the row any more.
FINISHED = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})


class AttemptOutcome(StrEnum):
    """How one claim of a job ended (`job_attempts.outcome`)."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    RELEASED = "released"  # the worker shut down mid-job and put it back in the queue
    PAUSED = "paused"  # the worker stopped at a requested pause
    LOST = "lost"  # the worker vanished; its attempt ends at its last fenced write


@dataclass(frozen=True)
class Lease:
    """What a worker holds while it trains a job (from `claim`): the fence on every write it makes for it."""

    job_id: str
    owner: str
    attempt: int


class LeaseLost(Exception):
    """A fenced write found the lease gone: another worker has the job now, this one must stop and write nothing."""

    def __init__(self, lease: Lease):
        super().__init__(f"job {lease.job_id}: attempt {lease.attempt} of {lease.owner} no longer holds its lease")
        self.lease = lease


def fine_tuned_model_name(job: Job) -> str:
    """The `fine_tuned_model` a succeeded job gets (OpenAI's `ft:<base>:<org>:<suffix>:<id>` shape)."""
    return f"ft:{job.model}:{job.organization_id}:{job.suffix or ''}:{job.id}"


def n_devices(hyperparameters: dict[str, Any] | None) -> int:
    """The devices a job trains on: its `n_devices` hyperparameter (on the row only when more than one)."""
    return int((hyperparameters or {}).get("n_devices", 1))


def devices_of(session: Session, job_id: str) -> int:
    """`n_devices` of the job's row (1 when it is gone): which queue its message goes to (control.queue)."""
    return n_devices(session.scalar(select(Job.hyperparameters).where(Job.id == job_id)))


def status_of(session: Session, job_id: str) -> JobStatus | None:
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    return None if status is None else JobStatus(status)


def stop_requested(session: Session, job_id: str) -> bool:
    """Whether the worker should stop after its current step: a cancel or a pause was asked for."""
    return status_of(session, job_id) in STOPPING


def census(session: Session) -> dict[JobStatus, tuple[int, int | None]]:
    """Per status: how many jobs are in it, and when the oldest of them was created (unfinished statuses only;
    None for the others, and for an empty one). Every status is present, so a scraped series never vanishes."""
    rows = session.execute(
        select(Job.status, func.count(), func.min(Job.created_at)).group_by(Job.status)
    ).all()  # fmt: skip
    found = {JobStatus(status): (count, oldest) for status, count, oldest in rows}
    counted = {}
    for status in JobStatus:
        count, oldest = found.get(status, (0, None))
        counted[status] = (count, oldest if status in UNFINISHED else None)
    return counted


def active_job_using(session: Session, organization_id: str, file_id: str) -> str | None:
    """The id of an unfinished job of the organisation that trains on (or validates with) `file_id`, if any: such a
    file cannot be deleted, its worker (or the next one, after a loss) still has to read it."""
    uses = (Job.training_file == file_id) | (Job.validation_file == file_id)
    query = select(Job.id).where(Job.organization_id == organization_id, uses, Job.status.in_(UNFINISHED))
    return session.scalar(query.order_by(Job.seq).limit(1))


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
    """validating_files | queued | paused → cancelled. A worker's claim races this one: one of the two wins."""
    done = _update(session, job_id, UNHELD, status=JobStatus.CANCELLED, finished_at=now())
    if done:
        _announce(session, job_id, JobStatus.CANCELLED)
    return done


def request_cancel(session: Session, job_id: str) -> bool:
    """running | pausing → cancelling: the worker sees it between steps, saves a checkpoint and records `cancel`."""
    return _update(session, job_id, {JobStatus.RUNNING, JobStatus.PAUSING}, status=JobStatus.CANCELLING)


def request_pause(session: Session, job_id: str) -> JobStatus | None:
    """running → pausing (the worker sees it between steps, saves a checkpoint and records `pause`), or
    validating_files | queued → paused at once (its queued message finds it not queued and is skipped). Returns
    the status it moved to, or None."""
    if _update(session, job_id, NOT_STARTED, status=JobStatus.PAUSED):
        return JobStatus.PAUSED
    if _update(session, job_id, {JobStatus.RUNNING}, status=JobStatus.PAUSING):
        return JobStatus.PAUSING
    return None


def resume(session: Session, job_id: str) -> JobStatus | None:
    """paused → queued (the caller sends its message; a worker resumes it from its newest recorded checkpoint),
    or pausing → running (resumed before its worker stopped: the pause is simply withdrawn). Returns the status it
    moved to, or None."""
    if _update(session, job_id, {JobStatus.PAUSED}, status=JobStatus.QUEUED, sent_at=time.time()):
        return JobStatus.QUEUED
    if _update(session, job_id, {JobStatus.PAUSING}, status=JobStatus.RUNNING):
        return JobStatus.RUNNING
    return None


# --- a worker's transitions and writes, fenced on its lease ------------------------------------------------------

# The job-row fields a worker reports while it trains (`record_progress`); everything else changes by transition.
PROGRESS_FIELDS = frozenset(
    {"trained_tokens", "estimated_finish", "resolved_hyperparameters", "resolved_adapter", "adapter_selection"}
)


def claim(session: Session, job_id: str, owner: str, lease_seconds: float) -> int | None:
    """queued → running under a lease for `owner`, and a `job_attempts` row. One conditional UPDATE decides
    between racing deliveries of the same id and the API's cancel. Returns the attempt number (1 for the first
    claim; with the owner, the `Lease` every later write is fenced on), or None if the job was not queued."""
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
    session.add(JobAttempt(job_id=job_id, attempt=job.attempts, worker=owner, started_at=t, last_write_at=t))
    return job.attempts


def renew_lease(session: Session, lease: Lease, lease_seconds: float) -> bool:
    """The heartbeat: push the lease forward. False once the lease is gone (a reaper took the job back, or it
    left the leased states): the worker must stop training it."""
    return _fenced_update(session, lease, lease_expires_at=time.time() + lease_seconds)


def record_progress(session: Session, lease: Lease, **values: Any) -> bool:
    """Write `PROGRESS_FIELDS` of a job this worker still holds; False (nothing written) once it does not."""
    unknown = set(values) - PROGRESS_FIELDS
    if unknown:
        raise ValueError(f"not progress fields: {sorted(unknown)}")
    return _fenced_update(session, lease, **values)


def insert_fenced(session: Session, lease: Lease, row: type, **values: Any) -> bool:
    """INSERT one `row` (a table class: JobEvent, Checkpoint) with `values`, in a statement that inserts nothing
    unless the lease is still held: INSERT INTO t (...) SELECT <values> FROM jobs WHERE <held> FOR SHARE. The FOR
    SHARE makes a racing reaper wait for this transaction (and this statement wait for the reaper's, then see the
    lease gone), so a row never lands after the hand-over. Returns whether it was inserted."""
    columns = row.__table__.c
    source = (
        select(*[literal(value, type_=columns[name].type) for name, value in values.items()])
        .select_from(Job)
        .where(*_held(lease))
        .with_for_update(read=True)
    )
    # RETURNING, not rowcount: the driver reports no row count for an INSERT ... SELECT (psycopg answers -1)
    statement = insert(row.__table__).from_select(list(values), source).returning(row.__table__.c.seq)
    inserted = session.execute(statement).first() is not None
    if inserted:
        _touch(session, lease)
    return inserted


def add_checkpoint(session: Session, lease: Lease, **values: Any) -> bool:
    """`insert_fenced` of a Checkpoint row; once it is in, the organisation's webhooks hear of it
    (`fine_tuning.job.checkpoint.created`, ours: the checkpoint is a model that can be tried already)."""
    if not insert_fenced(session, lease, Checkpoint, job_id=lease.job_id, **values):
        return False
    data = {"id": lease.job_id, "checkpoint_id": values["id"], "step_number": values["step_number"]}
    webhooks.emit(session, _organization(session, lease.job_id), webhooks.CHECKPOINT_CREATED, data)
    return True


def add_fenced_event(session: Session, lease: Lease, message: str, *, level: str = "info", type: str = "message",
                     data: dict[str, Any] | None = None) -> bool:  # fmt: skip
    """`control.events.add_event` for a worker: the event is written only while `lease` holds the job."""
    return insert_fenced(session, lease, JobEvent, id=new_id("ftevent"), job_id=lease.job_id, created_at=now(),
                         level=level, type=type, message=message, data=data)  # fmt: skip


def succeed(
    session: Session, lease: Lease, *, artifact_key: str, trained_tokens: int, result_file: str | None = None
) -> bool:
    """running | cancelling → succeeded: a cancel that arrives during the last step is too late, the adapter is
    complete. `result_file`: the id of its results CSV (control.results), whose row the caller adds if this
    returns True."""
    job = session.scalar(select(Job).where(Job.id == lease.job_id))
    return _finish(session, lease, LEASED, JobStatus.SUCCEEDED, artifact_key=artifact_key,
                   fine_tuned_model=fine_tuned_model_name(job), trained_tokens=trained_tokens,
                   result_file=result_file)  # fmt: skip


def fail(session: Session, lease: Lease, error: dict[str, Any]) -> bool:
    """running | cancelling → failed, with the OpenAI-shaped `error` ({code, message, param})."""
    return _finish(session, lease, LEASED, JobStatus.FAILED, error=error)


def cancel(session: Session, lease: Lease, *, trained_tokens: int | None = None) -> bool:
    """cancelling → cancelled: the worker stopped at a requested cancel (its last checkpoint kept)."""
    values = {} if trained_tokens is None else {"trained_tokens": trained_tokens}
    return _finish(session, lease, {JobStatus.CANCELLING}, JobStatus.CANCELLED, **values)


def delete_model(session: Session, job_id: str, artifact_key: str) -> bool:
    """A succeeded job's fine-tuned model is deleted (DELETE /v1/models): the job keeps its record and its status,
    and no longer names an artifact (`artifact_key` NULL on a succeeded job means exactly this). Conditional on the
    key it had, so of two concurrent deletes one wins; the caller removes the artifact after the commit."""
    query = update(Job).where(Job.id == job_id, Job.status == JobStatus.SUCCEEDED, Job.artifact_key == artifact_key)
    return bool(session.execute(query.values(artifact_key=None)).rowcount)


def model_deleted(job: Job) -> bool:
    return job.status == JobStatus.SUCCEEDED and job.artifact_key is None


def pause(session: Session, lease: Lease, *, trained_tokens: int | None = None) -> bool:
    """pausing → paused: the worker stopped at a requested pause, its last checkpoint saved, and lets the job go."""
    values = {} if trained_tokens is None else {"trained_tokens": trained_tokens}
    paused = _fenced_update(session, lease, {JobStatus.PAUSING}, status=JobStatus.PAUSED, estimated_finish=None,
                            lease_owner=None, lease_expires_at=None, **values)  # fmt: skip
    if paused:
        _end_attempt(session, lease, AttemptOutcome.PAUSED)
    return paused


def release(session: Session, lease: Lease, *, resend_later_from: float | None = None) -> bool:
    """running → queued: the worker is shutting down mid-job; the redelivered message resumes it from its last
    checkpoint. (A job being cancelled is not released: the caller `cancel`s it instead.)

    `resend_later_from` (a time): the job's message counts as sent then, and nobody sends it now, so the reapers
    send it once it has waited `redeliver_seconds`: how a job that hit a full disk waits for space."""
    later = {} if resend_later_from is None else {"sent_at": resend_later_from}
    released = _fenced_update(session, lease, {JobStatus.RUNNING}, status=JobStatus.QUEUED, estimated_finish=None,
                              lease_owner=None, lease_expires_at=None, **later)  # fmt: skip
    if released:
        _end_attempt(session, lease, AttemptOutcome.RELEASED)
    return released


# --- the reaper's transitions -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpiredLease:
    job_id: str
    owner: str
    expires_at: float
    attempts: int
    status: JobStatus


@dataclass(frozen=True)
class Expiry:
    """What `expire` did: the job's new status and, when it was requeued, how long its retry waits (the caller
    sends the message with that delay)."""

    status: JobStatus
    retry_in: float = 0.0


def expired_leases(session: Session, at: float) -> list[ExpiredLease]:
    rows = session.execute(
        select(Job.id, Job.lease_owner, Job.lease_expires_at, Job.attempts, Job.status).where(
            Job.status.in_(LEASED), Job.lease_expires_at < at
        )
    ).all()
    return [ExpiredLease(i, o, e, a, JobStatus(s)) for i, o, e, a, s in rows]


def expire(session: Session, lease: ExpiredLease, max_attempts: int, at: float, *, backoff_seconds: float = 0.0,
           backoff_max_seconds: float = 0.0) -> Expiry | None:  # fmt: skip
    """Take a job back from a worker whose lease expired: cancelling → cancelled; running → queued, to be resumed
    from its last checkpoint after a backoff, or → failed (`worker_lost`) when this is the `max_attempts`-th lost
    attempt in a row that ended at the same point (the same last checkpoint step: a poison job that takes its
    worker down, as opposed to infrastructure that failed under it, which is always retried). The backoff doubles
    with each loss at the same point: `backoff_seconds`, 2×, 4×, ... up to `backoff_max_seconds`. Conditional on
    the same expired lease, so of several reapers one acts and a lease renewed meanwhile is left alone. Returns
    what it did, or None if this reaper lost."""
    point = session.scalar(select(func.max(Checkpoint.step_number)).where(Checkpoint.job_id == lease.job_id))
    in_a_row = 1 + _lost_at(session, lease.job_id, lease.attempts, point)
    retry_in = 0.0
    if lease.status == JobStatus.CANCELLING:
        target, values = JobStatus.CANCELLED, {"finished_at": int(at)}
    elif lease.status == JobStatus.PAUSING:
        target, values = JobStatus.PAUSED, {}
    elif in_a_row >= max_attempts:
        where = "before its first checkpoint" if point is None else f"after its checkpoint at step {point}"
        error = {
            "code": "worker_lost",
            "message": f"The job's worker stopped unexpectedly {in_a_row} times in a row at the same point ({where}); "
            "it was not retried again.",
            "param": None,
        }
        target, values = JobStatus.FAILED, {"error": error, "finished_at": int(at)}
    else:
        retry_in = min(backoff_seconds * 2 ** (in_a_row - 1), max(backoff_seconds, backoff_max_seconds))
        # `sent_at` is when the delayed message comes due: redelivery counts its wait from then.
        target, values = JobStatus.QUEUED, {"sent_at": at + retry_in}
    won = session.execute(
        update(Job)
        .where(Job.id == lease.job_id, Job.lease_owner == lease.owner, Job.lease_expires_at == lease.expires_at)
        .where(Job.status.in_(LEASED))
        .values(status=target, lease_owner=None, lease_expires_at=None, estimated_finish=None, **values)
    ).rowcount
    if not won:
        return None
    if target in FINISHED:
        _announce(session, lease.job_id, target)
    # The attempt ended at its last write that got through (fenced: nothing of it can land later), not when its
    # lease ran out.
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == lease.job_id, JobAttempt.attempt == lease.attempts, JobAttempt.ended_at.is_(None))
        .values(ended_at=func.coalesce(JobAttempt.last_write_at, lease.expires_at), outcome=AttemptOutcome.LOST,
                checkpoint_step=point)
    )  # fmt: skip
    if target == JobStatus.QUEUED:
        resume = "from the start" if point is None else f"from its checkpoint at step {point}"
        add_event(session, lease.job_id, f"Job restarted: its worker stopped unexpectedly (attempt {lease.attempts}); "
                  f"resuming {resume} in {retry_in:g} s", level="warn",
                  data={"type": "job_restarted", "attempt": lease.attempts})  # fmt: skip
    elif target == JobStatus.FAILED:
        add_event(session, lease.job_id, f"Fine-tuning job failed: {values['error']['message']}", level="error")
    elif target == JobStatus.PAUSED:
        add_event(session, lease.job_id, "Job paused; resume it to continue from its last checkpoint")
    else:
        add_event(session, lease.job_id, "Job cancelled; last checkpoint kept")
    return Expiry(target, retry_in)


def _lost_at(session: Session, job_id: str, before_attempt: int, point: int | None) -> int:
    """How many attempts right before `before_attempt` were lost at checkpoint step `point` (None: none yet)."""
    earlier = session.execute(
        select(JobAttempt.outcome, JobAttempt.checkpoint_step)
        .where(JobAttempt.job_id == job_id, JobAttempt.attempt < before_attempt)
        .order_by(JobAttempt.attempt.desc())
    )
    count = 0
    for outcome, step in earlier:
        if outcome != AttemptOutcome.LOST or step != point:
            break
        count += 1
    return count


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


# --- the UPDATE shapes ------------------------------------------------------------------------------------------


def _held(lease: Lease) -> tuple:
    """The fence: the job is still leased, to this owner, for this attempt. (The attempt number tells apart two
    claims by the same owner name.)"""
    return (Job.id == lease.job_id, Job.lease_owner == lease.owner, Job.attempts == lease.attempt,
            Job.status.in_(LEASED))  # fmt: skip


def _touch(session: Session, lease: Lease) -> None:
    """Remember the attempt's last fenced write: when it really ended, should its worker be lost."""
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == lease.job_id, JobAttempt.attempt == lease.attempt)
        .values(last_write_at=time.time())
    )


def _fenced_update(session: Session, lease: Lease, from_statuses: frozenset | set = LEASED, **values: Any) -> bool:
    query = update(Job).where(*_held(lease), Job.status.in_(from_statuses))
    done = bool(session.execute(query.values(**values)).rowcount)
    if done:
        _touch(session, lease)
    return done


def _update(session: Session, job_id: str, from_statuses: frozenset | set, **values: Any) -> bool:
    query = update(Job).where(Job.id == job_id, Job.status.in_(from_statuses))
    return bool(session.execute(query.values(**values)).rowcount)


def _finish(session: Session, lease: Lease, from_statuses: frozenset | set, status: JobStatus, **values: Any) -> bool:
    done = _fenced_update(session, lease, from_statuses, status=status, finished_at=now(), estimated_finish=None,
                          lease_expires_at=None, **values)  # fmt: skip
    if done:
        _end_attempt(session, lease, AttemptOutcome(status.value))
        _announce(session, lease.job_id, status)
    return done


def _organization(session: Session, job_id: str) -> str:
    return session.scalar(select(Job.organization_id).where(Job.id == job_id))


def _announce(session: Session, job_id: str, status: JobStatus) -> None:
    """The job just reached a final status: its organisation's webhooks hear of it, in the transition's own
    transaction (OpenAI's `fine_tuning.job.succeeded | failed | cancelled`, `data` the job's id). Every move into
    FINISHED goes through here: `_finish`, `cancel_unstarted`, `expire`."""
    webhooks.emit(session, _organization(session, job_id), f"fine_tuning.job.{status.value}", {"id": job_id})


def _end_attempt(session: Session, lease: Lease, outcome: AttemptOutcome) -> None:
    # Its outcome is its last fenced write (`_touch` just recorded it): that is when it ended.
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == lease.job_id, JobAttempt.attempt == lease.attempt, JobAttempt.ended_at.is_(None))
        .values(ended_at=JobAttempt.last_write_at, outcome=outcome)
    )
