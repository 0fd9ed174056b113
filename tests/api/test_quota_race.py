"""The active-jobs quota under a race: 50 job creations at once, through two real API processes (uvicorn) over the
same database, against a limit of 20. Exactly 20 are admitted; the other 30 get the 429 `quota_exceeded` in OpenAI's
shape, and the database holds exactly 20 jobs. On SQLite and on Postgres: each takes its lock its own way
(control.jobs._lock_organization), and counting without the lock admitted 25."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import func, select, update

from control.orm import Job, Organization
from tests.api import api_processes, assert_error, chat_rows

LIMIT, ATTEMPTS, PROCESSES = 20, 50, 2


@pytest.fixture
def api_ports(api, tmp_path) -> Iterator[list[int]]:
    """Two uvicorn processes serving the app over the test's database, broker and storage."""
    with api_processes(api.settings, tmp_path / "api.log", PROCESSES) as ports:
        yield ports


def test_concurrent_job_creations_admit_exactly_the_limit(api, api_ports):
    file_id = api.upload_ok(chat_rows())["id"]
    with api.session() as session:  # the organisation's own limit (the deployment default is 20 as well)
        session.execute(update(Organization).where(Organization.id == api.a.id).values(max_active_jobs=LIMIT))
    body = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "training_file": file_id}
    barrier, responses, lock = threading.Barrier(ATTEMPTS), [], threading.Lock()

    def create(i: int) -> None:
        url = f"http://127.0.0.1:{api_ports[i % PROCESSES]}/v1/fine_tuning/jobs"
        barrier.wait()
        response = httpx.post(url, json=body, headers=api.a.headers, timeout=120)
        with lock:
            responses.append(response)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(ATTEMPTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert Counter(r.status_code for r in responses) == {200: LIMIT, 429: ATTEMPTS - LIMIT}, [
        r.text for r in responses if r.status_code not in (200, 429)
    ]
    for refused in (r for r in responses if r.status_code == 429):
        error = assert_error(refused, 429, code="quota_exceeded")
        assert f"its limit is {LIMIT}" in error["message"] and int(refused.headers["Retry-After"]) > 0
    admitted = {r.json()["id"] for r in responses if r.status_code == 200}
    with api.session() as session:
        stored = set(session.scalars(select(Job.id).where(Job.organization_id == api.a.id)))
        assert session.scalar(select(func.count()).select_from(Job)) == LIMIT
    assert stored == admitted and len(admitted) == LIMIT
    # the other organisation's quota is its own, and the refused requests left no lock behind
    b_file = api.upload_ok(chat_rows(), org=api.b)["id"]
    assert api.create_job(b_file, org=api.b).status_code == 200
    assert_error(api.create_job(file_id), 429, code="quota_exceeded")
