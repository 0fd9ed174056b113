"""`DbProgress`: the training callback that reports a job's progress to the database, and through which the API's
cancel reaches the loop. It only writes rows and answers `should_stop`; the loop never learns about the database.

Every write is its own short transaction: the API reads progress while the job trains, and an SQLite database is
never held locked across a training step.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from control import jobs
from control.db import session_scope, with_retries
from control.events import add_event
from control.ids import new_id, now
from control.orm import Checkpoint, Job
from control.storage import Storage
from neat_core.train import Callback, list_checkpoints
from neat_core.train.checkpoint import LoopState
from worker.trainspec import SCHEDULE_FIELDS

log = logging.getLogger(__name__)

METRICS_EVENTS = 100  # per job, about: a readable loss curve that is still a few pages of events
EXTRA_HYPERPARAMETERS = ("learning_rate", "max_seq_len", "total_steps", "warmup_steps")
ROW_UPDATE_SECONDS = 1.0  # trained_tokens / estimated_finish: fresh enough for a progress bar


class DbProgress(Callback):
    poll_seconds = 1.0  # a cancel is seen within this long; one cheap status query per interval at most

    def __init__(self, job_id: str, database_url: str, storage: Storage):
        self.job_id = job_id
        self.url = database_url
        self.storage = storage
        self.total_steps = 0
        self.events_every = 1
        self._start_step, self._start_time = 0, time.monotonic()
        self._row_updated_at = -math.inf
        self._polled_at = -math.inf
        self._cancelling = False

    def on_train_begin(self, loop: LoopState, info: dict[str, Any]) -> None:
        hp = info["hyperparameters"]
        self.total_steps = hp["total_steps"]
        self.events_every = max(1, math.ceil(self.total_steps / METRICS_EVENTS))  # every step up to 100 steps
        self._start_step, self._start_time = loop.step, time.monotonic()  # a resumed run times its own steps only
        resolved = {k: hp[k] for k in (*SCHEDULE_FIELDS, *EXTRA_HYPERPARAMETERS)}
        adapter = {"type": hp["method"], **hp["adapter"]}
        counts = {k: info[k] for k in ("adapter_parameters", "trainable_parameters")}
        message = (
            f"Training a {hp['method']} adapter: {counts['adapter_parameters']:,} adapter parameters "
            f"({counts['trainable_parameters']:,} trainable), {self.total_steps} steps"
        )

        def write(session: Session) -> None:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(resolved_hyperparameters=resolved, resolved_adapter=adapter)
            )
            add_event(session, self.job_id, message, data={**counts, "task": info["task"]})

        with_retries(self.url, write)

    def on_step_end(self, loop: LoopState, metrics: dict[str, float]) -> None:
        step = loop.step
        event_due = step % self.events_every == 0 or step == self.total_steps
        # Tiny models take many steps a second: the row is rewritten with events or once a second, not every step.
        if not event_due and time.monotonic() - self._row_updated_at < ROW_UPDATE_SECONDS:
            return

        def write(session: Session) -> None:
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(trained_tokens=loop.trained_tokens, estimated_finish=self._estimated_finish(step))
            )
            if event_due:
                # `metrics` also carries the last validation results; those have their own events.
                train = {k: v for k, v in metrics.items() if not k.startswith("valid_")}
                self._metrics_event(session, step, f"training loss={metrics['train_loss']:.4f}", train)

        with_retries(self.url, write)
        self._row_updated_at = time.monotonic()

    def on_evaluate(self, loop: LoopState, metrics: dict[str, float]) -> None:
        valid = {k: v for k, v in metrics.items() if k.startswith("valid_")}
        summary = f"validation loss={metrics['valid_loss']:.4f}"
        with_retries(self.url, lambda session: self._metrics_event(session, loop.step, summary, valid))

    def on_checkpoint(self, loop: LoopState, path: Path, metrics: dict[str, float]) -> None:
        key = self.storage.key(path)
        on_disk = [self.storage.key(p) for p in list_checkpoints(path.parent)]  # neat_core keeps only the last few
        of_job = Checkpoint.job_id == self.job_id

        def write(session: Session) -> None:
            row = session.scalar(select(Checkpoint).where(of_job, Checkpoint.storage_key == key))
            if row is None:
                row = Checkpoint(id=new_id("ftckpt"), job_id=self.job_id, step_number=loop.step, storage_key=key)
                session.add(row)
            row.metrics, row.pruned = {"step": loop.step, **metrics}, False  # a re-saved step replaces its files
            gone = Checkpoint.storage_key.not_in(on_disk)
            session.execute(update(Checkpoint).where(of_job, gone).values(pruned=True))
            add_event(session, self.job_id, f"Checkpoint saved at step {loop.step}", data={"step": loop.step})

        with_retries(self.url, write)

    def should_stop(self, loop: LoopState) -> bool:
        if not self._cancelling and time.monotonic() - self._polled_at >= self.poll_seconds:
            self._polled_at = time.monotonic()
            try:
                with session_scope(self.url) as session:
                    self._cancelling = jobs.is_cancelling(session, self.job_id)
            except (OperationalError, DBAPIError):  # the database is away: a cancel waits until it is back
                log.warning("job %s: cannot check for a cancel (database unavailable)", self.job_id)
        return self._cancelling

    def _estimated_finish(self, step: int) -> int | None:
        done = step - self._start_step
        if done <= 0:
            return None
        per_step = (time.monotonic() - self._start_time) / done
        return now() + round(per_step * (self.total_steps - step))

    def _metrics_event(self, session, step: int, summary: str, metrics: dict[str, float]) -> None:
        data = {"step": step, "total_steps": self.total_steps, **metrics}
        add_event(session, self.job_id, f"Step {step}/{self.total_steps}: {summary}", type="metrics", data=data)


class LeaseWatch(Callback):
    """Stops the training once this worker's heartbeat reports the job's lease lost (worker.lease)."""

    def __init__(self, heartbeat: Any):
        self.heartbeat = heartbeat

    def should_stop(self, loop: LoopState) -> bool:
        return self.heartbeat.lost.is_set()
