"""/v1/fine_tuning/jobs: create (validated up front), list, retrieve, cancel, events, checkpoints, adapter download."""

from __future__ import annotations

import io
import logging
import re
import secrets
import tarfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import BigInteger, Select, Text, bindparam, cast, or_, select
from sqlalchemy.orm import Session

from api import idempotency
from api.deps import CurrentOrg, IdempotencyHeader, SessionClosingRoute, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, not_found
from api.idempotency import Claim, request_hash
from api.pagination import known_params, owned, paginate, read_newest_first
from api.quotas import job_quota_error
from api.schemas import (
    EVENT_FIELDS,
    JOB_FIELDS,
    MAX_METADATA_KEY,
    Adapter,
    JobCreate,
    checkpoint_object,
    columns,
    event_object,
    job_object,
    page,
)
from api.targets import checkpoint_of, not_allowed
from control import jobs, models
from control.db import Read, fetch
from control.events import add_event
from control.ids import new_id
from control.jobs import FINISHED, JobStatus, fine_tuned_model_name
from control.orm import Checkpoint, File, Job, JobEvent
from control.queue import enqueue
from control.settings import Settings
from neat_core.data.formats import DataFormat
from neat_core.errors import InvalidHyperparameterError
from neat_core.methods.specs import check_architecture, check_hyperparameters

router = APIRouter(route_class=SessionClosingRoute, prefix="/v1/fine_tuning/jobs", tags=["fine-tuning"])
log = logging.getLogger("api")


# The reads a client polling its job makes every second or so, run on the event loop (control.db.fetch): a job, and
# its latest events. Another organisation's job is found by none of them, exactly like a missing one.
_OWNED_JOB = (Job.id == bindparam("job_id"), Job.organization_id == bindparam("org"))
_JOB = Read(select(*columns(Job, JOB_FIELDS)).where(*_OWNED_JOB))
_JOB_ID = Read(select(Job.id.label("id")).where(*_OWNED_JOB))
_OF_OWNED_JOB = (JobEvent.job_id == bindparam("job_id"), select(Job.id).where(*_OWNED_JOB).exists())
_EVENTS = Read(
    select(*columns(JobEvent, EVENT_FIELDS))
    .where(*_OF_OWNED_JOB, JobEvent.seq < bindparam("before", type_=BigInteger))
    .order_by(JobEvent.seq.desc())
    .limit(bindparam("n", type_=BigInteger))
)
_EVENT_SEQ = Read(select(JobEvent.seq.label("seq")).where(*_OF_OWNED_JOB, JobEvent.id == bindparam("after")))


def _get(session, org: str, job_id: str) -> Job:
    row = session.scalar(owned(Job, org).where(Job.id == job_id))
    if row is None:
        raise not_found("job", job_id)
    return row


def _file(session, org: str, file_id: str, param: str) -> File:
    # FOR SHARE (Postgres): a concurrent DELETE /v1/files of this file waits until the job is created, then sees it
    row = session.scalar(owned(File, org).where(File.id == file_id).with_for_update(read=True))
    if row is None:
        raise APIError(400, f"{param} '{file_id}' does not exist.", code="file_not_found", param=param)
    return row


@router.post("")
def create_job(body: JobCreate, session: SessionDep, org: CurrentOrg, settings: SettingsDep,
               idempotency_key: IdempotencyHeader = None) -> Any:  # fmt: skip
    digest = request_hash(body.model_dump(mode="json"), body.model_extra)
    claimed = idempotency.claim(settings.resolved_database_url, org, "fine_tuning.jobs", idempotency_key, digest)
    if isinstance(claimed, JSONResponse):
        return claimed  # a retry of a request that already created its job
    try:
        job = _create_job(body, session, org, settings, claimed)
    except BaseException:
        session.rollback()  # first: on SQLite the admission holds the write lock, which the release needs
        if claimed is not None:
            claimed.release()
        raise
    _send(job, settings)  # after the commit: a worker that picks the message up must find the row
    return job_object(job)


def _create_job(body: JobCreate, session: Session, org: str, settings: Settings, claimed: Claim | None) -> Job:
    # catalog and registered models only (control.models); a local path is a library feature, never a customer's
    base = models.find(session, body.model)
    if base is None:
        available = ", ".join(m.id for m in models.available(session, org))
        raise APIError(400, f"Unknown base model '{body.model}'; available: {available}.", code="model_not_found",
                       param="model")  # fmt: skip
    if not models.may_use(session, org, base.id):
        raise not_allowed(base.id)
    tasks = base.tasks
    training = _file(session, org, body.training_file, "training_file")
    if body.validation_file:
        validation = _file(session, org, body.validation_file, "validation_file")
        if validation.format != training.format:
            raise APIError(400, f"validation_file is {validation.format}, training_file is {training.format}.",
                           code="format_mismatch", param="validation_file")  # fmt: skip
    fmt = DataFormat(training.format)
    if fmt.objective != body.method_type:  # DPO trains on preference pairs, and only DPO does
        wanted = "the preference format" if body.method_type == "dpo" else "a supervised format, not preference pairs"
        raise APIError(400, f"A {body.method_type} job needs {wanted}; training_file {training.id} is {fmt.value}.",
                       code="format_mismatch", param="training_file")  # fmt: skip
    task = fmt.task
    if task not in tasks:
        raise APIError(400, f"{body.model} cannot be fine-tuned on {training.format} data ({task}); it supports: "
                       f"{', '.join(tasks)}.", code="incompatible_model", param="model")  # fmt: skip
    adapter = body.adapter or Adapter()
    try:
        check_hyperparameters(adapter.type, adapter.model_extra or {})
        # A method that cannot work on this architecture is refused now, not by the worker after the model loads.
        check_architecture(adapter.type, base.model_type, adapter.model_extra or {})
    except InvalidHyperparameterError as e:
        param = "adapter.type" if e.field == "method" else f"adapter.{e.field}"
        raise APIError(400, str(e), code="invalid_hyperparameter", param=param) from e

    # Files were validated in full when uploaded; what is left is that they still exist, checked above.
    job = Job(
        id=new_id("ftjob"),
        organization_id=org,
        model=body.model,
        task=task,
        training_file=training.id,
        validation_file=body.validation_file,
        suffix=body.suffix or None,
        seed=body.seed if body.seed is not None else secrets.randbelow(2**31),
        user_metadata=body.metadata,
        method_type=body.method_type,
        hyperparameters=body.requested_hyperparameters(),
        adapter={"type": adapter.type, **(adapter.model_extra or {})},
    )
    try:  # last: the admission holds its organisation's lock until the commit
        jobs.create(session, job, default_max_active=settings.max_active_jobs)  # queued; sent after the commit
    except jobs.ActiveJobLimit as refused:
        raise job_quota_error(refused) from None
    if claimed is not None:
        session.flush()
        claimed.record(session, job_object(job))  # in the job's own transaction: both or neither
    session.commit()
    return job


@router.get("", dependencies=[known_params("after", "limit", "metadata", prefixes=("metadata[",))])
def list_jobs(request: Request, session: SessionDep, org: CurrentOrg, after: str | None = None,
              limit: Annotated[int, Query()] = 20) -> dict:  # fmt: skip
    query = _metadata_filter(owned(Job, org), request.query_params.multi_items())
    rows, has_more = paginate(session, query, Job, after=after, limit=limit, newest_first=True)
    return page([job_object(r) for r in rows], has_more)


_METADATA_KEY = re.compile(r"^metadata\[(.+)\]$")
_SAFE_KEY = re.compile(r"^[^\"\\]+$")  # a key the JSON path of SQLite's json_extract can name


def _metadata_filter(query: Select, params: list[tuple[str, str]]) -> Select:
    """OpenAI's filter: `metadata[k]=v` (every pair must match), or `metadata=null` (jobs without metadata)."""
    for name, value in params:
        if name == "metadata":
            if value != "null":
                raise APIError(400, "metadata filters are written metadata[key]=value, or metadata=null for jobs "
                               "without metadata.", code="invalid_metadata_filter", param="metadata")  # fmt: skip
            query = query.where(or_(Job.user_metadata.is_(None), cast(Job.user_metadata, Text).in_(["null", "{}"])))
            continue
        match = _METADATA_KEY.match(name)
        if match is None:
            continue  # not a metadata filter (known_params let it through)
        key = match.group(1)
        if len(key) > MAX_METADATA_KEY or not _SAFE_KEY.match(key):
            raise APIError(400, f"Cannot filter on the metadata key {key!r}: keys are at most {MAX_METADATA_KEY} "
                           "characters, without '\"' or '\\'.", code="invalid_metadata_filter", param=name)  # fmt: skip
        query = query.where(Job.user_metadata[key].as_string() == value)
    return query


@router.get("/{job_id}")
async def retrieve_job(org: CurrentOrg, settings: SettingsDep, job_id: str) -> dict:
    rows = await fetch(settings.resolved_database_url, _JOB, job_id=job_id, org=org)
    if not rows:
        raise not_found("job", job_id)
    return job_object(rows[0])


@router.post("/{job_id}/cancel")
def cancel_job(session: SessionDep, org: CurrentOrg, job_id: str) -> dict:
    job = _get(session, org, job_id)
    # Conditional updates: the worker claims queued jobs concurrently, so decide on the row's state, not ours.
    stopped = jobs.cancel_unstarted(session, job.id)
    if stopped:
        add_event(session, job.id, "Job cancelled before it started")
    elif jobs.request_cancel(session, job.id):
        add_event(session, job.id, "Cancellation requested; the job stops after its current step")
    session.commit()
    session.refresh(job)
    # Cancelling is idempotent: a job already cancelled (by a concurrent request that won the race, or earlier)
    # or being cancelled answers as the winning request did. Only a job that ended otherwise cannot be cancelled.
    if job.status in FINISHED and job.status != JobStatus.CANCELLED:
        raise APIError(409, f"Job {job.id} has already {job.status}.", code="job_not_cancellable")
    return job_object(job)


@router.post("/{job_id}/pause")
def pause_job(session: SessionDep, org: CurrentOrg, job_id: str) -> dict:
    """OpenAI's pause: a running job saves a checkpoint after its current step and lets its worker go (it shows
    `running` until then); a queued one is held at once. Pausing a paused (or pausing) job changes nothing."""
    job = _get(session, org, job_id)
    moved = jobs.request_pause(session, job.id)
    if moved == JobStatus.PAUSED:
        add_event(session, job.id, "Job paused before it started; resume it to queue it again")
    elif moved == JobStatus.PAUSING:
        add_event(session, job.id, "Pause requested; the job saves a checkpoint after its current step")
    session.commit()
    session.refresh(job)
    if job.status not in (JobStatus.PAUSED, JobStatus.PAUSING):
        raise APIError(409, f"Job {job.id} is {job_object(job)['status']}; only a queued or running job can be "
                       "paused.", code="job_not_pausable")  # fmt: skip
    return job_object(job)


@router.post("/{job_id}/resume")
def resume_job(session: SessionDep, org: CurrentOrg, settings: SettingsDep, job_id: str) -> dict:
    """OpenAI's resume: a paused job is queued again and continues exactly from its last checkpoint."""
    job = _get(session, org, job_id)
    moved = jobs.resume(session, job.id)
    if moved == JobStatus.QUEUED:
        add_event(session, job.id, "Job resumed; it continues from its last checkpoint")
    elif moved == JobStatus.RUNNING:
        add_event(session, job.id, "Pause withdrawn; the job keeps running")
    session.commit()
    session.refresh(job)
    if moved is None:
        raise APIError(409, f"Job {job.id} is {job_object(job)['status']}; only a paused job can be resumed.",
                       code="job_not_resumable")  # fmt: skip
    if moved == JobStatus.QUEUED:
        _send(job, settings)
    return job_object(job)


@router.get("/{job_id}/events", dependencies=[known_params("after", "limit")])
async def list_events(org: CurrentOrg, settings: SettingsDep, job_id: str, after: str | None = None,
                      limit: Annotated[int, Query()] = 20) -> dict:  # fmt: skip
    # newest first, as OpenAI lists them: the first page shows where the job is now
    rows, has_more = await read_newest_first(settings.resolved_database_url, _EVENTS, _EVENT_SEQ, _JOB_ID,
                                             not_found("job", job_id), after=after, limit=limit, job_id=job_id,
                                             org=org)  # fmt: skip
    return page([event_object(r) for r in rows], has_more)


@router.get("/{job_id}/checkpoints", dependencies=[known_params("after", "limit")])
def list_checkpoints(session: SessionDep, org: CurrentOrg, job_id: str, after: str | None = None,
                     limit: Annotated[int, Query()] = 10) -> dict:  # fmt: skip
    job = _get(session, org, job_id)
    query = select(Checkpoint).where(Checkpoint.job_id == job_id)
    rows, has_more = paginate(session, query, Checkpoint, after=after, limit=limit, newest_first=True)
    return page([checkpoint_object(r, job) for r in rows], has_more)


NATIVE_FILES = ("adapter_config.json", "adapter_model.safetensors", "manifest.json")


@router.get("/{job_id}/adapter")
def download_adapter(session: SessionDep, org: CurrentOrg, storage: StorageDep, job_id: str,
                     format: Literal["native", "lora"] = "native",
                     checkpoint: int | None = None) -> Response:  # fmt: skip
    job = _get(session, org, job_id)
    if checkpoint is not None:  # a checkpoint's adapter (any job status), as `ft:…:ckpt-step-N` serves it
        if format == "lora":
            raise APIError(400, "A checkpoint's adapter comes in the native format only; the job's final adapter "
                           "also has a LoRA form.", code="not_exportable", param="format")  # fmt: skip
        _, row = checkpoint_of(session, org, f"{fine_tuned_model_name(job)}:ckpt-step-{checkpoint}", storage)
        root = storage.path(row.storage_key) / "adapter"
    elif jobs.model_deleted(job):
        raise APIError(409, f"Job {job.id}'s fine-tuned model {job.fine_tuned_model} has been deleted, and its adapter "
                       "with it.", code="model_deleted")  # fmt: skip
    elif job.status != JobStatus.SUCCEEDED or not job.artifact_key:
        raise APIError(409, f"Job {job.id} has no adapter yet (status: {job.status}).", code="adapter_not_ready")
    else:
        root = storage.path(job.artifact_key)
    if format == "lora":
        if not (root / "lora").is_dir():
            raise APIError(400, "This adapter has no LoRA form.", code="not_exportable", param="format")
        members = [(p, p.name) for p in sorted((root / "lora").iterdir())] + [(root / "manifest.json", "manifest.json")]
    else:
        members = [(root / name, name) for name in NATIVE_FILES]
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path, name in members:
            tar.add(Path(path), arcname=f"{job.id}/{name}")
    return Response(
        buffer.getvalue(),
        media_type="application/gzip",
        headers={"Content-Disposition": f'attachment; filename="{job.id}{_step(checkpoint)}-{format}.tar.gz"'},
    )


def _step(checkpoint: int | None) -> str:
    return "" if checkpoint is None else f"-step-{checkpoint}"


def _send(job: Job, settings: Settings) -> None:
    """The queued job's message to the workers that have its devices, once its row is committed."""
    try:
        enqueue(job.id, settings, n_devices=jobs.n_devices(job.hyperparameters))
    except Exception:  # noqa: BLE001  (the row stays queued; a worker's reaper sends it after redeliver_seconds)
        log.exception("could not enqueue %s", job.id)
