"""A job row → the `TrainSpec` neat_core trains: the files it names, its attempt's working directory, and the
checkpoint an earlier attempt left to resume from.

Each attempt works in a folder of its own, `<org>/jobs/<job>/attempt-<n>/` (checkpoints/ and adapter/), so a
worker that lost its lease while paused and resumes cannot write into its successor's folder. An attempt resumes
from the newest checkpoint any earlier attempt *recorded* (a `checkpoints` row, written fenced on its lease, whose
directory is complete on disk): a directory a zombie finished after the hand-over has no row and is never read.
Once the job is final, the folders of the attempts that lost are removed (control.attempts)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.orm import Session

from control import jobs, models
from control.attempts import attempt_key
from control.db import with_retries
from control.orm import Checkpoint, File, Job
from control.settings import Settings
from control.storage import Storage

if TYPE_CHECKING:  # torch-heavy: imported inside train_spec (see worker.runner.run_job)
    from neat_core.train import TrainSpec

# OpenAI's hyperparameters, and ours: activation checkpointing (on a job's row only when given, and among the
# resolved ones only when on) and the device count (on the row and among the resolved ones only when above 1)
SCHEDULE_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier", "gradient_checkpointing", "n_devices")


class FileGone(Exception):
    """A job's training or validation file (or its registered base model) was removed after the job was created."""

    code = "file_not_found"

    def __init__(self, field: str, file_id: str):
        self.field = field
        super().__init__(f"{field} '{file_id}' no longer exists; upload it again and create a new job.")


class BaseModelGone(FileGone):
    code = "model_not_found"

    def __init__(self, model_id: str):
        self.field = "model"
        Exception.__init__(
            self, f"The base model '{model_id}' was removed from this service after the job was created."
        )


def train_spec(url: str, lease: jobs.Lease, settings: Settings, storage: Storage) -> TrainSpec:
    """The job's TrainSpec, read in one transaction that is run again while the database is away (a restart
    right after the claim must not fail the job: the chaos soak caught exactly that)."""
    return with_retries(url, lambda session: _train_spec(session, lease, settings, storage))


def _train_spec(session: Session, lease: jobs.Lease, settings: Settings, storage: Storage) -> TrainSpec:
    from neat_core.train import TrainSpec, checkpoint_step

    job = session.scalar(select(Job).where(Job.id == lease.job_id))
    try:
        base_dir = models.loads_from(session, job.model)  # a registered model's directory (control.models)
    except LookupError:
        raise BaseModelGone(job.model) from None
    training_file = _file_path(session, storage, job, "training_file")
    validation_file = _file_path(session, storage, job, "validation_file") if job.validation_file else None
    adapter = dict(job.adapter)
    method = adapter.pop("type", "neat")
    # "auto" passes through: neat_core resolves it once it has the model and the data.
    schedule = {k: v for k, v in job.hyperparameters.items() if k in SCHEDULE_FIELDS}
    # a dpo job trains on its preference pairs against the base model (its adapter off), at its beta
    objective = {}
    if job.method_type == "dpo":
        objective = {"objective": "dpo", "beta": job.hyperparameters.get("beta", "auto")}
    spec = TrainSpec(
        base_model=job.model,
        training_file=training_file,
        validation_file=validation_file,
        output_dir=storage.path(attempt_key(job.organization_id, job.id, lease.attempt)),
        method=method,
        adapter=adapter,
        **schedule,
        **objective,
        seed=job.seed,
        checkpoint_every=settings.checkpoint_every,
        device=settings.device,
        cache_dir=settings.model_cache_dir,
        base_model_dir=Path(base_dir) if base_dir else None,
    )
    # A checkpoint an earlier attempt recorded (a lost worker, a worker that shut down): continue from it
    # rather than start over.
    spec.resume_from = _resume_point(session, storage, job.id)
    if spec.resume_from is not None:
        message = f"Resuming from checkpoint at step {checkpoint_step(spec.resume_from)}"
        if not jobs.add_fenced_event(session, lease, message):
            raise jobs.LeaseLost(lease)
    return spec


def _resume_point(session: Session, storage: Storage, job_id: str) -> Path | None:
    """The newest recorded checkpoint of the job whose directory is complete (a rename makes it so)."""
    rows = session.scalars(
        select(Checkpoint.storage_key)
        .where(Checkpoint.job_id == job_id, Checkpoint.pruned.is_(False))
        .order_by(Checkpoint.step_number.desc(), Checkpoint.seq.desc())
    )
    for key in rows:
        path = storage.path(key)
        if (path / "state.json").is_file():
            return path
    return None


def _file_path(session: Session, storage: Storage, job: Job, field: str) -> Path:
    file_id = getattr(job, field)
    row = session.scalar(select(File).where(File.id == file_id, File.organization_id == job.organization_id))
    path = storage.path(row.storage_key) if row is not None else None
    if path is None or not path.is_file():
        raise FileGone(field, file_id)
    return path
