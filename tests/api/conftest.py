"""The API under test: the real app, a real database built by the migrations (SQLite file, or a fresh database on a
throw-away Postgres cluster), a real broker nobody consumes (kombu's SQLAlchemy transport on SQLite), storage in a
temporary directory, and two organisations with API keys.

`database` (and so `db_url`, `api`) runs each test on both databases; a test that only exercises request handling
pins itself to SQLite with `@sqlite_only` (from `tests.api`). Without Postgres binaries only the postgres cases are
skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from api.deps import hash_key
from api.main import create_app
from control import webhooks
from control.db import session_factory
from control.ids import new_id
from control.migrate import upgrade
from control.orm import ApiKey, Checkpoint, Job, JobEvent, Organization, WebhookAttempt, WebhookDelivery
from control.settings import Settings, get_settings
from control.storage import job_key
from inference.inprocess import InProcessBackend
from tests import conformance, services
from tests.api import MIN_EXAMPLES, SMOLLM2, Owned, chat_rows, finish_job, jsonl

DB_PARAMS = [
    "sqlite",
    pytest.param(
        "postgres",
        marks=pytest.mark.skipif(not services.postgres_available(), reason=services.postgres_unavailable_reason()),
    ),
]


@dataclass(frozen=True)
class Org:
    id: str
    key: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


ORG_A = Org("org-alpha", "sk-test-alpha-0123456789abcdef")
ORG_B = Org("org-beta", "sk-test-beta-0123456789abcdef")


@pytest.fixture(scope="package", autouse=True)
def _no_ambient_data_dir(tmp_path_factory) -> Iterator[None]:
    """The app's own settings come from the overridden dependency; should anything still read the process-wide
    settings (`get_settings()` creates its data dir), it gets a throw-away one, not the repository's `data/`."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NEAT_DATA_DIR", str(tmp_path_factory.mktemp("ambient-data")))
        get_settings.cache_clear()
        yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory) -> Iterator[str]:
    """One Postgres cluster for the session; each test gets a database of its own on it."""
    with services.postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


_database_names = itertools.count()


@pytest.fixture(params=DB_PARAMS)
def database(request, tmp_path) -> Iterator[str]:
    """The URL of a fresh, empty database: a SQLite file, or a new database on the session's Postgres cluster."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'neat.sqlite'}"
    else:
        server, name = request.getfixturevalue("pg_server"), f"test_{next(_database_names)}"
        url = services.create_database(server, name)
    yield url
    session_factory(url).kw["bind"].dispose()  # close the pooled connections the app (or a test) left open
    if request.param == "postgres":
        services.drop_database(server, name)


@pytest.fixture
def db_url(database) -> str:
    """`database` with the schema built by the migrations, as deployments build it."""
    upgrade(database)
    return database


@pytest.fixture
def orgs(db_url) -> tuple[Org, Org]:
    with session_factory(db_url).begin() as session:
        for org in (ORG_A, ORG_B):
            session.add(Organization(id=org.id, name=org.id.removeprefix("org-").title()))
            session.flush()  # the key's foreign key names the organisation's public id, not a relationship
            session.add(ApiKey(id=f"key-{org.id}", organization_id=org.id, key_hash=hash_key(org.key),
                               prefix=org.key[:12]))  # fmt: skip
    return ORG_A, ORG_B


@pytest.fixture(scope="session")
def broker_url(tmp_path_factory) -> str:
    return f"sqla+sqlite:///{tmp_path_factory.mktemp('broker') / 'broker.sqlite'}"


@dataclass
class Api:
    """A TestClient over one app, acting as organisation A unless told otherwise."""

    client: TestClient
    settings: Settings
    a: Org
    b: Org
    artifact_root: Path = field(init=False)

    def __post_init__(self) -> None:
        self.artifact_root = self.settings.resolved_artifact_root

    def request(self, method: str, path: str, *, org: Org | None = None, **kwargs: Any) -> httpx.Response:
        headers = {**(org or self.a).headers, **kwargs.pop("headers", {})}
        return self.client.request(method, path, headers=headers, **kwargs)

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", path, **kwargs)

    def delete(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.request("DELETE", path, **kwargs)

    def upload(self, content: bytes | list, *, filename: str = "train.jsonl", purpose: str = "fine-tune",
               org: Org | None = None) -> httpx.Response:  # fmt: skip
        body = content if isinstance(content, bytes) else jsonl(content)
        return self.post("/v1/files", org=org, files={"file": (filename, body, "application/jsonl")},
                         data={"purpose": purpose})  # fmt: skip

    def upload_ok(self, content: bytes | list, **kwargs: Any) -> dict:
        response = self.upload(content, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    def create_job(self, training_file: str, *, org: Org | None = None, headers: dict[str, str] | None = None,
                   **body: Any) -> httpx.Response:  # fmt: skip
        """POST a job (SmolLM2 unless `model` is given); `body` holds the other request fields."""
        body = {"model": body.pop("model", SMOLLM2), "training_file": training_file, **body}
        return self.post("/v1/fine_tuning/jobs", org=org, headers=headers or {}, json=body)

    def create_job_ok(self, training_file: str, **kwargs: Any) -> dict:
        response = self.create_job(training_file, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """Direct database access, committed on exit (for states only a worker would produce)."""
        with session_factory(self.settings.resolved_database_url).begin() as session:
            yield session

    def set_job(self, job_id: str, **values: Any) -> None:
        with self.session() as session:
            assert session.execute(update(Job).where(Job.id == job_id).values(**values)).rowcount == 1


@pytest.fixture
def make_api(db_url, orgs, tmp_path, broker_url):
    """Builds an app over this test's database and storage; keyword arguments override its settings."""

    def make(**overrides: Any) -> Api:
        values = {
            "data_dir": tmp_path / "data",
            "database_url": db_url,
            "broker_url": broker_url,
            "artifact_root": tmp_path / "artifacts",
            "min_examples": MIN_EXAMPLES,
            "max_upload_bytes": 8 * 1024 * 1024,
            **overrides,
        }
        settings = Settings(**values)
        assert (settings.database_url, settings.broker_url) == (values["database_url"], values["broker_url"])
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        # As the embedded launcher builds it: inference in process (nothing loads until a model is asked for).
        app = create_app(backend=InProcessBackend(settings) if settings.serving else None)
        app.dependency_overrides[get_settings] = lambda: settings
        return Api(conformance.install(TestClient(app)), settings, *orgs)

    return make


@pytest.fixture
def api(make_api) -> Api:
    return make_api()


@pytest.fixture
def polled_job(api) -> str:
    """A job of organisation A, every column a poll reads set as training leaves it, with five events."""
    file_id = api.upload_ok(chat_rows())["id"]
    job_id = api.create_job_ok(file_id, metadata={"team": "a"}, suffix="bot")["id"]
    # every column job_object reads, set as training would leave them (JSON, nulls, floats, the internal status)
    api.set_job(job_id, status="cancelling", error={"code": "x", "message": "é ✓", "param": None},
                resolved_hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5},
                resolved_adapter={"type": "neat", "r": 8}, adapter_selection={"winner": "neat", "losses": [1.5, 2.25]},
                fine_tuned_model="ft:x", trained_tokens=12345, estimated_finish=1_800_000_000,
                result_file="file-res")  # fmt: skip
    with api.session() as session:
        for step in range(5):
            data = {"step": step, "train_loss": 1.0 / (step + 3), "nested": [None, True]}
            session.add(
                JobEvent(id=new_id("ftevent"), job_id=job_id, type="metrics", message=f"Step {step}", data=data)
            )
    return job_id


@pytest.fixture
def owned_by_a(api) -> Owned:
    """Organisation A owns one of each resource; B owns none yet."""
    file_id = api.upload_ok(chat_rows())["id"]
    job_id = api.create_job_ok(file_id)["id"]
    model = finish_job(api, job_id)
    with api.session() as session:
        session.add(Checkpoint(id=new_id("ftckpt"), job_id=job_id, step_number=5, metrics={"train_loss": 1.0},
                               storage_key=f"{job_key(api.a.id, job_id)}/checkpoints/step-5"))  # fmt: skip
    event = api.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"][0]["id"]
    body = {"name": "a", "url": "https://93.184.216.34/hook", "event_types": list(webhooks.EVENT_TYPES)}
    webhook = api.post("/v1/webhook_endpoints", json=body).json()["id"]
    with api.session() as session:  # one event for it, attempted once
        webhooks.emit(session, api.a.id, webhooks.EVENT_TYPES[0], {"id": job_id})
        session.flush()
        delivery = session.scalar(select(WebhookDelivery.id))
        session.add(WebhookAttempt(delivery_id=delivery, organization_id=api.a.id, attempt=1, started_at=0.0,
                                   duration_ms=1, status_code=500, error="HTTP 500"))  # fmt: skip
    return Owned(file_id, job_id, event, model, webhook)
