"""A worker killed inside a checkpoint write or inside the adapter write leaves a temporary directory beside the
final one; the sweeper removes it, nothing half-written is ever read, and the job, taken back by the reaper,
finishes from its last complete checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from control.storage import Storage, job_key
from control.sweeper import Sweeper
from tests.conftest import classification_rows
from tests.worker.conftest import ORG, ROOT, get_job, insert_job
from worker.lease import reap
from worker.runner import run_job

TWO_EPOCHS = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}  # 16 rows: 8 steps


def run_killed(settings, job_id: str, fault: str) -> None:
    """run_job in a process of its own that SIGKILLs itself at `fault` (worker.faults)."""
    env = {
        **os.environ,
        "NEAT_DATA_DIR": str(settings.data_dir),
        "NEAT_DATABASE_URL": settings.resolved_database_url,
        "NEAT_BROKER_URL": settings.resolved_broker_url,
        "NEAT_DEVICE": "cpu",
        "NEAT_CHECKPOINT_EVERY": "2",
        "NEAT_LEASE_SECONDS": "1",
        "NEAT_FAULT_POINT": fault,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    code = "import sys; from worker.runner import run_job; run_job(sys.argv[1])"
    done = subprocess.run([sys.executable, "-c", code, job_id], cwd=ROOT, env=env, capture_output=True, timeout=300)
    assert done.returncode == -9, done.stderr.decode(errors="replace")[-3000:]


@pytest.mark.parametrize(
    "fault, leftover, kept",
    [
        # killed before its first checkpoint: the lost attempt's folder holds nothing the job keeps
        ("checkpoint:2", "attempt-1/checkpoints/.step-*.tmp", ["attempt-2"]),
        # killed writing the adapter: the second attempt resumed from the first's last checkpoint, which stays
        ("artifact", "attempt-1/.adapter.*.tmp", ["attempt-1", "attempt-2"]),
    ],
)
def test_a_killed_write_is_swept_and_the_job_still_succeeds(settings, tiny_models, fault, leftover, kept):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16), hyperparameters=TWO_EPOCHS)
    run_killed(settings, job_id, fault)
    job_dir = Storage(settings.resolved_artifact_root).path(job_key(ORG, job_id))
    [half_written] = job_dir.glob(leftover)
    assert any(p.is_file() for p in half_written.rglob("*"))  # files written, never renamed into place

    time.sleep(1.1)  # older than the sweeper's age limit below (an hour by default)
    sweeper = Sweeper(settings.model_copy(update={"temp_max_age_seconds": 1.0})).start()  # sweeps at start
    sweeper.stop()
    assert not half_written.exists()
    assert list(job_dir.rglob("*.tmp")) == []

    reaper_settings = settings.model_copy(update={"lease_seconds": 1.0})
    assert job_id in reap(reaper_settings)  # the dead worker's lease expired: queued again
    assert run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    assert (
        job.attempts == 2
        and (Storage(settings.resolved_artifact_root).path(job.artifact_key) / "manifest.json").is_file()
    )
    assert list(job_dir.rglob("*.tmp")) == []

    # Final: the sweep removes the folders of the attempts that lost, but not one holding the job's last checkpoint.
    assert sorted(p.name for p in job_dir.iterdir()) == ["attempt-1", "attempt-2"]
    Sweeper(settings.model_copy(update={"lease_seconds": 0.0})).sweep()  # no grace: the job has just finished
    assert sorted(p.name for p in job_dir.iterdir()) == kept
    assert (Storage(settings.resolved_artifact_root).path(job.artifact_key) / "manifest.json").is_file()
