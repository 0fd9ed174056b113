"""/v1/webhook_endpoints: an organisation's webhook endpoints, as OpenAI's API (and the `openai` SDK's
`client.webhooks.create | retrieve | update | list | delete`) has them, plus ours: each endpoint's deliveries and
their attempts. /v1/webhook_event_types lists what can be subscribed to. What is sent, and how: control.webhooks.

An endpoint's URL is checked when it is registered or changed (control.webhooks.check_url: no private or loopback
address unless the operator allows them) and again at every delivery. Its secret is answered once, at creation
(and to a retry of that creation with the same Idempotency-Key, as for files and jobs).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import idempotency
from api.deps import CurrentOrg, IdempotencyHeader, SessionClosingRoute, SessionDep, SettingsDep
from api.errors import APIError, not_found
from api.idempotency import request_hash
from api.pagination import known_params, owned, paginate
from api.schemas import (
    WebhookEndpointCreate,
    WebhookEndpointUpdate,
    files_page,
    page,
    webhook_delivery_object,
    webhook_endpoint_object,
)
from control import webhooks
from control.ids import new_id, now
from control.orm import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from control.settings import Settings

router = APIRouter(route_class=SessionClosingRoute, prefix="/v1", tags=["webhooks"])
ENDPOINTS = "/webhook_endpoints"


def _get(session: Session, org: str, endpoint_id: str) -> WebhookEndpoint:
    row = session.scalar(owned(WebhookEndpoint, org).where(WebhookEndpoint.id == endpoint_id))
    if row is None:
        raise not_found("webhook_endpoint", endpoint_id)
    return row


def _check_url(url: str, settings: Settings) -> None:
    try:
        webhooks.check_url(url, allow_private=settings.webhooks_allow_private)
    except webhooks.UnsafeURL as e:
        raise APIError(400, str(e), code="invalid_url", param="url") from None


@router.get("/webhook_event_types")
def list_event_types(org: CurrentOrg) -> dict:
    return {"object": "list", "data": list(webhooks.EVENT_TYPES)}


@router.post(ENDPOINTS)
def create_endpoint(body: WebhookEndpointCreate, session: SessionDep, org: CurrentOrg, settings: SettingsDep,
                    idempotency_key: IdempotencyHeader = None) -> Any:  # fmt: skip
    _check_url(body.url, settings)
    digest = request_hash(body.model_dump(mode="json"))
    claimed = idempotency.claim(settings.resolved_database_url, org, "webhook_endpoints", idempotency_key, digest)
    if isinstance(claimed, JSONResponse):
        return claimed  # a retry of a creation that happened: the same endpoint, and its secret, again
    try:
        endpoint = WebhookEndpoint(id=new_id("whep", sep="_"), organization_id=org, name=body.name, url=body.url,
                                   event_types=list(dict.fromkeys(body.event_types)), secret=webhooks.new_secret(),
                                   created_at=now(), updated_at=now())  # fmt: skip
        session.add(endpoint)
        answer = webhook_endpoint_object(endpoint, with_secret=True)
        if claimed is not None:
            claimed.record(session, answer)  # in the endpoint's own transaction: both or neither
        session.commit()
    except BaseException:
        session.rollback()
        if claimed is not None:
            claimed.release()
        raise
    return answer


@router.get(ENDPOINTS, dependencies=[known_params("after", "limit")])
def list_endpoints(session: SessionDep, org: CurrentOrg, after: str | None = None,
                   limit: Annotated[int, Query()] = 20) -> dict:  # fmt: skip
    rows, has_more = paginate(session, owned(WebhookEndpoint, org), WebhookEndpoint, after=after, limit=limit,
                              newest_first=True)  # fmt: skip
    return files_page([webhook_endpoint_object(r) for r in rows], has_more)  # names first_id/last_id, as OpenAI's


@router.get(ENDPOINTS + "/{endpoint_id}")
def retrieve_endpoint(session: SessionDep, org: CurrentOrg, endpoint_id: str) -> dict:
    return webhook_endpoint_object(_get(session, org, endpoint_id))


@router.post(ENDPOINTS + "/{endpoint_id}")
def update_endpoint(body: WebhookEndpointUpdate, session: SessionDep, org: CurrentOrg, settings: SettingsDep,
                    endpoint_id: str) -> dict:  # fmt: skip
    endpoint = _get(session, org, endpoint_id)
    changes = body.model_dump(exclude_none=True)
    if "url" in changes:
        _check_url(changes["url"], settings)
    if "event_types" in changes:
        changes["event_types"] = list(dict.fromkeys(changes["event_types"]))
    changed = {k: v for k, v in changes.items() if getattr(endpoint, k) != v}
    for name, value in changed.items():
        setattr(endpoint, name, value)
    if changed:  # as OpenAI's: an unchanged update does not advance `updated_at`
        endpoint.updated_at = now()
    session.commit()
    return webhook_endpoint_object(endpoint)


@router.delete(ENDPOINTS + "/{endpoint_id}")
def delete_endpoint(session: SessionDep, org: CurrentOrg, endpoint_id: str) -> dict:
    endpoint = _get(session, org, endpoint_id)
    # Its deliveries and their attempts go with it (ON DELETE CASCADE); a task already holding one records nothing.
    session.delete(endpoint)
    session.commit()
    return {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


@router.get(ENDPOINTS + "/{endpoint_id}/deliveries", dependencies=[known_params("after", "limit")])
def list_deliveries(session: SessionDep, org: CurrentOrg, endpoint_id: str, after: str | None = None,
                    limit: Annotated[int, Query()] = 20) -> dict:  # fmt: skip
    """Ours: the endpoint's deliveries, newest first, each with every attempt made (status code or error)."""
    _get(session, org, endpoint_id)
    query = owned(WebhookDelivery, org).where(WebhookDelivery.endpoint_id == endpoint_id)
    rows, has_more = paginate(session, query, WebhookDelivery, after=after, limit=limit, newest_first=True)
    attempts: dict[str, list[WebhookAttempt]] = {r.id: [] for r in rows}
    if rows:
        found = session.scalars(
            select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(attempts)).order_by(WebhookAttempt.seq)
        )
        for attempt in found:
            attempts[attempt.delivery_id].append(attempt)
    return page([webhook_delivery_object(r, attempts[r.id]) for r in rows], has_more)
