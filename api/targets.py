"""Which model a request names, for this caller: the API's records decide (a catalog base model, or a succeeded
fine-tuned model of the caller's organisation) before anything is sent to a backend. Another organisation's model
answers exactly like a missing one, and never reaches an inference server."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import APIError
from api.pagination import owned
from control.backends import Backend, Target
from control.db import session_scope
from control.jobs import JobStatus, fine_tuned_model_name
from control.orm import Checkpoint, Job
from control.settings import Settings
from control.storage import Storage
from neat_core.models.catalog import CAUSAL_LM, entry

log = logging.getLogger("api.targets")
CHECKPOINT_MODEL = re.compile(r"^(?P<model>ft:.+):ckpt-step-(?P<step>\d+)$")  # checkpoint_object's names


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
                raise _wrong_endpoint(model_id, CAUSAL_LM in base.tasks, base=True)
            return Target(model_id, CAUSAL_LM, model_id, caller=org)
        if CHECKPOINT_MODEL.match(model_id):
            job, checkpoint = checkpoint_of(session, org, model_id, storage)
            if job.task != task:
                raise _wrong_endpoint(model_id, job.task == CAUSAL_LM, base=False)
            return dataclasses.replace(of_checkpoint(job, checkpoint, storage), caller=org)
        job = session.scalar(owned(Job, org).where(Job.fine_tuned_model == model_id, Job.status == JobStatus.SUCCEEDED))
    finally:
        session.close()
    if job is None or job.artifact_key is None:
        gone = "has been deleted" if job is not None else "does not exist"  # (deleted: DELETE /v1/models)
        raise APIError(404, f"The model '{model_id}' {gone}.", code="model_not_found", param="model")
    if job.task != task:
        raise _wrong_endpoint(model_id, job.task == CAUSAL_LM, base=False)
    return dataclasses.replace(of_job(job, storage), caller=org)


def checkpoint_of(session: Session, org: str, model_id: str, storage: Storage) -> tuple[Job, Checkpoint]:
    """The job and checkpoint a `ft:…:ckpt-step-N` name stands for (any status of the job: a running or cancelled
    job's checkpoints are models too), or a 404 that says why not."""
    match = CHECKPOINT_MODEL.match(model_id)
    job = None
    if match:
        job = session.scalar(owned(Job, org).where(Job.id == match["model"].rsplit(":", 1)[-1]))
    if job is None or fine_tuned_model_name(job) != match["model"]:
        raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    step = int(match["step"])
    checkpoint = session.scalar(select(Checkpoint).where(Checkpoint.job_id == job.id, Checkpoint.step_number == step)
                                .order_by(Checkpoint.seq.desc()).limit(1))  # fmt: skip
    if checkpoint is None:
        raise APIError(404, f"Job {job.id} has no checkpoint at step {step}.", code="model_not_found", param="model")
    if checkpoint.pruned:
        raise APIError(404, f"The checkpoint at step {step} of job {job.id} was deleted (only the last few of a job "
                       "are kept); list its checkpoints for those there are.", code="model_not_found",
                       param="model")  # fmt: skip
    if not (storage.path(checkpoint.storage_key) / "adapter" / "manifest.json").is_file():
        raise APIError(404, f"The checkpoint at step {step} of job {job.id} was saved before checkpoints could be "
                       "served; its job's final model can be.", code="model_not_found", param="model")  # fmt: skip
    return job, checkpoint


def of_checkpoint(job: Job, checkpoint: Checkpoint, storage: Storage) -> Target:
    """A checkpoint as a model: its `adapter/` is an artifact of its own (neat_core.train), served by name."""
    name = f"{fine_tuned_model_name(job)}:ckpt-step-{checkpoint.step_number}"
    adapter = Path(storage.path(checkpoint.storage_key)) / "adapter"
    return Target(name, job.task, job.model, str(adapter), owner=job.organization_id,
                  method=(job.adapter or {}).get("type"))  # fmt: skip


def _wrong_endpoint(model_id: str, generates: bool, *, base: bool) -> APIError:
    """400 naming the endpoint the model does serve (the one the caller should have used)."""
    if generates:
        kind = "a base text-generation model" if base else "a text-generation model"
        use = "use it with /v1/chat/completions or /v1/completions"
    elif base:
        kind, use = "a text encoder", "fine-tune it for classification, then use the result with /v1/classifications"
    else:
        kind, use = "a classification model", "use it with /v1/classifications"
    return APIError(400, f"The model '{model_id}' is {kind}; {use}.", code="invalid_model_for_endpoint", param="model")


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
