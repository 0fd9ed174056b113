"""/v1/admin: organisations, API keys and registered base models over HTTP, for the operator (the same operations
as `python -m api.admin`).

Authenticated by the deployment's admin key (NEAT_ADMIN_API_KEY, compared in constant time), never by a customer's
key. Without an admin key configured the whole prefix answers 404, as if it did not exist.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Request
from pydantic import BaseModel, ConfigDict, Field

from api.deps import SessionClosingRoute, SessionDep, SettingsDep, StorageDep
from api.errors import APIError
from api.uploads import receive_upload
from control import models
from control.keys import LIMITS, create_key, create_org, list_keys, revoke_key, set_limits
from neat_core.models.directory import InvalidModelDirectory

OrgId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]


def require_admin(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> None:
    if not settings.admin_api_key:
        raise APIError(404, "Not found.", code="not_found")
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.admin_api_key.encode()):
        raise APIError(401, "This endpoint needs the admin API key.", code="invalid_api_key")


router = APIRouter(
    route_class=SessionClosingRoute,
    prefix="/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    include_in_schema=False,
)


class NewOrganization(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: OrgId
    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_active_jobs: Annotated[int, Field(ge=0)] | None = None
    max_storage_bytes: Annotated[int, Field(ge=0)] | None = None
    inference_rpm: Annotated[int, Field(ge=0)] | None = None


class NewModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: Annotated[str, Field(min_length=1, max_length=200)]
    path: Annotated[str, Field(min_length=1, max_length=1024)]  # a directory on shared storage
    description: Annotated[str, Field(max_length=500)] | None = None


class AllowedModels(BaseModel):
    model_config = ConfigDict(extra="forbid")
    models: list[Annotated[str, Field(min_length=1, max_length=200)]] | None  # null: every base model


@router.post("/organizations")
def new_organization(body: NewOrganization, session: SessionDep) -> dict:
    try:
        org = create_org(session, body.id, body.name)
    except ValueError as e:
        raise APIError(409, str(e), code="organization_exists", param="id") from e
    session.commit()
    return {"object": "organization", "id": org.id, "name": org.name}


@router.post("/organizations/{org_id}/api_keys")
def new_key(org_id: str, session: SessionDep) -> dict:
    try:
        row, key = create_key(session, org_id)
    except LookupError as e:
        raise APIError(404, str(e), code="organization_not_found") from e
    session.commit()
    return {"object": "api_key", "id": row.id, "organization": org_id, "key": key}  # the only time it is shown


@router.get("/organizations/{org_id}/api_keys")
def keys(org_id: str, session: SessionDep) -> dict:
    try:
        rows = list_keys(session, org_id)
    except LookupError as e:
        raise APIError(404, str(e), code="organization_not_found") from e
    data = [{"object": "api_key", "id": k.id, "prefix": k.prefix, "created_at": k.created_at,
             "revoked_at": k.revoked_at} for k in rows]  # fmt: skip
    return {"object": "list", "data": data}


@router.delete("/api_keys/{key_id}")
def revoke(key_id: str, session: SessionDep) -> dict:
    if not revoke_key(session, key_id):
        raise APIError(404, f"No active API key '{key_id}'.", code="api_key_not_found")
    session.commit()
    return {"object": "api_key", "id": key_id, "revoked": True}


@router.post("/organizations/{org_id}/limits")
def limits(org_id: str, body: Limits, session: SessionDep) -> dict:
    try:
        org = set_limits(session, org_id, **{n: getattr(body, n) for n in body.model_fields_set})
    except LookupError as e:
        raise APIError(404, str(e), code="organization_not_found") from e
    session.commit()
    return {"object": "organization.limits", "id": org.id, **{n: getattr(org, n) for n in LIMITS}}


@router.post("/organizations/{org_id}/allowed_models")
def allowed_models(org_id: str, body: AllowedModels, session: SessionDep) -> dict:
    try:
        org = models.set_allowed_models(session, org_id, body.models)
    except LookupError as e:
        raise APIError(404, str(e), code="organization_not_found") from e
    except ValueError as e:
        raise APIError(400, str(e), code="model_not_found", param="models") from e
    session.commit()
    return {"object": "organization.allowed_models", "id": org.id, "allowed_models": org.allowed_models}


@router.post("/models")
def register_model(body: NewModel, session: SessionDep) -> dict:
    """Register a directory on shared storage as a base model; 400 naming what is wrong with it (nothing stored)."""
    try:
        model = models.register(session, body.id, body.path, body.description)
    except InvalidModelDirectory as e:
        raise APIError(400, str(e), code="invalid_model", param="path") from e
    except ValueError as e:
        raise APIError(400, str(e), code="invalid_model", param="id") from e
    session.commit()
    return {"object": "model", **model.as_dict()}


@router.get("/models")
def registered_models(session: SessionDep) -> dict:
    return {"object": "list", "data": [{"object": "model", **m.as_dict()} for m in models.base_models(session)]}


@router.post("/models/archive")
def upload_model(request: Request, session: SessionDep, settings: SettingsDep, storage: StorageDep) -> dict:
    """Register a model from an uploaded tar or zip of its directory (multipart: `id`, `file`, `description`),
    unpacked onto the artifact storage (control.models.register_archive); 400 naming what is wrong, nothing kept."""
    upload = receive_upload(request, storage, settings.max_model_archive_bytes, settings.upload_idle_seconds)
    try:
        model_id = upload.fields.get("id")
        if not model_id:
            raise APIError(400, "id is required: the model's id, e.g. acme/qwen3-support.", code="invalid_request",
                           param="id")  # fmt: skip
        try:
            limit, description = settings.max_model_archive_bytes, upload.fields.get("description")
            model = models.register_archive(session, model_id, upload.temp, storage, limit, description)
        except InvalidModelDirectory as e:
            raise APIError(400, str(e), code="invalid_model", param="file") from e
        except ValueError as e:
            raise APIError(400, str(e), code="invalid_model", param="id") from e
        session.commit()
    finally:
        upload.temp.unlink(missing_ok=True)
    return {"object": "model", **model.as_dict()}


@router.delete("/models/{model_id:path}")
def remove_model(model_id: str, session: SessionDep, storage: StorageDep) -> dict:
    try:
        path = models.remove(session, model_id)
    except LookupError as e:
        raise APIError(404, str(e), code="model_not_found", param="model") from e
    except ValueError as e:
        raise APIError(409, str(e), code="model_in_use", param="model") from e
    session.commit()
    models.delete_upload(storage, model_id, path)  # an uploaded archive's files, once nothing names them
    return {"object": "model", "id": model_id, "deleted": True}
