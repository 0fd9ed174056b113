"""Which model a request names, for this caller: the API's records decide (a catalog base model, or a succeeded
fine-tuned model of the caller's organisation) before anything is sent to a backend. Another organisation's model
answers exactly like a missing one, and never reaches an inference server."""

from __future__ import annotations

import dataclasses
import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import APIError
from api.pagination import owned
from control.backends import Backend, Target
from control.db import session_scope
from control.jobs import JobStatus
from control.orm import Job
from control.settings import Settings
from control.storage import Storage
from neat_core.models.catalog import CAUSAL_LM, CLASSIFICATION, entry

log = logging.getLogger("api.targets")


def of_job(job: Job, storage: Storage) -> Target:
    """A succeeded job's fine-tuned model: its artifact location, owner and method as the job recorded them."""
    return Target(
        job.fine_tuned_model,
        job.task,
        job.model,
        str(storage.path(job.artifact_key)),
        owner=job.organization_id,
        method=(job.adapter or {}).get("type"),
    )


def resolve(session: Session, org: str, storage: Storage, model_id: str, task: str) -> Target:
    """The model `model_id` names for this caller, checked against the endpoint's task. Closes the session: the
    generation that follows may take a while and needs no database connection."""
    try:
        base = entry(model_id)
        if base is not None:
            if task != CAUSAL_LM or CAUSAL_LM not in base.tasks:
                raise _wrong_endpoint(model_id, "a base model" if task == CLASSIFICATION else "a text encoder", task)
            return Target(model_id, CAUSAL_LM, model_id, caller=org)
        job = session.scalar(owned(Job, org).where(Job.fine_tuned_model == model_id, Job.status == JobStatus.SUCCEEDED))
    finally:
        session.close()
    if job is None or job.artifact_key is None:
        gone = "has been deleted" if job is not None else "does not exist"  # (deleted: DELETE /v1/models)
        raise APIError(404, f"The model '{model_id}' {gone}.", code="model_not_found", param="model")
    if job.task != task:
        kind = "a classification model" if job.task == CLASSIFICATION else "a text-generation model"
        raise _wrong_endpoint(model_id, kind, task)
    return dataclasses.replace(of_job(job, storage), caller=org)


def _wrong_endpoint(model_id: str, kind: str, task: str) -> APIError:
    if task == CLASSIFICATION:
        use = "/v1/classifications with a fine-tuned classification model"
    else:
        use = "/v1/chat/completions or /v1/completions with a text-generation model"
    message = f"The model '{model_id}' is {kind}; use {use}."
    return APIError(400, message, code="invalid_model_for_endpoint", param="model")


def preload_targets(settings: Settings) -> list[Target]:
    """The models `serving_preload` names (catalog base models, or succeeded fine-tuned models of any
    organisation: an operator's list). A name that does not resolve is logged and skipped."""
    storage = Storage(settings.resolved_artifact_root)
    targets = []
    for name in filter(None, (n.strip() for n in settings.serving_preload.split(","))):
        if entry(name) is not None:
            targets.append(Target(name, CAUSAL_LM, name))
            continue
        with session_scope(settings.resolved_database_url) as session:
            job = session.scalar(select(Job).where(Job.fine_tuned_model == name, Job.status == JobStatus.SUCCEEDED))
            if job is None or job.artifact_key is None:
                log.warning("cannot preload %s: no such succeeded fine-tuned model", name)
                continue
            targets.append(of_job(job, storage))
    return targets


async def preload(settings: Settings, backend: Backend) -> None:
    """Load the `serving_preload` models on their backend now, so their first requests find them warm."""
    from starlette.concurrency import run_in_threadpool

    for target in await run_in_threadpool(preload_targets, settings):
        try:
            await backend.load(target)
            log.info("preloaded %s", target.name)
        except Exception:
            log.exception("cannot preload %s", target.name)
