"""A succeeded job's results file: the CSV that OpenAI lists in a job's `result_files`, one row per step that has
metrics, readable at `/v1/files/{id}/content` like any file.

Columns: OpenAI's (`step, train_loss, train_accuracy, valid_loss, valid_mean_token_accuracy`), then the full
validation ones (`full_valid_loss, full_valid_mean_token_accuracy`). Our validation always runs over the whole
validation file, at checkpoints: those rows carry the same figures in `valid_*` and `full_valid_*`, and the rows
between them leave both empty. `train_accuracy` is the training batch's mean token accuracy (a causal LM), its
accuracy (a classifier), or its preference accuracy (a DPO job: the share of pairs whose preferred reply scored
higher). A step trained twice (resumed after a lost attempt) keeps its last figures.

The rows come from the job's metrics events, so the file says exactly what the events said.
"""

from __future__ import annotations

import csv
import io

from sqlalchemy import select
from sqlalchemy.orm import Session

from control.orm import JobEvent

COLUMNS = (
    "step",
    "train_loss",
    "train_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
)
# column <- the metrics event keys it is read from, first present wins
SOURCES = {
    "train_loss": ("train_loss",),
    "train_accuracy": ("train_mean_token_accuracy", "train_accuracy", "train_preference_accuracy"),  # DPO: its pairs
    "valid_loss": ("full_valid_loss",),
    "valid_mean_token_accuracy": ("full_valid_mean_token_accuracy", "full_valid_accuracy"),
    "full_valid_loss": ("full_valid_loss",),
    "full_valid_mean_token_accuracy": ("full_valid_mean_token_accuracy", "full_valid_accuracy"),
}
FILENAME = "step_metrics.csv"
PURPOSE = "fine-tune-results"


def metrics_by_step(session: Session, job_id: str) -> dict[int, dict[str, float]]:
    """step -> every metric the job's metrics events recorded for it (later events win)."""
    events = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "metrics").order_by(JobEvent.seq)
    )
    steps: dict[int, dict[str, float]] = {}
    for event in events:
        data = dict(event.data or {})
        step = data.pop("step", None)
        if isinstance(step, int):
            steps.setdefault(step, {}).update(data)
    return steps


def results_csv(steps: dict[int, dict[str, float]]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for step in sorted(steps):
        metrics = steps[step]
        cells = [next((metrics[k] for k in SOURCES[c] if k in metrics), "") for c in COLUMNS[1:]]
        writer.writerow([step, *(repr(float(v)) if v != "" else "" for v in cells)])
    return out.getvalue().encode()
