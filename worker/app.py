"""The worker's Celery app: `celery -A worker.app worker ...`.

The configuration is the one the API sends with (`control.queue.make_celery`), so both sides agree on the broker, the
queue and the ack policy. Importing this module must not import torch: a prefork pool forks its children after
importing the task modules, and children that inherit torch's thread pools can deadlock. The runner imports
neat_core inside the task instead.
"""

from __future__ import annotations

from celery import signals

from control.queue import make_celery, training_queue
from control.settings import get_settings
from control.sweeper import Sweeper
from worker import metrics
from worker.lease import Reaper

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]  # imported when the worker starts, so the task name is registered


@signals.celeryd_after_setup.connect
def _consume_device_queues(sender: str, instance, **_: object) -> None:
    # A worker that consumes the training queue takes the jobs of every device count it has (NEAT_WORKER_DEVICES):
    # `-Q training` on a 2-device worker also consumes `training-n2` (control.queue.training_queue).
    settings = get_settings()
    queues = instance.app.amqp.queues
    if settings.queue in queues.consume_from:
        for n in range(2, settings.worker_devices + 1):
            queues.select_add(training_queue(settings, n))


@signals.worker_init.connect
def _serve_metrics(**_: object) -> None:
    # In the main process, before the pool forks (worker.metrics): the pool children's figures are summed here.
    global _metrics
    _metrics = metrics.start(get_settings())


@signals.worker_ready.connect
def _start_reaper(**_: object) -> None:
    # Every worker process reaps expired leases (worker.lease): the jobs of a worker that died are picked up by
    # whichever worker is still alive, or by the next one to start.
    # And every worker process sweeps the temporary bytes (half-written checkpoints and adapters, uploads) that
    # killed processes left on the volume (control.sweeper).
    global _reaper, _sweeper
    _reaper = Reaper(get_settings()).start()
    _sweeper = Sweeper(get_settings()).start()


@signals.worker_shutdown.connect
def _stop_reaper(**_: object) -> None:
    if _reaper is not None:
        _reaper.stop()
    if _sweeper is not None:
        _sweeper.stop()
    if _metrics is not None:
        _metrics.shutdown()


_reaper: Reaper | None = None
_sweeper: Sweeper | None = None
_metrics: metrics.ThreadingWSGIServer | None = None
