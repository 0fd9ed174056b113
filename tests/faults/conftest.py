"""Postgres and Redis on loopback for the fault suite (one of each per session; a fresh database per test)."""

from __future__ import annotations

import uuid
from contextlib import ExitStack

import pytest

from control.db import session_scope
from control.settings import Settings
from tests.services import ServiceError, create_database, postgres, postgres_available, redis
from tests.worker.conftest import make_settings


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fault-servers")
    with ExitStack() as stack:
        try:
            pg = stack.enter_context(postgres(tmp))
            broker = stack.enter_context(redis(tmp))
        except ServiceError as e:
            pytest.fail(f"the fault-injection suite needs Postgres and Redis: {e}")
        yield pg, broker


@pytest.fixture
def settings(servers, tmp_path) -> Settings:
    pg, broker = servers
    url = create_database(pg, f"faults_{uuid.uuid4().hex[:8]}")
    base = make_settings(tmp_path / "data")  # SQLite first (make_settings migrates and adds the org) ...
    settings = base.model_copy(update={"database_url": url, "broker_url": broker, "queue": f"q-{tmp_path.name}"})
    from control.migrate import upgrade
    from control.orm import Organization
    from tests.worker.conftest import ORG

    upgrade(url)  # ... then the same on the Postgres database the workers use
    with session_scope(url) as session:
        session.add(Organization(id=ORG, name="Test org"))
    return settings


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> Settings:
    """For the transition-level tests (test_leases.py, test_fences.py): a fresh database, SQLite and Postgres (where
    this machine has it), with a 30 s lease and `max_attempts` 3."""
    if request.param == "postgres":
        if not postgres_available():
            pytest.skip("no Postgres server binaries on this machine")
        settings = request.getfixturevalue("settings")  # a fresh Postgres database
    else:
        settings = make_settings(tmp_path / "data")
    return settings.model_copy(update={"lease_seconds": 30.0, "max_attempts": 3})
