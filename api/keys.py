"""Organisations and API keys. Keys are random, shown once, and stored only as a sha256 hash."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.ids import new_id
from api.orm import ApiKey, Organization


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


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


def key_is_active(session: Session, key: str) -> bool:
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return row is not None and row.revoked_at is None
