"""Idempotency-Key on POST /v1/files and POST /v1/fine_tuning/jobs: a retry replays the first response and creates
nothing; the key with another body is a 422; a request still in flight is a 409; a failed request frees its key;
keys are per organisation. Also through the stock openai client, which retries POSTs."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from api.idempotency import claim, request_hash
from api.schemas import JobCreate
from control.db import session_factory
from control.orm import File, IdempotencyKey, Job
from tests.api import assert_error, chat_rows, jsonl, sqlite_only

ROOT = Path(__file__).resolve().parents[2]


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


def test_a_request_whose_key_release_failed_in_a_live_process_frees_its_key(api, tmp_path):
    """The chaos soak's finding: the database went away mid-request, so the request failed and so did the release
    of its key; the API process lived on, so the key answered 409 for 300 s. A retry reaching that process now
    sees that none of its requests holds the key and takes it over."""
    file_id = api.upload_ok(chat_rows())["id"]
    job = JobCreate(model="HuggingFaceTB/SmolLM2-135M-Instruct", training_file=file_id)
    digest = request_hash(job.model_dump(mode="json"), job.model_extra)
    held = claim(api.settings.resolved_database_url, api.a.id, "fine_tuning.jobs", "orphan", digest)
    unreachable = dataclasses.replace(held, url=f"sqlite:///{tmp_path / 'gone' / 'db.sqlite'}")
    with pytest.raises(OperationalError):
        unreachable.release()  # the release cannot be written: the row stays in flight, owned by this process
    with api.session() as session:
        assert session.scalar(select(IdempotencyKey.state).where(IdempotencyKey.key == "orphan")) == "in_flight"
    r = api.create_job(file_id, headers=key("orphan"))
    assert r.status_code == 200, r.text
    assert api.create_job(file_id, headers=key("orphan")).json()["id"] == r.json()["id"]  # and replays
    assert count(api, Job) == 1


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


@sqlite_only
def test_a_retry_after_the_api_process_died_mid_upload_succeeds(db_url, orgs, tmp_path):
    """Two real API processes behind one listening socket (as behind a load balancer). The one handling an upload
    with an Idempotency-Key is SIGKILLed while it holds the key; the stock openai client's own retries (its
    defaults) reach the other process, which sees the key's process gone, takes the key over and stores the file
    once. (Before, the key stayed in flight and every retry got 409 for 300 s.)"""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.set_inheritable(True)
    port = listener.getsockname()[1]
    env = {**os.environ, "NEAT_DATA_DIR": str(tmp_path / "data"), "NEAT_DATABASE_URL": db_url,
           "NEAT_ARTIFACT_ROOT": str(tmp_path / "artifacts"), "NEAT_SERVING": "false", "HF_HUB_OFFLINE": "1",
           "NEAT_MIN_EXAMPLES": "10", "PYTHONPATH": str(ROOT)}  # fmt: skip
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--fd", str(listener.fileno())]
    log = tmp_path / "api.log"
    with open(log, "ab") as out:
        apis = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out, pass_fds=(listener.fileno(),),
                                 start_new_session=True) for _ in range(2)]  # fmt: skip
    try:
        wait_until(lambda: log.read_text().count("Application startup complete") == 2 and _healthy(port), 90, log)
        # Big enough that validating it takes a while: the window in which its process holds the key.
        body = jsonl(chat_rows(10)) * 30_000
        client = openai.OpenAI(api_key=orgs[0].key, base_url=f"http://127.0.0.1:{port}/v1", timeout=120)
        outcome: dict = {}

        def upload() -> None:
            try:
                outcome["file"] = client.files.create(file=("big.jsonl", body), purpose="fine-tune",
                                                      extra_headers=key("crash-1"))  # fmt: skip
            except Exception as e:  # noqa: BLE001 (reported below)
                outcome["error"] = e

        thread = threading.Thread(target=upload)
        thread.start()
        holder = wait_until(lambda: _in_flight_owner(db_url), 120, log)
        pid = int(holder.split(".")[1])
        assert pid in [p.pid for p in apis]
        os.kill(pid, signal.SIGKILL)  # mid-request, holding the key: nothing of its own frees it
        thread.join(timeout=180)
        assert "error" not in outcome, outcome.get("error")
        file_id = outcome["file"].id
        with session_factory(db_url)() as session:
            assert session.scalar(select(func.count()).select_from(File)) == 1
            row = session.scalar(select(IdempotencyKey))
            assert row.state == "done" and row.response_body["id"] == file_id
    finally:
        for api in apis:
            if api.poll() is None:
                os.killpg(api.pid, signal.SIGKILL)
                api.wait(timeout=30)
        listener.close()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _in_flight_owner(url: str) -> str | None:
    with session_factory(url)() as session:
        return session.scalar(select(IdempotencyKey.owner).where(IdempotencyKey.state == "in_flight"))


def wait_until(predicate, timeout: float, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out; API log:\n{log.read_text(errors='replace')[-3000:]}")
