"""/v1/files: uploads are streamed into a temporary file under the size limit (api.uploads), validated line by
line, and stored together with their row, within the organisation's storage quota (api.quotas.admit_storage)."""

from __future__ import annotations

import os
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse

from api import idempotency
from api.deps import CurrentOrg, IdempotencyHeader, SessionClosingRoute, SessionDep, SettingsDep, StorageDep
from api.errors import APIError, not_found
from api.idempotency import Claim, request_hash
from api.pagination import known_params, owned, paginate
from api.quotas import admit_storage, check_storage_quota
from api.schemas import file_object, files_page
from api.uploads import OPENAPI, disk_full, receive_upload
from control import jobs
from control.ids import new_id
from control.orm import File
from control.storage import DiskFull, file_key
from neat_core.data.formats import validate_jsonl

router = APIRouter(route_class=SessionClosingRoute, prefix="/v1/files", tags=["files"])


def _plain_name(name: str | None) -> str:
    """The client's file name as a plain display name: no directories, no control characters (NUL included)."""
    name = os.path.basename((name or "").replace("\\", "/"))
    name = "".join(c for c in name if c.isprintable())[:255]
    return name if name not in ("", ".", "..") else "upload.jsonl"


def _get(session, org: str, file_id: str) -> File:
    row = session.scalar(owned(File, org).where(File.id == file_id))
    if row is None:
        raise not_found("file", file_id)
    return row


@router.post("", openapi_extra=OPENAPI)
def upload_file(
    request: Request,
    session: SessionDep,
    org: CurrentOrg,
    storage: StorageDep,
    settings: SettingsDep,
    idempotency_key: IdempotencyHeader = None,
) -> Any:
    upload = receive_upload(request, storage, settings.max_upload_bytes, settings.upload_idle_seconds)
    claimed: Claim | JSONResponse | None = None
    try:
        purpose = upload.fields.get("purpose")
        if purpose is None:
            raise APIError(400, "purpose is required ('fine-tune').", code="invalid_request", param="purpose")
        if purpose != "fine-tune":
            raise APIError(400, "purpose must be 'fine-tune'.", code="invalid_purpose", param="purpose")
        digest = request_hash(upload.sha256, upload.size, purpose, upload.filename)
        claimed = idempotency.claim(settings.resolved_database_url, org, "files", idempotency_key, digest)
        if isinstance(claimed, JSONResponse):
            return claimed  # a retry of an upload that was already stored (whatever the quota says now)
        check_storage_quota(session, org, upload.size, settings)  # early and cheap; `admit_storage` decides
        report = validate_jsonl(upload.temp, min_examples=settings.min_examples,
                                max_line_bytes=settings.max_line_bytes)  # fmt: skip
        if not report.ok:
            raise APIError(400, f"Invalid training file: {report.errors[0]['message']}", code="invalid_file",
                           param="file", extra={"errors": report.errors})  # fmt: skip
        file_id = new_id("file")
        row = File(
            id=file_id,
            organization_id=org,
            filename=_plain_name(upload.filename),
            purpose=purpose,
            bytes=upload.size,
            sha256=upload.sha256,
            format=report.format.value,
            num_examples=report.num_examples,
            storage_key=file_key(org, file_id),
        )
        admit_storage(session, org, upload.size, settings)  # locks the organisation until the commit below
        try:
            storage.commit(upload.temp, row.storage_key)
        except DiskFull as e:
            raise disk_full() from e
        session.add(row)
        if claimed is not None:
            session.flush()  # fills in the defaults (created_at) that the response shows
            claimed.record(session, file_object(row))  # in the file's own transaction: both or neither
        try:
            session.commit()
        except BaseException:
            storage.delete(row.storage_key)  # no blob without its row
            raise
    except BaseException:
        session.rollback()  # let go of the organisation's lock before the key's release writes (SQLite: one writer)
        if isinstance(claimed, Claim):
            claimed.release()
        raise
    finally:
        upload.temp.unlink(missing_ok=True)
    return file_object(row)


@router.get("", dependencies=[known_params("after", "limit", "purpose", "order")])
def list_files(
    session: SessionDep,
    org: CurrentOrg,
    after: str | None = None,
    limit: Annotated[int, Query()] = 20,
    purpose: str | None = None,
    order: Literal["asc", "desc"] = "desc",
) -> dict:
    query = owned(File, org)
    if purpose:
        query = query.where(File.purpose == purpose)
    rows, has_more = paginate(session, query, File, after=after, limit=limit, newest_first=order == "desc")
    return files_page([file_object(r) for r in rows], has_more)


@router.get("/{file_id}")
def retrieve_file(session: SessionDep, org: CurrentOrg, file_id: str) -> dict:
    return file_object(_get(session, org, file_id))


@router.delete("/{file_id}")
def delete_file(session: SessionDep, org: CurrentOrg, storage: StorageDep, file_id: str) -> dict:
    # The row is locked (Postgres) while we look for jobs that use it; job creation reads it FOR SHARE, so a job
    # created at the same moment either waits for this delete (then finds no file) or makes it answer 409.
    row = session.scalar(owned(File, org).where(File.id == file_id).with_for_update())
    if row is None:
        raise not_found("file", file_id)
    job_id = jobs.active_job_using(session, org, file_id)
    if job_id is not None:
        raise APIError(409, f"File {file_id} is in use by job {job_id}, which has not finished; cancel the job or "
                       "wait for it to finish, then delete the file.", code="file_in_use", param="file_id")  # fmt: skip
    session.delete(row)
    session.commit()
    storage.delete(row.storage_key)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/{file_id}/content")
def file_content(session: SessionDep, org: CurrentOrg, storage: StorageDep, file_id: str) -> FileResponse:
    row = _get(session, org, file_id)
    return FileResponse(storage.path(row.storage_key), media_type="application/jsonl", filename=row.filename)
