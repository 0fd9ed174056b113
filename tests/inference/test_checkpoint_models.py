"""A checkpoint is a model of its own (`ft:…:ckpt-step-N`, the name the checkpoints list gives): served for
inference, retrievable, downloadable, and only its owner's; a deleted (pruned) checkpoint says so."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from sqlalchemy import delete, select

from control.db import session_scope
from control.ids import new_id, now
from control.orm import Checkpoint, Job
from control.storage import Storage, job_key
from neat_core.train import list_checkpoints
from tests.api import assert_error
from tests.inference.conftest import KEY_B, ORG_A, make_client


@pytest.fixture
def checkpointed(service):
    """The chat job's last checkpoint (step 2: the weights of its final adapter) and a pruned step 1, recorded as
    the worker records them."""
    url = service.settings.resolved_database_url
    storage = Storage(service.settings.resolved_artifact_root)
    with session_scope(url) as session:
        job = session.scalars(select(Job).where(Job.fine_tuned_model == service.chat_model)).one()
        step_dir = list_checkpoints(storage.path(job_key(ORG_A, job.id)) / "checkpoints")[-1]
        rows = [
            Checkpoint(id=new_id("ftckpt"), job_id=job.id, step_number=2, metrics={"step": 2},
                       storage_key=storage.key(step_dir), created_at=now(), pruned=False),
            Checkpoint(id=new_id("ftckpt"), job_id=job.id, step_number=1, metrics={"step": 1},
                       storage_key=f"{job_key(ORG_A, job.id)}/checkpoints/step-000001", created_at=now(), pruned=True),
        ]  # fmt: skip
        session.add_all(rows)
        job_id = job.id
    yield job_id
    with session_scope(url) as session:
        session.execute(delete(Checkpoint).where(Checkpoint.job_id == job_id))


def test_a_checkpoint_is_a_model_for_inference_retrieval_and_download(service, client, checkpointed):
    listed = client.get(f"/v1/fine_tuning/jobs/{checkpointed}/checkpoints").json()["data"]
    name = next(c["fine_tuned_model_checkpoint"] for c in listed if c["step_number"] == 2)
    assert name == f"{service.chat_model}:ckpt-step-2"

    ask = {"messages": [{"role": "user", "content": "What colour is item 3?"}], "max_tokens": 6, "temperature": 0}
    from_checkpoint = client.post("/v1/chat/completions", json={"model": name, **ask})
    final = client.post("/v1/chat/completions", json={"model": service.chat_model, **ask})
    assert from_checkpoint.status_code == 200, from_checkpoint.text
    assert from_checkpoint.json()["model"] == name
    # step 2 is the run's last step: the checkpoint's weights are the final adapter's, so are its answers
    assert from_checkpoint.json()["choices"][0]["message"] == final.json()["choices"][0]["message"]

    model = client.get(f"/v1/models/{name}").json()
    assert (model["id"], model["object"], model["parent"]) == (name, "model", service.chat_model)

    r = client.get(f"/v1/fine_tuning/jobs/{checkpointed}/adapter", params={"checkpoint": 2})
    assert r.status_code == 200, r.text
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        manifest = json.load(tar.extractfile(f"{checkpointed}/manifest.json"))
    assert manifest["steps"] == 2
    r = client.get(f"/v1/fine_tuning/jobs/{checkpointed}/adapter", params={"checkpoint": 2, "format": "lora"})
    assert_error(r, 400, code="not_exportable", param="format")


def test_a_missing_pruned_or_foreign_checkpoint_is_not_found(service, client, checkpointed):
    ask = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error = assert_error(client.post("/v1/chat/completions", json={"model": f"{service.chat_model}:ckpt-step-1",
                                                                   **ask}), 404, code="model_not_found")  # fmt: skip
    assert "was deleted" in error["message"], error
    error = assert_error(client.get(f"/v1/models/{service.chat_model}:ckpt-step-9"), 404, code="model_not_found")
    assert "no checkpoint at step 9" in error["message"], error
    other = make_client(service.settings, KEY_B)  # another organisation: as if it did not exist
    r = other.post("/v1/chat/completions", json={"model": f"{service.chat_model}:ckpt-step-2", **ask})
    error = assert_error(r, 404, code="model_not_found")
    assert "does not exist" in error["message"], error
    r = client.post("/v1/classifications", json={"model": f"{service.chat_model}:ckpt-step-2", "input": ["x"]})
    assert_error(r, 400, code="invalid_model_for_endpoint")
