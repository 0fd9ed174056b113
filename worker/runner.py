"""One fine-tuning job from start to finish: claim the row → build the TrainSpec → train → record the outcome.

The database row is the truth. Every transition is a conditional UPDATE on the row's status and on this worker's
lease (worker.lease), so the worker never overwrites a state someone else set (the API's cancel, a reaper that
gave the job to another worker). A training failure is recorded on the job and never raised: the task returns
normally, its message is acked, and the worker takes the next job.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.db import session_scope, with_retries
from api.events import add_event
from api.ids import now
from api.orm import File, Job
from api.schemas import fine_tuned_model_name
from api.settings import Settings, get_settings
from api.storage import Storage, job_key
from neat_core.errors import NeatCoreError
from worker import faults
from worker.lease import ACTIVE, Heartbeat, claim, end_attempt, worker_id

if TYPE_CHECKING:  # torch-heavy: imported inside the task (see run_job)
    from neat_core.train import TrainResult, TrainSpec

log = logging.getLogger(__name__)

SCHEDULE_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")  # OpenAI's hyperparameters


class FileGone(Exception):
    """A job's training or validation file was deleted after the job was created."""

    code = "file_not_found"

    def __init__(self, field: str, file_id: str):
        self.field = field
        super().__init__(f"{field} '{file_id}' no longer exists; upload it again and create a new job.")


def run_job(job_id: str, settings: Settings | None = None) -> str:
    """Train job `job_id` if it is still queued; returns its final status, or "skipped"."""
    settings = settings or get_settings()
    url = settings.resolved_database_url
    storage = Storage(settings.resolved_artifact_root)
    owner = worker_id()
    if not _claim(url, job_id, owner, settings):
        log.info("job %s is not queued (duplicate delivery, or cancelled before it started); skipping", job_id)
        return "skipped"
    try:
        with Heartbeat(job_id, owner, settings) as heartbeat:  # from the claim on: importing torch takes seconds
            faults.reached("claimed", settings)
            # torch comes in with these: imported per task, never when the worker starts (see worker.app).
            from neat_core.train import train
            from worker.progress import DbProgress, LeaseWatch

            spec = _train_spec(url, job_id, settings, storage)
            callbacks = [DbProgress(job_id, url, storage), LeaseWatch(heartbeat), *faults.callbacks(settings)]
            result = train(spec, callbacks=callbacks)
        if heartbeat.lost.is_set():  # another worker has the job now: record nothing
            log.warning("job %s: lease lost during training; leaving the job to its new worker", job_id)
            return "lost"
        faults.reached("trained", settings)
    except (NeatCoreError, FileGone) as e:  # the data or the request is at fault: tell the user what and where
        log.warning("job %s failed: %s", job_id, e)
        error = {"code": e.code, "message": str(e), "param": getattr(e, "field", None)}
        return _failed(url, job_id, owner, error)
    except Exception as e:  # a bug, or out of memory: the job fails, the worker lives on
        log.exception("job %s failed", job_id)
        error = {"code": "training_error", "message": f"{type(e).__name__}: {e}", "param": None}
        return _failed(url, job_id, owner, error)
    except BaseException:
        # The worker is shutting down mid-job. With late acks the message goes back to the broker; put the row
        # back in the queue too, so that the redelivery can claim it and resume from the last checkpoint.
        _release(url, job_id, owner)
        raise
    if result.status == "cancelled":
        return _cancelled(url, job_id, owner, result)
    return _succeeded(url, job_id, owner, result)


def _claim(url: str, job_id: str, owner: str, settings: Settings) -> bool:
    # One statement decides: of two deliveries of the same id, or a claim racing the API's cancel, one wins.
    def write(session: Session) -> int | None:
        attempt = claim(session, job_id, owner, settings)
        if attempt == 1:
            add_event(session, job_id, "Fine-tuning job started")
        elif attempt is not None:
            add_event(session, job_id, f"Fine-tuning job started again (attempt {attempt} of {settings.max_attempts})")
        return attempt

    return with_retries(url, write) is not None


def _train_spec(url: str, job_id: str, settings: Settings, storage: Storage) -> TrainSpec:
    from neat_core.train import TrainSpec, latest_checkpoint

    with session_scope(url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        training_file = _file_path(session, storage, job, "training_file")
        validation_file = _file_path(session, storage, job, "validation_file") if job.validation_file else None
        output_dir = storage.path(job_key(job.organization_id, job.id))
        # A checkpoint in the job's own directory comes from an earlier attempt (a cancel, a lost worker):
        # continue from it rather than start over.
        resume_from = latest_checkpoint(output_dir / "checkpoints")
        if resume_from is not None:
            step = int(resume_from.name.rpartition("-")[2])  # neat_core names them step-<step>
            add_event(session, job.id, f"Resuming from checkpoint at step {step}")
        adapter = dict(job.adapter)
        method = adapter.pop("type", "neat")
        # "auto" passes through: neat_core resolves it once it has the model and the data.
        schedule = {k: v for k, v in job.hyperparameters.items() if k in SCHEDULE_FIELDS}
        return TrainSpec(
            base_model=job.model,
            training_file=training_file,
            validation_file=validation_file,
            output_dir=output_dir,
            method=method,
            adapter=adapter,
            **schedule,
            seed=job.seed,
            checkpoint_every=settings.checkpoint_every,
            device=settings.device,
            cache_dir=settings.model_cache_dir,
            resume_from=resume_from,
        )


def _file_path(session: Session, storage: Storage, job: Job, field: str) -> Path:
    file_id = getattr(job, field)
    row = session.scalar(select(File).where(File.id == file_id, File.organization_id == job.organization_id))
    path = storage.path(row.storage_key) if row is not None else None
    if path is None or not path.is_file():
        raise FileGone(field, file_id)
    return path


def _finish(session: Session, job_id: str, owner: str, from_status: tuple[str, ...], values: dict[str, Any],
            message: str, *, level: str = "info", data: dict | None = None) -> str:  # fmt: skip
    """Record an outcome if the row is still in one of `from_status` and this worker still holds its lease;
    returns the job's status afterwards."""
    done = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(from_status), Job.lease_owner == owner)
        .values(finished_at=now(), estimated_finish=None, lease_expires_at=None, **values)
    ).rowcount
    if done:
        end_attempt(session, job_id, owner, values["status"])
        add_event(session, job_id, message, level=level, data=data)
        return values["status"]
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    log.warning("job %s is %s, not %s for this worker; its %s outcome was not recorded", job_id, status,
                from_status, values["status"])  # fmt: skip
    return status


def _succeeded(url: str, job_id: str, owner: str, result: TrainResult) -> str:
    def write(session: Session) -> str:
        job = session.scalar(select(Job).where(Job.id == job_id))
        values = {
            "status": "succeeded",
            "artifact_key": f"{job_key(job.organization_id, job.id)}/adapter",
            "fine_tuned_model": fine_tuned_model_name(job),
            "trained_tokens": result.trained_tokens,
        }
        # A cancel that arrives during the last step is too late: the adapter is complete, so the job succeeded.
        data = {"step": result.steps, **result.metrics}
        return _finish(session, job_id, owner, ACTIVE, values, "The job has successfully completed", data=data)

    return with_retries(url, write)


def _cancelled(url: str, job_id: str, owner: str, result: TrainResult) -> str:
    values = {"status": "cancelled", "trained_tokens": result.trained_tokens}
    message = f"Job cancelled at step {result.steps}; last checkpoint kept"
    return with_retries(url, lambda session: _finish(session, job_id, owner, ("cancelling",), values, message))


def _failed(url: str, job_id: str, owner: str, error: dict[str, Any]) -> str:
    values = {"status": "failed", "error": error}
    message = f"Fine-tuning job failed: {error['message']}"
    return with_retries(url, lambda session: _finish(session, job_id, owner, ACTIVE, values, message, level="error"))


def _release(url: str, job_id: str, owner: str) -> None:
    with session_scope(url) as session:
        requeued = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.lease_owner == owner)
            .values(status="queued", estimated_finish=None, lease_owner=None, lease_expires_at=None)
        ).rowcount
        if requeued:
            end_attempt(session, job_id, owner, "released")
            add_event(session, job_id, "Worker stopped mid-job; the job is queued again", level="warn")
        else:  # it was being cancelled anyway
            values = {"status": "cancelled"}
            _finish(session, job_id, owner, ("cancelling",), values, "Job cancelled; last checkpoint kept")
