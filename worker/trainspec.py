"""A job row → the `TrainSpec` neat_core trains: the files it names, its working directory, and the checkpoint an
earlier attempt left there to resume from."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.db import session_scope
from control.events import add_event
from control.orm import File, Job
from control.settings import Settings
from control.storage import Storage, job_key

if TYPE_CHECKING:  # torch-heavy: imported inside train_spec (see worker.runner.run_job)
    from neat_core.train import TrainSpec

SCHEDULE_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier")  # OpenAI's hyperparameters


class FileGone(Exception):
    """A job's training or validation file was deleted after the job was created."""

    code = "file_not_found"

    def __init__(self, field: str, file_id: str):
        self.field = field
        super().__init__(f"{field} '{file_id}' no longer exists; upload it again and create a new job.")


def train_spec(url: str, job_id: str, settings: Settings, storage: Storage) -> TrainSpec:
    from neat_core.train import TrainSpec, checkpoint_step, latest_checkpoint

    with session_scope(url) as session:
        job = session.scalar(select(Job).where(Job.id == job_id))
        training_file = _file_path(session, storage, job, "training_file")
        validation_file = _file_path(session, storage, job, "validation_file") if job.validation_file else None
        adapter = dict(job.adapter)
        method = adapter.pop("type", "neat")
        # "auto" passes through: neat_core resolves it once it has the model and the data.
        schedule = {k: v for k, v in job.hyperparameters.items() if k in SCHEDULE_FIELDS}
        spec = TrainSpec(
            base_model=job.model,
            training_file=training_file,
            validation_file=validation_file,
            output_dir=storage.path(job_key(job.organization_id, job.id)),
            method=method,
            adapter=adapter,
            **schedule,
            seed=job.seed,
            checkpoint_every=settings.checkpoint_every,
            device=settings.device,
            cache_dir=settings.model_cache_dir,
        )
        # A checkpoint in the job's own directory comes from an earlier attempt (a cancel, a lost worker):
        # continue from it rather than start over.
        spec.resume_from = latest_checkpoint(spec.checkpoint_dir)
        if spec.resume_from is not None:
            add_event(session, job.id, f"Resuming from checkpoint at step {checkpoint_step(spec.resume_from)}")
        return spec


def _file_path(session: Session, storage: Storage, job: Job, field: str) -> Path:
    file_id = getattr(job, field)
    row = session.scalar(select(File).where(File.id == file_id, File.organization_id == job.organization_id))
    path = storage.path(row.storage_key) if row is not None else None
    if path is None or not path.is_file():
        raise FileGone(field, file_id)
    return path
