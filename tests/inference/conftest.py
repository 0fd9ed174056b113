"""A service with real adapters: two organisations, a chat adapter and a classification adapter trained for a few
steps on the tiny models, and jobs pointing at them. Built once per session; the tests only read it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.deps import hash_key
from api.main import create_app
from control.ids import new_id
from control.jobs import fine_tuned_model_name
from control.migrate import upgrade
from control.orm import ApiKey, Job, Organization
from control.settings import Settings, get_settings
from control.storage import Storage, job_key
from inference.inprocess import InProcessBackend
from tests import conformance
from tests.conftest import chat_rows, classification_rows, write_jsonl

ORG_A, ORG_B = "org-a", "org-b"
KEY_A, KEY_B = "sk-test-org-a", "sk-test-org-b"


@dataclass
class Service:
    settings: Settings
    chat_model: str  # org A's succeeded causal-LM adapter
    classifier: str  # org A's succeeded classification adapter
    other_org_model: str  # org B's succeeded causal-LM adapter
    running_model: str  # org A's job that has not finished
    broken_model: str  # org A's succeeded job whose artifact is gone


def _train(base: Path, rows: list[dict], storage: Storage, org: str, job_id: str) -> str:
    """Train a few steps into the job's directory; returns the adapter's storage key."""
    from neat_core.train import TrainSpec, train

    key = job_key(org, job_id)
    work = storage.path(key)
    work.mkdir(parents=True)
    spec = TrainSpec(
        base_model=str(base),
        training_file=write_jsonl(work / "train.jsonl", rows),
        output_dir=work,
        batch_size=4,
        max_steps=2,
        seed=0,
        device="cpu",
    )
    result = train(spec)
    assert result.adapter_dir == work / "adapter"
    return f"{key}/adapter"


def _job(org: str, job_id: str, base: Path, task: str, artifact_key: str | None, status: str = "succeeded") -> Job:
    job = Job(
        id=job_id,
        organization_id=org,
        model=str(base),
        task=task,
        training_file="file-test",
        suffix="t",
        seed=0,
        hyperparameters={},
        adapter={"type": "neat"},
        status=status,
        artifact_key=artifact_key,
    )
    job.fine_tuned_model = fine_tuned_model_name(job)
    return job


@pytest.fixture(scope="session")
def service(tmp_path_factory, tiny_models) -> Service:
    from control.db import session_scope

    root = tmp_path_factory.mktemp("serving")
    settings = Settings(
        data_dir=root, database_url=f"sqlite:///{root / 'x.sqlite'}", artifact_root=root / "artifacts", device="cpu"
    )
    upgrade(settings.resolved_database_url)
    storage = Storage(settings.resolved_artifact_root)

    chat_id, cls_id, other_id, running_id, broken_id = (new_id("ftjob") for _ in range(5))
    chat_key = _train(tiny_models["llama"], chat_rows(), storage, ORG_A, chat_id)
    cls_key = _train(tiny_models["bert"], classification_rows(), storage, ORG_A, cls_id)
    jobs = [
        _job(ORG_A, chat_id, tiny_models["llama"], "causal_lm", chat_key),
        _job(ORG_A, cls_id, tiny_models["bert"], "classification", cls_key),
        _job(ORG_B, other_id, tiny_models["llama"], "causal_lm", chat_key),  # same weights, another owner
        _job(ORG_A, running_id, tiny_models["llama"], "causal_lm", None, status="running"),
        _job(ORG_A, broken_id, tiny_models["llama"], "causal_lm", f"{job_key(ORG_A, broken_id)}/adapter"),
    ]
    with session_scope(settings.resolved_database_url) as session:
        for org, key in ((ORG_A, KEY_A), (ORG_B, KEY_B)):
            session.add(Organization(id=org, name=org))
            session.flush()
            session.add(ApiKey(id=new_id("key"), organization_id=org, key_hash=hash_key(key), prefix=key[:12]))
        session.add_all(jobs)
    return Service(settings, *(job.fine_tuned_model for job in jobs))


_backends: dict[str, InProcessBackend] = {}


def backend_for(settings: Settings) -> InProcessBackend:
    """The in-process backend of a test service (one per database, as a launcher builds one per process): its
    engines load once per session, whichever client asks."""
    key = settings.resolved_database_url
    if key not in _backends:
        _backends[key] = InProcessBackend(settings)
    return _backends[key]


def make_client(settings: Settings, key: str = KEY_A) -> TestClient:
    """The API as the embedded launcher builds it (inference in process); with serving off, none is injected."""
    app = create_app(backend=backend_for(settings) if settings.serving else None)
    app.dependency_overrides[get_settings] = lambda: settings
    return conformance.install(TestClient(app, headers={"Authorization": f"Bearer {key}"}))


@pytest.fixture
def client(service) -> TestClient:
    return make_client(service.settings)
