"""An operator-registered base model end to end: a tiny Qwen3 saved with `save_pretrained` (safetensors, SmolLM2's
tokenizer and chat template), registered with `python -m api.admin models add` against the running deployment's
database, then used through the stock `openai` client: listed, fine-tuned, and served with chat completions (the
fine-tuned model, and the registered base itself).

test_service_flow's fixture, on the distributed topology only, to keep the module short (about 30 s): there the
directory travels furthest (Postgres, a celery worker, an inference server told of it over HTTP). The embedded
topology's in-process serving of a registered model is in tests/api/test_registered_models.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import _build_tiny, chat_rows
from tests.e2e import test_service_flow
from tests.e2e.test_service_flow import ROOT, _jsonl, _wait_for

service = test_service_flow.service
pytestmark = pytest.mark.parametrize("service", ["distributed"], indirect=True)
MODEL = "acme/tiny-qwen3"


def admin(service, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "api.admin", *args], env=service.env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip


def test_a_registered_model_is_listed_fine_tuned_and_served(service, tmp_path, model_cache):
    directory = _build_tiny(tmp_path / "models", ("qwen3",), model_cache)["qwen3"]
    assert sorted(p.name for p in directory.glob("*.safetensors")) == ["model.safetensors"]

    added = admin(service, "models", "add", MODEL, str(directory), "--description", "a tiny Qwen3")
    assert added.returncode == 0, added.stderr
    row = json.loads(added.stdout)
    assert row["model_type"] == "qwen3" and row["tasks"] == ["causal_lm", "classification"] and row["parameters"] > 0
    again = admin(service, "models", "add", MODEL, str(directory))
    assert again.returncode == 1 and again.stderr.startswith("error: ") and "already registered" in again.stderr

    client = service.client()
    listed = {m.id: m for m in client.models.list()}
    assert MODEL in listed and listed[MODEL].owned_by == "system"

    training = client.files.create(file=("colours.jsonl", _jsonl(chat_rows(12))), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=training.id, suffix="colours",
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 6}}},
    )  # fmt: skip
    job = _wait_for(client, job.id, {"succeeded"}, service, timeout=120)
    assert job.model == MODEL and job.fine_tuned_model.startswith(f"ft:{MODEL}:")

    messages = [{"role": "user", "content": "What colour is item 2?"}]
    for model in (job.fine_tuned_model, MODEL):
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0)
        assert reply.object == "chat.completion" and reply.usage.completion_tokens >= 1

    # No job on it is unfinished, so the registration can go; the directory stays, the model is no longer listed.
    removed = admin(service, "models", "remove", MODEL)
    assert removed.returncode == 0, removed.stderr
    assert MODEL not in {m.id for m in client.models.list()}
