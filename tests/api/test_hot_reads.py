"""The reads a polling client makes (retrieve a job, list its events) run on the event loop over Core selects
(control.db.fetch; psycopg's async connections on Postgres): they answer exactly what the ORM objects serialised
by the same functions answer, on both databases, with the same errors in the same order."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import delete, select, text

from api.schemas import event_object, job_object, page
from control.orm import Job, JobEvent
from tests.api import assert_error


def test_a_job_reads_as_its_orm_object_serialises(api, polled_job):
    body = api.get(f"/v1/fine_tuning/jobs/{polled_job}").json()
    with api.session() as session:
        assert body == job_object(session.scalar(select(Job).where(Job.id == polled_job)))
    assert body["status"] == "running" and body["metadata"] == {"team": "a"}  # the public status, as before


def test_events_read_as_their_orm_objects_serialise(api, polled_job):
    with api.session() as session:
        rows = list(
            session.scalars(select(JobEvent).where(JobEvent.job_id == polled_job).order_by(JobEvent.seq.desc()))
        )
    expected = [event_object(r) for r in rows]
    assert api.get(f"/v1/fine_tuning/jobs/{polled_job}/events").json() == page(expected, False)
    first = api.get(f"/v1/fine_tuning/jobs/{polled_job}/events", params={"limit": 2}).json()
    assert first == page(expected[:2], True)
    after = api.get(f"/v1/fine_tuning/jobs/{polled_job}/events", params={"after": expected[1]["id"], "limit": 3}).json()
    assert after == page(expected[2:5], True)


def test_another_organisations_job_is_404_before_any_other_refusal(api, polled_job):
    events = f"/v1/fine_tuning/jobs/{polled_job}/events"
    mine = api.get(events).json()["data"][0]["id"]
    for params in ({}, {"limit": 0}, {"limit": 101}, {"after": "ftevent-nope"}, {"after": mine}):
        assert_error(api.get(events, params=params, org=api.b), 404, code="job_not_found")
    assert_error(api.get(f"/v1/fine_tuning/jobs/{polled_job}", org=api.b), 404, code="job_not_found")
    # the owner gets the refusals themselves
    assert_error(api.get(events, params={"limit": 0}), 400, code="invalid_limit")
    assert_error(api.get(events, params={"after": "ftevent-nope"}), 400, code="invalid_cursor")


def test_an_id_the_database_refuses_answers_as_before(api):
    # Postgres refuses a NUL in a string; the engine's DataError answered 503 (a DBAPIError), SQLite finds nothing
    status = 503 if api.settings.resolved_database_url.startswith("postgresql") else 404
    for path in ("/v1/fine_tuning/jobs/ftjob-%00", "/v1/fine_tuning/jobs/ftjob-%00/events"):
        assert api.get(path).status_code == status


def test_a_job_without_events_lists_none(api, polled_job):
    with api.session() as session:
        session.execute(delete(JobEvent).where(JobEvent.job_id == polled_job))
    assert api.get(f"/v1/fine_tuning/jobs/{polled_job}/events").json() == page([], False)


def test_a_read_survives_its_pooled_connection_being_ended_by_the_server(api, polled_job):
    if not api.settings.resolved_database_url.startswith("postgresql"):
        pytest.skip("Postgres: the async connection pool")
    before = api.get(f"/v1/fine_tuning/jobs/{polled_job}").json()
    with api.session() as session:  # a restart, a fail-over: every other connection to the database is ended
        others = "datname = current_database() AND pid <> pg_backend_pid()"
        ended = session.scalar(text(f"SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE {others}"))
    assert ended >= 1
    assert api.get(f"/v1/fine_tuning/jobs/{polled_job}").json() == before  # retried on a fresh connection, not a 503
    assert api.get(f"/v1/fine_tuning/jobs/{polled_job}/events").status_code == 200


def test_requests_missing_the_key_cache_together_share_one_lookup(monkeypatch):
    from api import deps

    calls = []

    async def lookup(url: str, digest: str) -> str:
        calls.append(digest)
        await asyncio.sleep(0.01)
        return "org-x"

    monkeypatch.setattr(deps, "_lookup", lookup)

    async def burst() -> list[str | None]:
        return await asyncio.gather(*(deps._shared_lookup("db", "digest") for _ in range(20)))

    assert asyncio.run(burst()) == ["org-x"] * 20 and calls == ["digest"]
    assert asyncio.run(burst()) == ["org-x"] * 20 and len(calls) == 2  # done: the next miss looks it up again
    assert deps._LOOKUPS == {}
