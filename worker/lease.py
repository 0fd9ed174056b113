"""Job leases: how a job survives a worker that dies without a word (SIGKILL, out of memory, a lost machine).

A worker that claims a job becomes its lease owner until `lease_expires_at`, and a heartbeat thread pushes that
time forward while it trains. Every write the worker makes for the job (events, progress, checkpoint rows, the
outcome) is fenced on the lease (control.jobs: `lease_owner = me AND attempts = mine`, in the writing statement),
so a worker that lost its lease (paused past the expiry, cut off from the database) can no longer change the job;
its heartbeat, or its next fenced write, notices the loss and stops its training at once (`LeaseLost`).

The reaper (a thread in every worker process) finds jobs whose lease expired: it puts them back in the queue with
a `job_restarted` event and sends their message again after a backoff, so the next worker resumes from the last
complete checkpoint; a job lost `max_attempts` times in a row at the same checkpoint (a poison job) fails instead.
`job_attempts` keeps one row per claim (a lost one ends at its last fenced write), the history that shows no two
workers held a job at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session

from control import jobs, webhooks
from control.db import session_scope
from control.queue import enqueue, send_webhook
from control.settings import Settings
from worker.metrics import LEASE_RENEWALS, REAPER_REQUEUES

log = logging.getLogger(__name__)

_RUN = uuid.uuid4().hex[:8]  # tells apart two runs that reuse a pid


def worker_id() -> str:
    """This process's lease-owner name (host:pid:run; a forked pool child gets its own pid)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_RUN}"


class Heartbeat:
    """Renews `lease` every `settings.heartbeat_seconds` while training runs; `lost` is set once the lease is gone
    (another worker's reaper took the job, or the job left the active states)."""

    def __init__(self, lease: jobs.Lease, settings: Settings):
        self.lease, self.job_id, self.settings = lease, lease.job_id, settings
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{lease.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def renew_now(self) -> bool:
        """Renew the lease now, from the calling thread; False (and `lost` set) once it is gone. A database that
        is away answers True: the lease may well still be ours, and every write is fenced anyway."""
        if self.lost.is_set():
            return False
        try:
            with session_scope(self.settings.resolved_database_url) as session:
                renewed = jobs.renew_lease(session, self.lease, self.settings.lease_seconds)
        except SQLAlchemyError:
            log.warning("job %s: cannot renew the lease (database unavailable); retrying", self.job_id)
            LEASE_RENEWALS.labels("unavailable").inc()
            return True
        LEASE_RENEWALS.labels("renewed" if renewed else "lost").inc()
        if not renewed:
            log.error("job %s: lease lost; stopping this worker's training of it", self.job_id)
            self.lost.set()
        return renewed

    def _run(self) -> None:
        # the database being away is not a loss: keep training, try again next beat
        while not self._stop.wait(self.settings.heartbeat_seconds):
            if not self.renew_now():
                return


def reap(settings: Settings) -> list[str]:
    """Requeue (after a backoff; or fail, a poison job) every leased job whose lease has expired, and send again
    the message of every job left queued too long (`redeliver`); returns the ids sent."""
    url = settings.resolved_database_url
    now = time.time()
    with session_scope(url) as session:
        expired = jobs.expired_leases(session, now)
    requeued = []
    for lease in expired:
        try:
            with session_scope(url) as session:
                _bounded_lock_wait(session)
                expiry = jobs.expire(session, lease, settings.max_attempts, now,
                                     backoff_seconds=settings.retry_backoff_seconds,
                                     backoff_max_seconds=settings.retry_backoff_max_seconds)  # fmt: skip
                devices = jobs.devices_of(session, lease.job_id)
        except OperationalError as e:
            if getattr(e.orig, "sqlstate", None) != LOCK_NOT_AVAILABLE:
                raise
            log.warning("job %s: its row is locked by a transaction that does not end (a worker paused inside a "
                        "write?); trying again next round", lease.job_id)  # fmt: skip
            continue
        if expiry is None:  # another reaper acted, or the lease was renewed meanwhile
            continue
        if expiry.status == jobs.JobStatus.QUEUED:
            # after the commit, so the delivery finds the row queued
            enqueue(lease.job_id, settings, delay=expiry.retry_in, n_devices=devices)
            requeued.append(lease.job_id)
            REAPER_REQUEUES.labels("lease_expired").inc()
        log.warning("job %s: lease of %s expired; now %s", lease.job_id, lease.owner, expiry.status)
    redeliver_webhooks(settings, now)
    return requeued + redeliver(settings, now)


LOCK_NOT_AVAILABLE = "55P03"  # Postgres: lock_timeout ran out
REAPER_LOCK_WAIT = "5s"


def _bounded_lock_wait(session: Session) -> None:
    """A worker paused (SIGSTOP) in the middle of one of its writes keeps the job's row locked for as long as it is
    paused: on Postgres, wait for such a lock at most REAPER_LOCK_WAIT, so that one stuck row does not stop this
    reaper from taking back every other expired job. (SQLite: its busy timeout bounds every wait already.)"""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text(f"SET LOCAL lock_timeout = '{REAPER_LOCK_WAIT}'"))


def redeliver(settings: Settings, now: float) -> list[str]:
    """Send again the message of every job queued for `redeliver_seconds` since its message was sent: Redis may
    have lost it (restarted without persistence), or the API could not reach the broker when it created the job.
    A queued job in a long queue gets a duplicate too, which is harmless: the claim is conditional, and a delivery
    that finds the job no longer queued does nothing. Returns the ids sent."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        stale = jobs.unsent_queued(session, now - settings.redeliver_seconds)
    sent = []
    for job_id, sent_at in stale:
        with session_scope(url) as session:  # of several reapers, the one whose conditional update wins sends
            won = jobs.mark_resent(session, job_id, sent_at, now)
            devices = jobs.devices_of(session, job_id)
        if won:
            enqueue(job_id, settings, n_devices=devices)
            sent.append(job_id)
            REAPER_REQUEUES.labels("unsent").inc()
            log.warning("job %s: queued and not claimed since its message was sent; sent it again", job_id)
    return sent


def redeliver_webhooks(settings: Settings, now: float) -> list[str]:
    """Send again the message of every webhook delivery overdue by `webhooks_redeliver_seconds` (its message, or
    the worker of its attempt, was lost); of several reapers, the one whose conditional update wins sends it.
    Returns the ids sent."""
    url = settings.resolved_database_url
    with session_scope(url) as session:
        stale = webhooks.overdue(session, now - settings.webhooks_redeliver_seconds)
    sent = []
    for delivery_id, due in stale:
        with session_scope(url) as session:
            won = webhooks.mark_resent(session, delivery_id, due, now)
        if won:
            send_webhook(delivery_id, settings)
            sent.append(delivery_id)
            log.warning("webhook delivery %s: overdue since its message was sent; sent it again", delivery_id)
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
