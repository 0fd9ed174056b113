"""Organisations and API keys, shared by the admin CLI (`python -m api.admin`) and the admin API
(`/v1/admin/...`). Keys are random, shown once, stored only as a sha256 hash, and revocable."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections import OrderedDict

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from control.ids import new_id, now
from control.orm import ApiKey, Organization


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class RecentKeys:
    """(database URL, digest) of keys found valid in the last few seconds → their organisation: a bounded LRU,
    per process.
    Only valid keys are remembered (a wrong key always costs a lookup), and any revocation in this process forgets
    them all."""

    def __init__(self, size: int = 10_000):
        self._size = size
        self._seen: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()  # -> (organisation, when found)
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str], ttl: float) -> str | None:
        with self._lock:
            hit = self._seen.get(key)
            if hit is None or time.monotonic() - hit[1] > ttl:
                return None
            self._seen.move_to_end(key)
            return hit[0]

    def put(self, key: tuple[str, str], org: str) -> None:
        with self._lock:
            self._seen[key] = (org, time.monotonic())
            self._seen.move_to_end(key)
            while len(self._seen) > self._size:
                self._seen.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()


RECENT_KEYS = RecentKeys()


def ensure_org(session: Session, org_id: str, name: str | None = None) -> Organization:
    org = session.scalar(select(Organization).where(Organization.id == org_id))
    if org is None:
        org = Organization(id=org_id, name=name or org_id)
        session.add(org)
        session.flush()
    return org


def add_key(session: Session, org_id: str, key: str | None = None) -> str:
    """Store a key (a new random one unless given) for `org_id`; returns the key. Idempotent for a given key."""
    key = key or f"sk-neat-{secrets.token_urlsafe(32)}"
    if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key))) is None:
        ensure_org(session, org_id)
        session.add(ApiKey(id=new_id("key"), organization_id=org_id, key_hash=hash_key(key), prefix=key[:12]))
    return key


def lock_organization(session: Session, org: str) -> Organization | None:
    """Lock organisation `org` until the transaction ends, and return its row (None if there is none): what
    admissions against a per-organisation quota count under (control.jobs.create: active jobs; api.quotas.
    admit_storage: stored bytes), so that concurrent ones take turns and each counts what the others committed.

    Postgres: the organisation's row `FOR NO KEY UPDATE`. A concurrent admission for the same organisation waits
    on it, and then (read committed: each statement sees what was committed before it began) counts the job or
    file the other one committed. NO KEY: inserts that merely reference the row (files, keys, idempotency keys)
    take a key share lock and are not held up.
    SQLite: `BEGIN IMMEDIATE`, the database's write lock, taken before the count. Python's sqlite3 runs a SELECT
    outside any transaction and begins one only at the first write, so without it two admissions both count,
    then both insert; a plain deferred BEGIN would instead fail the second writer (its read snapshot is stale).
    Other writers wait for the lock up to the busy timeout (control.db); a connection already in a transaction
    has written, so it holds the write lock already."""
    connection = session.connection()
    if connection.dialect.name == "sqlite" and not connection.connection.dbapi_connection.in_transaction:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
    return session.scalar(select(Organization).where(Organization.id == org).with_for_update(key_share=True))


def key_is_active(session: Session, key: str) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row is not None and row.revoked_at is None


LIMITS = ("max_active_jobs", "max_storage_bytes", "inference_rpm")


def create_org(session: Session, org_id: str, name: str | None = None) -> Organization:
    """A new organisation; ValueError if the id is taken."""
    if session.scalar(select(Organization).where(Organization.id == org_id)) is not None:
        raise ValueError(f"organisation {org_id!r} already exists")
    return ensure_org(session, org_id, name)


def create_key(session: Session, org_id: str) -> tuple[ApiKey, str]:
    """(the key's row, the key itself: shown this once, never stored). LookupError for an unknown organisation."""
    if session.scalar(select(Organization).where(Organization.id == org_id)) is None:
        raise LookupError(f"organisation {org_id!r} does not exist")
    key = add_key(session, org_id)
    session.flush()
    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key))), key


def revoke_key(session: Session, key_id: str) -> bool:
    """Revoke a key by its id; False if there is no such active key. This process forgets every remembered key at
    once (a request racing the revocation may remember it again, for at most `key_cache_seconds`, as other API
    processes do)."""
    RECENT_KEYS.clear()
    return bool(
        session.execute(
            update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=now())
        ).rowcount
    )


def list_keys(session: Session, org_id: str) -> list[ApiKey]:
    """The organisation's keys, revoked ones included; LookupError for an unknown organisation (not an empty
    list: an operator's typo must not look like an organisation without keys)."""
    if session.scalar(select(Organization.id).where(Organization.id == org_id)) is None:
        raise LookupError(f"organisation {org_id!r} does not exist")
    return list(session.scalars(select(ApiKey).where(ApiKey.organization_id == org_id).order_by(ApiKey.seq)))


def set_limits(session: Session, org_id: str, **limits: int | None) -> Organization:
    """Set an organisation's own limits (None: back to the deployment's default)."""
    org = session.scalar(select(Organization).where(Organization.id == org_id))
    if org is None:
        raise LookupError(f"organisation {org_id!r} does not exist")
    for name, value in limits.items():
        if name not in LIMITS or (value is not None and value < 0):
            raise ValueError(f"{name}={value!r}: limits are {', '.join(LIMITS)}, each >= 0 or unset")
        setattr(org, name, value)
    return org
