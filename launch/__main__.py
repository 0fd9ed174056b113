"""The embedded default, one command on one machine: `python -m launch` (the README's `scripts/run`).

Applies migrations, makes sure an API key exists (printing it), starts one `celery worker` child process on the
server-less SQLite broker (and a second, threaded one for webhook deliveries, which a training job must not hold
up), and serves the API in this process with inference in it too: the inference tier's in-process backend,
handed to `api.main.create_app(backend=...)` (api never imports the inference tier; this module composes the two).
With NEAT_INFERENCE_SERVERS set, the API sends inference there instead. The same code runs distributed; there each
piece is started on its own (docker-compose.yml).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import uvicorn

from api.http import OpenAIErrorsHTTP
from api.main import create_app
from control.backends import Backend
from control.db import session_scope
from control.keys import add_key, key_is_active
from control.migrate import upgrade
from control.settings import Settings, get_settings


def bootstrap_key(settings: Settings) -> str:
    """The configured bootstrap key, else the key this data directory was given on its first start (kept in a
    0600 file beside the database so the next start can print it again), else a new one."""
    key_file = settings.data_dir / "api_key"
    with session_scope(settings.resolved_database_url) as session:
        if settings.bootstrap_api_key:
            return add_key(session, settings.bootstrap_org, settings.bootstrap_api_key)
        if key_file.exists() and key_is_active(session, key := key_file.read_text().strip()):
            return key
        key = add_key(session, settings.bootstrap_org)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def embedded_backend(settings: Settings) -> Backend | None:
    """Inference in this process, unless it is off or inference servers are listed (then the app builds its
    remote backend from the same settings)."""
    if not settings.serving or settings.inference_server_urls:
        return None
    from inference.inprocess import InProcessBackend

    return InProcessBackend(settings)


def start_worker(settings: Settings) -> subprocess.Popen:
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1",
               "-Q", settings.queue, "--loglevel=INFO", "--without-gossip", "--without-mingle"]  # fmt: skip
    env = None
    if settings.worker_metrics_port:  # its pool's figures meet in a folder of their own (worker.metrics)
        folder = settings.prometheus_multiproc_dir or settings.data_dir / "worker-metrics"
        folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder.resolve())}
    return subprocess.Popen(command, env=env, start_new_session=True)  # its own group: stopped with its pool child


def start_webhook_worker(settings: Settings) -> subprocess.Popen:
    """Webhook deliveries wait on other people's servers, not on a GPU: threads, a few at once, on their own queue."""
    command = [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "--pool=threads", "--concurrency=4",
               "-Q", settings.webhooks_queue, "-n", "webhooks@%h", "--loglevel=INFO", "--without-gossip",
               "--without-mingle"]  # fmt: skip
    # No metrics port of its own: the training worker serves the worker figures on NEAT_WORKER_METRICS_PORT, and a
    # second process on that port would fail to start.
    env = {**os.environ, "NEAT_WORKER_METRICS_PORT": "0"}
    return subprocess.Popen(command, env=env, start_new_session=True)


def main() -> None:
    # uvicorn shuts down gracefully on SIGTERM and then re-raises the signal under the handler it found; with the
    # default handler the process would die right there and leave the worker running. Turning SIGTERM into
    # SystemExit (as SIGINT is KeyboardInterrupt) lets the `finally` below stop the worker on every exit path.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    settings = get_settings()
    upgrade(settings.resolved_database_url)
    key = bootstrap_key(settings)
    workers = [start_worker(settings), start_webhook_worker(settings)]
    url = f"http://{settings.host}:{settings.port}/v1"
    print(f"\nNEAT fine-tuning service\n  API:     {url}\n  API key: {key}\n"
          f"  data:    {settings.data_dir.resolve()}\n  try:     curl -H 'Authorization: Bearer {key}' {url}/models\n",
          flush=True)  # fmt: skip
    try:
        backend = embedded_backend(settings)
        app = create_app(backend=backend)
        if backend is not None:  # the API's /metrics shows the in-process engines too
            from inference import metrics

            metrics.register(app.state.metrics, backend.host)
        uvicorn.run(app, host=settings.host, port=settings.port, http=OpenAIErrorsHTTP, log_level="info")
    finally:
        for worker in reversed(workers):  # the webhook worker first: it stops at once
            stop_worker(worker)


def stop_worker(worker: subprocess.Popen) -> None:
    """Warm shutdown first (SIGTERM: finish the current task), then cold (SIGQUIT: a running job is interrupted and
    re-queues itself, to resume from its last checkpoint), then SIGKILL: the group is gone within 20 s, before a
    supervisor that gives this process 30 s to exit would kill it and orphan the worker."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGQUIT, 8), (signal.SIGKILL, 2)):
        try:
            os.killpg(worker.pid, sig)
            worker.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    main()
