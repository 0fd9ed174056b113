"""The Celery app configuration, shared by the API (which only sends job ids) and the worker (which runs them).
Torch-free and FastAPI-free. Messages carry a job id and nothing else: the database row is the truth."""

from __future__ import annotations

from functools import lru_cache

from celery import Celery

from control.settings import Settings

TRAIN_TASK = "neat.train_job"
MAX_DEVICES = 64  # a job's `n_devices` (its data-parallel processes: neat_core.train.distributed), at most
WEBHOOK_TASK = "neat.deliver_webhook"  # on its own queue (`webhooks_queue`): a training job never holds it up


def make_celery(settings: Settings) -> Celery:
    app = Celery("neat", broker=settings.resolved_broker_url)
    app.conf.update(
        task_acks_late=True,  # a worker that dies mid-job leaves the message to be redelivered...
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,  # ...and a busy worker holds no queued jobs hostage
        task_ignore_result=True,
        task_default_queue=settings.queue,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    if app.conf.broker_url.startswith(("redis", "rediss")):
        # Redelivery happens after the visibility timeout: it must exceed the longest job, or a healthy long job
        # would be delivered twice (harmless, the claim is conditional, but wasteful). kombu's SQLAlchemy
        # transport passes transport options to create_engine, so they are set for Redis only.
        app.conf.broker_transport_options = {"visibility_timeout": settings.max_job_seconds + 3600}
    return app


@lru_cache(maxsize=4)
def _client(broker_url: str, queue: str, max_job_seconds: int) -> Celery:
    # Keyed by what make_celery reads, so each distinct configuration keeps one connection pool.
    return make_celery(Settings.model_construct(broker_url=broker_url, queue=queue, max_job_seconds=max_job_seconds))


def training_queue(settings: Settings, n_devices: int = 1) -> str:
    """The queue of jobs that train on `n_devices` devices: `settings.queue` for one, `<queue>-n<N>` for N. A worker
    with D devices consumes those of 1..D (worker.app), so a job waits, queued, until a worker with enough devices
    is there to take it."""
    return settings.queue if n_devices <= 1 else f"{settings.queue}-n{n_devices}"


def enqueue(job_id: str, settings: Settings, *, delay: float = 0.0, n_devices: int = 1) -> None:
    """Send job `job_id`'s message to the queue of its device count (`jobs.devices_of`); with `delay` (seconds) it
    is delivered no earlier than that (a retry's backoff). A message lost meanwhile is sent again by the reaper
    (worker.lease.redeliver)."""
    client = _client(settings.resolved_broker_url, settings.queue, settings.max_job_seconds)
    client.send_task(TRAIN_TASK, args=[job_id], queue=training_queue(settings, n_devices),
                     countdown=delay if delay > 0 else None)  # fmt: skip


def send_webhook(delivery_id: str, settings: Settings, *, delay: float = 0.0) -> None:
    """Send a webhook delivery's message (control.webhooks); with `delay`, a retry's backoff."""
    client = _client(settings.resolved_broker_url, settings.queue, settings.max_job_seconds)
    client.send_task(WEBHOOK_TASK, args=[delivery_id], queue=settings.webhooks_queue,
                     countdown=delay if delay > 0 else None)  # fmt: skip
