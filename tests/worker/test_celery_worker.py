"""A real `celery worker` process on kombu's SQLite transport, as the embedded deployment runs it: a job id goes in
through `control.queue.enqueue`, the row comes out succeeded, and a duplicate message trains nothing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from control import queue
from control.settings import get_settings
from control.storage import Storage
from tests.conftest import chat_rows, classification_rows
from tests.worker.conftest import get_events, get_job, insert_job, make_settings, start_worker

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT = 120
TASK_DONE = re.compile(r"Task neat\.train_job\[[^\]]+\] succeeded in")  # celery's line for a finished task (its
# "received" line starts the same way: counting that too let a test read the log before a delivery had been handled)


@pytest.fixture(scope="module")
def settings(tmp_path_factory):
    return make_settings(tmp_path_factory.mktemp("celery") / "data")


@pytest.fixture(scope="module")
def worker_log(settings) -> Path:
    """One worker for the module (its start is most of the cost); stopped with its whole process group."""
    log_path = settings.data_dir / "worker.log"
    proc = start_worker(settings, log_path)
    try:
        # Wait until it is consuming: it declares the queue (creating the broker's tables) before we publish.
        wait_for(lambda: "ready." in log_path.read_text(), 60, "the worker to start", proc, log_path)
        yield log_path
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
def enqueue(settings, worker_log, monkeypatch):
    # control.queue builds its client from get_settings(), which creates its data dir: keep that inside the test's.
    monkeypatch.setenv("NEAT_DATA_DIR", str(settings.data_dir))
    get_settings.cache_clear()
    yield lambda job_id: queue.enqueue(job_id, settings)
    get_settings.cache_clear()


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.5)
    tail = log.read_text()[-3000:] if log is not None else ""
    pytest.fail(f"gave up waiting for {what}\n{tail}")


def wait_until_finished(settings, job_id: str, log: Path) -> str:
    def finished() -> str | None:
        status = get_job(settings, job_id).status
        return status if status in ("succeeded", "failed", "cancelled") else None

    return wait_for(finished, JOB_TIMEOUT, f"{job_id} to finish", log=log)


def tasks_done(log: Path) -> int:
    return len(TASK_DONE.findall(log.read_text()))


def test_worker_modules_import_no_torch(tmp_path):
    # A prefork pool forks after importing the task modules; children must not inherit torch's thread pools.
    code = "import sys, worker.app, worker.tasks; assert 'torch' not in sys.modules"
    env = {**os.environ, "NEAT_DATA_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=60)


def test_enqueued_job_is_trained_by_the_worker(settings, tiny_models, worker_log, enqueue):
    job_id = insert_job(settings, tiny_models["llama"], chat_rows(12), fmt="chat", validation_rows=chat_rows(4))
    enqueue(job_id)

    status = wait_until_finished(settings, job_id, worker_log)
    job = get_job(settings, job_id)
    assert status == "succeeded", job.error
    assert job.attempts == 1 and job.trained_tokens > 0
    assert (Storage(settings.resolved_artifact_root).path(job.artifact_key) / "manifest.json").is_file()
    metrics = [e.data for e in get_events(settings, job_id) if e.type == "metrics"]
    assert any("train_mean_token_accuracy" in m for m in metrics) and any(
        "full_valid_mean_token_accuracy" in m for m in metrics
    )


def test_a_job_enqueued_twice_is_trained_once(settings, tiny_models, worker_log, enqueue):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(12))
    done_before = tasks_done(worker_log)
    enqueue(job_id)
    enqueue(job_id)

    assert wait_until_finished(settings, job_id, worker_log) == "succeeded"
    wait_for(lambda: tasks_done(worker_log) >= done_before + 2, 30, "the second delivery", log=worker_log)
    job = get_job(settings, job_id)
    assert job.attempts == 1
    assert [e.message for e in get_events(settings, job_id)].count("Fine-tuning job started") == 1
    assert f"job {job_id} is not queued" in worker_log.read_text()  # the duplicate was seen, and skipped
