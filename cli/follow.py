"""`neatft jobs follow`: a job watched until it ends. It polls the job and its events (the API lists them newest
first, so each poll pages back only as far as the newest event already seen) and shows a live view: a step bar
with the ETA the worker estimates, the latest train and validation loss and accuracy, a sparkline of the training
loss, and every new event as it arrives. The exit code says how the job ended (`EXIT_CODES`).

On a terminal the view redraws in place; piped, rich prints the events as they come and the view once, at the end.
With `--json` it writes JSON Lines instead: one event object per line, then the final job object."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from datetime import datetime

import openai
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

# 1 is any error (the API refused, the service is unreachable) and 2 a usage error, as for every command.
EXIT_CODES = {"succeeded": 0, "failed": 3, "cancelled": 4}
EXIT_INTERRUPTED = 130  # Ctrl-C: the shell's convention for SIGINT; the job itself goes on
POLL_SECONDS = 1.0
EVENT_PAGE = 100
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 48

# The metrics events' keys (worker/progress.py writes them), first present wins: classification jobs report
# `*_accuracy`, causal LM jobs `*_mean_token_accuracy`, DPO jobs `*_preference_accuracy`; validation over the
# whole file is `full_valid_*`.
METRICS = {
    ("train", "loss"): ("train_loss",),
    ("train", "accuracy"): ("train_accuracy", "train_mean_token_accuracy", "train_preference_accuracy"),
    ("valid", "loss"): ("full_valid_loss", "valid_loss"),
    ("valid", "accuracy"): (
        "full_valid_accuracy",
        "full_valid_mean_token_accuracy",
        "valid_mean_token_accuracy",
        "full_valid_preference_accuracy",
    ),
}


@dataclass
class View:
    job: object = None
    step: int = 0
    total_steps: int = 0
    latest: dict[tuple[str, str], float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)

    def absorb(self, event) -> None:
        data = event.data or {}
        if event.type != "metrics":
            return
        self.step = max(self.step, int(data.get("step", 0)))
        self.total_steps = int(data.get("total_steps", self.total_steps))
        for cell, keys in METRICS.items():
            value = next((data[k] for k in keys if k in data), None)
            if value is not None:
                self.latest[cell] = float(value)
        if "train_loss" in data:
            self.losses.append(float(data["train_loss"]))

    def render(self) -> Group:
        job = self.job
        status = Text.assemble(("job ", "dim"), (job.id, "bold"), ("  model ", "dim"), job.model,
                               ("  status ", "dim"), (job.status, _STYLE.get(job.status, "yellow")))  # fmt: skip
        total = self.total_steps or None
        steps = Table.grid(padding=(0, 1))
        steps.add_row(
            ProgressBar(total=total, completed=self.step, width=40),
            f"step {self.step}/{self.total_steps or '?'}",
            f"ETA {_eta(job)}",
        )
        metrics = Table("", "loss", "accuracy", box=None, padding=(0, 2), header_style="dim")
        for split in ("train", "valid"):
            metrics.add_row(split, *(_number(self.latest.get((split, kind))) for kind in ("loss", "accuracy")))
        parts = [status, steps, metrics]
        if self.losses:
            parts.append(Text.assemble(("loss ", "dim"), (sparkline(self.losses), "cyan")))
        if job.status == "failed" and job.error:
            parts.append(Text(f"error: {job.error.message}", style="red"))
        elif job.fine_tuned_model:
            parts.append(Text.assemble(("model ", "dim"), job.fine_tuned_model))
        return Group(*parts)


_STYLE = {"succeeded": "green", "failed": "red", "cancelled": "red"}


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _eta(job) -> str:
    if job.status != "running" or not job.estimated_finish:
        return "–"
    seconds = max(0, int(job.estimated_finish - time.time()))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def sparkline(values: list[float], width: int = SPARK_WIDTH) -> str:
    """The last `width` values as block characters, lowest to highest."""
    values = values[-width:]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    return "".join(SPARK[round((v - low) / span * (len(SPARK) - 1))] for v in values)


def new_events(client: openai.OpenAI, job_id: str, seen: set[str]) -> list:
    """The job's events not in `seen`, oldest first."""
    fresh, after = [], None
    while True:
        page = client.fine_tuning.jobs.list_events(job_id, limit=EVENT_PAGE, **({"after": after} if after else {}))
        for event in page.data:
            if event.id in seen:
                return fresh[::-1]
            fresh.append(event)
        if not page.has_more or not page.data:
            return fresh[::-1]
        after = page.data[-1].id


def _event_line(event) -> Text:
    stamp = datetime.fromtimestamp(event.created_at).strftime("%H:%M:%S")
    style = {"error": "red", "warn": "yellow"}.get(event.level, "")
    return Text.assemble((stamp + " ", "dim"), (event.message, style))


def follow(client: openai.OpenAI, job_id: str, console: Console, *, as_json: bool) -> int:
    """Watch the job until it ends; its exit code."""
    view, seen = View(), set()
    view.job = client.fine_tuning.jobs.retrieve(job_id)
    live = None if as_json else Live(view.render(), console=console, refresh_per_second=4)
    try:
        if live:
            live.start()
        while True:
            for event in new_events(client, job_id, seen):
                seen.add(event.id)
                view.absorb(event)
                if as_json:
                    print(json.dumps(event.model_dump()), flush=True)
                else:
                    live.console.print(_event_line(event))
            if live:
                live.update(view.render())
            if view.job.status in EXIT_CODES:
                break
            time.sleep(POLL_SECONDS)
            view.job = client.fine_tuning.jobs.retrieve(job_id)
    except KeyboardInterrupt:
        if live:
            live.stop()
            live = None
        console.print(f"Stopped following {job_id}; the job goes on (`neatft jobs follow {job_id}`).", style="dim")
        return EXIT_INTERRUPTED
    finally:
        if live:
            live.stop()
    if as_json:
        print(json.dumps(view.job.model_dump()), flush=True)
    return EXIT_CODES[view.job.status]
