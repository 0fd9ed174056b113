"""The worker against a real SQLite database (migrated with Alembic), a real storage directory and tiny models.
Rows are inserted directly, as the API would leave them after creating a job."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from control.db import session_scope
from control.ids import new_id
from control.migrate import upgrade
from control.orm import File, Job, JobEvent, Organization
from control.settings import Settings
from control.storage import Storage, file_key
from neat_core.data.formats import DataFormat
from tests.conftest import classification_rows, preference_rows

ORG = "org-test"
ROOT = Path(__file__).resolve().parents[2]


def make_settings(data_dir: Path, **kw) -> Settings:
    """Explicit URLs, so that a DATABASE_URL or BROKER_URL in the environment cannot point a test elsewhere."""
    data_dir.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        data_dir=data_dir,
        NEAT_DATABASE_URL=f"sqlite:///{data_dir.resolve() / 'neat.sqlite'}",
        NEAT_BROKER_URL=f"sqla+sqlite:///{data_dir.resolve() / 'broker.sqlite'}",
        device="cpu",
        checkpoint_every=2,
        **kw,
    )
    upgrade(settings.resolved_database_url)
    with session_scope(settings.resolved_database_url) as session:
        session.add(Organization(id=ORG, name="Test org"))
    return settings


@pytest.fixture
def settings(tmp_path) -> Settings:
    return make_settings(tmp_path / "data")


def store_file(settings: Settings, rows: list[dict], fmt: str) -> str:
    """Write a JSONL file through Storage and its File row; returns the file id."""
    storage = Storage(settings.resolved_artifact_root)
    data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    temp = storage.temp_path()
    temp.write_bytes(data)
    file_id = new_id("file")
    key = file_key(ORG, file_id)
    storage.commit(temp, key)
    with session_scope(settings.resolved_database_url) as session:
        session.add(File(id=file_id, organization_id=ORG, filename=f"{fmt}.jsonl", purpose="fine-tune",
                         bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), format=fmt,
                         num_examples=len(rows), storage_key=key))  # fmt: skip
    return file_id


def insert_job(settings: Settings, model: Path, rows: list[dict], *, fmt: str = "classification",
               validation_rows: list[dict] | None = None, status: str = "queued", **kw) -> str:  # fmt: skip
    """A job row as the API leaves it once queued; returns the job id."""
    training = store_file(settings, rows, fmt)
    validation = store_file(settings, validation_rows, fmt) if validation_rows else None
    job = Job(
        id=new_id("ftjob"),
        organization_id=ORG,
        model=str(model),
        task=DataFormat(fmt).task,
        training_file=training,
        validation_file=validation,
        suffix="tiny",
        seed=0,
        hyperparameters={"n_epochs": 1, "batch_size": 4, "learning_rate_multiplier": "auto"},
        adapter={"type": "neat", "r": 4},
        status=status,
    )
    for name, value in kw.items():
        setattr(job, name, value)
    with session_scope(settings.resolved_database_url) as session:
        session.add(job)
    return job.id


TWO_EPOCHS = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}  # 16 rows: 8 steps


def sixteen_rows(tiny_models, objective: str) -> dict:
    """insert_job's arguments for a job of 16 rows and TWO_EPOCHS (8 steps): a supervised classifier, or a DPO job
    on preference pairs (the tiny causal LM; "dpo" in the row's method_type, beta in its hyperparameters)."""
    if objective == "dpo":
        return {"model": tiny_models["llama"], "rows": preference_rows(16), "fmt": "preference",
                "method_type": "dpo", "hyperparameters": {**TWO_EPOCHS, "beta": 0.5}}  # fmt: skip
    return {"model": tiny_models["bert"], "rows": classification_rows(16), "hyperparameters": TWO_EPOCHS}


def get_job(settings: Settings, job_id: str) -> Job:
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(Job).where(Job.id == job_id))


def get_events(settings: Settings, job_id: str) -> list[JobEvent]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)))


def start_worker(settings: Settings, log: Path, pool: str = "solo", **env: str) -> subprocess.Popen:
    """A `celery worker` process (solo pool, unless `pool` says otherwise) on `settings`' database, broker and queue,
    logging to `log`; `env` adds or overrides NEAT_* variables. It runs in a session of its own, so its whole process
    group can be stopped."""
    environment = {
        **os.environ,
        "NEAT_DATA_DIR": str(settings.data_dir),
        "NEAT_DATABASE_URL": settings.resolved_database_url,
        "NEAT_BROKER_URL": settings.resolved_broker_url,
        "NEAT_QUEUE": settings.queue,
        "NEAT_DEVICE": "cpu",
        "NEAT_CHECKPOINT_EVERY": "2",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", f"--pool={pool}", "--concurrency=1",
               "-Q", settings.queue, "--loglevel=INFO", "--without-gossip", "--without-mingle",
               "--without-heartbeat"]  # fmt: skip
    with open(log, "ab") as out:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stdout=out, stderr=out, start_new_session=True)
