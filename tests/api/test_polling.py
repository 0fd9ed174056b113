"""The polling fast path (api.polling): the polls it takes are answered exactly as the FastAPI routes answer them,
errors included, counted in the metrics as before; everything it cannot decide goes on to FastAPI."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.exc import OperationalError

from api.deps import CurrentOrg
from api.errors import install_error_handlers
from api.polling import PollingFastPath
from control.keys import RECENT_KEYS, hash_key, revoke_key
from control.settings import Settings, get_settings
from tests.api import assert_error

JOB = "/v1/fine_tuning/jobs/{}"
EVENTS = "/v1/fine_tuning/jobs/{}/events"


def _fast_path(app: Any) -> PollingFastPath:
    layer = app.middleware_stack
    while not isinstance(layer, PollingFastPath):
        layer = layer.app
    return layer


@pytest.fixture
def passed_on(api) -> Iterator[list[str]]:
    """Each request the fast path passed on to FastAPI, as 'path?query'."""
    assert api.get("/healthz").status_code == 200  # builds the middleware stack
    fast = _fast_path(api.client.app)
    inner, seen = fast.app, []

    async def recording(scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            seen.append(f"{scope['path']}?{scope['query_string'].decode()}")
        await inner(scope, receive, send)

    fast.app = recording
    yield seen
    fast.app = inner


def _slow_then_fast(api, passed_on: list[str], path: str, **kwargs: Any) -> tuple[Any, Any]:
    """The same request answered by FastAPI (the key not remembered yet), then by the fast path."""
    RECENT_KEYS.clear()
    before = len(passed_on)
    slow = api.get(path, **kwargs)
    assert len(passed_on) == before + 1  # FastAPI looked the key up...
    fast = api.get(path, **kwargs)
    assert len(passed_on) == before + 1, passed_on[before:]  # ...and the fast path answered the second
    return slow, fast


def test_polls_with_a_remembered_key_are_answered_as_fastapi_answers_them(api, polled_job, passed_on):
    all_events = api.get(EVENTS.format(polled_job)).json()["data"]
    cases = [
        (JOB.format(polled_job), {}),
        (EVENTS.format(polled_job), {}),
        (EVENTS.format(polled_job), {"limit": 2}),
        (EVENTS.format(polled_job), {"after": all_events[1]["id"], "limit": 3}),
        (EVENTS.format(polled_job), {"after": all_events[3]["id"]}),
    ]
    for path, params in cases:
        slow, fast = _slow_then_fast(api, passed_on, path, params=params)
        assert (fast.status_code, fast.headers["content-type"]) == (200, slow.headers["content-type"])
        assert fast.json() == slow.json()
        assert fast.headers["x-request-id"] != slow.headers["x-request-id"]  # each answer still carries its own id
    assert api.get(EVENTS.format(polled_job), params={"limit": 2}).json()["data"] == all_events[:2]


def test_refusals_on_the_fast_path_are_the_routes(api, polled_job, passed_on):
    mine = api.get(EVENTS.format(polled_job)).json()["data"][0]["id"]
    cases = [
        (JOB.format(polled_job), {}, api.b, 404, "job_not_found"),  # another organisation's job: as a missing one
        (JOB.format("ftjob-missing"), {}, api.a, 404, "job_not_found"),
        (EVENTS.format(polled_job), {"limit": 0}, api.b, 404, "job_not_found"),  # 404 before any other refusal
        (EVENTS.format(polled_job), {"after": mine}, api.b, 404, "job_not_found"),
        (EVENTS.format(polled_job), {"limit": 0}, api.a, 400, "invalid_limit"),
        (EVENTS.format(polled_job), {"limit": 101}, api.a, 400, "invalid_limit"),
        (EVENTS.format(polled_job), {"after": "ftevent-nope"}, api.a, 400, "invalid_cursor"),
    ]
    for path, params, org, status, code in cases:
        slow, fast = _slow_then_fast(api, passed_on, path, params=params, org=org)
        assert_error(fast, status, code=code)
        assert fast.json() == slow.json()


def test_what_the_fast_path_cannot_decide_goes_to_fastapi(api, polled_job, passed_on):
    events = EVENTS.format(polled_job)
    assert api.get(events).status_code == 200  # the key is remembered now
    del passed_on[:]
    refused = [
        ("foo=1", 400, "unsupported_parameter", "foo"),  # a parameter the list does not take is named
        ("limit=abc", 400, None, "limit"),
        ("limit=-1", 400, None, "limit"),
        ("limit=2&limit=3", None, None, None),  # repeated: FastAPI's rules decide which counts
        ("after=", 400, "invalid_cursor", "after"),
    ]
    for query, status, code, param in refused:
        response = api.get(f"{events}?{query}")
        if status is not None:
            assert_error(response, status, code=code, param=param)
    assert passed_on == [f"{events}?{query}" for query, *_ in refused]

    del passed_on[:]
    assert api.get(f"{JOB.format(polled_job)}?expand=1").status_code == 200  # (the retrieve route takes no query)
    assert_error(api.get(events, headers={"Authorization": "Bearer sk-wrong"}), 401, code="invalid_api_key")
    assert_error(api.get(events, headers={"Authorization": "Basic x"}), 401, code="missing_api_key")
    assert api.get(f"{events}/", follow_redirects=False).status_code == 307  # not a polled path: FastAPI redirects
    assert len(passed_on) == 4


def test_a_key_revoked_through_this_process_stops_polling_at_once(api, polled_job, passed_on):
    assert api.get(JOB.format(polled_job)).status_code == 200
    assert api.get(JOB.format(polled_job)).status_code == 200
    with api.session() as session:
        assert revoke_key(session, f"key-{api.a.id}")
    assert_error(api.get(JOB.format(polled_job)), 401, code="invalid_api_key")
    assert_error(api.get(EVENTS.format(polled_job)), 401, code="invalid_api_key")


def test_polls_on_the_fast_path_are_counted_in_the_metrics(api, polled_job, passed_on):
    registry = api.client.app.state.metrics

    def served(template: str, status: str) -> float:
        labels = {"handler": template, "method": "GET", "status": status}
        return registry.get_sample_value("neat_api_http_requests_total", labels) or 0.0

    api.get(JOB.format(polled_job))  # the key remembered
    del passed_on[:]
    before = served("/v1/fine_tuning/jobs/{job_id}", "200"), served("/v1/fine_tuning/jobs/{job_id}/events", "404")
    for _ in range(3):
        assert api.get(JOB.format(polled_job)).status_code == 200
        assert api.get(EVENTS.format("ftjob-missing")).status_code == 404
    assert passed_on == []
    after = served("/v1/fine_tuning/jobs/{job_id}", "200"), served("/v1/fine_tuning/jobs/{job_id}/events", "404")
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


def test_a_failure_other_than_an_api_error_is_left_to_fastapi_to_map(tmp_path):
    """The fast path cannot map a database failure as `api.errors` does: FastAPI runs the request again and does."""
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path}/x.db")
    router, calls = APIRouter(), []

    @router.get("/v1/things/{thing}")
    async def thing(org: CurrentOrg, thing: str) -> dict:
        calls.append((org, thing))
        if thing == "down":
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return {"id": thing, "owner": org}

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(PollingFastPath, routes=router.routes, endpoints=(thing,))
    app.include_router(router)
    app.dependency_overrides[get_settings] = lambda: settings
    RECENT_KEYS.put((settings.resolved_database_url, hash_key("sk-x")), "org-x")
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer sk-x"}
        assert client.get("/v1/things/a", headers=headers).json() == {"id": "a", "owner": "org-x"}
        assert calls == [("org-x", "a")]  # once: the fast path answered
        assert_error(client.get("/v1/things/down", headers=headers), 503, code="database_unavailable")
        assert calls[1:] == [("org-x", "down")] * 2  # the fast path's attempt, then FastAPI's


def test_a_route_the_fast_path_cannot_fill_is_refused_when_the_app_is_built():
    router = APIRouter()

    @router.get("/v1/things/{thing}")
    async def thing(thing: str, size: float = 1.0) -> dict:  # no caller organisation, a float parameter
        return {}

    with pytest.raises(ValueError, match="organisation"):
        PollingFastPath(FastAPI(), routes=router.routes, endpoints=(thing,))
