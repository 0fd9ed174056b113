"""Webhook endpoints through the API (OpenAI's /v1/webhook_endpoints shapes, checked by tests.conformance), the
address check that keeps endpoints off private networks, the events the job state machine emits, and the signature,
verified by the stock `openai` SDK. Deliveries over real HTTP: tests/worker/test_webhooks.py and
tests/e2e/test_webhooks.py."""

from __future__ import annotations

import json
import time

import openai
import pytest
from sqlalchemy import select

from control import jobs, webhooks
from control.orm import WebhookDelivery
from tests.api import assert_error, classification_rows, sqlite_only

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SUCCEEDED, CANCELLED = "fine_tuning.job.succeeded", "fine_tuning.job.cancelled"


@pytest.fixture
def open_api(make_api):
    """An app whose operator allows private endpoint addresses (as the tests' receivers are on loopback)."""
    return make_api(webhooks_allow_private=True)


def _create(api, url="http://127.0.0.1:9/hook", event_types=(SUCCEEDED,), **kw):
    return api.post("/v1/webhook_endpoints", json={"name": "ci", "url": url, "event_types": list(event_types)}, **kw)


def test_endpoint_lifecycle_in_openais_shapes(open_api):
    created = _create(open_api).json()
    assert created["object"] == "webhook_endpoint" and created["id"].startswith("whep_")
    assert created["signing_secret"].startswith("whsec_")
    assert created["signing_secret_hint"].endswith(created["signing_secret"][-4:])
    endpoint_id = created["id"]

    got = open_api.get(f"/v1/webhook_endpoints/{endpoint_id}").json()
    assert "signing_secret" not in got  # shown once, at creation
    assert got["event_types"] == [SUCCEEDED]
    listed = open_api.get("/v1/webhook_endpoints").json()
    assert [e["id"] for e in listed["data"]] == [endpoint_id] and listed["first_id"] == endpoint_id

    updated = open_api.post(f"/v1/webhook_endpoints/{endpoint_id}", json={"event_types": [SUCCEEDED, CANCELLED]})
    assert updated.status_code == 200, updated.text
    assert updated.json()["event_types"] == [SUCCEEDED, CANCELLED]

    types = open_api.get("/v1/webhook_event_types").json()["data"]
    assert set(types) == set(webhooks.EVENT_TYPES)

    deleted = open_api.delete(f"/v1/webhook_endpoints/{endpoint_id}").json()
    assert deleted == {"id": endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}
    assert_error(open_api.get(f"/v1/webhook_endpoints/{endpoint_id}"), 404, code="webhook_endpoint_not_found")


@sqlite_only
def test_another_organisations_endpoint_is_not_found(open_api):
    endpoint_id = _create(open_api).json()["id"]
    for method, path in [("GET", ""), ("POST", ""), ("DELETE", ""), ("GET", "/deliveries")]:
        kwargs = {"json": {"name": "x"}} if method == "POST" else {}
        response = open_api.request(method, f"/v1/webhook_endpoints/{endpoint_id}{path}", org=open_api.b, **kwargs)
        assert_error(response, 404, code="webhook_endpoint_not_found")
    assert open_api.get("/v1/webhook_endpoints", org=open_api.b).json()["data"] == []


@sqlite_only
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://[::ffff:127.0.0.1]/hook",
        "http://10.1.2.3/hook",
        "http://192.168.0.1/hook",
        "http://169.254.169.254/latest/meta-data",  # a cloud's metadata service
        "http://0.0.0.0/hook",
    ],
)
def test_private_and_loopback_endpoints_are_refused_with_the_setting_off(api, url):
    assert api.settings.webhooks_allow_private is False  # the default
    error = assert_error(_create(api, url=url), 400, code="invalid_url", param="url")
    assert "not a public address" in error["message"]
    assert api.get("/v1/webhook_endpoints").json()["data"] == []  # nothing registered


@sqlite_only
def test_an_update_to_a_private_address_is_refused_too(make_api):
    api = make_api()
    endpoint_id = _create(api, url="https://93.184.216.34/hook").json()["id"]  # a public address: accepted
    response = api.post(f"/v1/webhook_endpoints/{endpoint_id}", json={"url": "http://127.0.0.1/hook"})
    assert_error(response, 400, code="invalid_url", param="url")
    assert api.get(f"/v1/webhook_endpoints/{endpoint_id}").json()["url"] == "https://93.184.216.34/hook"


@sqlite_only
@pytest.mark.parametrize(
    "body, param",
    [
        ({"url": "ftp://example.com/x"}, "url"),
        ({"url": "http://user:pw@93.184.216.34/x"}, "url"),
        ({"event_types": ["batch.completed"]}, "event_types.0"),  # OpenAI's, but nothing here ever sends it
        ({"event_types": []}, "event_types"),
        ({"secret": "whsec_mine"}, "secret"),
    ],
)
def test_what_cannot_be_honoured_is_refused(open_api, body, param):
    request = {"name": "ci", "url": "http://127.0.0.1:9/hook", "event_types": [SUCCEEDED], **body}
    error = assert_error(open_api.post("/v1/webhook_endpoints", json=request), 400)
    assert error["param"] == param, error


def test_a_cancel_emits_its_event_to_the_subscribed_endpoints_only(open_api):
    subscribed = _create(open_api, event_types=(CANCELLED,)).json()["id"]
    other_type = _create(open_api, event_types=(SUCCEEDED,)).json()["id"]
    other_org = _create(open_api, event_types=(CANCELLED,), org=open_api.b).json()["id"]
    file_id = open_api.upload_ok(classification_rows())["id"]
    job_id = open_api.create_job_ok(file_id, model=MINILM)["id"]

    assert open_api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"

    deliveries = open_api.get(f"/v1/webhook_endpoints/{subscribed}/deliveries").json()["data"]
    assert [(d["event_type"], d["status"], d["attempts"]) for d in deliveries] == [(CANCELLED, "pending", [])]
    with open_api.session() as session:
        row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.id == deliveries[0]["id"]))
        event = json.loads(row.payload)
    assert event["type"] == CANCELLED and event["object"] == "event" and event["data"] == {"id": job_id}
    assert event["id"].startswith("evt_") and event["id"] == deliveries[0]["event_id"]
    assert open_api.get(f"/v1/webhook_endpoints/{other_type}/deliveries").json()["data"] == []
    assert open_api.get(f"/v1/webhook_endpoints/{other_org}/deliveries", org=open_api.b).json()["data"] == []

    # a second cancel changes nothing, so it emits nothing
    open_api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    assert len(open_api.get(f"/v1/webhook_endpoints/{subscribed}/deliveries").json()["data"]) == 1


def test_a_rolled_back_transition_emits_nothing(open_api):
    endpoint_id = _create(open_api, event_types=(CANCELLED,)).json()["id"]
    file_id = open_api.upload_ok(classification_rows())["id"]
    job_id = open_api.create_job_ok(file_id, model=MINILM)["id"]
    with pytest.raises(RuntimeError), open_api.session() as session:
        assert jobs.cancel_unstarted(session, job_id)
        raise RuntimeError("the transaction fails after the transition")
    assert open_api.get(f"/v1/webhook_endpoints/{endpoint_id}/deliveries").json()["data"] == []


def test_the_signature_verifies_with_the_stock_openai_sdk():
    secret = webhooks.new_secret()
    body = json.dumps({"id": "evt_1", "object": "event", "created_at": 1, "type": SUCCEEDED, "data": {"id": "j"}})

    headers = webhooks.headers(secret, "wh_1", body, time.time())
    client = openai.OpenAI(api_key="unused", base_url="http://127.0.0.1:9/v1")
    event = client.webhooks.unwrap(body, headers, secret=secret)
    assert event.type == SUCCEEDED and event.data.id == "j"
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body.replace('"j"', '"k"'), headers, secret=secret)
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body, headers, secret=webhooks.new_secret())


def test_public_addresses_pass_the_check():
    webhooks.check_url("https://93.184.216.34/hook", allow_private=False)
    webhooks.check_url("http://[2606:4700::1111]:8443/x", allow_private=False)
    with pytest.raises(webhooks.UnsafeURL):
        webhooks.check_url("http://[fe80::1%25eth0]/x", allow_private=False)


@sqlite_only
def test_a_retried_creation_with_its_idempotency_key_creates_one_endpoint(open_api):
    first = _create(open_api, headers={"Idempotency-Key": "hook-1"})
    again = _create(open_api, headers={"Idempotency-Key": "hook-1"})
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json()  # the same endpoint and secret
    assert len(open_api.get("/v1/webhook_endpoints").json()["data"]) == 1
    other = _create(open_api, url="http://127.0.0.1:10/other", headers={"Idempotency-Key": "hook-1"})
    assert_error(other, 422, code="idempotency_key_reused")
