"""One fine-tuning job from start to finish: claim the row → build the TrainSpec → train → record the outcome.

The database row is the truth. Every transition, and every other write for the job, is conditional on the row's
status and on this worker's lease (control.jobs), so the worker never overwrites a state someone else set (the
API's cancel, a reaper that gave the job to another worker). A worker that finds its lease gone stops at once and
records nothing. A training failure is recorded on the job and never raised: the task returns
normally, its message is acked, and the worker takes the next job.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from control import jobs, results
from control.db import session_scope, with_retries
from control.events import add_event
from control.ids import new_id
from control.jobs import JobStatus
from control.orm import File, Job
from control.queue import enqueue
from control.settings import Settings, get_settings
from control.storage import Storage, no_space
from neat_core.errors import NeatCoreError
from worker import faults
from worker.fit import check_fits
from worker.lease import Heartbeat, worker_id
from worker.trainspec import FileGone, train_spec

if TYPE_CHECKING:  # torch-heavy: imported inside the task (see run_job)
    from neat_core.train import TrainResult

log = logging.getLogger(__name__)


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Train job `job_id` if it is still queued; returns its final status, or "skipped"."""
    settings = settings or get_settings()
    url = settings.resolved_database_url
    storage = Storage(settings.resolved_artifact_root)
    wanted = with_retries(url, lambda session: jobs.devices_of(session, job_id))
    if wanted > settings.worker_devices:  # sent to a queue this worker should not consume: left for one that can
        log.warning("job %s needs %d devices, this worker has %d; leaving it queued", job_id, wanted,
                    settings.worker_devices)  # fmt: skip
        return "skipped"
    lease = _claim(url, job_id, worker_id(), settings)
    if lease is None:
        log.info("job %s is not queued (duplicate delivery, or cancelled before it started); skipping", job_id)
        return "skipped"
    try:
        with Heartbeat(lease, settings) as heartbeat:  # from the claim on: importing torch takes seconds
            faults.reached("claimed", settings)
            check_fits(url, lease, settings)  # before torch and the model: a job that cannot fit fails now
            # torch comes in with these: imported per task, never when the worker starts (see worker.app).
            from neat_core.train import train
            from worker.progress import DbProgress, LeaseWatch, StepMetrics

            spec = train_spec(url, lease, settings, storage)
            # LeaseWatch first: once the lease is gone, no other callback writes anything
            callbacks = [LeaseWatch(heartbeat), DbProgress(lease, url, storage), StepMetrics(),
                         *faults.callbacks(settings)]  # fmt: skip
            result = train(spec, callbacks=callbacks)
        if heartbeat.lost.is_set():
            raise jobs.LeaseLost(lease)
        faults.reached("trained", settings)
    except jobs.LeaseLost:  # another worker has the job now: record nothing (every write would be refused anyway)
        log.warning("job %s: lease lost (attempt %s); leaving the job to its new worker", job_id, lease.attempt)
        return "lost"
    except (NeatCoreError, FileGone) as e:  # the data or the request is at fault: tell the user what and where
        log.warning("job %s failed: %s", job_id, e)
        error = {"code": e.code, "message": str(e), "param": getattr(e, "field", None)}
        return _failed(url, lease, error)
    except Exception as e:  # a bug, or out of memory: the job fails, the worker lives on
        if no_space(e):  # not the job's fault: it waits for space and resumes from its last checkpoint
            return _out_of_space(url, lease, settings, e)
        log.exception("job %s failed", job_id)
        error = {"code": "training_error", "message": f"{type(e).__name__}: {e}", "param": None}
        return _failed(url, lease, error)
    except BaseException:
        # The worker is shutting down mid-job. With late acks the message goes back to the broker; put the row
        # back in the queue too, so that the redelivery can claim it and resume from the last checkpoint.
        _release(url, lease)
        raise
    if result.cancelled:  # stopped at a requested cancel or pause
        return _stopped(url, lease, result, settings)
    try:
        results = _results_file(url, lease, storage, result)
    except OSError as e:
        if no_space(e):  # the adapter is complete; the job resumes from its last checkpoint once there is space
            return _out_of_space(url, lease, settings, e)
        raise
    return _succeeded(url, lease, storage, result, results)


def _claim(url: str, job_id: str, owner: str, settings: Settings) -> jobs.Lease | None:
    # One statement decides: of two deliveries of the same id, or a claim racing the API's cancel, one wins.
    def write(session: Session) -> int | None:
        attempt = jobs.claim(session, job_id, owner, settings.lease_seconds)
        if attempt == 1:
            add_event(session, job_id, "Fine-tuning job started")
        elif attempt is not None:
            add_event(session, job_id, f"Fine-tuning job started again (attempt {attempt})")
        return attempt

    attempt = with_retries(url, write)
    return None if attempt is None else jobs.Lease(job_id, owner, attempt)


def _recorded(session: Session, job_id: str, done: bool, status: JobStatus, message: str, *, level: str = "info",
              data: dict | None = None) -> str:  # fmt: skip
    """The event of an outcome this worker recorded (in the transaction whose fenced UPDATE holds the job row
    locked, so it is fenced too); or, when its transition lost (the job was cancelled or taken back meanwhile), a
    log line and the status someone else set."""
    if done:
        add_event(session, job_id, message, level=level, data=data)
        return status
    current = jobs.status_of(session, job_id)
    log.warning("job %s is %s; this worker's %s outcome was not recorded", job_id, current, status)
    return current


def _results_file(url: str, lease: jobs.Lease, storage: Storage, result: TrainResult) -> dict[str, Any]:
    """The job's results CSV (control.results), written into this attempt's folder beside its adapter (so that a
    lost attempt's file goes with its folder); the values of its `files` row, added with the job's success."""

    def read(session: Session) -> tuple[dict, str]:
        owner = session.scalar(select(Job.organization_id).where(Job.id == lease.job_id))
        return results.metrics_by_step(session, lease.job_id), owner

    steps, organization = with_retries(url, read)
    body = results.results_csv(steps)
    temp = storage.temp_path()
    try:
        temp.write_bytes(body)
        path = storage.commit(temp, storage.key(result.adapter_dir.parent) + "/" + results.FILENAME)
    finally:
        temp.unlink(missing_ok=True)
    return dict(id=new_id("file"), organization_id=organization, filename=results.FILENAME,
                purpose=results.PURPOSE, bytes=len(body), sha256=hashlib.sha256(body).hexdigest(), format="csv",
                num_examples=len(steps), storage_key=storage.key(path))  # fmt: skip


def _succeeded(url: str, lease: jobs.Lease, storage: Storage, result: TrainResult, results_file: dict) -> str:
    def write(session: Session) -> str:
        done = jobs.succeed(session, lease, artifact_key=storage.key(result.adapter_dir),
                            trained_tokens=result.trained_tokens, result_file=results_file["id"])  # fmt: skip
        if done:
            session.add(File(**results_file))
        data = {"step": result.steps, **result.metrics}
        return _recorded(
            session, lease.job_id, done, JobStatus.SUCCEEDED, "The job has successfully completed", data=data
        )

    return with_retries(url, write)


def _stopped(url: str, lease: jobs.Lease, result: TrainResult, settings: Settings) -> str:
    """The training stopped where it was asked to (its checkpoint saved): a cancel, or a pause; or a pause that was
    withdrawn (resumed) after the worker saw it, which puts the job back in the queue to continue."""

    def write(session: Session) -> str:
        if jobs.cancel(session, lease, trained_tokens=result.trained_tokens):
            message = f"Job cancelled at step {result.steps}; last checkpoint kept"
            return _recorded(session, lease.job_id, True, JobStatus.CANCELLED, message)
        if jobs.pause(session, lease, trained_tokens=result.trained_tokens):
            message = f"Job paused at step {result.steps}; resume it to continue from there"
            return _recorded(session, lease.job_id, True, JobStatus.PAUSED, message)
        if jobs.release(session, lease):
            message = f"The pause was withdrawn; the job continues from step {result.steps}"
            return _recorded(session, lease.job_id, True, JobStatus.QUEUED, message)
        return _recorded(session, lease.job_id, False, JobStatus.CANCELLED, "")

    status = with_retries(url, write)
    if status == JobStatus.QUEUED:
        try:
            enqueue(lease.job_id, settings, n_devices=jobs.n_devices(result.hyperparameters))
        except Exception:  # noqa: BLE001  (the row is queued; the reapers resend it after `redeliver_seconds`)
            log.exception("could not enqueue %s", lease.job_id)
    return status


def _failed(url: str, lease: jobs.Lease, error: dict[str, Any]) -> str:
    def write(session: Session) -> str:
        done = jobs.fail(session, lease, error)
        message = f"Fine-tuning job failed: {error['message']}"
        return _recorded(session, lease.job_id, done, JobStatus.FAILED, message, level="error")

    return with_retries(url, write)


def _out_of_space(url: str, lease: jobs.Lease, settings: Settings, e: Exception) -> str:
    """The storage volume filled up (a checkpoint, the adapter, or anything else written): put the job back in the
    queue, to be sent again after `redeliver_seconds`, when it resumes from its last complete checkpoint (a write
    cut short by the full disk removed its own temporary directory, and a half-written one is never read). After
    `max_attempts` claims it fails with `storage_full`, not `training_error`: retrying it then succeeds."""
    job_id, attempt = lease.job_id, lease.attempt
    log.error("job %s: the storage volume is full (%s)", job_id, e)
    if attempt >= settings.max_attempts:
        message = f"The service's storage stayed full over {attempt} attempts; retry the job later."
        error = {"code": "storage_full", "message": message, "param": None}
        return _failed(url, lease, error)

    def write(session: Session) -> str:
        if jobs.release(session, lease, resend_later_from=time.time()):
            add_event(session, job_id, "The service's storage is full; the job is queued again and will resume "
                      f"from its last checkpoint in about {settings.redeliver_seconds:g} seconds", level="warn",
                      data={"type": "storage_full", "attempt": attempt})  # fmt: skip
            return JobStatus.QUEUED
        return _recorded(session, job_id, False, JobStatus.QUEUED, "")

    return with_retries(url, write)


def _release(url: str, lease: jobs.Lease) -> None:
    with session_scope(url) as session:
        if jobs.release(session, lease):
            add_event(session, lease.job_id, "Worker stopped mid-job; the job is queued again", level="warn")
        elif jobs.pause(session, lease):  # it was being paused anyway
            add_event(session, lease.job_id, "Job paused; resume it to continue from its last checkpoint")
        else:  # it was being cancelled anyway
            done = jobs.cancel(session, lease)
            _recorded(session, lease.job_id, done, JobStatus.CANCELLED, "Job cancelled; last checkpoint kept")
