"""One webhook delivery attempt (control.webhooks): claim it, POST the signed event, record what happened, and
send the retry's message after its backoff. Runs in the `webhooks` queue's worker, never beside a training job.

Redirects are not followed: a 3xx is a failed attempt like any other non-2xx, since a redirect could lead to an
address the endpoint's own check refused. The endpoint's host is resolved and checked again before every attempt
(its DNS may have changed since it was registered).
"""

from __future__ import annotations

import logging
import time

import httpx
from sqlalchemy.orm import Session

from control import webhooks
from control.db import with_retries
from control.queue import send_webhook
from control.settings import Settings, get_settings

log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 500


def deliver(delivery_id: str, settings: Settings | None = None) -> int | str | None:
    """Make the delivery's next attempt if it is due; returns the endpoint's status code, or why there was none
    ("skipped": not due or gone; else the attempt's error), for logs and tests."""
    settings = settings or get_settings()
    url = settings.resolved_database_url
    in_flight = settings.webhooks_timeout_seconds + webhooks.IN_FLIGHT_SLACK_SECONDS

    attempt = with_retries(url, lambda session: webhooks.claim(session, delivery_id, time.time(), in_flight))
    if attempt is None:
        return "skipped"  # delivered, given up, not due (a duplicate message), or its endpoint deleted
    started = time.time()
    status_code, error = _post(attempt, settings)
    duration_ms = round((time.time() - started) * 1000)

    def write(session: Session) -> float | None:
        return webhooks.record(session, attempt, started_at=started, duration_ms=duration_ms, status_code=status_code,
                               error=error, max_attempts=settings.webhooks_max_attempts,
                               base_seconds=settings.webhooks_backoff_seconds,
                               max_seconds=settings.webhooks_backoff_max_seconds)  # fmt: skip

    retry_in = with_retries(url, write)
    if retry_in is not None:
        log.warning("webhook %s attempt %d failed (%s); retrying in %g s", delivery_id, attempt.number,
                    error or status_code, retry_in)  # fmt: skip
        send_webhook(delivery_id, settings, delay=retry_in)  # lost meanwhile: the reapers send it (`overdue`)
    return status_code if status_code is not None else error


def _post(attempt: webhooks.Attempt, settings: Settings) -> tuple[int | None, str | None]:
    """(status code, error): the endpoint's answer, or None and why there was none."""
    try:
        webhooks.check_url(attempt.url, allow_private=settings.webhooks_allow_private)
    except webhooks.UnsafeURL as e:
        return None, f"refused: {e}"
    headers = webhooks.headers(attempt.secret, attempt.delivery_id, attempt.payload, time.time())
    try:
        response = httpx.post(attempt.url, content=attempt.payload.encode(), headers=headers,
                              timeout=settings.webhooks_timeout_seconds, follow_redirects=False)  # fmt: skip
    except httpx.HTTPError as e:
        return None, f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS]
    if 200 <= response.status_code < 300:
        return response.status_code, None
    redirect = " (redirects are not followed)" if response.is_redirect else ""
    return response.status_code, f"HTTP {response.status_code}{redirect}"
