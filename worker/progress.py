"""`DbProgress`: the training callback that reports a job's progress to the database, and through which the API's
cancel reaches the loop. It only writes rows and answers `should_stop`; the loop never learns about the database.

Every write is its own short transaction: the API reads progress while the job trains, and an SQLite database is
never held locked across a training step. Every write is fenced on the worker's lease (control.jobs); one that
finds the lease gone raises `LeaseLost` out of the loop, which stops the training at once, writing nothing more
(no checkpoint, no artifact).
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

from sqlalchemy import delete, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from control import jobs
from control.db import session_scope, with_retries
from control.ids import new_id, now
from control.orm import Checkpoint
from control.storage import Storage
from neat_core.train import Callback, list_checkpoints
from neat_core.train.checkpoint import LoopState
from worker.metrics import STEP_SECONDS, TRAINED_TOKENS
from worker.trainspec import SCHEDULE_FIELDS

log = logging.getLogger(__name__)

METRICS_EVENTS = 100  # per job, about: a readable loss curve that is still a few pages of events
EXTRA_HYPERPARAMETERS = ("learning_rate", "max_seq_len", "total_steps", "warmup_steps")
ROW_UPDATE_SECONDS = 1.0  # trained_tokens / estimated_finish: fresh enough for a progress bar


class DbProgress(Callback):
    poll_seconds = 1.0  # a cancel is seen within this long; one cheap status query per interval at most

    def __init__(self, lease: jobs.Lease, database_url: str, storage: Storage):
        self.lease, self.job_id = lease, lease.job_id
        self.url = database_url
        self.storage = storage
        self.total_steps = 0
        self.events_every = 1
        self._start_step, self._start_time = 0, time.monotonic()
        self._row_updated_at = -math.inf
        self._polled_at = -math.inf
        self._stopping = False  # a cancel or a pause was seen

    def on_train_begin(self, loop: LoopState, info: dict[str, Any]) -> None:
        hp = info["hyperparameters"]
        self.total_steps = hp["total_steps"]
        self.events_every = max(1, math.ceil(self.total_steps / METRICS_EVENTS))  # every step up to 100 steps
        self._start_step, self._start_time = loop.step, time.monotonic()  # a resumed run times its own steps only
        resolved = {k: hp[k] for k in (*SCHEDULE_FIELDS, *EXTRA_HYPERPARAMETERS, "beta") if k in hp}  # beta: DPO's
        adapter = {"type": hp["method"], **hp["adapter"]}
        counts = {k: info[k] for k in ("adapter_parameters", "trainable_parameters")}
        message = (
            f"Training a {hp['method']} adapter: {counts['adapter_parameters']:,} adapter parameters "
            f"({counts['trainable_parameters']:,} trainable), {self.total_steps} steps"
        )

        def write(session: Session) -> bool:
            return jobs.record_progress(
                session, self.lease, resolved_hyperparameters=resolved, resolved_adapter=adapter
            ) and jobs.add_fenced_event(session, self.lease, message, data={**counts, "task": info["task"]})

        self._write(write)

    def on_selection(self, report: dict[str, Any]) -> None:
        """Method "auto": an event per candidate, one for the choice, and the report on the job row (its
        `adapter_selection`), in one fenced transaction. The winner's `on_train_begin` then fills in
        `resolved_adapter` with the chosen method and its hyperparameters."""
        chosen = report["chosen"]

        def write(session: Session) -> bool:
            if not jobs.record_progress(session, self.lease, adapter_selection=report):
                return False
            for row in report["candidates"]:
                loss = "diverged" if row["dev_loss"] is None else f"{row['dev_loss']:.4f}"
                message = (
                    f"Method selection: {row['method']} dev loss {loss} ({row['adapter_parameters']:,} parameters, "
                    f"{row['steps']} steps, {row['seconds']:.1f} s)"
                )
                if not jobs.add_fenced_event(session, self.lease, message, data=row):
                    return False
            numbers = {k: v for k, v in report.items() if k != "candidates"}
            if report["candidates"]:
                why = (f"{len(report['candidates'])} candidates scored on {report['dev_examples']} held-out "
                       f"training examples in {report['seconds']:.1f} s")  # fmt: skip
            else:  # too short a run to race: the first in the order, by the measured quality table
                why = f"first of {', '.join(report['order'])} by measured quality: the run is too short to compare them"
            message = f"Selected {chosen} for the full run ({why})"
            return jobs.add_fenced_event(session, self.lease, message, data=numbers)

        self._write(write)

    def on_step_end(self, loop: LoopState, metrics: dict[str, float]) -> None:
        step = loop.step
        event_due = step % self.events_every == 0 or step == self.total_steps
        # Tiny models take many steps a second: the row is rewritten with events or once a second, not every step.
        if not event_due and time.monotonic() - self._row_updated_at < ROW_UPDATE_SECONDS:
            return

        def write(session: Session) -> bool:
            progress = {"trained_tokens": loop.trained_tokens, "estimated_finish": self._estimated_finish(step)}
            if not jobs.record_progress(session, self.lease, **progress):
                return False
            if event_due:
                # `metrics` also carries the last validation results; those have their own events.
                train = {k: v for k, v in metrics.items() if not k.startswith("full_valid_")}
                return self._metrics_event(session, step, f"training loss={metrics['train_loss']:.4f}", train)
            return True

        self._write(write)
        self._row_updated_at = time.monotonic()

    def on_evaluate(self, loop: LoopState, metrics: dict[str, float]) -> None:
        valid = {k: v for k, v in metrics.items() if k.startswith("full_valid_")}
        summary = f"validation loss={metrics['full_valid_loss']:.4f}"
        self._write(lambda session: self._metrics_event(session, loop.step, summary, valid))

    def on_checkpoint(self, loop: LoopState, path: Path, metrics: dict[str, float]) -> None:
        key = self.storage.key(path)
        folder = self.storage.key(path.parent)  # this attempt's checkpoints/
        on_disk = [self.storage.key(p) for p in list_checkpoints(path.parent)]  # neat_core keeps only the last few
        of_job = Checkpoint.job_id == self.job_id

        def write(session: Session) -> bool:
            row_id = new_id("ftckpt")
            if not jobs.add_checkpoint(session, self.lease, id=row_id, step_number=loop.step,
                                       metrics={"step": loop.step, **metrics}, storage_key=key, created_at=now(),
                                       pruned=False):  # fmt: skip
                return False
            # a re-saved step replaced its files: its new row replaces the old one
            session.execute(delete(Checkpoint).where(of_job, Checkpoint.storage_key == key, Checkpoint.id != row_id))
            ours = Checkpoint.storage_key.startswith(f"{folder}/", autoescape=True)  # not other attempts'
            gone = Checkpoint.storage_key.not_in(on_disk)
            session.execute(update(Checkpoint).where(of_job, ours, gone).values(pruned=True))
            message = f"Checkpoint saved at step {loop.step}"
            return jobs.add_fenced_event(session, self.lease, message, data={"step": loop.step})

        self._write(write)

    def should_stop(self, loop: LoopState) -> bool:
        if not self._stopping and time.monotonic() - self._polled_at >= self.poll_seconds:
            self._polled_at = time.monotonic()
            try:
                with session_scope(self.url) as session:
                    self._stopping = jobs.stop_requested(session, self.job_id)
            except (OperationalError, DBAPIError):  # the database is away: a cancel waits until it is back
                log.warning("job %s: cannot check for a cancel or pause (database unavailable)", self.job_id)
        return self._stopping

    def _estimated_finish(self, step: int) -> int | None:
        done = step - self._start_step
        if done <= 0:
            return None
        per_step = (time.monotonic() - self._start_time) / done
        return now() + round(per_step * (self.total_steps - step))

    def _write(self, write) -> None:
        """Run a fenced `write` (False: the lease is gone) in its own transaction, retried while the database is
        away; a lost lease ends the training here."""
        if not with_retries(self.url, write):
            raise jobs.LeaseLost(self.lease)

    def _metrics_event(self, session, step: int, summary: str, metrics: dict[str, float]) -> bool:
        data = {"step": step, "total_steps": self.total_steps, **metrics}
        message = f"Step {step}/{self.total_steps}: {summary}"
        return jobs.add_fenced_event(session, self.lease, message, type="metrics", data=data)


class LeaseWatch(Callback):
    """Ends the training at once, before the step's writes and checkpoint, once this worker's heartbeat reports
    the job's lease lost (worker.lease): it raises `LeaseLost` rather than asking the loop to stop, because a
    stopping loop saves a checkpoint first. Put it first among the callbacks.

    Before every checkpoint and the artifact it also renews the lease itself, there and then: a worker resumed
    after a pause (SIGSTOP) goes straight on to the write its step had due, before its heartbeat thread has had a
    chance to notice anything. (Files are not fenced like rows: a pause *inside* a write still finishes that
    write once resumed, but in the attempt's own folder, and without its row nothing ever reads it.)"""

    def __init__(self, heartbeat: Any):
        self.heartbeat = heartbeat

    def _check(self) -> None:
        if self.heartbeat.lost.is_set():
            raise jobs.LeaseLost(self.heartbeat.lease)

    def on_train_begin(self, loop: LoopState, info: dict[str, Any]) -> None:
        self._check()

    def on_step_end(self, loop: LoopState, metrics: dict[str, float]) -> None:
        self._check()

    def on_evaluate(self, loop: LoopState, metrics: dict[str, float]) -> None:
        self._check()

    def on_selection(self, report: dict[str, Any]) -> None:
        # An "auto" job's candidates trained while only the heartbeat watched the lease: lost meanwhile, the
        # choice is not written.
        self._check()

    def before_save(self, loop: LoopState, what: str) -> None:
        self._check()
        if not self.heartbeat.renew_now():
            raise jobs.LeaseLost(self.heartbeat.lease)


class StepMetrics(Callback):
    """Each step's wall time and tokens, for Prometheus (worker.metrics): the time from one step's end to the next
    (what a step costs the job, its callbacks' writes and any evaluation or checkpoint in between included)."""

    def on_train_begin(self, loop: LoopState, info: dict[str, Any]) -> None:
        self._at, self._tokens = time.monotonic(), loop.trained_tokens  # a resumed run counts its own tokens only

    def on_step_end(self, loop: LoopState, metrics: dict[str, float]) -> None:
        at = time.monotonic()
        STEP_SECONDS.observe(at - self._at)
        TRAINED_TOKENS.inc(max(0, loop.trained_tokens - self._tokens))
        self._at, self._tokens = at, loop.trained_tokens
