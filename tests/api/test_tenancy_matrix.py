"""The tenancy matrix: two organisations, every route of the app, every resource type.

Organisation A owns one of everything (a file, a finished job with events, a checkpoint and an adapter, its
fine-tuned model, idempotency keys). Organisation B then aims every endpoint at each of A's resources:

- a request naming A's resource answers exactly as for an id that does not exist (404, same body, same headers);
- a list, a cursor or the serving stats never show A's resources;
- B's own writes (an upload, a job, the same Idempotency-Keys A used) land in B and never replay A's responses;
- afterwards every database row and stored byte of A's is what it was.

The route table is checked against the app itself, so a new endpoint without a row here fails this test.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
from fastapi.routing import APIRoute
from sqlalchemy import select

from api.routes import admin
from control.orm import Base, Job
from tests.api import Owned, assert_error, assert_same_as_missing, chat_rows, jsonl

MISSING = Owned("file-" + "0" * 24, "ftjob-" + "0" * 24, "ftevent-" + "0" * 24, "", "whep_" + "0" * 24)
KEY = "retry-0123456789"  # the Idempotency-Key A used; B uses it too

# (method, route) -> requests B sends naming A's resources: (method, path template, JSON body or None).
# Every one must answer exactly like the same request naming an id that does not exist.
AIMED_AT_A = {
    ("GET", "/v1/files/{file_id}"): [("GET", "/v1/files/{file}", None)],
    ("DELETE", "/v1/files/{file_id}"): [("DELETE", "/v1/files/{file}", None)],
    ("GET", "/v1/files/{file_id}/content"): [("GET", "/v1/files/{file}/content", None)],
    ("GET", "/v1/files"): [("GET", "/v1/files?after={file}", None)],
    ("POST", "/v1/fine_tuning/jobs"): [
        ("POST", "/v1/fine_tuning/jobs", {"model": "{base}", "training_file": "{file}"}),
        ("POST", "/v1/fine_tuning/jobs", {"model": "{base}", "training_file": "{b_file}", "validation_file": "{file}"}),
    ],
    ("GET", "/v1/fine_tuning/jobs"): [("GET", "/v1/fine_tuning/jobs?after={job}", None)],
    ("GET", "/v1/fine_tuning/jobs/{job_id}"): [("GET", "/v1/fine_tuning/jobs/{job}", None)],
    ("POST", "/v1/fine_tuning/jobs/{job_id}/cancel"): [("POST", "/v1/fine_tuning/jobs/{job}/cancel", None)],
    ("POST", "/v1/fine_tuning/jobs/{job_id}/pause"): [("POST", "/v1/fine_tuning/jobs/{job}/pause", None)],
    ("POST", "/v1/fine_tuning/jobs/{job_id}/resume"): [("POST", "/v1/fine_tuning/jobs/{job}/resume", None)],
    ("GET", "/v1/fine_tuning/jobs/{job_id}/events"): [
        ("GET", "/v1/fine_tuning/jobs/{job}/events", None),
        ("GET", "/v1/fine_tuning/jobs/{b_job}/events?after={event}", None),
    ],
    ("GET", "/v1/fine_tuning/jobs/{job_id}/checkpoints"): [("GET", "/v1/fine_tuning/jobs/{job}/checkpoints", None)],
    ("GET", "/v1/fine_tuning/jobs/{job_id}/adapter"): [
        ("GET", "/v1/fine_tuning/jobs/{job}/adapter", None),
        ("GET", "/v1/fine_tuning/jobs/{job}/adapter?format=lora", None),
    ],
    ("GET", "/v1/models/{model_id}"): [("GET", "/v1/models/{model}", None)],
    ("DELETE", "/v1/models/{model_id}"): [
        ("DELETE", "/v1/models/{model}", None),
        ("DELETE", "/v1/models/{model}:ckpt-step-5", None),
    ],
    ("POST", "/v1/chat/completions"): [
        ("POST", "/v1/chat/completions", {"model": "{model}", "messages": [{"role": "user", "content": "hi"}]})
    ],
    ("POST", "/v1/completions"): [("POST", "/v1/completions", {"model": "{model}", "prompt": "hi"})],
    ("POST", "/v1/classifications"): [("POST", "/v1/classifications", {"model": "{model}", "input": "hi"})],
    ("GET", "/v1/webhook_endpoints"): [("GET", "/v1/webhook_endpoints?after={webhook}", None)],
    ("GET", "/v1/webhook_endpoints/{endpoint_id}"): [("GET", "/v1/webhook_endpoints/{webhook}", None)],
    ("POST", "/v1/webhook_endpoints/{endpoint_id}"): [
        ("POST", "/v1/webhook_endpoints/{webhook}", {"name": "theirs now", "url": "https://93.184.216.35/x"})
    ],
    ("DELETE", "/v1/webhook_endpoints/{endpoint_id}"): [("DELETE", "/v1/webhook_endpoints/{webhook}", None)],
    ("GET", "/v1/webhook_endpoints/{endpoint_id}/deliveries"): [
        ("GET", "/v1/webhook_endpoints/{webhook}/deliveries", None)
    ],
}
# Routes with nothing of A's to name: checked below for what they show (lists, stats) or who may call them.
LISTS = {("GET", "/v1/models"), ("POST", "/v1/files"), ("GET", "/v1/serving/stats"), ("GET", "/v1/methods"),
         ("POST", "/v1/webhook_endpoints"), ("GET", "/v1/webhook_event_types")}  # fmt: skip


def fill(template, ids: dict[str, str]):
    if isinstance(template, str):
        return template.format(**ids)
    if isinstance(template, dict):
        return {k: fill(v, ids) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, ids) for v in template]
    return template


def snapshot(api, org_id: str) -> dict:
    """Every row that belongs to `org_id` (directly, or through one of its jobs), and every stored byte under its
    prefix."""
    rows: dict[str, list] = {}
    with api.session() as session:
        jobs = set(session.scalars(select(Job.id).where(Job.organization_id == org_id)))
        for table in Base.metadata.sorted_tables:
            columns = {c.name for c in table.columns}
            if "organization_id" in columns:
                where = table.c.organization_id == org_id
            elif "job_id" in columns:
                where = table.c.job_id.in_(jobs)
            elif table.name == "organizations":
                where = table.c.id == org_id
            elif table.name == "registered_models":  # the operator's base models: no organisation's resource
                continue
            else:  # a table this matrix does not know how to attribute: it must learn before the table ships
                raise AssertionError(f"table {table.name} has no organisation or job column")
            rows[table.name] = sorted(map(tuple, session.execute(select(table).where(where)).all()), key=repr)
    root = Path(api.artifact_root) / org_id
    files = (p for p in root.rglob("*") if p.is_file())
    stored = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    return {"rows": rows, "stored": stored}


def upload(api, org, rows: list[dict]) -> httpx.Response:
    """An upload with the shared Idempotency-Key."""
    files = {"file": ("t.jsonl", jsonl(rows), "application/jsonl")}
    return api.post("/v1/files", org=org, headers={"Idempotency-Key": KEY}, files=files, data={"purpose": "fine-tune"})


def send(api, method: str, path: str, body, org) -> httpx.Response:
    return api.request(method, path, org=org, json=body) if body is not None else api.request(method, path, org=org)


def test_no_endpoint_reads_or_writes_another_organisations_resources(make_api, owned_by_a):
    api = make_api(admin_api_key="sk-admin-tenancy-matrix")  # the same database and storage as owned_by_a's
    a, b = api.a, api.b
    # A's Idempotency-Keys, on both endpoints that take one
    a_file2 = upload(api, a, chat_rows()).json()["id"]
    base = api.get(f"/v1/fine_tuning/jobs/{owned_by_a.job}").json()["model"]
    a_job2 = api.create_job_ok(owned_by_a.file, headers={"Idempotency-Key": KEY})["id"]
    b_file = api.upload_ok(chat_rows(), org=b)["id"]
    b_job = api.create_job_ok(b_file, org=b)["id"]
    before = snapshot(api, a.id)

    # every route a customer can call is in the service's OpenAPI document (the operator's are not: below)
    schema = api.client.app.openapi()["paths"]
    customer_routes = {(m.upper(), path) for path, item in schema.items() for m in item}
    assert customer_routes == set(AIMED_AT_A) | LISTS, "every customer route needs a row in the tenancy matrix"

    shared = {"base": base, "b_file": b_file, "b_job": b_job}
    theirs_ids = {**vars(owned_by_a), **shared}
    missing_ids = {**vars(MISSING), "model": owned_by_a.model.replace(owned_by_a.job, MISSING.job), **shared}
    for route, requests in AIMED_AT_A.items():
        for method, path, body in requests:
            theirs = send(api, method, fill(path, theirs_ids), fill(body, theirs_ids), b)
            missing = send(api, method, fill(path, missing_ids), fill(body, missing_ids), b)
            assert theirs.status_code in (400, 404), (route, path, theirs.text)
            assert_error(theirs, theirs.status_code)
            for k in ("file", "job", "event", "model", "webhook"):  # the body may quote the id asked for, nothing more
                if "{" + k + "}" in path + repr(body):
                    assert_same_as_missing(theirs, missing, theirs_ids[k], missing_ids[k])

    # lists and stats show only B's own
    assert [f["id"] for f in api.get("/v1/files", org=b).json()["data"]] == [b_file]
    assert [j["id"] for j in api.get("/v1/fine_tuning/jobs", org=b).json()["data"]] == [b_job]
    assert owned_by_a.model not in {m["id"] for m in api.get("/v1/models", org=b).json()["data"]}
    assert api.get("/v1/webhook_endpoints", org=b).json()["data"] == []
    stats = api.get("/v1/serving/stats", org=b)
    assert stats.status_code == 200 and owned_by_a.job not in stats.text and a.id not in stats.text

    # B's writes with A's Idempotency-Key are B's own: no replay of A's file or job
    b_upload = upload(api, b, chat_rows()[1:] + chat_rows()[:1])
    assert b_upload.status_code == 200 and b_upload.json()["id"] not in (owned_by_a.file, a_file2)
    job = api.create_job(b_file, org=b, headers={"Idempotency-Key": KEY})
    assert job.status_code == 200 and job.json()["id"] not in (owned_by_a.job, a_job2)

    # organisation keys cannot reach the operator's routes
    admin_routes = {(m, r.path) for r in admin.router.routes if isinstance(r, APIRoute) for m in r.methods}
    assert len(admin_routes) == 10
    for route in sorted(admin_routes):
        method, path = route
        path = path.replace("{org_id}", a.id).replace("{key_id}", "key-x").replace("{model_id:path}", "acme/m")
        response = api.request(method, path, org=b, json={})
        assert_error(response, 401, code="invalid_api_key")

    assert snapshot(api, a.id) == before, "organisation B changed something of A's"
    assert api.get(f"/v1/fine_tuning/jobs/{owned_by_a.job}", org=a).status_code == 200
