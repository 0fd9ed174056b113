"""Per-organisation quotas and the inference rate limit. Over a limit the API answers 429 in OpenAI's error shape
with `Retry-After`, before anything is stored.

Limits come from the organisation's row, else from settings. Quotas (active jobs, stored bytes) are counted in the
database, so they hold across API processes; the inference rate is a sliding one-minute window kept in each API
process (with N API processes an organisation gets up to N × its rate; see docs/operations.md). The active-jobs
quota is decided by `control.jobs.create`, in the job's own transaction under a per-organisation lock (so that
concurrent creations cannot all see room for one more); here it only becomes the 429.
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict, deque
from typing import Annotated

from fastapi import Depends, Request, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import CurrentOrg, SessionDep, SettingsDep
from api.errors import APIError
from control.jobs import ActiveJobLimit
from control.keys import lock_organization
from control.orm import File, Organization
from control.settings import Settings


def _limit(session: Session, org: str, field: str, default: int) -> int:
    own = session.scalar(select(getattr(Organization, field)).where(Organization.id == org))
    return default if own is None else int(own)


def job_quota_error(refused: ActiveJobLimit) -> APIError:
    message = f"Your organisation has {refused.active} queued or running jobs; its limit is {refused.limit}."
    return APIError(429, message, code="quota_exceeded", headers={"Retry-After": "60"})


def check_storage_quota(session: Session, org: str, incoming: int, settings: Settings) -> None:
    """429 if `incoming` more bytes would take the organisation over its storage limit, as counted now. Cheap and
    early (before a file is validated), but two uploads may both pass it: `admit_storage` is what decides."""
    limit = _limit(session, org, "max_storage_bytes", settings.max_storage_bytes)
    used = session.scalar(select(func.coalesce(func.sum(File.bytes), 0)).where(File.organization_id == org))
    if used + incoming > limit:
        raise APIError(429, f"This file ({incoming:,} bytes) would bring your organisation's files to "
                       f"{used + incoming:,} bytes, over its limit of {limit:,}; delete files first.",
                       code="quota_exceeded", param="file", headers={"Retry-After": "3600"})  # fmt: skip


def admit_storage(session: Session, org: str, incoming: int, settings: Settings) -> None:
    """The storage quota, unraceable: under the organisation's lock (control.keys.lock_organization, held until
    the caller's commit or rollback, right after it inserts the file's row), count the stored bytes and check.

    Counting and inserting in two steps let 20 concurrent uploads against room for 3 files store 8: each counted
    before any other had committed. Under the lock they take turns and each counts what the ones before it
    committed. The lock is held for a count, an insert and a rename, never while a body streams in or a file is
    validated. (Not a counter column: every delete would have to decrement it, and the sum of the rows is the
    truth.)"""
    if lock_organization(session, org) is None:  # every key belongs to an organisation row (foreign key)
        raise RuntimeError(f"organisation {org!r} has no row to lock")
    check_storage_quota(session, org, incoming, settings)


class RateLimiter:
    """A sliding one-minute window of request times per organisation, in this process."""

    def __init__(self) -> None:
        self._seen: defaultdict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def admit(self, org: str, per_minute: int) -> tuple[float | None, int, float]:
        """(None if the request may go ahead (and it is counted), else the seconds until it may; the requests left
        in the window after this one; the seconds until the window is whole again)."""
        now = time.monotonic()
        with self._lock:
            seen = self._seen[org]
            while seen and seen[0] <= now - 60:
                seen.popleft()
            if len(seen) >= per_minute:
                wait = seen[0] + 60 - now
                return wait, 0, wait
            seen.append(now)
            return None, per_minute - len(seen), seen[0] + 60 - now


def rate_headers(per_minute: int, remaining: int, reset_s: float) -> dict[str, str]:
    """OpenAI's request rate-limit headers (`reset` in its duration format, e.g. "1.5s")."""
    return {"x-ratelimit-limit-requests": str(per_minute), "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{max(0.0, reset_s):.3g}s"}  # fmt: skip


def inference_rate(
    request: Request, response: Response, session: SessionDep, org: CurrentOrg, settings: SettingsDep
) -> dict[str, str]:
    """Dependency of the inference routes: 429 once the organisation is over its requests per minute. The window
    lives on the app (`app.state.inference_rate`, set by create_app). Puts the `x-ratelimit-*` headers on the
    answer, and returns them for answers built as responses of their own (event streams)."""
    per_minute = _limit(session, org, "inference_rpm", settings.inference_rpm)
    wait, remaining, reset = request.app.state.inference_rate.admit(org, per_minute)
    headers = rate_headers(per_minute, remaining, reset)
    if wait is not None:
        raise APIError(429, f"Rate limit reached: {per_minute} inference requests per minute for your organisation.",
                       code="rate_limit_exceeded",
                       headers={"Retry-After": str(max(1, math.ceil(wait))), **headers})  # fmt: skip
    response.headers.update(headers)
    return headers


InferenceRate = Annotated[dict[str, str], Depends(inference_rate)]
