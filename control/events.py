"""Job events: the timeline a customer reads at /v1/fine_tuning/jobs/{id}/events. Written by the API (created,
queued, cancel requested) and by the worker (started, metrics, checkpoints, outcome); FastAPI-free for the latter."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from control.ids import new_id
from control.orm import JobEvent


def add_event(
    session: Session,
    job_id: str,
    message: str,
    *,
    level: str = "info",
    type: str = "message",
    data: dict[str, Any] | None = None,
) -> None:
    session.add(JobEvent(id=new_id("ftevent"), job_id=job_id, message=message, level=level, type=type, data=data))
