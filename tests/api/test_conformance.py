"""The conformance check itself (tests/conformance.py): it fails on a body that does not match the SDK's type for its
route, on a stream event that does not, on an error body that is not OpenAI's, and on a 2xx JSON body from a route
nobody decided; it lets a conforming body through. Over a small app of its own, so that the product's routes being
right cannot hide a check that never fires."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.testclient import TestClient

from tests import conformance
from tests.conformance import NonConforming

JOB = {"id": "ftjob-1", "object": "fine_tuning.job", "created_at": 1, "model": "m", "organization_id": "org",
       "result_files": [], "seed": 1, "status": "queued", "training_file": "file-1",
       "hyperparameters": {"n_epochs": "auto"}}  # fmt: skip
CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}  # fmt: skip


def _app() -> FastAPI:
    app = FastAPI()
    bodies = {
        "good": JOB,
        "cancelling": {**JOB, "status": "cancelling"},  # outside OpenAI's status enum
        "no-seed": {k: v for k, v in JOB.items() if k != "seed"},  # a required field missing
    }

    @app.get("/v1/fine_tuning/jobs/{name}")
    def job(name: str) -> dict:
        return bodies[name]

    @app.get("/v1/files")
    def files() -> dict:  # a files list without first_id / last_id
        return {"object": "list", "data": [], "has_more": False}

    @app.get("/v1/undecided")
    def undecided() -> dict:
        return {"anything": 1}

    @app.get("/v1/models/{name}")
    def bad_error(name: str) -> JSONResponse:  # an error with FastAPI's `detail` beside OpenAI's `error`
        return JSONResponse({"error": {"message": "x", "type": "t"}, "detail": "x"}, status_code=404)

    @app.post("/v1/chat/completions")
    def stream() -> StreamingResponse:
        bad = {**CHUNK, "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "finished"}]}
        events = [f"data: {json.dumps(CHUNK)}\n\n", f"data: {json.dumps(bad)}\n\n", "data: [DONE]\n\n"]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    @app.post("/v1/completions")
    def completions_stream() -> StreamingResponse:
        def event(finish_reason) -> str:
            choice = {"index": 0, "text": "x", "logprobs": None, "finish_reason": finish_reason}
            body = {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
            return f"data: {json.dumps(body)}\n\n"

        # null before the last event (as OpenAI sends it) passes; a value outside the enum does not
        events = [event(None), event("stop"), event("finished"), "data: [DONE]\n\n"]
        return StreamingResponse(iter(events), media_type="text/event-stream")

    return app


@pytest.fixture
def client():
    yield conformance.install(TestClient(_app()))
    conformance.MISMATCHES.clear()  # what this module provoked on purpose is not a failure of the test


def _refused(call, *words: str) -> None:
    with pytest.raises(NonConforming) as refused:
        call()
    for word in words:
        assert word in str(refused.value), refused.value
    assert conformance.MISMATCHES, "a mismatch is also recorded, for the autouse fixture"
    conformance.MISMATCHES.clear()


def test_a_conforming_body_passes(client):
    assert client.get("/v1/fine_tuning/jobs/good").json()["status"] == "queued"
    assert conformance.MISMATCHES == []


def test_a_status_outside_the_enum_fails(client):
    _refused(lambda: client.get("/v1/fine_tuning/jobs/cancelling"), "FineTuningJob", "status", "cancelling")


def test_a_missing_required_field_fails(client):
    _refused(lambda: client.get("/v1/fine_tuning/jobs/no-seed"), "seed")


def test_a_files_list_without_first_and_last_id_fails(client):
    _refused(lambda: client.get("/v1/files"), "first_id", "last_id")


def test_a_route_without_a_declared_type_fails(client):
    _refused(lambda: client.get("/v1/undecided"), "no SDK type")


def test_an_error_body_beyond_openais_shape_fails(client):
    _refused(lambda: client.get("/v1/models/x"), "detail")


def test_each_stream_event_is_checked(client):
    with client.stream("POST", "/v1/chat/completions") as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # the first event conforms
        _refused(lambda: list(lines), "stream event", "finish_reason")


def test_check_body_directly():
    conformance.check_body("GET", "/v1/fine_tuning/jobs/x", 200, "application/json", json.dumps(JOB).encode())
    with pytest.raises(NonConforming):
        conformance.check_body("GET", "/v1/fine_tuning/jobs/x", 200, "application/json; charset=utf-8",
                               json.dumps({**JOB, "created_at": "yesterday"}).encode())  # fmt: skip


def test_completions_stream_events_allow_only_a_null_finish_reason_beyond_the_sdk(client):
    with client.stream("POST", "/v1/completions") as response:
        lines = (line for line in response.iter_lines() if line)
        assert next(lines) and next(lines)  # null, then "stop": both conform
        _refused(lambda: list(lines), "finish_reason")
