"""Which model a request names, for this caller: the API's records decide (a base model the caller's organisation may
use, catalog or registered, or a succeeded fine-tuned model of the organisation) before anything is sent to a
backend. Another organisation's model answers exactly like a missing one, and never reaches an inference server."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import APIError
from api.pagination import owned
from control import models
from control.backends import Backend, Target
from control.db import session_scope
from control.jobs import JobStatus, fine_tuned_model_name
from control.orm import Checkpoint, Job
from control.settings import Settings
from control.storage import Storage
from neat_core.models.catalog import CAUSAL_LM

log = logging.getLogger("api.targets")
CHECKPOINT_MODEL = re.compile(r"^(?P<model>ft:.+):ckpt-step-(?P<step>\d+)$")  # checkpoint_object's names


def of_job(job: Job, storage: Storage, base_dir: str | None = None) -> Target:
    """A succeeded job's fine-tuned model: its artifact location, owner and method as the job recorded them."""
    return Target(
        job.fine_tuned_model,
        job.task,
        job.model,
        str(storage.path(job.artifact_key)),
        owner=job.organization_id,
        method=(job.adapter or {}).get("type"),
        base_dir=base_dir,
    )


def not_allowed(model_id: str) -> APIError:
    """An organisation limited to other base models (control.models.set_allowed_models) asked for this one."""
    return APIError(403, f"Your organisation may not use the model '{model_id}'; the models it may use are listed "
                    "at /v1/models.", code="model_not_allowed", param="model")  # fmt: skip


def base_dir_of(session: Session, job: Job) -> str | None:
    """Where a fine-tuned model's base loads from: a registered base's directory (None for a catalog base); a 404
    once its registered base was removed."""
    try:
        return models.loads_from(session, job.model)
    except LookupError:
        raise APIError(404, f"The model '{job.fine_tuned_model}' is no longer served: its base model '{job.model}' "
                       "was removed from this service.", code="model_not_found", param="model") from None  # fmt: skip


def resolve(session: Session, org: str, storage: Storage, model_id: str, task: str) -> Target:
    """The model `model_id` names for this caller, checked against the endpoint's task. Closes the session: the
    generation that follows may take a while and needs no database connection."""
    try:
        base = models.find(session, model_id)
        if base is not None:
            if not models.may_use(session, org, model_id):
                raise not_allowed(model_id)
            if task != CAUSAL_LM or CAUSAL_LM not in base.tasks:
                raise _wrong_endpoint(model_id, CAUSAL_LM in base.tasks, base=True)
            return Target(model_id, CAUSAL_LM, model_id, caller=org, base_dir=base.path)
        if CHECKPOINT_MODEL.match(model_id):
            job, checkpoint = checkpoint_of(session, org, model_id, storage)
            if job.task != task:
                raise _wrong_endpoint(model_id, job.task == CAUSAL_LM, base=False)
            target = of_checkpoint(job, checkpoint, storage)
            return dataclasses.replace(target, caller=org, base_dir=base_dir_of(session, job))
        job = session.scalar(owned(Job, org).where(Job.fine_tuned_model == model_id, Job.status == JobStatus.SUCCEEDED))
        if job is None or job.artifact_key is None:
            gone = "has been deleted" if job is not None else "does not exist"  # (deleted: DELETE /v1/models)
            raise APIError(404, f"The model '{model_id}' {gone}.", code="model_not_found", param="model")
        if job.task != task:
            raise _wrong_endpoint(model_id, job.task == CAUSAL_LM, base=False)
        return dataclasses.replace(of_job(job, storage, base_dir_of(session, job)), caller=org)
    finally:
        session.close()


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
    """The models `serving_preload` names (base models, catalog or registered, or succeeded fine-tuned models of
    any organisation: an operator's list). A name that does not resolve is logged and skipped."""
    storage = Storage(settings.resolved_artifact_root)
    targets = []
    for name in filter(None, (n.strip() for n in settings.serving_preload.split(","))):
        with session_scope(settings.resolved_database_url) as session:
            base = models.find(session, name)
            if base is not None:
                targets.append(Target(name, CAUSAL_LM, name, base_dir=base.path))
                continue
            job = session.scalar(select(Job).where(Job.fine_tuned_model == name, Job.status == JobStatus.SUCCEEDED))
            if job is None or job.artifact_key is None:
                log.warning("cannot preload %s: no such succeeded fine-tuned model", name)
                continue
            try:
                targets.append(of_job(job, storage, models.loads_from(session, job.model)))
            except LookupError as e:
                log.warning("cannot preload %s: %s", name, e)
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
