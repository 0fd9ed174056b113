"""OpenAI parity of the job, file and model lifecycle: list filters and orders (nothing silently ignored), model
deletion, `x-request-id`, and the OpenAI routes this service does not offer. Through raw HTTP and the stock `openai`
client (over the test app: `http_client=api.client`)."""

from __future__ import annotations

import logging

import openai
import pytest
from sqlalchemy import select

from control.orm import Checkpoint, Job
from tests.api import SMOLLM2, assert_error, chat_rows, finish_job, sqlite_only


def _client(api, org=None) -> openai.OpenAI:
    return openai.OpenAI(api_key=(org or api.a).key, base_url=f"{api.client.base_url}/v1", http_client=api.client,
                         max_retries=0)  # fmt: skip


@pytest.fixture
def chat_file(api) -> str:
    return api.upload_ok(chat_rows())["id"]


# ---------------------------------------------------------------------------------------------------- list filters


def test_jobs_list_filters_on_metadata(api, chat_file):
    """OpenAI's `metadata[k]=v` (every pair must match) and `metadata=null`, on both databases."""
    a = api.create_job_ok(chat_file, metadata={"team": "red", "run": "1"})["id"]
    b = api.create_job_ok(chat_file, metadata={"team": "blue", "run": "1"})["id"]
    c = api.create_job_ok(chat_file)["id"]
    api.create_job_ok(api.upload_ok(chat_rows(), org=api.b)["id"], org=api.b, metadata={"team": "red"})

    def ids(params) -> list[str]:
        response = api.get("/v1/fine_tuning/jobs", params=params)
        assert response.status_code == 200, response.text
        return [j["id"] for j in response.json()["data"]]

    assert ids({"metadata[team]": "red"}) == [a]  # not B's job, which has the same metadata
    assert ids({"metadata[run]": "1"}) == [b, a]
    assert ids({"metadata[team]": "blue", "metadata[run]": "1"}) == [b]
    assert ids({"metadata[team]": "blue", "metadata[run]": "2"}) == []
    assert ids({"metadata[absent]": "x"}) == []
    assert ids({"metadata": "null"}) == [c]
    assert ids({"metadata[run]": "1", "limit": 1}) == [b]  # the filter applies before the page is cut
    # the stock client writes the filter in OpenAI's form
    assert [j.id for j in _client(api).fine_tuning.jobs.list(metadata={"team": "red"})] == [a]


@sqlite_only
def test_jobs_list_refuses_a_malformed_metadata_filter(api):
    assert_error(api.get("/v1/fine_tuning/jobs", params={"metadata": "team"}), 400, code="invalid_metadata_filter",
                 param="metadata")  # fmt: skip
    assert_error(api.get("/v1/fine_tuning/jobs", params={'metadata[a"b]': "x"}), 400,
                 code="invalid_metadata_filter", param='metadata[a"b]')  # fmt: skip


@sqlite_only
def test_files_list_order_and_first_last_ids(api):
    ids = [api.upload_ok(chat_rows(), filename=f"f{i}.jsonl")["id"] for i in range(3)]
    desc = api.get("/v1/files").json()
    assert [f["id"] for f in desc["data"]] == ids[::-1]  # newest first by default, as OpenAI's
    assert (desc["first_id"], desc["last_id"]) == (ids[2], ids[0])
    asc = api.get("/v1/files", params={"order": "asc", "limit": 2}).json()
    assert [f["id"] for f in asc["data"]] == ids[:2] and asc["has_more"] is True
    assert (asc["first_id"], asc["last_id"]) == (ids[0], ids[1])
    rest = api.get("/v1/files", params={"order": "asc", "after": asc["last_id"]}).json()
    assert [f["id"] for f in rest["data"]] == ids[2:] and rest["has_more"] is False
    older = api.get("/v1/files", params={"order": "desc", "after": ids[2]}).json()
    assert [f["id"] for f in older["data"]] == ids[1::-1]
    empty = api.get("/v1/files", params={"purpose": "batch"}).json()
    assert (empty["data"], empty["first_id"], empty["last_id"]) == ([], None, None)
    assert_error(api.get("/v1/files", params={"order": "sideways"}), 400, param="order")
    assert [f.id for f in _client(api).files.list(order="asc")] == ids
    assert "status_details" not in desc["data"][0]  # a string in OpenAI's spec when present, never null


JOB = "/v1/fine_tuning/jobs"
LISTS = ["/v1/files", JOB, JOB + "/{job}/events", JOB + "/{job}/checkpoints", "/v1/models"]


@sqlite_only
@pytest.mark.parametrize("path", LISTS)
def test_lists_refuse_unknown_query_parameters(api, chat_file, path):
    """A filter the service does not apply is refused, naming it, rather than answered as if it had been applied."""
    path = path.format(job=api.create_job_ok(chat_file)["id"])
    error = assert_error(api.get(path, params={"status": "running"}), 400, code="unsupported_parameter",
                         param="status")  # fmt: skip
    assert "'status'" in error["message"]
    assert api.get(path).status_code == 200


# ---------------------------------------------------------------------------------------------------- model deletion


@sqlite_only
def test_delete_fine_tuned_model(api, chat_file):
    job_id = api.create_job_ok(chat_file, suffix="gone")["id"]
    model = finish_job(api, job_id)
    with api.session() as session:
        artifact = api.artifact_root / session.scalar(select(Job.artifact_key).where(Job.id == job_id))
    assert artifact.is_dir()
    other = api.upload_ok(chat_rows(), org=api.b)["id"]
    theirs = finish_job(api, api.create_job_ok(other, org=api.b)["id"], org=api.b)

    # another organisation's model answers as a missing one, and stays
    assert_error(api.delete(f"/v1/models/{theirs}"), 404, code="model_not_found")
    assert api.get(f"/v1/models/{theirs}", org=api.b).status_code == 200

    deleted = _client(api).models.delete(model)
    assert (deleted.id, deleted.object, deleted.deleted) == (model, "model", True)
    assert not artifact.exists(), "the artifact is removed from storage"

    # the job keeps its record; the model is gone everywhere else, with a message saying so
    job = api.get(f"/v1/fine_tuning/jobs/{job_id}").json()
    assert (job["status"], job["fine_tuned_model"]) == ("succeeded", model)
    assert any("deleted" in e["message"] for e in api.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"])
    error = assert_error(api.get(f"/v1/models/{model}"), 404, code="model_not_found")
    assert "has been deleted" in error["message"]
    assert model not in [m["id"] for m in api.get("/v1/models").json()["data"]]
    chat = api.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "hi"}]})
    assert "has been deleted" in assert_error(chat, 404, code="model_not_found")["message"]
    assert_error(api.get(f"/v1/fine_tuning/jobs/{job_id}/adapter"), 409, code="model_deleted")
    with pytest.raises(openai.NotFoundError):
        _client(api).models.retrieve(model)

    assert_error(api.delete(f"/v1/models/{model}"), 404, code="model_not_found")  # a second delete


@sqlite_only
def test_checkpoint_models_cannot_be_deleted_on_their_own(api, owned_by_a):
    checkpoint = f"{owned_by_a.model}:ckpt-step-5"
    with api.session() as session:
        key = session.scalar(select(Checkpoint.storage_key).where(Checkpoint.job_id == owned_by_a.job))
    (api.artifact_root / key / "adapter").mkdir(parents=True)
    (api.artifact_root / key / "adapter" / "manifest.json").write_text("{}")  # a servable checkpoint
    assert (
        "checkpoint" in assert_error(api.delete(f"/v1/models/{checkpoint}"), 403, code="model_not_deletable")["message"]
    )
    assert_error(api.delete(f"/v1/models/{checkpoint}", org=api.b), 404, code="model_not_found")
    assert api.get(f"/v1/models/{checkpoint}").status_code == 200


@sqlite_only
def test_base_models_cannot_be_deleted(api):
    error = assert_error(api.delete(f"/v1/models/{SMOLLM2}"), 403, code="model_not_deletable")
    assert "base model" in error["message"]
    assert api.get(f"/v1/models/{SMOLLM2}").status_code == 200
    assert_error(api.delete("/v1/models/ft:nothing:here"), 404, code="model_not_found")


# ---------------------------------------------------------------------------------------------------- x-request-id


@sqlite_only
def test_every_response_carries_a_request_id(api, chat_file, caplog):
    ids = set()
    for response in (api.get("/v1/models"), api.get("/v1/files/file-nope"), api.get("/v1/nowhere"),
                     api.post("/v1/fine_tuning/jobs", json={})):  # fmt: skip
        request_id = response.headers["x-request-id"]
        assert request_id.startswith("req_") and len(request_id) == 36, request_id
        ids.add(request_id)
    assert len(ids) == 4, "one per request"

    echoed = api.get("/v1/models", headers={"x-request-id": "trace-42.a:b"})
    assert echoed.headers["x-request-id"] == "trace-42.a:b"  # the caller's own, when well-formed
    for bad in ("has space", "x" * 200, "-leading", "new\\nline"):
        replaced = api.get("/v1/models", headers={"x-request-id": bad}).headers["x-request-id"]
        assert replaced.startswith("req_") and replaced != bad

    # the stock client reads it
    client = _client(api)
    raw = client.fine_tuning.jobs.with_raw_response.list()
    assert raw.headers["x-request-id"].startswith("req_")
    assert client.models.retrieve(SMOLLM2)._request_id.startswith("req_")

    # and the API's log lines for the request name it
    model = finish_job(api, api.create_job_ok(chat_file)["id"])
    with caplog.at_level(logging.INFO, logger="api"):
        api.delete(f"/v1/models/{model}", headers={"x-request-id": "trace-delete-1"})
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("api")]
    assert any(line.startswith("[trace-delete-1] deleted fine-tuned model") for line in lines), lines
    assert all(getattr(r, "request_id", None) == "trace-delete-1" for r in caplog.records if r.name == "api.models")


# ---------------------------------------------------------------------------------------------------- routes


UNOFFERED = [("POST", "/v1/embeddings"), ("POST", "/v1/batches"), ("GET", "/v1/batches/batch_1"),
             ("POST", "/v1/uploads"), ("POST", "/v1/images/generations"), ("POST", "/v1/audio/speech"),
             ("POST", "/v1/audio/transcriptions"), ("GET", "/v1/assistants"), ("POST", "/v1/responses"),
             ("POST", "/v1/moderations"), ("GET", "/v1/fine_tuning/checkpoints/x/permissions")]  # fmt: skip


@sqlite_only
@pytest.mark.parametrize("method, path", UNOFFERED)
def test_openai_routes_not_offered_say_so(api, method, path):
    error = assert_error(api.request(method, path, json={}), 404, code="unsupported_route")
    assert path in error["message"] and "does not offer" in error["message"]


@sqlite_only
def test_unsupported_routes_through_the_stock_client(api):
    with pytest.raises(openai.NotFoundError) as refused:
        _client(api).embeddings.create(model=SMOLLM2, input="hi")
    assert refused.value.code == "unsupported_route" and "/v1/embeddings" in refused.value.message
    other = assert_error(api.get("/v1/nonsense"), 404, code="not_found")  # not an OpenAI route: the plain 404
    assert "does not offer" not in other["message"]


# ---------------------------------------------------------------------------------------------------- pause, resume


def test_pause_and_resume_through_the_stock_client(api, chat_file):
    """A queued job is held at once; a running one is asked to stop after its step (it shows `running` until its
    worker has saved a checkpoint and let go: tests/worker/test_runner.py runs that part and the exact resume)."""
    client = _client(api)
    queued = api.create_job_ok(chat_file)["id"]
    assert client.fine_tuning.jobs.pause(queued).status == "paused"
    assert client.fine_tuning.jobs.pause(queued).status == "paused"  # again: nothing changes
    assert client.fine_tuning.jobs.retrieve(queued).status == "paused"
    assert client.fine_tuning.jobs.resume(queued).status == "queued"
    with pytest.raises(openai.ConflictError) as refused:
        client.fine_tuning.jobs.resume(queued)  # not paused
    assert refused.value.code == "job_not_resumable"

    running = api.create_job_ok(chat_file)["id"]
    api.set_job(running, status="running")
    assert client.fine_tuning.jobs.pause(running).status == "running"  # until its worker stops
    with api.session() as session:
        assert session.scalar(select(Job.status).where(Job.id == running)) == "pausing"
    assert client.fine_tuning.jobs.resume(running).status == "running"  # the pause withdrawn
    with api.session() as session:
        assert session.scalar(select(Job.status).where(Job.id == running)) == "running"

    api.set_job(running, status="paused")
    assert client.fine_tuning.jobs.cancel(running).status == "cancelled"  # a paused job has no worker to wait for
    with pytest.raises(openai.ConflictError) as refused:
        client.fine_tuning.jobs.pause(running)
    assert refused.value.code == "job_not_pausable" and "cancelled" in refused.value.message
    messages = [e.message for e in client.fine_tuning.jobs.list_events(queued).data]
    assert messages[:2] == ["Job resumed; it continues from its last checkpoint",
                            "Job paused before it started; resume it to queue it again"]  # fmt: skip
