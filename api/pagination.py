"""Cursor pagination over rows of one organisation: `after=<id>` and `limit`, ordered by insertion (`seq`); and the
lists' query parameters, of which an unknown one is refused rather than ignored."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, Request
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from api.errors import APIError
from control.db import Read, fetch

MAX_LIMIT = 100
NEWEST = 2**62  # a `seq` past every row's: the first page of a newest-first list is the rows before it


def paginate(session: Session, query: Select, model: Any, *, after: str | None, limit: int, newest_first: bool):
    """Returns (rows, has_more). `query` must already be scoped to the caller's organisation, so a cursor from
    another organisation finds nothing and answers 400 like any unknown cursor. `after` continues the list past
    that row in the list's own order (newest first: with older rows)."""
    _check_limit(limit)
    if after is not None:
        cursor = session.scalar(query.with_only_columns(model.seq).where(model.id == after))
        if cursor is None:
            raise _unknown_cursor(after)
        query = query.where(model.seq < cursor if newest_first else model.seq > cursor)
    query = query.order_by(model.seq.desc() if newest_first else model.seq.asc()).limit(limit + 1)
    rows = list(session.scalars(query))
    return rows[:limit], len(rows) > limit


async def read_newest_first(url: str, rows: Read, cursor: Read, parent: Read, missing: APIError, *,
                            after: str | None, limit: int, **params: Any):  # fmt: skip
    """`paginate` for a newest-first list of a parent's rows (a job's events), read on the event loop
    (control.db.fetch): (rows, has_more).

    `rows` selects the list's rows with `seq < :before`, newest first, `LIMIT :n`; `cursor` the `seq` of the row
    `:after` in the same list; `parent` the parent itself. `rows` and `cursor` must find nothing unless the
    parent is the caller's (an EXISTS on it), so that a poll is one query. Where they find nothing, and before a
    bad limit is refused, `parent` is read: without it the answer is `missing` (404), as when it came first."""
    if not 1 <= limit <= MAX_LIMIT:
        await _require(url, parent, missing, params)
        _check_limit(limit)
    before = NEWEST
    if after is not None:
        found = await fetch(url, cursor, after=after, **params)
        if not found:
            await _require(url, parent, missing, params)
            raise _unknown_cursor(after)
        before = found[0].seq
    page = await fetch(url, rows, before=before, n=limit + 1, **params)
    if not page:
        await _require(url, parent, missing, params)
    return page[:limit], len(page) > limit


async def _require(url: str, parent: Read, missing: APIError, params: dict[str, Any]) -> None:
    if not await fetch(url, parent, **params):
        raise missing


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_LIMIT:
        raise APIError(400, f"limit must be between 1 and {MAX_LIMIT}.", code="invalid_limit", param="limit")


def _unknown_cursor(after: str) -> APIError:
    return APIError(400, f"Unknown cursor '{after}'.", code="invalid_cursor", param="after")


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

    check.only_params = names  # type: ignore[attr-defined]  # what api.polling reads: a check of names only
    return Depends(check)
