"""/v1/models: the base models the caller may use (the catalog's and the operator's registered ones, control.models)
and the caller's fine-tuned ones; a fine-tuned model can be deleted."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentOrg, SessionClosingRoute, SessionDep, StorageDep
from api.errors import APIError
from api.pagination import known_params, owned
from api.routes.inference import BackendDep
from api.targets import CHECKPOINT_MODEL, checkpoint_of
from control import jobs, models
from control.backends import BackendError
from control.events import add_event
from control.jobs import JobStatus, fine_tuned_model_name
from control.orm import Job
from control.storage import Storage

router = APIRouter(route_class=SessionClosingRoute, prefix="/v1/models", tags=["models"])
log = logging.getLogger("api.models")


def _base(model: models.BaseModel) -> dict:
    return {"id": model.id, "object": "model", "created": model.created, "owned_by": "system",
            "tasks": list(model.tasks)}  # fmt: skip


def _fine_tuned(job: Job) -> dict:
    return {"id": job.fine_tuned_model, "object": "model", "created": job.finished_at, "owned_by": job.organization_id,
            "parent": job.model, "tasks": [job.task]}  # fmt: skip


def missing(model_id: str, job: Job | None) -> APIError:
    """The 404 of a model the caller has not got: a deleted fine-tuned model of theirs says so."""
    if job is not None and jobs.model_deleted(job):
        return APIError(404, f"The model '{model_id}' has been deleted.", code="model_not_found", param="model")
    return APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")


def _owned_model(session: Session, org: str, model_id: str) -> Job | None:
    return session.scalar(owned(Job, org).where(Job.fine_tuned_model == model_id, Job.status == JobStatus.SUCCEEDED))


@router.get("", dependencies=[known_params()])
def list_models(session: SessionDep, org: CurrentOrg) -> dict:
    query = owned(Job, org).where(Job.status == JobStatus.SUCCEEDED, Job.artifact_key.is_not(None)).order_by(Job.seq)
    bases = [_base(m) for m in models.available(session, org)]
    return {"object": "list", "data": bases + [_fine_tuned(j) for j in session.scalars(query)]}


@router.get("/{model_id:path}")
def retrieve_model(session: SessionDep, org: CurrentOrg, storage: StorageDep, model_id: str) -> dict:
    base = models.find(session, model_id)
    if base is not None and models.may_use(session, org, model_id):
        return _base(base)
    if CHECKPOINT_MODEL.match(model_id):  # a checkpoint is a model of its own, whatever its job's status
        job, checkpoint = checkpoint_of(session, org, model_id, storage)
        return {"id": model_id, "object": "model", "created": checkpoint.created_at, "owned_by": org,
                "parent": fine_tuned_model_name(job), "tasks": [job.task]}  # fmt: skip
    job = _owned_model(session, org, model_id)
    if job is None or jobs.model_deleted(job):
        raise missing(model_id, job)
    return _fine_tuned(job)


@router.delete("/{model_id:path}")
async def delete_model(session: SessionDep, org: CurrentOrg, storage: StorageDep, backend: BackendDep,
                       model_id: str) -> dict:  # fmt: skip
    """OpenAI's ModelDeleted. The job keeps its record (and names the model it made); the model is unloaded from
    serving and its artifact removed. The database decides first: once committed, no request resolves the model
    (api.targets), whatever a server still has cached, and a second delete answers 404."""
    key = await run_in_threadpool(_forget, session, org, storage, model_id)
    try:
        await backend.unload(model_id)
    except BackendError:
        pass  # nothing serves inference here (so nothing has it loaded)
    await run_in_threadpool(storage.delete, key)
    log.info("deleted fine-tuned model %s (artifact %s)", model_id, key)
    return {"id": model_id, "object": "model", "deleted": True}


def _forget(session: Session, org: str, storage: Storage, model_id: str) -> str:
    """Marks the model deleted (committed) and returns its artifact's key; closes the session."""
    try:
        if models.find(session, model_id) is not None:
            raise APIError(403, f"The model '{model_id}' is a base model of this service; only fine-tuned models can "
                           "be deleted.", code="model_not_deletable", param="model")  # fmt: skip
        if CHECKPOINT_MODEL.match(model_id):
            checkpoint_of(session, org, model_id, storage)  # (another organisation's, or none: 404 as missing)
            raise APIError(403, f"The model '{model_id}' is a checkpoint of a job; checkpoints cannot be deleted on "
                           "their own (the job keeps its last few).", code="model_not_deletable",
                           param="model")  # fmt: skip
        job = _owned_model(session, org, model_id)
        if job is None or jobs.model_deleted(job):
            raise missing(model_id, job)
        key, job_id = job.artifact_key, job.id
        if not jobs.delete_model(session, job_id, key):  # a concurrent delete won
            raise APIError(404, f"The model '{model_id}' has been deleted.", code="model_not_found", param="model")
        add_event(session, job_id, f"Fine-tuned model {model_id} deleted")
        session.commit()
        return key
    finally:
        session.close()
