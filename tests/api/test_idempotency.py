"""Idempotency-Key on POST /v1/files and POST /v1/fine_tuning/jobs: a retry replays the first response and creates
nothing; the key with another body is a 422; a request still in flight is a 409; a failed request frees its key;
keys are per organisation. Also through the stock openai client, which retries POSTs."""

from __future__ import annotations

import threading

import openai
from sqlalchemy import func, select

from api.idempotency import claim, request_hash
from api.schemas import JobCreate
from control.orm import File, IdempotencyKey, Job
from tests.api import assert_error, chat_rows, jsonl


def key(value: str) -> dict[str, str]:
    return {"Idempotency-Key": value}


def count(api, model) -> int:
    with api.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def upload(api, rows, value: str, org=None):
    files = {"file": ("t.jsonl", jsonl(rows), "application/jsonl")}
    return api.post("/v1/files", org=org, headers=key(value), files=files, data={"purpose": "fine-tune"})


def test_a_retried_upload_replays_the_first_file(api):
    first = upload(api, chat_rows(), "upload-1")
    again = upload(api, chat_rows(), "upload-1")
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["Idempotent-Replayed"] == "true"
    assert count(api, File) == 1 and len(list(api.artifact_root.rglob("file-*"))) == 1

    other = upload(api, chat_rows(12), "upload-1")  # same key, other content
    assert_error(other, 422, code="idempotency_key_reused", param="Idempotency-Key")
    assert count(api, File) == 1


def test_a_retried_job_creation_replays_the_first_job(api):
    file_id = api.upload_ok(chat_rows())["id"]
    first = api.create_job(file_id, headers=key("job-1"), suffix="a")
    again = api.create_job(file_id, headers=key("job-1"), suffix="a")
    assert first.status_code == again.status_code == 200 and again.json()["id"] == first.json()["id"]
    assert count(api, Job) == 1

    changed = api.create_job(file_id, headers=key("job-1"), suffix="b")
    assert_error(changed, 422, code="idempotency_key_reused")
    assert api.create_job(file_id, headers=key("job-2"), suffix="a").json()["id"] != first.json()["id"]
    assert count(api, Job) == 2


def test_a_request_still_in_flight_answers_409(api):
    file_id = api.upload_ok(chat_rows())["id"]
    body = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "training_file": file_id}
    # Another request holding the key right now: claimed, its job not yet committed.
    job = JobCreate(**body)
    digest = request_hash(job.model_dump(mode="json"), job.model_extra)
    held = claim(api.settings.resolved_database_url, api.a.id, "fine_tuning.jobs", "busy", digest)
    assert held is not None
    r = api.create_job(file_id, headers=key("busy"))
    assert_error(r, 409, code="idempotency_request_in_progress")
    assert r.headers["Retry-After"] == "1"
    assert count(api, Job) == 0
    held.release()  # the other request failed: its key is free again
    assert api.create_job(file_id, headers=key("busy")).status_code == 200


def test_concurrent_duplicates_create_one_job(api):
    file_id = api.upload_ok(chat_rows())["id"]
    barrier, responses = threading.Barrier(6), []

    def post():
        barrier.wait()
        responses.append(api.create_job(file_id, headers=key("race")))

    threads = [threading.Thread(target=post) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in responses if r.status_code == 200]
    assert ok and all(r.status_code in (200, 409) for r in responses)
    assert len({r.json()["id"] for r in ok}) == 1 and count(api, Job) == 1


def test_a_failed_request_frees_its_key_and_keys_are_per_organisation(api):
    r = api.create_job("file-missing", headers=key("k"))
    assert_error(r, 400, code="file_not_found")
    with api.session() as session:
        assert session.scalar(select(func.count()).select_from(IdempotencyKey)) == 0
    mine = api.create_job(api.upload_ok(chat_rows())["id"], headers=key("k"))
    theirs_file = api.upload_ok(chat_rows(), org=api.b)["id"]
    theirs = api.create_job(theirs_file, org=api.b, headers=key("k"))
    assert mine.status_code == theirs.status_code == 200 and mine.json()["id"] != theirs.json()["id"]


def test_invalid_key_is_rejected(api):
    assert_error(upload(api, chat_rows(), "x" * 256), 400, code="invalid_idempotency_key")
    assert count(api, File) == 0


def test_the_openai_client_retry_with_its_key_creates_one_job(api):
    client = openai.OpenAI(api_key=api.a.key, base_url=f"{api.client.base_url}/v1", http_client=api.client,
                           max_retries=0)  # fmt: skip
    file_id = client.files.create(file=("t.jsonl", jsonl(chat_rows())), purpose="fine-tune").id
    first = client.fine_tuning.jobs.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=file_id,
                                           extra_headers=key("sdk-retry"))  # fmt: skip
    retried = client.fine_tuning.jobs.create(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=file_id,
                                             extra_headers=key("sdk-retry"))  # fmt: skip
    assert retried.id == first.id and count(api, Job) == 1
