"""Dependencies routes declare: a database session, the caller's organisation, storage, settings."""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import APIError
from control.db import session_factory
from control.keys import RECENT_KEYS, hash_key
from control.orm import ApiKey
from control.settings import Settings, get_settings
from control.storage import Storage


def settings_of(app: Any) -> Settings:
    """`app`'s settings: `get_settings()`, or what `app.dependency_overrides[get_settings]` puts in its place (tests
    point it at their database)."""
    overrides = getattr(app, "dependency_overrides", None) or {}
    return overrides.get(get_settings, get_settings)()


async def app_settings(request: Request) -> Settings:
    # Async, though it does no I/O: FastAPI runs a sync dependency (get_settings itself) in the thread pool, one
    # trip there per request, which under a burst queued behind the routes' own trips.
    return settings_of(request.app)


SettingsDep = Annotated[Settings, Depends(app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """A session for one request. It connects on its first query, in the route's worker thread, and
    `SessionClosingRoute` closes it as the route returns, in that same thread; this tear-down (on the event loop)
    is only the backstop for a route that queried again afterwards (a streamed response). A tear-down that must
    wait for a thread, or for a busy event loop, held its connection meanwhile: under load the pool ran dry."""
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


class SessionClosingRoute(APIRoute):
    """Routes whose sync endpoint closes its database session (handing the connection back to the pool) in its
    own worker thread, the moment it returns: not after the response is sent, when the connection would wait for
    the event loop."""

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any):
        if not inspect.iscoroutinefunction(endpoint):
            endpoint = _closing_sessions(endpoint)
        super().__init__(path, endpoint, **kwargs)


def _closing_sessions(endpoint: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(endpoint)  # FastAPI reads the parameters through __wrapped__
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return endpoint(*args, **kwargs)
        finally:
            for value in kwargs.values():
                if isinstance(value, Session):
                    value.close()

    return call


async def current_org(request: Request, authorization: Annotated[str | None, Header()] = None) -> str:
    """The organisation owning the bearer key. The key is looked up by its hash (the raw key is never stored) and
    the stored hash compared in constant time.

    A key found valid is remembered for `key_cache_seconds` (5) in this process, so that a client polling its job
    costs one query, not two. The price: a key revoked by another process keeps working here for up to that long;
    one revoked through this process's admin API stops at once (docs/operations.md). Requests that miss at the
    same moment share one lookup: when a busy key's entry expires in the middle of a burst, one query, not one per
    request of the burst."""
    key = _bearer(authorization)
    if key is None:
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    settings = settings_of(request.app)  # (not SettingsDep: one dependency fewer to solve on every request)
    digest, url = hash_key(key), settings.resolved_database_url
    org = RECENT_KEYS.get((url, digest), settings.key_cache_seconds)
    if org is None:
        org = await _shared_lookup(url, digest)
        if org is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        RECENT_KEYS.put((url, digest), org)
    return org


def remembered_org(settings: Settings, authorization: str | None) -> str | None:
    """The organisation owning the bearer key in `authorization` when this process found the key valid in the
    last `key_cache_seconds`; None otherwise (`current_org` decides: it looks the key up, or refuses it)."""
    key = _bearer(authorization)
    if key is None:
        return None
    return RECENT_KEYS.get((settings.resolved_database_url, hash_key(key)), settings.key_cache_seconds)


def _bearer(authorization: str | None) -> str | None:
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


_LOOKUPS: dict[tuple[str, str], asyncio.Future[str | None]] = {}  # (url, digest) -> the lookup in flight


async def _shared_lookup(url: str, digest: str) -> str | None:
    key, loop = (url, digest), asyncio.get_running_loop()
    lookup = _LOOKUPS.get(key)
    if lookup is None or lookup.get_loop() is not loop:  # (a TestClient runs each request on a loop of its own)
        lookup = _LOOKUPS[key] = loop.create_task(_lookup(url, digest))
        lookup.add_done_callback(functools.partial(_finished, key))
    return await asyncio.shield(lookup)  # a waiter that goes away (its client did) leaves the others theirs


def _finished(key: tuple[str, str], lookup: asyncio.Future[str | None]) -> None:
    if _LOOKUPS.get(key) is lookup:
        del _LOOKUPS[key]
    if not lookup.cancelled():
        lookup.exception()  # retrieved: every waiter may have gone (its error is theirs to answer, not a log line's)


async def _lookup(url: str, digest: str) -> str | None:
    return await run_in_threadpool(_lookup_sync, url, digest)


def _lookup_sync(url: str, digest: str) -> str | None:
    with session_factory(url)() as session:
        row = session.execute(
            select(ApiKey.key_hash, ApiKey.organization_id)
            .where(ApiKey.key_hash == digest, ApiKey.revoked_at.is_(None))
        ).first()  # fmt: skip
    return row.organization_id if row is not None and hmac.compare_digest(row.key_hash, digest) else None


CurrentOrg = Annotated[str, Depends(current_org)]


def get_storage(settings: SettingsDep) -> Storage:
    return Storage(settings.resolved_artifact_root)


StorageDep = Annotated[Storage, Depends(get_storage)]

# The header the stock openai client sends on POSTs (api.idempotency); FastAPI reads it by its HTTP name.
IdempotencyHeader = Annotated[str | None, Header(alias="Idempotency-Key")]
