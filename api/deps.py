"""Dependencies routes declare: a database session, the caller's organisation, storage, settings."""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.db import session_factory
from api.errors import APIError
from api.keys import RECENT_KEYS, hash_key
from api.orm import ApiKey
from api.settings import Settings, get_settings
from api.storage import Storage

SettingsDep = Annotated[Settings, Depends(get_settings)]  # tests override get_settings to point at their database


async def get_session(settings: SettingsDep) -> AsyncIterator[Session]:
    """A session for one request. Async on purpose, though the routes using it are sync: FastAPI runs a sync
    dependency's set-up and tear-down each in a worker thread, so under load the tear-down (which hands the
    connection back) queued behind requests waiting for threads while holding its connection, and the pool ran
    dry. Here the close runs on the event loop as soon as the response is sent: one rollback on a pooled
    connection (no I/O before the first query, none after a commit)."""
    session = session_factory(settings.resolved_database_url)()
    try:
        yield session
    finally:
        session.close()


SessionDep = Annotated[Session, Depends(get_session)]


async def current_org(settings: SettingsDep, authorization: Annotated[str | None, Header()] = None) -> str:
    """The organisation owning the bearer key. The key is looked up by its hash (the raw key is never stored) and
    the stored hash compared in constant time.

    A key found valid is remembered for `key_cache_seconds` (5) in this process, so that a client polling its job
    costs one query, not two, and no extra trip through the thread pool (auth and route each took one, and under
    load every request queued twice). The price: a key revoked by another process keeps working here for up to
    that long; one revoked through this process's admin API stops at once (docs/operations.md)."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise APIError(401, "Missing API key: send 'Authorization: Bearer <key>'.", code="missing_api_key")
    digest, url = hash_key(key.strip()), settings.resolved_database_url
    org = RECENT_KEYS.get((url, digest), settings.key_cache_seconds)
    if org is None:
        org = await run_in_threadpool(_lookup, url, digest)
        if org is None:
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        RECENT_KEYS.put((url, digest), org)
    return org


def _lookup(url: str, digest: str) -> str | None:
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
