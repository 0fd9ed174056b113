"""HTTP API tests against real databases (SQLite and Postgres). What the test modules share lives here (dataset
builders, the error-shape assertion, `sqlite_only`, a fake finished job); the app, database and organisation
fixtures are in `conftest.py`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from control.orm import Job
from control.storage import job_key
from tests.services import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[2]
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
MIN_EXAMPLES = 10  # the test apps' `min_examples`

# Pins a test to the SQLite case of the `database` fixture (for request handling that no database changes).
sqlite_only = pytest.mark.parametrize("database", ["sqlite"], indirect=True)


def assert_error(response: httpx.Response, status: int, *, code: str | None = None, param: Any = ...) -> dict:
    """The response is an error in OpenAI's shape and nothing else (no FastAPI `detail`); returns `error`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert {"message", "type", "param", "code"} <= set(error), error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    if code is not None:
        assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def classification_rows(n: int = MIN_EXAMPLES) -> list[dict]:
    return [{"text": f"review number {i}", "label": ["negative", "positive"][i % 2]} for i in range(n)]


def chat_rows(n: int = MIN_EXAMPLES) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "system", "content": "You name colours."},
                {"role": "user", "content": f"Colour of item {i}?"},
                {"role": "assistant", "content": ["red", "green", "blue"][i % 3]},
            ]
        }
        for i in range(n)
    ]


def prompt_completion_rows(n: int = MIN_EXAMPLES) -> list[dict]:
    return [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(n)]


def text_rows(n: int = MIN_EXAMPLES) -> list[dict]:
    return [{"text": f"The number {i} comes before {i + 1}."} for i in range(n)]


def preference_rows(n: int = MIN_EXAMPLES) -> list[dict]:
    """OpenAI's preference format (a dpo job's training data): the right colour preferred over a wrong one."""
    colours = ["red", "green", "blue"]
    return [
        {
            "input": {"messages": [{"role": "user", "content": f"Colour of item {i}?"}]},
            "preferred_output": [{"role": "assistant", "content": colours[i % 3]}],
            "non_preferred_output": [{"role": "assistant", "content": colours[(i + 1) % 3]}],
        }
        for i in range(n)
    ]


# A finished job's adapter directory, as the worker leaves it (contents are opaque to the API).
NATIVE = {"adapter_config.json": b'{"peft_type": "NEAT"}', "adapter_model.safetensors": b"\x00weights\x01",
          "manifest.json": b'{"method": "neat"}'}  # fmt: skip
LORA = {"adapter_config.json": b'{"peft_type": "LORA"}', "adapter_model.safetensors": b"\x00lora\x01"}


def finish_job(api, job_id: str, *, org=None, lora: bool = True) -> str:
    """Make `job_id` look succeeded, as a worker leaves it: the adapter directory in storage and the row pointing at
    it. Returns the fine-tuned model's name."""
    org_id = (org or api.a).id
    key = f"{job_key(org_id, job_id)}/adapter"
    root = api.artifact_root / key
    (root / "lora").mkdir(parents=True)
    for name, data in NATIVE.items():
        (root / name).write_bytes(data)
    for name, data in LORA.items() if lora else ():
        (root / "lora" / name).write_bytes(data)
    with api.session() as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        job.fine_tuned_model = f"ft:{job.model}:{org_id}:{job.suffix or ''}:{job_id}"
        job.status, job.artifact_key, job.finished_at = "succeeded", key, 1_800_000_000
        return job.fine_tuned_model


ROWS = {
    "classification": classification_rows,
    "chat": chat_rows,
    "prompt_completion": prompt_completion_rows,
    "text": text_rows,
    "preference": preference_rows,
}


@dataclass
class Owned:
    """Organisation A's resources: a file, a finished job with an event and a checkpoint, its model, and a
    webhook endpoint with a delivery."""

    file: str
    job: str
    event: str
    model: str
    webhook: str = ""  # a webhook endpoint


def assert_same_as_missing(theirs: httpx.Response, missing: httpx.Response, real_id: str, fake_id: str) -> None:
    """Another organisation's id answers exactly like an id that does not exist (the id itself aside)."""
    assert theirs.status_code == missing.status_code, (theirs.text, missing.text)
    assert theirs.json() == json.loads(missing.text.replace(fake_id, real_id)), (theirs.text, missing.text)
    assert dict(theirs.headers).keys() == dict(missing.headers).keys()


@contextmanager
def api_processes(settings, log: Path, count: int = 1) -> Iterator[list[int]]:
    """`count` real API processes (uvicorn, as deployed: with api.http's protocol) over `settings`' database, broker
    and storage, on loopback; yields their ports, and stops them on exit."""
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
    procs, ports = [], []
    try:
        for _ in range(count):
            port = free_port()
            command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
                       "--http", "api.http:OpenAIErrorsHTTP"]  # fmt: skip
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


def _wait_until_up(port: int, log: Path, timeout: float = 120) -> None:
    wait_healthy(f"http://127.0.0.1:{port}", log, timeout)
