"""The training workers' Prometheus metrics, and the port a worker serves them on (docs/metrics.md).

A worker is a Celery prefork pool: the main process (its reaper and sweeper threads) and the pool children that
train. They share nothing in memory, so the figures go through prometheus-client's multiprocess mode: every process
writes its samples to memory-mapped files in PROMETHEUS_MULTIPROC_DIR, and the main process serves their sum on
NEAT_WORKER_METRICS_PORT. Chosen over a port per process because a pool replaces its children (one that dies, or
after `--max-tasks-per-child`), and each new child would need a port of its own and Prometheus a new target; one
port per worker keeps one target per GPU, and counters survive a child's death.

The mode is fixed when prometheus_client is first imported, so PROMETHEUS_MULTIPROC_DIR must be in the worker's
environment when it starts (one directory per worker; `start` empties it of earlier runs' files).
"""

from __future__ import annotations

import logging
import os
import threading
from http import HTTPStatus
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector

from control.metrics import scrape
from control.settings import Settings

log = logging.getLogger(__name__)

JOBS = Counter("neat_worker_jobs", "Job runs ended, by the status the worker left the job in.", ["status"],
               registry=None)  # fmt: skip
STEP_SECONDS = Histogram(
    "neat_worker_step_seconds",
    "Wall time of each training step (its callbacks' database writes included).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
TRAINED_TOKENS = Counter("neat_worker_trained_tokens", "Training tokens processed; rate() is tokens per second.",
                         registry=None)  # fmt: skip
LEASE_RENEWALS = Counter("neat_worker_lease_renewals", "Lease renewals by result: renewed, lost, or unavailable "
                         "(the database was away).", ["result"], registry=None)  # fmt: skip
REAPER_REQUEUES = Counter(
    "neat_worker_reaper_requeues",
    "Jobs the reaper sent again: lease_expired (their worker died or hung) or unsent (queued, message lost).",
    ["reason"],
    registry=None,
)


def start(settings: Settings) -> ThreadingWSGIServer | None:
    """Serve `/metrics` on `settings.worker_metrics_port` from this (the pool's main) process; None when off."""
    if not settings.worker_metrics_port:
        return None
    folder = settings.prometheus_multiproc_dir
    if folder is None or not folder.is_dir():
        raise RuntimeError("NEAT_WORKER_METRICS_PORT needs PROMETHEUS_MULTIPROC_DIR: an existing directory, in the "
                           "worker's environment when it starts (worker.metrics)")  # fmt: skip
    _forget_other_processes(folder)
    server = make_server(settings.worker_metrics_host, settings.worker_metrics_port, _app(settings, folder),
                         ThreadingWSGIServer, handler_class=_Quiet)  # fmt: skip
    threading.Thread(target=server.serve_forever, name="worker-metrics", daemon=True).start()
    log.info("worker metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    return server


def _forget_other_processes(folder: Path) -> None:
    """Remove the files of earlier runs (before the pool forks, only this process's own are current)."""
    own = f"_{os.getpid()}.db"
    for path in folder.glob("*.db"):
        if not path.name.endswith(own):
            path.unlink(missing_ok=True)


def _app(settings: Settings, folder: Path):  # noqa: ANN202  (a WSGI app)
    def app(environ: dict, start_response) -> list[bytes]:  # noqa: ANN001
        if environ.get("PATH_INFO") != "/metrics":
            status, content_type, body = 404, "text/plain", b"not found\n"
        else:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=str(folder))
            status, content_type, body = scrape(registry, settings, environ.get("HTTP_AUTHORIZATION"))
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", content_type), ("Content-Length", str(len(body)))])  # fmt: skip
        return [body]

    return app


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (every scrape would be a log line)
        pass
