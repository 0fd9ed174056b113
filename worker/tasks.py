"""Celery tasks. Thin, like views: the message carries a job id (or a webhook delivery's id), the runner re-reads
everything from the database and claims the row with a conditional update, so a duplicate or late delivery is a
no-op."""

from __future__ import annotations

from control.queue import TRAIN_TASK, WEBHOOK_TASK
from worker.app import app
from worker.metrics import JOBS
from worker.runner import run_job
from worker.webhooks import deliver


@app.task(name=TRAIN_TASK)
def train_job(job_id: str) -> None:
    JOBS.labels(run_job(job_id)).inc()


@app.task(name=WEBHOOK_TASK)
def deliver_webhook(delivery_id: str) -> None:
    deliver(delivery_id)
