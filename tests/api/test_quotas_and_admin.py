"""Per-organisation quotas and rate limits (429 with Retry-After, nothing stored), and organisations and keys
managed by the operator: the admin API and the `python -m api.admin` command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from control.orm import ApiKey, File, Job
from tests.api import assert_error, chat_rows, jsonl

ADMIN = "sk-admin-test"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def admin(make_api):
    return make_api(admin_api_key=ADMIN)


def as_admin() -> dict[str, str]:
    return {"Authorization": f"Bearer {ADMIN}"}


def set_limits(api, org_id: str, **limits) -> None:
    r = api.client.post(f"/v1/admin/organizations/{org_id}/limits", headers=as_admin(), json=limits)
    assert r.status_code == 200, r.text


def count(api, model, org_id: str) -> int:
    with api.session() as session:
        return session.scalar(select(func.count()).select_from(model).where(model.organization_id == org_id))


def test_active_jobs_over_the_quota_are_refused(admin):
    set_limits(admin, admin.a.id, max_active_jobs=2)
    file_id = admin.upload_ok(chat_rows())["id"]
    for _ in range(2):
        admin.create_job_ok(file_id)
    r = admin.create_job(file_id)
    assert_error(r, 429, code="quota_exceeded")
    assert int(r.headers["Retry-After"]) > 0 and count(admin, Job, admin.a.id) == 2
    # Another organisation has its own quota; and a finished job frees a place.
    admin.create_job_ok(admin.upload_ok(chat_rows(), org=admin.b)["id"], org=admin.b)
    first = admin.get("/v1/fine_tuning/jobs").json()["data"][-1]["id"]
    admin.set_job(first, status="succeeded")
    admin.create_job_ok(file_id)


def test_files_over_the_storage_quota_are_refused_and_not_stored(admin):
    body = jsonl(chat_rows())
    set_limits(admin, admin.a.id, max_storage_bytes=len(body) + 10)
    admin.upload_ok(chat_rows())
    blobs = sorted(admin.artifact_root.rglob("*"))
    r = admin.upload(chat_rows())
    assert_error(r, 429, code="quota_exceeded", param="file")
    assert count(admin, File, admin.a.id) == 1 and sorted(admin.artifact_root.rglob("*")) == blobs
    set_limits(admin, admin.a.id, max_storage_bytes=None)  # back to the deployment default
    admin.upload_ok(chat_rows())


def test_inference_requests_over_the_rate_limit_get_429(admin):
    set_limits(admin, admin.a.id, inference_rpm=2)
    body = {"model": "ft:no-such-model", "input": "x"}
    for _ in range(2):  # counted even though they fail later (an unknown model)
        assert admin.post("/v1/classifications", json=body).status_code == 404
    r = admin.post("/v1/classifications", json=body)
    assert_error(r, 429, code="rate_limit_exceeded")
    assert 1 <= int(r.headers["Retry-After"]) <= 60
    assert r.headers["x-ratelimit-limit-requests"] == "2" and r.headers["x-ratelimit-remaining-requests"] == "0"
    assert 0 < float(r.headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 60
    assert admin.post("/v1/classifications", json=body, org=admin.b).status_code == 404  # b has its own window


def test_admin_api_manages_organisations_and_keys(admin, api):
    assert_error(api.client.post("/v1/admin/organizations", headers=as_admin(), json={"id": "x"}), 404)  # off
    assert_error(admin.client.post("/v1/admin/organizations", headers=admin.a.headers, json={"id": "x"}), 401)

    r = admin.client.post("/v1/admin/organizations", headers=as_admin(), json={"id": "acme", "name": "Acme"})
    assert r.status_code == 200, r.text
    assert_error(admin.client.post("/v1/admin/organizations", headers=as_admin(), json={"id": "acme"}), 409)
    created = admin.client.post("/v1/admin/organizations/acme/api_keys", headers=as_admin()).json()
    key = created["key"]
    assert key.startswith("sk-") and created["organization"] == "acme"
    with admin.session() as session:  # stored hashed only
        stored = session.scalar(select(ApiKey).where(ApiKey.id == created["id"]))
        assert key not in (stored.key_hash, stored.prefix) and len(stored.key_hash) == 64

    acme = {"Authorization": f"Bearer {key}"}
    assert admin.client.get("/v1/files", headers=acme).status_code == 200
    listed = admin.client.get("/v1/admin/organizations/acme/api_keys", headers=as_admin()).json()["data"]
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]

    # an unknown organisation is 404, not an empty list (an operator's typo must not look like "no keys")
    missing = admin.client.get("/v1/admin/organizations/no-such-org/api_keys", headers=as_admin())
    assert "no-such-org" in assert_error(missing, 404, code="organization_not_found")["message"]
    admin.client.post("/v1/admin/organizations", headers=as_admin(), json={"id": "keyless"})
    keyless = admin.client.get("/v1/admin/organizations/keyless/api_keys", headers=as_admin())
    assert (keyless.status_code, keyless.json()["data"]) == (200, [])

    assert admin.client.delete(f"/v1/admin/api_keys/{created['id']}", headers=as_admin()).status_code == 200
    assert_error(admin.client.get("/v1/files", headers=acme), 401, code="invalid_api_key")
    assert_error(admin.client.delete(f"/v1/admin/api_keys/{created['id']}", headers=as_admin()), 404)


def test_admin_command_line(api):
    env = {**os.environ, "NEAT_DATABASE_URL": api.settings.resolved_database_url,
           "NEAT_DATA_DIR": str(api.settings.data_dir), "PYTHONPATH": str(ROOT)}  # fmt: skip

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "api.admin", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    assert run("create-org", "cli-org", "--name", "CLI").returncode == 0
    made = run("create-key", "cli-org")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert api.client.get("/v1/files", headers=headers).status_code == 200
    limits = json.loads(run("set-limits", "cli-org", "--max-active-jobs", "3").stdout)
    assert limits["max_active_jobs"] == 3 and limits["inference_rpm"] is None
    assert run("revoke-key", key["id"]).returncode == 0  # another process: this API notices within the key cache
    deadline = time.monotonic() + api.settings.key_cache_seconds + 2
    while api.client.get("/v1/files", headers=headers).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key still works after key_cache_seconds"
        time.sleep(0.2)
    missing = run("create-key", "no-such-org")
    assert missing.returncode == 1 and "does not exist" in missing.stderr
    missing = run("list-keys", "no-such-org")
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_concurrent_uploads_never_exceed_the_storage_quota(admin):
    """20 uploads at once against room for 3 files: exactly 3 are stored (counting and inserting in two steps let
    8 through); the others get 429 and leave nothing behind. On SQLite and on Postgres."""
    body = jsonl(chat_rows())
    set_limits(admin, admin.a.id, max_storage_bytes=3 * len(body))
    barrier, responses = threading.Barrier(20), []

    def upload() -> None:
        barrier.wait()
        responses.append(admin.upload(chat_rows()))

    threads = [threading.Thread(target=upload) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = [r for r in responses if r.status_code == 200]
    for r in responses:
        if r.status_code != 200:
            assert_error(r, 429, code="quota_exceeded", param="file")
    assert len(responses) == 20 and len(accepted) == 3
    with admin.session() as session:
        stored = session.scalar(select(func.sum(File.bytes)).where(File.organization_id == admin.a.id))
    assert stored == 3 * len(body) and count(admin, File, admin.a.id) == 3
    assert len([p for p in admin.artifact_root.rglob("file-*") if p.is_file()]) == 3
    temp = admin.artifact_root / ".tmp"
    assert not temp.exists() or list(temp.iterdir()) == []
