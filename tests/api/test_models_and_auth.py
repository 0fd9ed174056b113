"""/v1/models, authentication, and tenancy: another organisation's resources answer exactly like missing ones,
on every endpoint, and never show up in lists."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from api.deps import hash_key
from control.orm import ApiKey
from tests.api import MINILM, SMOLLM2, Owned, assert_error, assert_same_as_missing, chat_rows, finish_job, sqlite_only

# ---------------------------------------------------------------------------------------------------- models


def test_models_lists_catalog_and_own_fine_tuned_models(api):
    a_file = api.upload_ok(chat_rows())["id"]
    a_done = api.create_job_ok(a_file, suffix="bot")["id"]
    a_queued = api.create_job_ok(a_file)["id"]
    a_model = finish_job(api, a_done)
    b_done = api.create_job_ok(api.upload_ok(chat_rows(), org=api.b)["id"], org=api.b)["id"]
    b_model = finish_job(api, b_done, org=api.b)

    body = api.get("/v1/models").json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {SMOLLM2, MINILM, a_model}
    assert by_id[SMOLLM2]["owned_by"] == by_id[MINILM]["owned_by"] == "system"
    assert all(m["object"] == "model" for m in body["data"])
    assert set(by_id[SMOLLM2]["tasks"]) == {"causal_lm", "classification"}
    assert by_id[MINILM]["tasks"] == ["classification"]
    assert a_model == f"ft:{SMOLLM2}:{api.a.id}:bot:{a_done}"
    assert by_id[a_model]["owned_by"] == api.a.id and by_id[a_model]["parent"] == SMOLLM2
    assert by_id[a_model]["tasks"] == ["causal_lm"]
    assert not any(a_queued in model for model in by_id)

    b_ids = {m["id"] for m in api.get("/v1/models", org=api.b).json()["data"]}
    assert b_ids == {SMOLLM2, MINILM, b_model}


def test_retrieve_model(api):
    base = api.get(f"/v1/models/{SMOLLM2}")  # the id contains a "/"
    assert base.status_code == 200, base.text
    assert base.json()["id"] == SMOLLM2 and base.json()["owned_by"] == "system"

    job_id = api.create_job_ok(api.upload_ok(chat_rows())["id"])["id"]
    model = finish_job(api, job_id)
    fine_tuned = api.get(f"/v1/models/{model}")
    assert fine_tuned.status_code == 200, fine_tuned.text
    assert fine_tuned.json() == {"id": model, "object": "model", "created": 1_800_000_000, "owned_by": api.a.id,
                                 "parent": SMOLLM2, "tasks": ["causal_lm"]}  # fmt: skip

    for unknown in ("gpt-4o", "HuggingFaceTB/unknown", f"ft:{SMOLLM2}:{api.a.id}::ftjob-nope"):
        error = assert_error(api.get(f"/v1/models/{unknown}"), 404, code="model_not_found")
        assert unknown in error["message"]


# ---------------------------------------------------------------------------------------------------- auth

ENDPOINTS = [
    ("GET", "/v1/models"),
    ("GET", f"/v1/models/{SMOLLM2}"),
    ("GET", "/v1/files"),
    ("POST", "/v1/files"),
    ("GET", "/v1/files/file-x"),
    ("GET", "/v1/files/file-x/content"),
    ("DELETE", "/v1/files/file-x"),
    ("GET", "/v1/fine_tuning/jobs"),
    ("POST", "/v1/fine_tuning/jobs"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x"),
    ("POST", "/v1/fine_tuning/jobs/ftjob-x/cancel"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/events"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/checkpoints"),
    ("GET", "/v1/fine_tuning/jobs/ftjob-x/adapter"),
]


@sqlite_only
@pytest.mark.parametrize("method, path", ENDPOINTS)
def test_every_endpoint_needs_a_key(api, method, path):
    error = assert_error(api.client.request(method, path), 401, code="missing_api_key", param=None)
    assert error["type"] == "authentication_error"


@sqlite_only
@pytest.mark.parametrize(
    "authorization, code",
    [
        ("Basic dXNlcjpwYXNz", "missing_api_key"),
        ("Bearer", "missing_api_key"),
        ("Bearer    ", "missing_api_key"),
        ("sk-test-alpha-0123456789abcdef", "missing_api_key"),  # the key without its scheme
        ("Bearer sk-unknown", "invalid_api_key"),
        ("Bearer sk-test-alpha-0123456789abcdeF", "invalid_api_key"),
        ("Bearer sk-revoked", "invalid_api_key"),
    ],
)
def test_bad_keys_are_401(api, authorization, code):
    with api.session() as session:
        session.add(ApiKey(id="key-revoked", organization_id=api.a.id, key_hash=hash_key("sk-revoked"),
                           prefix="sk-revoked", revoked_at=1_700_000_000))  # fmt: skip
    response = api.client.get("/v1/files", headers={"Authorization": authorization})
    error = assert_error(response, 401, code=code)
    assert error["type"] == "authentication_error"
    assert "sk-" not in error["message"]  # keys are never echoed


@sqlite_only
@pytest.mark.parametrize(
    "url", ["sqlite:////nonexistent-dir/neat.sqlite", "postgresql+psycopg://postgres@127.0.0.1:9/x"]
)
def test_database_down_is_503_with_retry_after(make_api, url):
    api = make_api(database_url=url)
    response = api.get("/v1/files")
    assert_error(response, 503, code="database_unavailable", param=None)
    assert int(response.headers["retry-after"]) > 0
    assert "nonexistent" not in response.text and "9/x" not in response.text  # no connection details leak


@sqlite_only
def test_scheme_is_case_insensitive(api):
    assert api.client.get("/v1/files", headers={"Authorization": f"bearer {api.a.key}"}).status_code == 200


@sqlite_only
def test_unknown_route_is_404_in_openai_shape(api):
    assert_error(api.get("/v1/nothing-here"), 404, code="not_found")
    assert_error(api.client.get("/nothing"), 404, code="not_found")  # before authentication


@sqlite_only
def test_wrong_method_is_405_in_openai_shape(api):
    assert_error(api.request("PUT", "/v1/files"), 405, code="method_not_allowed")


@sqlite_only
def test_wrong_method_is_an_invalid_request(api):
    assert assert_error(api.request("PUT", "/v1/files"), 405)["type"] == "invalid_request_error"


# ---------------------------------------------------------------------------------------------------- tenancy


RESOURCE_ENDPOINTS = [
    ("GET", "/v1/files/{file}"),
    ("GET", "/v1/files/{file}/content"),
    ("DELETE", "/v1/files/{file}"),
    ("GET", "/v1/fine_tuning/jobs/{job}"),
    ("POST", "/v1/fine_tuning/jobs/{job}/cancel"),
    ("GET", "/v1/fine_tuning/jobs/{job}/events"),
    ("GET", "/v1/fine_tuning/jobs/{job}/checkpoints"),
    ("GET", "/v1/fine_tuning/jobs/{job}/adapter"),
    ("GET", "/v1/fine_tuning/jobs/{job}/adapter?format=lora"),
    ("GET", "/v1/models/{model}"),
]


def test_other_organisations_resources_are_404(api, owned_by_a):
    fakes = Owned("file-" + "0" * 24, "ftjob-" + "0" * 24, "ftevent-" + "0" * 24,
                  owned_by_a.model.replace(owned_by_a.job, "ftjob-" + "0" * 24))  # fmt: skip
    for method, template in RESOURCE_ENDPOINTS:
        real_path, fake_path = template.format(**vars(owned_by_a)), template.format(**vars(fakes))
        if method == "GET":  # it exists: its owner can read it
            assert api.get(real_path).status_code == 200, real_path
        theirs = api.request(method, real_path, org=api.b)
        assert_error(theirs, 404)
        real_id = next(getattr(owned_by_a, k) for k in ("file", "job", "model") if "{" + k + "}" in template)
        fake_id = next(getattr(fakes, k) for k in ("file", "job", "model") if "{" + k + "}" in template)
        assert_same_as_missing(theirs, api.request(method, fake_path, org=api.b), real_id, fake_id)

    # B's attempts changed nothing of A's
    assert api.get(f"/v1/files/{owned_by_a.file}").status_code == 200
    assert api.get(f"/v1/fine_tuning/jobs/{owned_by_a.job}").json()["status"] == "succeeded"


def test_other_organisations_ids_are_unknown_cursors(api, owned_by_a):
    b_job = api.create_job_ok(api.upload_ok(chat_rows(), org=api.b)["id"], org=api.b)["id"]
    for path, real, fake in [
        ("/v1/files", owned_by_a.file, "file-" + "0" * 24),
        ("/v1/fine_tuning/jobs", owned_by_a.job, "ftjob-" + "0" * 24),
        (f"/v1/fine_tuning/jobs/{b_job}/events", owned_by_a.event, "ftevent-" + "0" * 24),
    ]:
        theirs = api.get(path, params={"after": real}, org=api.b)
        assert_error(theirs, 400, code="invalid_cursor", param="after")
        assert_same_as_missing(theirs, api.get(path, params={"after": fake}, org=api.b), real, fake)


def test_other_organisations_files_cannot_train(api, owned_by_a):
    b_file = api.upload_ok(chat_rows(), org=api.b)["id"]
    cases = [
        ("training_file", {"training_file": owned_by_a.file}),
        ("validation_file", {"training_file": b_file, "validation_file": owned_by_a.file}),
    ]
    for field, body in cases:
        theirs = api.post("/v1/fine_tuning/jobs", org=api.b, json={"model": SMOLLM2, **body})
        assert_error(theirs, 400, code="file_not_found", param=field)
        fake = {k: "file-" + "0" * 24 if v == owned_by_a.file else v for k, v in body.items()}
        missing = api.post("/v1/fine_tuning/jobs", org=api.b, json={"model": SMOLLM2, **fake})
        assert_same_as_missing(theirs, missing, owned_by_a.file, "file-" + "0" * 24)
    assert api.get("/v1/fine_tuning/jobs", org=api.b).json()["data"] == []


def test_lists_never_show_other_organisations_resources(api, owned_by_a):
    b_file = api.upload_ok(chat_rows(), org=api.b)["id"]
    b_job = api.create_job_ok(b_file, org=api.b)["id"]

    assert [f["id"] for f in api.get("/v1/files", org=api.b).json()["data"]] == [b_file]
    assert [j["id"] for j in api.get("/v1/fine_tuning/jobs", org=api.b).json()["data"]] == [b_job]
    assert owned_by_a.model not in {m["id"] for m in api.get("/v1/models", org=api.b).json()["data"]}

    assert [f["id"] for f in api.get("/v1/files").json()["data"]] == [owned_by_a.file]
    assert [j["id"] for j in api.get("/v1/fine_tuning/jobs").json()["data"]] == [owned_by_a.job]


def test_valid_keys_are_remembered_briefly_and_revocation_here_is_immediate(make_api):
    """A valid key costs one lookup per `key_cache_seconds`; a wrong key is never remembered; a key revoked by
    another process works here until the entry expires; one revoked through this process stops at once."""
    from sqlalchemy import event, update

    from control.db import session_factory
    from control.keys import RECENT_KEYS, revoke_key

    # 3 s: the five lookups below must fall inside one cache window even on a loaded CI machine (a 1 s window
    # was once outlived by a stall between them, which read as a second lookup).
    api = make_api(key_cache_seconds=3.0)
    RECENT_KEYS.clear()
    engine = session_factory(api.settings.resolved_database_url).kw["bind"]
    lookups = []

    def count(conn, cursor, statement, *args):
        if "FROM api_keys" in statement:
            lookups.append(statement)

    event.listen(engine, "before_cursor_execute", count)
    try:
        for _ in range(5):
            assert api.get("/v1/files").status_code == 200
        assert len(lookups) == 1
        for _ in range(3):
            assert_error(api.get("/v1/files", headers={"Authorization": "Bearer sk-wrong"}), 401)
        assert len(lookups) == 4

        with api.session() as session:  # revoked behind this process's back (another API process, the CLI)
            session.execute(update(ApiKey).where(ApiKey.id == f"key-{api.a.id}").values(revoked_at=1))
        assert api.get("/v1/files").status_code == 200  # still remembered...
        time.sleep(3.1)
        assert_error(api.get("/v1/files"), 401, code="invalid_api_key")  # ...for at most key_cache_seconds

        assert api.get("/v1/files", org=api.b).status_code == 200  # B's key is remembered now
        with api.session() as session:
            assert revoke_key(session, f"key-{api.b.id}")
        assert_error(api.get("/v1/files", org=api.b), 401, code="invalid_api_key")  # at once
    finally:
        event.remove(engine, "before_cursor_execute", count)


@sqlite_only
def test_routes_hand_their_connection_back_as_they_return(api):
    """Under load the response (and so the session's tear-down) waits for a busy event loop; a session still
    holding its connection meanwhile ran the pool dry at 200 requests/s. Every sync route closes its session in its
    own thread as it returns."""
    import inspect

    from api.deps import SessionClosingRoute, _closing_sessions
    from api.routes import admin, files, inference, jobs, models
    from control.db import session_factory

    for module in (files, jobs, models, inference, admin):
        assert module.router.route_class is SessionClosingRoute, module.__name__

    seen = {}

    def endpoint(session, job_id: str) -> dict:
        session.execute(select(ApiKey.id)).all()
        seen["during"] = session.in_transaction()
        return {"id": job_id}

    wrapped = _closing_sessions(endpoint)
    assert inspect.signature(wrapped) == inspect.signature(endpoint)  # what FastAPI reads for dependencies
    with session_factory(api.settings.resolved_database_url)() as session:
        assert wrapped(session=session, job_id="x") == {"id": "x"}
        assert seen["during"] and not session.in_transaction()
