"""A full disk, for real: a small tmpfs mounted by the test as the artifact root (so the test needs root; it is
skipped, saying so, otherwise). Uploads answer 507 in OpenAI's shape and leave nothing behind; a job whose
checkpoint or adapter write hits the full disk goes back to the queue (not `failed`), and once there is space
again resumes from its last complete checkpoint and ends with the adapter an uninterrupted run gives; nothing
half-written is ever stored or served."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load_file

from api.main import create_app
from control.db import session_scope
from control.keys import add_key
from control.settings import get_settings
from control.storage import Storage, job_key
from tests.conftest import classification_rows
from tests.worker.conftest import ORG, get_events, get_job, insert_job, make_settings
from worker.progress import DbProgress
from worker.runner import run_job

TWO_EPOCHS = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}  # 16 rows: 8 steps
KEY = "sk-disk-full-test"


@pytest.fixture
def small_disk(tmp_path) -> Path:
    if os.geteuid() != 0:
        pytest.skip("the disk-full test mounts a tmpfs, which needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(disk: Path) -> Path:
    """Take every free byte of `disk`; returns the filler, whose removal gives the space back."""
    filler = disk / "filler"
    with open(filler, "ab", buffering=0) as f:  # unbuffered: nothing left to flush (and fail) on close
        for size in (1 << 20, 1 << 12, 1):
            try:
                while f.write(b"\0" * size):
                    pass
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return filler


def test_an_upload_on_a_full_disk_answers_507_and_stores_nothing(small_disk, tmp_path):
    settings = make_settings(tmp_path / "data", artifact_root=small_disk / "artifacts", min_examples=10)
    with session_scope(settings.resolved_database_url) as session:
        add_key(session, ORG, KEY)
    app = create_app()
    app.dependency_overrides[get_settings] = lambda: settings
    client = TestClient(app)
    body = "".join(f'{{"text": "review {i}", "label": "{["neg", "pos"][i % 2]}"}}\n' for i in range(20)).encode()

    def upload():
        return client.post("/v1/files", headers={"Authorization": f"Bearer {KEY}"},
                           files={"file": ("t.jsonl", body)}, data={"purpose": "fine-tune"})  # fmt: skip

    (small_disk / "artifacts").mkdir()  # the volume's root exists, as in a deployment
    filler = fill(small_disk)
    r = upload()
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["code"] == "storage_full" and error["param"] == "file" and "full" in error["message"]
    assert int(r.headers["Retry-After"]) > 0
    assert [p for p in (small_disk / "artifacts").rglob("*") if p.is_file()] == []
    assert client.get("/v1/files", headers={"Authorization": f"Bearer {KEY}"}).json()["data"] == []

    filler.unlink()
    r = upload()
    assert r.status_code == 200, r.text
    stored = client.get(f"/v1/files/{r.json()['id']}/content", headers={"Authorization": f"Bearer {KEY}"})
    assert stored.content == body


@pytest.mark.parametrize("when", ["mid_training", "after_training"])
def test_a_job_that_hits_a_full_disk_resumes_once_there_is_space(small_disk, tmp_path, tiny_models, monkeypatch,
                                                                 when):  # fmt: skip
    rows = classification_rows(16)
    reference_settings = make_settings(tmp_path / "reference")
    reference = insert_job(reference_settings, tiny_models["bert"], rows, hyperparameters=TWO_EPOCHS)
    assert run_job(reference, reference_settings) == "succeeded"

    settings = make_settings(tmp_path / "data", artifact_root=small_disk / "artifacts")
    job_id = insert_job(settings, tiny_models["bert"], rows, hyperparameters=TWO_EPOCHS)
    fillers: list[Path] = []
    if when == "mid_training":  # after step 3: the checkpoint of step 4 finds the disk full
        original = DbProgress.on_step_end

        def on_step_end(self, loop, metrics):
            original(self, loop, metrics)
            if loop.step == 3 and not fillers:
                fillers.append(fill(small_disk))

        monkeypatch.setattr(DbProgress, "on_step_end", on_step_end)
    else:  # training done, its last checkpoint written: the adapter finds the disk full
        original = DbProgress.on_checkpoint

        def on_checkpoint(self, loop, path, metrics):
            original(self, loop, path, metrics)
            if loop.step == 8 and not fillers:
                fillers.append(fill(small_disk))

        monkeypatch.setattr(DbProgress, "on_checkpoint", on_checkpoint)

    assert run_job(job_id, settings) == "queued"
    job = get_job(settings, job_id)
    assert job.status == "queued" and job.error is None and job.artifact_key is None
    events = get_events(settings, job_id)
    assert any(e.data and e.data.get("type") == "storage_full" for e in events), [e.message for e in events]
    job_dir = Storage(settings.resolved_artifact_root).path(job_key(ORG, job_id))
    assert list(job_dir.rglob("*.tmp")) == []  # the failed write removed its temporary directory
    attempt_dir = job_dir / "attempt-1"  # each attempt works in its own folder
    assert not (attempt_dir / "adapter").exists()  # nothing half-written where it would be served from
    checkpoints = sorted(p.name for p in (attempt_dir / "checkpoints").iterdir())
    # keep_checkpoints (3): the newest three complete ones
    expected_checkpoints = ["step-000002"] if when == "mid_training" else ["step-000004", "step-000006", "step-000008"]
    assert checkpoints == expected_checkpoints

    fillers[0].unlink()  # space again
    assert run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    resumed_from = 2 if when == "mid_training" else 8
    assert f"Resuming from checkpoint at step {resumed_from}" in [e.message for e in get_events(settings, job_id)]
    ours = load_file(Storage(settings.resolved_artifact_root).path(job.artifact_key) / "adapter_model.safetensors")
    ref_job = get_job(reference_settings, reference)
    expected = load_file(Storage(reference_settings.resolved_artifact_root).path(ref_job.artifact_key) /
                         "adapter_model.safetensors")  # fmt: skip
    assert ours.keys() == expected.keys()
    assert max((ours[k] - expected[k]).abs().max().item() for k in ours) <= 1e-6
    assert torch.isfinite(torch.cat([t.flatten().float() for t in ours.values()])).all()
