"""/v1/models: the catalog's base models and the caller's fine-tuned ones."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CurrentOrg, SessionClosingRoute, SessionDep, StorageDep
from api.errors import APIError
from api.pagination import owned
from api.targets import CHECKPOINT_MODEL, checkpoint_of
from control.jobs import JobStatus, fine_tuned_model_name
from control.orm import Job
from neat_core.models.catalog import catalog

router = APIRouter(route_class=SessionClosingRoute, prefix="/v1/models", tags=["models"])


def _base(entry) -> dict:
    return {"id": entry.id, "object": "model", "created": 0, "owned_by": "system", "tasks": list(entry.tasks)}


def _fine_tuned(job: Job) -> dict:
    return {"id": job.fine_tuned_model, "object": "model", "created": job.finished_at, "owned_by": job.organization_id,
            "parent": job.model, "tasks": [job.task]}  # fmt: skip


@router.get("")
def list_models(session: SessionDep, org: CurrentOrg) -> dict:
    jobs = session.scalars(owned(Job, org).where(Job.status == JobStatus.SUCCEEDED).order_by(Job.seq)).all()
    return {"object": "list", "data": [_base(e) for e in catalog()] + [_fine_tuned(j) for j in jobs]}


@router.get("/{model_id:path}")
def retrieve_model(session: SessionDep, org: CurrentOrg, storage: StorageDep, model_id: str) -> dict:
    for entry in catalog():
        if entry.id == model_id:
            return _base(entry)
    if CHECKPOINT_MODEL.match(model_id):  # a checkpoint is a model of its own, whatever its job's status
        job, checkpoint = checkpoint_of(session, org, model_id, storage)
        return {"id": model_id, "object": "model", "created": checkpoint.created_at, "owned_by": org,
                "parent": fine_tuned_model_name(job), "tasks": [job.task]}  # fmt: skip
    job = session.scalar(owned(Job, org).where(Job.fine_tuned_model == model_id, Job.status == JobStatus.SUCCEEDED))
    if job is None:
        raise APIError(404, f"The model '{model_id}' does not exist.", code="model_not_found", param="model")
    return _fine_tuned(job)
