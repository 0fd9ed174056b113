"""Cursor pagination over rows of one organisation: `after=<id>` and `limit`, ordered by insertion (`seq`); and the
lists' query parameters, of which an unknown one is refused rather than ignored."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from api.errors import APIError

MAX_LIMIT = 100


def paginate(session: Session, query: Select, model: Any, *, after: str | None, limit: int, newest_first: bool):
    """Returns (rows, has_more). `query` must already be scoped to the caller's organisation, so a cursor from
    another organisation finds nothing and answers 400 like any unknown cursor. `after` continues the list past
    that row in the list's own order (newest first: with older rows)."""
    if not 1 <= limit <= MAX_LIMIT:
        raise APIError(400, f"limit must be between 1 and {MAX_LIMIT}.", code="invalid_limit", param="limit")
    if after is not None:
        cursor = session.scalar(query.with_only_columns(model.seq).where(model.id == after))
        if cursor is None:
            raise APIError(400, f"Unknown cursor '{after}'.", code="invalid_cursor", param="after")
        query = query.where(model.seq < cursor if newest_first else model.seq > cursor)
    query = query.order_by(model.seq.desc() if newest_first else model.seq.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


def owned(model: Any, org_id: str) -> Select:
    return select(model).where(model.organization_id == org_id)


def known_params(*names: str, prefixes: tuple[str, ...] = ()) -> Any:
    """A route dependency refusing any query parameter but `names` (and those starting with one of `prefixes`, such
    as `metadata[`) with 400 `unsupported_parameter` naming it: a filter this service does not apply must not
    answer as if it had been applied."""

    async def check(request: Request) -> None:  # async: no trip through the thread pool for a few string checks
        for name in request.query_params:
            if name not in names and not name.startswith(prefixes):
                allowed = ", ".join(names + tuple(f"{p}...]" for p in prefixes)) or "none"
                raise APIError(400, f"Unknown query parameter '{name}' (this list takes: {allowed}).",
                               code="unsupported_parameter", param=name)  # fmt: skip

    return Depends(check)
