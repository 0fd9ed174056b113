"""DELETE /v1/models/{fine-tuned model} with the in-process backend and a real adapter: the model, loaded by a
request, leaves the engine's cache and storage, and the next request for it answers 404 saying it was deleted."""

from __future__ import annotations

import shutil
from pathlib import Path

from sqlalchemy import select

from control.db import session_scope
from control.ids import new_id
from control.orm import Job
from control.storage import Storage, job_key
from tests.inference.conftest import ORG_A, _job

CHAT = {"messages": [{"role": "user", "content": "colour?"}], "max_tokens": 2, "temperature": 0}


def _own_copy(service) -> tuple[str, Path]:
    """A fine-tuned model of org A's made for this test (a copy of the session's chat adapter), so the other
    tests keep theirs. Returns its name and its artifact directory."""
    storage = Storage(service.settings.resolved_artifact_root)
    url = service.settings.resolved_database_url
    with session_scope(url) as session:
        source = session.scalar(select(Job).where(Job.fine_tuned_model == service.chat_model))
        job_id = new_id("ftjob")
        key = f"{job_key(ORG_A, job_id)}/adapter"
        shutil.copytree(storage.path(source.artifact_key), storage.path(key))
        job = _job(ORG_A, job_id, Path(source.model), source.task, key)
        session.add(job)
        return job.fine_tuned_model, storage.path(key)


def _loaded(client) -> set[str]:
    return {a for e in client.get("/v1/serving/stats").json()["engines"] for a in e["your_adapters"]}


def test_deleting_a_model_unloads_it_and_removes_its_artifact(service, client):
    name, artifact = _own_copy(service)
    served = client.post("/v1/chat/completions", json={"model": name, **CHAT})
    assert served.status_code == 200, served.text
    assert name in _loaded(client)

    deleted = client.delete(f"/v1/models/{name}")
    assert deleted.status_code == 200, deleted.text
    assert deleted.json() == {"id": name, "object": "model", "deleted": True}
    assert name not in _loaded(client), "the adapter left the engine's cache"
    assert not artifact.exists()

    again = client.post("/v1/chat/completions", json={"model": name, **CHAT})
    assert again.status_code == 404 and "has been deleted" in again.json()["error"]["message"], again.text
    assert client.post("/v1/chat/completions", json={"model": service.chat_model, **CHAT}).status_code == 200
