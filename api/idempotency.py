"""`Idempotency-Key` on the POSTs that create things (files, jobs, webhook endpoints): the stock openai client retries
POSTs, and a retry must not create a second one.

The same key (per organisation and endpoint) with the same request replays the first response; with a different
request it answers 422; while the first request is still running it answers 409. The key is claimed in a short
transaction of its own before the work starts (so a concurrent duplicate sees it at once), and its response is
stored in the same transaction as the thing it created, so a crash leaves either both or neither. A request that
fails frees its key. A claim whose API process died (a crash, a kill, a lost machine) has no one to free it: the
claim names its process (`owner`, control.processes), and a retry that finds that process gone on this host takes
the key over at once, well within the openai client's retries (2, about a second apart). A process on another host
cannot be checked from here; its claim is taken over once it is `STALE_SECONDS` old.

A request can also die in a process that lives on: the database went away mid-request, so neither its commit nor
the release of its key could be written. Each process keeps the claims its running requests hold (`_live`), so a
retry that lands on the owning process and finds the claim's request gone takes the key over at once too (the
chaos soak found such keys answering 409 for the whole 300 s).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse
from sqlalchemy import delete, event, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.errors import APIError
from control.db import session_scope
from control.orm import IdempotencyKey
from control.processes import process_alive, process_token

MAX_KEY_LENGTH = 255
STALE_SECONDS = 300.0  # an in-flight claim this old belongs to a request that died before committing
_live: set[int] = set()  # the claims (rows) this process's running requests hold
_live_lock = threading.Lock()


def request_hash(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass
class Claim:
    """This request holds the key: `record` its response with the work's own transaction, or `release` it."""

    url: str
    row_id: int

    def record(self, session: Session, body: dict, status: int = 200) -> None:
        session.execute(
            update(IdempotencyKey)
            .where(IdempotencyKey.seq == self.row_id)
            .values(state="done", response_status=status, response_body=body)
        )
        event.listen(session, "after_commit", lambda _: _forget(self.row_id), once=True)  # done: replayed from now

    def release(self) -> None:
        try:
            with session_scope(self.url) as session:
                session.execute(
                    delete(IdempotencyKey).where(IdempotencyKey.seq == self.row_id, IdempotencyKey.state == "in_flight")
                )
        finally:  # written or not (the database may be what failed), no request of ours holds it any more
            _forget(self.row_id)


def _hold(row_id: int) -> None:
    with _live_lock:
        _live.add(row_id)


def _forget(row_id: int) -> None:
    with _live_lock:
        _live.discard(row_id)


def _request_gone(owner: str | None, row_id: int) -> bool:
    """Whether the request that claimed `row_id` has ended without finishing: its process is gone (on this host),
    or it is this process and none of its requests holds the claim."""
    if owner == process_token():
        with _live_lock:
            return row_id not in _live
    return not process_alive(owner)


def claim(url: str, org: str, endpoint: str, key: str | None, digest: str) -> Claim | JSONResponse | None:
    """None without a key; a Claim when this request goes ahead; the first response when it is a replay."""
    if key is None:
        return None
    if not key or len(key) > MAX_KEY_LENGTH:
        raise APIError(400, f"Idempotency-Key must be 1..{MAX_KEY_LENGTH} characters.", code="invalid_idempotency_key",
                       param="Idempotency-Key")  # fmt: skip
    try:
        with session_scope(url) as session:
            row = IdempotencyKey(organization_id=org, endpoint=endpoint, key=key, request_hash=digest,
                                 state="in_flight", owner=process_token(), created_at=time.time())  # fmt: skip
            session.add(row)
            session.flush()
            _hold(row.seq)
            return Claim(url, row.seq)
    except IntegrityError:
        pass  # the key exists: decide from what it holds
    with session_scope(url) as session:
        row = session.scalar(
            select(IdempotencyKey).where(
                IdempotencyKey.organization_id == org, IdempotencyKey.endpoint == endpoint, IdempotencyKey.key == key
            )
        )
        if row is None:  # released meanwhile: the caller may simply retry
            raise _in_progress()
        if row.request_hash != digest:
            raise APIError(422, "This Idempotency-Key was used with a different request; use a new key.",
                           code="idempotency_key_reused", param="Idempotency-Key")  # fmt: skip
        if row.state == "done":
            return JSONResponse(row.response_body, status_code=row.response_status,
                                headers={"Idempotent-Replayed": "true"})  # fmt: skip
        if not _request_gone(row.owner, row.seq) and row.created_at >= time.time() - STALE_SECONDS:
            raise _in_progress()  # its request is still running
        taken = session.execute(  # a claim whose request died before committing: take it over (one retry wins)
            update(IdempotencyKey)
            .where(IdempotencyKey.seq == row.seq, IdempotencyKey.state == "in_flight")
            .where(IdempotencyKey.created_at == row.created_at)
            .values(owner=process_token(), created_at=time.time())
        ).rowcount
        if taken:
            _hold(row.seq)
            return Claim(url, row.seq)
    raise _in_progress()


def _in_progress() -> APIError:
    return APIError(409, "A request with this Idempotency-Key is still in progress; retry shortly.",
                    code="idempotency_request_in_progress", param="Idempotency-Key",
                    headers={"Retry-After": "1"})  # fmt: skip
