"""Webhook delivery attempts (worker.webhooks.deliver) over real HTTP to a loopback receiver, without Celery: each
call is what one task message does. Retries with backoff, giving up, redirects, the address check at delivery time,
duplicate messages, and the reapers' resend of a lost message."""

from __future__ import annotations

import time

import openai
import pytest
from sqlalchemy import select, update

from control import webhooks
from control.db import session_scope
from control.ids import new_id, now
from control.orm import WebhookAttempt, WebhookDelivery, WebhookEndpoint
from control.settings import get_settings
from tests.webhook_receiver import receiver
from tests.worker.conftest import ORG, make_settings
from worker.lease import redeliver_webhooks
from worker.webhooks import deliver

EVENT = "fine_tuning.job.succeeded"


@pytest.fixture
def settings(tmp_path, monkeypatch):
    settings = make_settings(tmp_path / "data", webhooks_allow_private=True, webhooks_backoff_seconds=0.01,
                             webhooks_max_attempts=3, webhooks_timeout_seconds=5)  # fmt: skip
    # The after-commit send reads the process's settings: point them at this test's broker, not the repository's.
    monkeypatch.setenv("NEAT_DATA_DIR", str(tmp_path / "data"))
    get_settings.cache_clear()
    yield settings
    get_settings.cache_clear()


def _endpoint(settings, url: str) -> tuple[str, str]:
    """An endpoint and one emitted event for it; returns (delivery id, secret)."""
    secret = webhooks.new_secret()
    with session_scope(settings.resolved_database_url) as session:
        endpoint_id = new_id("whep", sep="_")
        session.add(WebhookEndpoint(id=endpoint_id, organization_id=ORG, name="t", url=url, event_types=[EVENT],
                                    secret=secret, created_at=now(), updated_at=now()))  # fmt: skip
        session.flush()
        webhooks.emit(session, ORG, EVENT, {"id": "ftjob-1"})
    with session_scope(settings.resolved_database_url) as session:
        return session.scalar(select(WebhookDelivery.id)), secret


def _state(settings, delivery_id: str) -> tuple[str, list[tuple[int, int | None, str | None]]]:
    with session_scope(settings.resolved_database_url) as session:
        status = session.scalar(select(WebhookDelivery.status).where(WebhookDelivery.id == delivery_id))
        attempts = session.execute(
            select(WebhookAttempt.attempt, WebhookAttempt.status_code, WebhookAttempt.error)
            .where(WebhookAttempt.delivery_id == delivery_id)
            .order_by(WebhookAttempt.seq)
        )
        return status, [tuple(a) for a in attempts]


def _deliver_when_due(delivery_id: str, settings):
    time.sleep(0.05)  # past the (test-short) backoff
    return deliver(delivery_id, settings)


def test_fails_twice_then_delivers_on_the_third_attempt_with_the_same_id(settings):
    with receiver([500, 503]) as hook:
        delivery_id, secret = _endpoint(settings, hook.url)
        assert [_deliver_when_due(delivery_id, settings) for _ in range(3)] == [500, 503, 200]
        assert _deliver_when_due(delivery_id, settings) == "skipped"  # delivered: a duplicate message does nothing
    assert _state(settings, delivery_id) == (webhooks.DELIVERED, [(1, 500, "HTTP 500"), (2, 503, "HTTP 503"),
                                                                   (3, 200, None)])  # fmt: skip
    ids = {r.headers["webhook-id"] for r in hook.received}
    assert ids == {delivery_id}  # Standard Webhooks: the same id on every retry, so receivers can deduplicate
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    for request in hook.received:  # every attempt is signed afresh, and verifies
        assert client.webhooks.unwrap(request.body, request.headers, secret=secret).data.id == "ftjob-1"


def test_a_message_not_yet_due_is_skipped(settings):
    with receiver([500]) as hook:
        delivery_id, _ = _endpoint(settings, hook.url)
        with session_scope(settings.resolved_database_url) as session:
            session.execute(update(WebhookDelivery).values(next_attempt_at=time.time() + 60))
        assert deliver(delivery_id, settings) == "skipped"
    assert hook.received == []


def test_gives_up_after_the_last_attempt(settings):
    with receiver([500, 500, 500, 500]) as hook:
        delivery_id, _ = _endpoint(settings, hook.url)
        for _ in range(4):
            _deliver_when_due(delivery_id, settings)
    status, attempts = _state(settings, delivery_id)
    assert status == webhooks.EXHAUSTED and [a[0] for a in attempts] == [1, 2, 3]
    assert len(hook.received) == 3


def test_redirects_are_not_followed(settings):
    with receiver() as target, receiver([302], redirect_to=None) as hook:
        hook.redirect_to = target.url
        delivery_id, _ = _endpoint(settings, hook.url)
        assert deliver(delivery_id, settings) == 302
    assert _state(settings, delivery_id)[1] == [(1, 302, "HTTP 302 (redirects are not followed)")]
    assert target.received == []


def test_a_private_address_is_refused_at_delivery_with_the_setting_off(settings):
    with receiver() as hook:
        delivery_id, _ = _endpoint(settings, hook.url)  # registered while allowed (or its DNS changed since)
        closed = settings.model_copy(update={"webhooks_allow_private": False})
        error = deliver(delivery_id, closed)
    assert error.startswith("refused: ") and "not a public address" in error
    assert hook.received == []


def test_the_reapers_resend_an_overdue_delivery_once(settings):
    with receiver() as hook:
        delivery_id, _ = _endpoint(settings, hook.url)
        with session_scope(settings.resolved_database_url) as session:  # its message was lost long ago
            session.execute(update(WebhookDelivery).values(next_attempt_at=time.time() - 3600))
        at = time.time()
        assert redeliver_webhooks(settings, at) == [delivery_id]
        assert redeliver_webhooks(settings, at) == []  # of several reapers, one sends it
        assert deliver(delivery_id, settings) == 200
    assert len(hook.received) == 1
