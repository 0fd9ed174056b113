"""Webhooks: an organisation's endpoints hear of its jobs' outcomes, signed as OpenAI signs them (Standard Webhooks).

    emit      a transition (control.jobs) adds one delivery per subscribed endpoint, in the transition's own
              transaction: the event exists exactly when the transition does (an outbox, not a side effect)
    send      once that transaction commits, each delivery's task message goes out (the `after_commit` hook below:
              every caller of every transition gets it without doing anything)
    claim     a task takes the delivery's next attempt (one conditional UPDATE: of duplicate messages one wins)
    record    the attempt's outcome: delivered (a 2xx), or retried after an exponential backoff, or given up
    overdue   deliveries whose message was lost (a broker restart, a killed worker): the reapers send them again

What is sent: the body `{"id": "evt_…", "object": "event", "created_at", "type", "data": {"id": <job id>}}` and the
headers `webhook-id` (the delivery's id, the same on every retry), `webhook-timestamp` (this attempt's time) and
`webhook-signature` (`v1,` + base64 HMAC-SHA256 of `<id>.<timestamp>.<body>` under the base64-decoded part of the
`whsec_…` secret). The signature is computed here with hmac/hashlib rather than with the `standardwebhooks`
package: it is four lines, and the lock stays as it is. The stock `openai` SDK's `client.webhooks.unwrap` verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import secrets
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import event, select, update
from sqlalchemy.orm import Session

from control.ids import new_id, now
from control.orm import WebhookAttempt, WebhookDelivery, WebhookEndpoint

log = logging.getLogger(__name__)

# OpenAI's fine-tuning events, and ours (a checkpoint saved: a model one can already try).
CHECKPOINT_CREATED = "fine_tuning.job.checkpoint.created"
EVENT_TYPES = ("fine_tuning.job.succeeded", "fine_tuning.job.failed", "fine_tuning.job.cancelled", CHECKPOINT_CREATED)

# A delivery's `status`.
PENDING, DELIVERED, EXHAUSTED = "pending", "delivered", "exhausted"  # exhausted: every attempt failed

CLOCK_SLACK_SECONDS = 2.0  # a message may come due a little early by the consuming machine's clock
IN_FLIGHT_SLACK_SECONDS = 30.0  # past its timeout, an attempt whose worker said nothing counts as lost


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_hint(secret: str) -> str:
    return f"whsec_…{secret[-4:]}"


def signature(secret: str, message_id: str, timestamp: int, body: str) -> str:
    """Standard Webhooks' `webhook-signature` value for `body` (the exact text sent)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{message_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, message_id: str, body: str, at: float) -> dict[str, str]:
    timestamp = int(at)
    return {
        "content-type": "application/json",
        "webhook-id": message_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, message_id, timestamp, body),
    }


# --- where an endpoint may be ---------------------------------------------------------------------------------


class UnsafeURL(ValueError):
    """An endpoint URL the service will not send to (the message says why, for the organisation)."""


def check_url(url: str, *, allow_private: bool) -> None:
    """Refuses a URL that is not http(s), carries credentials, or whose host resolves to any address that is not
    public (loopback, private, link-local such as a cloud's metadata service, reserved, multicast): every address
    is checked, since a client may connect to any of them. `allow_private` (an operator's setting, for a
    deployment whose receivers live on its own network, and for tests) skips the address check."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL(f"'{url}' is not an http or https URL.")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("The URL must not carry credentials; verify deliveries with the signing secret instead.")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeURL(f"'{url}' has an invalid port.") from None
    if allow_private:
        return
    try:
        found = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UnsafeURL(f"The host '{parts.hostname}' does not resolve.") from None
    for *_, sockaddr in found:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # an IPv6 zone id is not an address
        if not _public(address):
            raise UnsafeURL(f"The host '{parts.hostname}' resolves to {address}, which is not a public address.")


def _public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1 is loopback (Python 3.11 does not see through it)
    return address.is_global and not address.is_multicast


# --- emitting, and sending once committed -----------------------------------------------------------------------

_UNSENT = "webhook_deliveries_unsent"  # session.info: deliveries added in this transaction


def emit(session: Session, organization_id: str, event_type: str, data: dict[str, Any]) -> None:
    """One event, one delivery per endpoint of the organisation subscribed to `event_type`, in the caller's
    transaction; their messages are sent once it commits."""
    endpoints = session.scalars(select(WebhookEndpoint).where(WebhookEndpoint.organization_id == organization_id))
    subscribed = [e for e in endpoints if event_type in e.event_types]  # a few per organisation: filtered here
    if not subscribed:
        return
    created = now()
    event_id = new_id("evt", sep="_")
    body = {"id": event_id, "object": "event", "created_at": created, "type": event_type, "data": data}
    payload = json.dumps(body, separators=(",", ":"))
    for endpoint in subscribed:
        delivery = WebhookDelivery(id=new_id("wh", sep="_"), organization_id=organization_id, endpoint_id=endpoint.id,
                                   event_id=event_id, event_type=event_type, payload=payload, status=PENDING,
                                   attempts=0, next_attempt_at=time.time(), created_at=created)  # fmt: skip
        session.add(delivery)
        session.info.setdefault(_UNSENT, []).append(delivery.id)


@event.listens_for(Session, "after_commit")
def _send_committed(session: Session) -> None:
    # After the commit, so a task that runs at once finds its row. A message that cannot be sent now (the broker is
    # away) is not lost: its delivery stays pending and the reapers send it again (`overdue`).
    unsent = session.info.pop(_UNSENT, None)
    if not unsent:
        return
    from control.queue import send_webhook  # the Celery client, only where an event was emitted
    from control.settings import get_settings

    for delivery_id in unsent:
        try:
            send_webhook(delivery_id, get_settings())
        except Exception:  # noqa: BLE001  (see above)
            log.exception("could not send webhook delivery %s; the reapers will", delivery_id)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back(session: Session) -> None:
    session.info.pop(_UNSENT, None)


# --- attempts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attempt:
    """What a task needs to make one attempt of a delivery (from `claim`)."""

    delivery_id: str
    organization_id: str
    number: int
    url: str
    secret: str
    payload: str


def claim(session: Session, delivery_id: str, at: float, in_flight_seconds: float) -> Attempt | None:
    """The delivery's next attempt, if it is pending and due; until `in_flight_seconds` have passed nobody else
    takes it. None: delivered, given up, not due yet (a duplicate message), or its endpoint was deleted."""
    row = session.execute(
        select(WebhookDelivery.attempts, WebhookDelivery.organization_id, WebhookDelivery.payload,
               WebhookEndpoint.url, WebhookEndpoint.secret)
        .join(WebhookEndpoint, WebhookEndpoint.id == WebhookDelivery.endpoint_id)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING,
               WebhookDelivery.next_attempt_at <= at + CLOCK_SLACK_SECONDS)
    ).first()  # fmt: skip
    if row is None:
        return None
    attempts, organization_id, payload, url, secret = row
    won = session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING,
               WebhookDelivery.attempts == attempts)
        .values(attempts=attempts + 1, next_attempt_at=at + in_flight_seconds)
    ).rowcount  # fmt: skip
    return Attempt(delivery_id, organization_id, attempts + 1, url, secret, payload) if won else None


def backoff(attempt: int, base_seconds: float, max_seconds: float) -> float:
    """The wait after failed attempt number `attempt`: base, 2×base, 4×base, ... at most `max_seconds`."""
    return min(base_seconds * 2 ** (attempt - 1), max(base_seconds, max_seconds))


def record(session: Session, attempt: Attempt, *, started_at: float, duration_ms: int, status_code: int | None,
           error: str | None, max_attempts: int, base_seconds: float, max_seconds: float) -> float | None:  # fmt: skip
    """Record one attempt and move its delivery on: delivered on a 2xx, else retried after `backoff` (returned:
    the caller sends the message with that delay) or, after `max_attempts`, given up. Conditional on the attempt
    still being the delivery's latest (one that outlived its in-flight time and was taken over is recorded as an
    attempt, and changes nothing else)."""
    if session.scalar(select(WebhookDelivery.seq).where(WebhookDelivery.id == attempt.delivery_id)) is None:
        return None  # its endpoint was deleted meanwhile, and its deliveries with it
    session.add(WebhookAttempt(delivery_id=attempt.delivery_id, organization_id=attempt.organization_id,
                               attempt=attempt.number, started_at=started_at, duration_ms=duration_ms,
                               status_code=status_code, error=error))  # fmt: skip
    latest = update(WebhookDelivery).where(WebhookDelivery.id == attempt.delivery_id,
                                           WebhookDelivery.status == PENDING,
                                           WebhookDelivery.attempts == attempt.number)  # fmt: skip
    if status_code is not None and 200 <= status_code < 300:
        session.execute(latest.values(status=DELIVERED, next_attempt_at=None, finished_at=now()))
        return None
    if attempt.number >= max_attempts:
        session.execute(latest.values(status=EXHAUSTED, next_attempt_at=None, finished_at=now()))
        return None
    delay = backoff(attempt.number, base_seconds, max_seconds)
    moved = session.execute(latest.values(next_attempt_at=time.time() + delay)).rowcount
    return delay if moved else None


def overdue(session: Session, before: float) -> list[tuple[str, float]]:
    """(id, next_attempt_at) of pending deliveries due before `before` that nobody has attempted since."""
    query = select(WebhookDelivery.id, WebhookDelivery.next_attempt_at).where(
        WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at < before
    )
    return [(delivery_id, due) for delivery_id, due in session.execute(query)]


def mark_resent(session: Session, delivery_id: str, due: float, at: float) -> bool:
    """Still overdue since `due` and not resent by another reaper: it is due now, and the winner sends it."""
    query = update(WebhookDelivery).where(WebhookDelivery.id == delivery_id, WebhookDelivery.status == PENDING,
                                          WebhookDelivery.next_attempt_at == due)  # fmt: skip
    return bool(session.execute(query.values(next_attempt_at=at)).rowcount)
