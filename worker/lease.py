"""Job leases: how a job survives a worker that dies without a word (SIGKILL, out of memory, a lost machine).

A worker that claims a job becomes its lease owner until `lease_expires_at`, and a heartbeat thread pushes that
time forward while it trains. Every write that records an outcome is fenced on the lease (`WHERE lease_owner =
me`), so a worker that lost its lease (paused past the expiry, cut off from the database) can no longer change the
job; its heartbeat notices the loss and stops its training at the next step.

The reaper (a thread in every worker process) finds jobs whose lease expired: it puts them back in the queue with
a `job_restarted` event and sends their message again, so the next worker resumes from the last complete
checkpoint; after `max_attempts` claims it fails the job instead. `job_attempts` keeps one row per claim (a lost
one ends when its lease expired), the history that shows no two workers held a job at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from api.db import session_scope
from api.events import add_event
from api.orm import Job, JobAttempt
from api.queue import enqueue
from api.settings import Settings

log = logging.getLogger(__name__)

ACTIVE = ("running", "cancelling")  # a claimed job stays in one of these until its outcome is recorded
_RUN = uuid.uuid4().hex[:8]  # tells apart two runs that reuse a pid


def worker_id() -> str:
    """This process's lease-owner name (host:pid:run; a forked pool child gets its own pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_RUN}"


class Heartbeat:
    """Renews `job_id`'s lease every `settings.heartbeat_seconds` while training runs; `lost` is set once the
    lease is gone (another worker's reaper took the job, or the job left the active states)."""

    def __init__(self, job_id: str, owner: str, settings: Settings):
        self.job_id, self.owner, self.settings = job_id, owner, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_seconds):
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    renewed = session.execute(
                        update(Job)
                        .where(Job.id == self.job_id, Job.lease_owner == self.owner, Job.status.in_(ACTIVE))
                        .values(lease_expires_at=time.time() + self.settings.lease_seconds)
                    ).rowcount
            except SQLAlchemyError:  # the database is away: keep training, try again next beat
                log.warning("job %s: cannot renew the lease (database unavailable); retrying", self.job_id)
                continue
            if not renewed:
                log.error("job %s: lease lost; stopping this worker's training of it", self.job_id)
                self.lost.set()
                return


def claim(session: Any, job_id: str, owner: str, settings: Settings) -> int | None:
    """Claim a queued job for `owner`: one conditional UPDATE decides between racing deliveries. Returns the
    attempt number, or None if the job was not queued."""
    t = time.time()
    claimed = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == "queued")
        .values(
            status="running",
            attempts=Job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=t + settings.lease_seconds,
        )
    ).rowcount
    if not claimed:
        return None
    job = session.scalar(select(Job).where(Job.id == job_id))
    if job.started_at is None:
        job.started_at = int(t)
    session.add(JobAttempt(job_id=job_id, attempt=job.attempts, worker=owner, started_at=t))
    return job.attempts


def end_attempt(session: Any, job_id: str, owner: str, outcome: str, at: float | None = None) -> None:
    session.execute(
        update(JobAttempt)
        .where(JobAttempt.job_id == job_id, JobAttempt.worker == owner, JobAttempt.ended_at.is_(None))
        .values(ended_at=at or time.time(), outcome=outcome)
    )


def reap(settings: Settings) -> list[str]:
    """Requeue (or fail, past `max_attempts`) every active job whose lease has expired, and send again the
    message of every job left queued too long (`redeliver`); returns the ids sent."""
    url = settings.resolved_database_url
    now = time.time()
    with session_scope(url) as session:
        expired = session.execute(
            select(Job.id, Job.lease_owner, Job.lease_expires_at, Job.attempts, Job.status).where(
                Job.status.in_(ACTIVE), Job.lease_expires_at < now
            )
        ).all()
    requeued = []
    for job_id, owner, expires_at, attempts, status in expired:
        with session_scope(url) as session:
            if status == "cancelling":
                values: dict[str, Any] = {"status": "cancelled", "finished_at": int(now)}
            elif attempts >= settings.max_attempts:
                error = {
                    "code": "worker_lost",
                    "message": f"The job's worker stopped unexpectedly {attempts} times; it was not retried again.",
                    "param": None,
                }
                values = {"status": "failed", "error": error, "finished_at": int(now)}
            else:
                values = {"status": "queued", "sent_at": now}
            # Conditional on the same expired lease: of several reapers, one acts; a renewed lease is left alone.
            won = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.lease_owner == owner, Job.lease_expires_at == expires_at)
                .where(Job.status.in_(ACTIVE))
                .values(lease_owner=None, lease_expires_at=None, estimated_finish=None, **values)
            ).rowcount
            if not won:
                continue
            end_attempt(session, job_id, owner, "lost", at=expires_at)
            if values["status"] == "queued":
                add_event(
                    session,
                    job_id,
                    f"Job restarted: its worker stopped unexpectedly (attempt {attempts} of {settings.max_attempts}); "
                    "resuming from the last complete checkpoint",
                    level="warn",
                    data={"type": "job_restarted", "attempt": attempts},
                )
            elif values["status"] == "failed":
                add_event(session, job_id, f"Fine-tuning job failed: {values['error']['message']}", level="error")
            else:
                add_event(session, job_id, "Job cancelled; last checkpoint kept")
        if values["status"] == "queued":
            enqueue(job_id, settings)  # after the commit, so the delivery finds the row queued
            requeued.append(job_id)
        log.warning("job %s: lease of %s expired; now %s", job_id, owner, values["status"])
    return requeued + redeliver(settings, now)


def redeliver(settings: Settings, now: float) -> list[str]:
    """Send again the message of every job queued for `redeliver_seconds` since its message was sent: Redis may
    have lost it (restarted without persistence), or the API could not reach the broker when it created the job.
    A queued job in a long queue gets a duplicate too, which is harmless: the claim is conditional, and a delivery
    that finds the job no longer queued does nothing. Returns the ids sent."""
    url = settings.resolved_database_url
    cutoff = now - settings.redeliver_seconds
    with session_scope(url) as session:
        stale = session.execute(
            # rows from before sent_at existed count as sent when created
            select(Job.id, Job.sent_at).where(
                Job.status == "queued", func.coalesce(Job.sent_at, Job.created_at) < cutoff
            )
        ).all()
    sent = []
    for job_id, sent_at in stale:
        with session_scope(url) as session:  # of several reapers, the one whose conditional update wins sends
            same = Job.sent_at.is_(None) if sent_at is None else Job.sent_at == sent_at
            won = session.execute(
                update(Job).where(Job.id == job_id, Job.status == "queued", same).values(sent_at=now)
            ).rowcount
        if won:
            enqueue(job_id, settings)
            sent.append(job_id)
            log.warning("job %s: queued and not claimed since its message was sent; sent it again", job_id)
    return sent


class Reaper:
    """`reap` every `settings.reaper_seconds` in a daemon thread, for the life of the worker process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-reaper", daemon=True)

    def start(self) -> Reaper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.settings.reaper_seconds):
            try:
                reap(self.settings)
            except (OperationalError, DBAPIError) as e:  # the database is away: try again next round
                log.warning("reaper: database unavailable (%s)", type(e.orig).__name__)
            except Exception:  # the broker is away, or a bug: try again next round
                log.exception("reaper round failed")
