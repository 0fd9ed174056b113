"""Admission control and fairness over HTTP, through the in-process backend: every inference request is bounded
(body bytes, characters, texts) before anything expensive is done with it, and one organisation's big
classification does not hold up another's small ones (the engine takes work round-robin by organisation)."""

from __future__ import annotations

import statistics
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import delete, select

from api.main import create_app
from control.ids import new_id
from control.orm import Job
from control.protocol import MAX_INPUT_CHARS, MAX_PROMPT_CHARS, MAX_TEXT_CHARS
from control.settings import get_settings
from inference.inprocess import InProcessBackend
from inference.text import CHARS_PER_TOKEN
from tests.api import assert_error
from tests.inference.conftest import KEY_A, KEY_B, ORG_B, _job, make_client

LONG_TEXT = "the service was slow but the staff were kind and the food was good " * 10  # ~680 characters, > 128 tokens


@pytest.fixture(scope="module")
def b_classifier(service):
    """Organisation B's own classifier (org A's trained weights, another owner), for this module only."""
    from control.db import session_scope

    url = service.settings.resolved_database_url
    with session_scope(url) as session:
        a_job = session.scalars(select(Job).where(Job.fine_tuned_model == service.classifier)).one()
        job = _job(ORG_B, new_id("ftjob"), Path(a_job.model), "classification", a_job.artifact_key)
        session.add(job)
        name, job_id = job.fine_tuned_model, job.id
    yield name
    with session_scope(url) as session:
        session.execute(delete(Job).where(Job.id == job_id))


def test_inference_requests_are_bounded_before_they_are_tokenized(service, tiny_models):
    a = make_client(service.settings)
    over = "w" * (MAX_PROMPT_CHARS + 1)
    r = a.post("/v1/completions", json={"model": service.chat_model, "prompt": over})
    error = assert_error(r, 400, code="invalid_request", param="prompt")
    assert f"{MAX_PROMPT_CHARS}" in error["message"], error
    r = a.post(
        "/v1/chat/completions", json={"model": service.chat_model, "messages": [{"role": "user", "content": over}]}
    )
    assert_error(r, 400, code="invalid_request", param="messages")

    # Within the API's bound but past what this model's context (256 tokens) can take in characters: refused by
    # the inference tier before tokenizing, naming the limit.
    context_chars = 256 * CHARS_PER_TOKEN
    r = a.post("/v1/completions", json={"model": service.chat_model, "prompt": "w" * (context_chars + 1)})
    error = assert_error(r, 400, code="context_length_exceeded", param="prompt")
    assert f"{context_chars:,} characters" in error["message"], error
    messages = [{"role": "user", "content": "w" * context_chars}, {"role": "user", "content": "w"}]
    r = a.post("/v1/chat/completions", json={"model": service.chat_model, "messages": messages})
    assert_error(r, 400, code="context_length_exceeded", param="messages")

    r = a.post("/v1/classifications", json={"model": service.classifier, "input": ["ok", "x" * (MAX_TEXT_CHARS + 1)]})
    error = assert_error(r, 400, code="invalid_request", param="input")
    assert "text 1" in error["message"] and f"{MAX_TEXT_CHARS}" in error["message"], error
    many = ["x" * MAX_TEXT_CHARS] * (MAX_INPUT_CHARS // MAX_TEXT_CHARS + 1)
    r = a.post("/v1/classifications", json={"model": service.classifier, "input": many})
    error = assert_error(r, 400, code="invalid_request", param="input")
    assert f"{MAX_INPUT_CHARS}" in error["message"], error


def test_an_inference_body_past_its_byte_limit_is_refused_with_413(service):
    settings = service.settings.model_copy(update={"max_inference_body_bytes": 2000})
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    a = TestClient(app, headers={"Authorization": f"Bearer {KEY_A}"})
    r = a.post("/v1/classifications", json={"model": service.classifier, "input": ["x" * 2000]})
    error = assert_error(r, 413, code="request_too_large")
    assert "2,000 bytes" in error["message"], error

    def chunks():  # no Content-Length: counted as it arrives
        yield b'{"model": "m", "input": ["'
        for _ in range(10):
            yield b"x" * 500
        yield b'"]}'

    r = a.post("/v1/classifications", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, code="request_too_large")
    r = a.post("/v1/classifications", json={"model": "ft:nothing-here", "input": ["small"]})
    assert r.status_code == 404, r.text  # under the limit: on to the route


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _p95(samples: list[float]) -> float:
    return statistics.quantiles(samples, n=20)[-1]


def test_a_big_classification_does_not_hold_up_another_organisations_small_ones(service, b_classifier, tiny_models):
    # Small passes, so the test is quick; B's passes run beside A's (two lanes).
    settings = service.settings.model_copy(update={"serving_max_batch": 4})
    backend = InProcessBackend(settings)
    app = create_app(backend=backend)
    app.dependency_overrides[get_settings] = lambda: settings
    a = TestClient(app, headers={"Authorization": f"Bearer {KEY_A}"})
    b = TestClient(app, headers={"Authorization": f"Bearer {KEY_B}"})

    def small() -> float:
        start = time.perf_counter()
        r = b.post("/v1/classifications", json={"model": b_classifier, "input": ["good day"]})
        assert r.status_code == 200, r.text
        return time.perf_counter() - start

    try:
        assert a.post("/v1/classifications", json={"model": service.classifier, "input": ["warm"]}).status_code == 200
        small()  # both adapters loaded
        engine = backend.host.engine(str(tiny_models["bert"]), "classification")  # the one both are served by
        idle = [small() for _ in range(40)]
        rss_before = _rss_mb()

        big_answer: dict = {}
        refusals: list[int] = []

        def big() -> None:
            r = a.post("/v1/classifications", json={"model": service.classifier, "input": [LONG_TEXT] * 1200})
            big_answer["r"] = r

        def oversized() -> None:
            for _ in range(3):
                r = a.post(
                    "/v1/completions", json={"model": service.chat_model, "prompt": "w" * (MAX_PROMPT_CHARS + 1)}
                )
                refusals.append(r.status_code)

        threads = [threading.Thread(target=big), threading.Thread(target=oversized)]
        for t in threads:
            t.start()
        # Meanwhile B keeps sending. Counted: B's requests while A's classification is queued in the engine and
        # served (while it is still being parsed and tokenized, this one process's CPU is what B waits for).
        while engine.queue_depth() == 0 and threads[0].is_alive():
            small()
        loaded = []
        while threads[0].is_alive():
            loaded.append(small())
        for t in threads:
            t.join()
        time.sleep(1.5)  # idle: the engine gives freed memory back (at most once a second)
        rss_after = _rss_mb()
    finally:
        backend.host.close()

    r = big_answer["r"]
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 1200
    assert refusals == [400, 400, 400]
    assert len(loaded) >= 10, "A's classification finished too soon to measure B under load"
    idle_p95, loaded_p95 = _p95(idle), _p95(loaded)
    print(f"B idle p95 {idle_p95 * 1000:.1f} ms, loaded p95 {loaded_p95 * 1000:.1f} ms over {len(loaded)} requests")
    assert loaded_p95 <= 3 * idle_p95, (idle, loaded)
    # This process is the API here (and the test runner): its memory is back within 20% of where it was.
    assert rss_after <= 1.2 * rss_before, (rss_before, rss_after)


def test_more_waiting_work_than_an_organisations_share_gets_a_429(service):
    settings = service.settings.model_copy(update={"serving_max_queued_per_org": 4})
    backend = InProcessBackend(settings)
    app = create_app(backend=backend)
    app.dependency_overrides[get_settings] = lambda: settings
    a = TestClient(app, headers={"Authorization": f"Bearer {KEY_A}"})
    try:
        r = a.post("/v1/classifications", json={"model": service.classifier, "input": ["x"] * 5})
        error = assert_error(r, 429, code="engine_busy")
        assert r.headers["Retry-After"] == "1" and "at most 4" in error["message"], error
        r = a.post("/v1/classifications", json={"model": service.classifier, "input": ["x"] * 4})
        assert r.status_code == 200, r.text
    finally:
        backend.host.close()
