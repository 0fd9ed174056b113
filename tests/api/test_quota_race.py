"""The active-jobs quota under a race: 50 job creations at once, through two real API processes (uvicorn) over the
same database, against a limit of 20. Exactly 20 are admitted; the other 30 get the 429 `quota_exceeded` in OpenAI's
shape, and the database holds exactly 20 jobs. On SQLite and on Postgres: each takes its lock its own way
(control.jobs._lock_organization), and counting without the lock admitted 25."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select, update

from control.orm import Job, Organization
from tests.api import assert_error, chat_rows
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]
LIMIT, ATTEMPTS, PROCESSES = 20, 50, 2


def _wait_until_up(port: int, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"the API did not start; its log:\n{log.read_text(errors='replace')[-4000:]}")


@pytest.fixture
def api_ports(api, tmp_path) -> Iterator[list[int]]:
    """Two uvicorn processes serving the app over the test's database, broker and storage."""
    settings = api.settings
    env = {
        **os.environ,
        "NEAT_DATA_DIR": str(settings.data_dir),
        "NEAT_DATABASE_URL": settings.resolved_database_url,
        "NEAT_BROKER_URL": settings.resolved_broker_url,
        "NEAT_ARTIFACT_ROOT": str(settings.resolved_artifact_root),
        "NEAT_SERVING": "false",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(ROOT),
    }
    log, procs, ports = tmp_path / "api.log", [], []
    try:
        for _ in range(PROCESSES):
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
            with open(log, "ab") as out:
                procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out,
                                              start_new_session=True))  # fmt: skip
            ports.append(port)
        for port in ports:
            _wait_until_up(port, log)
        yield ports
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


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
