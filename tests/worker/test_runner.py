"""run_job end to end on tiny models: claim, progress, checkpoints, outcomes, duplicates, cancel and resume."""

from __future__ import annotations

import csv
import io
import json
import logging
import re

import pytest
from sqlalchemy import delete, select, update

from api.schemas import job_object
from control.db import session_scope
from control.orm import Checkpoint, File, Job, RegisteredModel
from control.storage import Storage, file_key, job_key
from tests.conftest import chat_rows, classification_rows, preference_rows
from tests.worker.conftest import ORG, TWO_EPOCHS, get_events, get_job, insert_job, make_settings, sixteen_rows
from worker.progress import DbProgress
from worker.runner import run_job


def checkpoints(settings, job_id) -> list[Checkpoint]:
    with session_scope(settings.resolved_database_url) as session:
        return list(session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.seq)))


def step_events(events) -> list[int]:
    return [e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data]


@pytest.fixture
def cancel_after_step(monkeypatch):
    """Cancel as the API does (running → cancelling) right after step `n`: deterministic, where a thread would
    race steps that take milliseconds. The cancel is polled at every step instead of once a second."""

    def arm(settings, job_id: str, n: int, status: str = "cancelling") -> None:  # or "pausing": a pause
        original = DbProgress.on_step_end

        def on_step_end(self, loop, metrics):
            original(self, loop, metrics)
            if loop.step == n:
                with session_scope(settings.resolved_database_url) as session:
                    session.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(status=status))

        monkeypatch.setattr(DbProgress, "on_step_end", on_step_end)
        monkeypatch.setattr(DbProgress, "poll_seconds", 0.0)

    return arm


def test_job_trains_and_reports_progress(settings, tiny_models):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16),
                        validation_rows=classification_rows(8), hyperparameters=TWO_EPOCHS)  # fmt: skip
    assert run_job(job_id, settings) == "succeeded"

    job = get_job(settings, job_id)
    assert job.status == "succeeded" and job.error is None and job.attempts == 1
    assert job.started_at <= job.finished_at and job.estimated_finish is None
    assert job.fine_tuned_model == f"ft:{tiny_models['bert']}:{ORG}:tiny:{job_id}"
    assert job.trained_tokens > 0
    assert job.resolved_hyperparameters["n_epochs"] == 2 and job.resolved_hyperparameters["batch_size"] == 4
    assert job.resolved_hyperparameters["learning_rate_multiplier"] == 1.0  # "auto", resolved
    assert job.resolved_hyperparameters["total_steps"] == 8
    assert {"learning_rate", "max_seq_len", "warmup_steps"} <= set(job.resolved_hyperparameters)
    assert job.resolved_adapter["type"] == "neat" and job.resolved_adapter["r"] == 4
    assert "target_modules" in job.resolved_adapter  # "auto" fields come back resolved

    events = get_events(settings, job_id)
    assert events[0].message == "Fine-tuning job started"
    assert events[1].data["adapter_parameters"] > 0
    assert events[-1].message == "The job has successfully completed"
    assert {"train_loss", "full_valid_loss", "full_valid_accuracy"} <= set(events[-1].data)
    assert step_events(events) == list(range(1, 9))
    metrics = [e.data for e in events if e.type == "metrics"]
    train = [m for m in metrics if "train_loss" in m]
    assert all({"total_steps", "learning_rate", "train_accuracy", "epoch"} <= set(m) for m in train)
    assert not any("full_valid_loss" in m for m in train)
    valid = [m for m in metrics if "full_valid_loss" in m]
    assert [m["step"] for m in valid] == [2, 4, 6, 8] and all("full_valid_accuracy" in m for m in valid)

    # checkpoint_every=2; neat_core keeps the last three on disk, so step 2's row is marked pruned.
    storage = Storage(settings.resolved_artifact_root)
    rows = checkpoints(settings, job_id)
    assert [(r.step_number, r.pruned) for r in rows] == [(2, True), (4, False), (6, False), (8, False)]
    assert [storage.path(r.storage_key).is_dir() for r in rows] == [False, True, True, True]
    assert rows[-1].metrics["step"] == 8 and "full_valid_loss" in rows[-1].metrics
    assert sum(e.message.startswith("Checkpoint saved at step") for e in events) == 4

    assert job.artifact_key == f"{job_key(ORG, job_id)}/attempt-1/adapter"  # each attempt works in its own folder
    artifact = storage.path(job.artifact_key)
    assert (artifact / "adapter_config.json").is_file() and (artifact / "manifest.json").is_file()


DPO_METRICS = {"train_loss", "train_rewards_chosen", "train_rewards_rejected", "train_reward_margin",
               "train_preference_accuracy", "learning_rate", "epoch"}  # fmt: skip
DPO_VALID = {"full_valid_loss", "full_valid_rewards_chosen", "full_valid_rewards_rejected", "full_valid_reward_margin",
             "full_valid_preference_accuracy"}  # fmt: skip


def test_a_dpo_job_trains_at_its_beta_and_reports_dpo_metrics(settings, tiny_models):
    job_id = insert_job(settings, **{**sixteen_rows(tiny_models, "dpo"), "hyperparameters": {**TWO_EPOCHS,
                        "beta": "auto"}}, validation_rows=preference_rows(8))  # fmt: skip
    assert run_job(job_id, settings) == "succeeded"

    job = get_job(settings, job_id)
    assert job.resolved_hyperparameters["beta"] == 0.1  # "auto", resolved
    assert job.resolved_hyperparameters["total_steps"] == 8
    echoed = job_object(job)
    assert echoed["method"] == {"type": "dpo", "dpo": {"hyperparameters": job.resolved_hyperparameters}}
    assert "beta" not in echoed["hyperparameters"]

    metrics = [e.data for e in get_events(settings, job_id) if e.type == "metrics"]
    train = [m for m in metrics if "train_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 9))
    assert all(DPO_METRICS <= set(m) and "train_mean_token_accuracy" not in m for m in train)
    assert all(0 <= m["train_preference_accuracy"] <= 1 for m in train)
    valid = [m for m in metrics if "full_valid_loss" in m]
    assert [m["step"] for m in valid] == [2, 4, 6, 8] and all(DPO_VALID <= set(m) for m in valid)
    final = checkpoints(settings, job_id)[-1].metrics  # a checkpoint's metrics carry DPO's too
    assert final["step"] == 8 and (DPO_METRICS | DPO_VALID) <= set(final)

    with session_scope(settings.resolved_database_url) as session:  # the results CSV: accuracy is the pairs'
        row = session.scalar(select(File).where(File.id == job.result_file))
    table = list(csv.DictReader(io.StringIO(Storage(settings.resolved_artifact_root).path(row.storage_key)
                                            .read_text())))  # fmt: skip
    assert [float(r["train_accuracy"]) for r in table] == [m["train_preference_accuracy"] for m in train]


AUTO_TWO = {"type": "auto", "candidates": ["neat", "lora"]}


def test_an_auto_adapter_job_reports_its_choice_and_trains_the_winner(settings, tiny_models):
    # 6 epochs, 24 steps: long enough to race two candidates (3 steps each, within 30% of the final run)
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16),
                        hyperparameters={**TWO_EPOCHS, "n_epochs": 6}, adapter=AUTO_TWO)  # fmt: skip
    assert run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    report = job.adapter_selection
    assert [c["method"] for c in report["candidates"]] == ["neat", "lora"] and report["chosen"] in ("neat", "lora")
    shown = job_object(job)
    assert shown["adapter_selection"] == report
    assert shown["adapter"]["type"] == report["chosen"] and "target_modules" in shown["adapter"]  # resolved, not "auto"
    assert shown["adapter"]["r"] == report["budget"]["ranks"][report["chosen"]]  # at the budget it was raced at
    assert job.adapter == AUTO_TWO  # what was asked for stays on the row

    messages = [e.message for e in get_events(settings, job_id)]
    picks = [m for m in messages if m.startswith("Method selection: ")]
    assert [m.split()[2] for m in picks] == ["neat", "lora"] and all("dev loss" in m for m in picks)
    (chosen,) = [i for i, m in enumerate(messages) if m.startswith(f"Selected {report['chosen']} for the full run")]
    assert "2 candidates scored on 3 held-out training examples" in messages[chosen]
    assert messages.index(picks[-1]) < chosen < next(i for i, m in enumerate(messages) if m.startswith("Training a"))
    assert step_events(get_events(settings, job_id)) == list(range(1, 25))  # the job's steps: the winner's alone
    manifest = Storage(settings.resolved_artifact_root).path(job.artifact_key) / "manifest.json"
    assert f'"method": "{report["chosen"]}"' in manifest.read_text()


def test_a_paused_auto_job_resumes_its_winner_without_choosing_again(settings, tiny_models, cancel_after_step,
                                                                    monkeypatch):  # fmt: skip
    from control import jobs

    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16), hyperparameters=TWO_EPOCHS,
                        adapter=AUTO_TWO)  # fmt: skip
    cancel_after_step(settings, job_id, 3, status="pausing")  # in the winner's run: candidates report no steps
    assert run_job(job_id, settings) == "paused"
    monkeypatch.undo()
    report = get_job(settings, job_id).adapter_selection
    with session_scope(settings.resolved_database_url) as session:
        assert jobs.resume(session, job_id) == "queued"
    assert run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    assert job.adapter_selection == report and job.resolved_adapter["type"] == report["chosen"]
    messages = [e.message for e in get_events(settings, job_id)]
    assert sum(m.startswith("Selected ") for m in messages) == 1  # chosen once, by the first attempt
    assert step_events(get_events(settings, job_id)) == list(range(1, 9))  # continued, not restarted
    attempt_2 = Storage(settings.resolved_artifact_root).path(f"{job_key(ORG, job_id)}/attempt-2")
    assert json.loads((attempt_2 / "selection.json").read_text()) == report  # carried over, not recomputed


def test_a_succeeded_job_has_a_results_csv_that_says_what_its_events_said(settings, tiny_models):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16),
                        validation_rows=classification_rows(8), hyperparameters=TWO_EPOCHS)  # fmt: skip
    assert run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    assert job_object(job)["result_files"] == [job.result_file]
    with session_scope(settings.resolved_database_url) as session:
        file = session.scalars(select(File).where(File.id == job.result_file)).one()
        assert (file.organization_id, file.purpose, file.filename) == (ORG, "fine-tune-results", "step_metrics.csv")
    body = Storage(settings.resolved_artifact_root).path(file.storage_key).read_bytes()
    assert file.bytes == len(body) and file.storage_key.startswith(f"{job_key(ORG, job_id)}/attempt-1/")
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert list(rows[0]) == ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy",
                             "full_valid_loss", "full_valid_mean_token_accuracy"]  # fmt: skip
    assert [int(r["step"]) for r in rows] == list(range(1, 9)) and file.num_examples == 8
    events = [e.data for e in get_events(settings, job_id) if e.type == "metrics"]
    for event in events:  # every figure of every metrics event is in the file, at its step
        row = rows[event["step"] - 1]
        if "train_loss" in event:
            assert float(row["train_loss"]) == event["train_loss"]
            assert float(row["train_accuracy"]) == event["train_accuracy"]
        if "full_valid_loss" in event:
            assert float(row["full_valid_loss"]) == float(row["valid_loss"]) == event["full_valid_loss"]
            assert float(row["full_valid_mean_token_accuracy"]) == event["full_valid_accuracy"]
    assert [r["step"] for r in rows if r["full_valid_loss"]] == ["2", "4", "6", "8"]


def test_duplicate_delivery_changes_nothing(settings, tiny_models):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(12))
    assert run_job(job_id, settings) == "succeeded"
    before = get_job(settings, job_id)
    n_events = len(get_events(settings, job_id))

    assert run_job(job_id, settings) == "skipped"
    after = get_job(settings, job_id)
    assert job_object(after) == job_object(before)
    assert (after.attempts, after.started_at) == (1, before.started_at)
    assert len(get_events(settings, job_id)) == n_events


def test_cancelled_job_is_never_started(settings, tiny_models):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(12), status="cancelled")
    assert run_job(job_id, settings) == "skipped"
    job = get_job(settings, job_id)
    assert (job.status, job.attempts, job.started_at) == ("cancelled", 0, None)
    assert get_events(settings, job_id) == []
    assert not Storage(settings.resolved_artifact_root).path(job_key(ORG, job_id)).exists()


@pytest.mark.parametrize("objective", ["supervised", "dpo"])
def test_cancel_stops_after_the_step_and_keeps_a_checkpoint(settings, tiny_models, cancel_after_step, objective):
    job_id = insert_job(settings, **sixteen_rows(tiny_models, objective))
    cancel_after_step(settings, job_id, 3)
    assert run_job(job_id, settings) == "cancelled"

    job = get_job(settings, job_id)
    assert job.status == "cancelled" and job.finished_at is not None
    assert job.fine_tuned_model is None and job.artifact_key is None
    events = get_events(settings, job_id)
    assert events[-1].message == "Job cancelled at step 3; last checkpoint kept"
    assert step_events(events) == [1, 2, 3]
    rows = checkpoints(settings, job_id)
    assert [r.step_number for r in rows] == [2, 3]  # the scheduled one, and the one written on cancel
    storage = Storage(settings.resolved_artifact_root)
    assert (storage.path(rows[-1].storage_key) / "adapter" / "adapter_model.safetensors").is_file()
    assert not storage.path(f"{job_key(ORG, job_id)}/attempt-1/adapter").exists()


def test_requeued_job_resumes_from_its_checkpoint(settings, tiny_models, cancel_after_step, monkeypatch):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(16), hyperparameters=TWO_EPOCHS)
    cancel_after_step(settings, job_id, 3)
    assert run_job(job_id, settings) == "cancelled"
    monkeypatch.undo()
    with session_scope(settings.resolved_database_url) as session:  # requeued, as an operator would
        session.execute(update(Job).where(Job.id == job_id).values(status="queued", finished_at=None))
    n_before = len(get_events(settings, job_id))

    assert run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    assert job.status == "succeeded" and job.attempts == 2
    events = get_events(settings, job_id)[n_before:]
    assert [e.message for e in events[:2]] == [
        "Fine-tuning job started again (attempt 2)",
        "Resuming from checkpoint at step 3",
    ]
    assert step_events(events) == [4, 5, 6, 7, 8]  # continued, not restarted
    assert [r.step_number for r in checkpoints(settings, job_id)] == [2, 3, 4, 6, 8]
    manifest = Storage(settings.resolved_artifact_root).path(job.artifact_key) / "manifest.json"
    assert '"steps": 8' in manifest.read_text()


@pytest.mark.parametrize("objective", ["supervised", "dpo"])
def test_a_paused_job_resumes_to_the_adapter_of_an_uninterrupted_run(settings, tiny_models, cancel_after_step,
                                                                     monkeypatch, objective):  # fmt: skip
    from safetensors.torch import load_file

    from control import jobs

    storage = Storage(settings.resolved_artifact_root)
    quiet = insert_job(settings, **sixteen_rows(tiny_models, objective))
    assert run_job(quiet, settings) == "succeeded"

    job_id = insert_job(settings, **sixteen_rows(tiny_models, objective))
    cancel_after_step(settings, job_id, 3, status="pausing")  # the API's pause, between steps 3 and 4
    assert run_job(job_id, settings) == "paused"
    monkeypatch.undo()
    paused = get_job(settings, job_id)
    assert paused.status == "paused" and paused.lease_owner is None and paused.finished_at is None
    assert job_object(paused)["status"] == "paused"
    assert get_events(settings, job_id)[-1].message == "Job paused at step 3; resume it to continue from there"
    assert [r.step_number for r in checkpoints(settings, job_id)][-1] == 3  # stopped at a checkpoint
    assert run_job(job_id, settings) == "skipped"  # a paused job's redelivered message claims nothing

    with session_scope(settings.resolved_database_url) as session:
        assert jobs.resume(session, job_id) == "queued"
    assert run_job(job_id, settings) == "succeeded"
    resumed = get_job(settings, job_id)
    assert step_events(get_events(settings, job_id)) == [1, 2, 3, 4, 5, 6, 7, 8]  # continued, not restarted
    expected = load_file(storage.path(get_job(settings, quiet).artifact_key) / "adapter_model.safetensors")
    got = load_file(storage.path(resumed.artifact_key) / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6


def test_data_that_breaks_training_fails_the_job(settings, tiny_models):
    one_class = [{"text": f"great product #{i}", "label": "positive"} for i in range(12)]  # valid lines, one label
    job_id = insert_job(settings, tiny_models["bert"], one_class)
    assert run_job(job_id, settings) == "failed"  # returned, not raised: the worker takes the next job

    job = get_job(settings, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error["code"] == "invalid_file" and "two distinct labels" in job.error["message"]
    last = get_events(settings, job_id)[-1]
    assert last.level == "error" and "two distinct labels" in last.message


def test_deleted_training_file_fails_the_job(settings, tiny_models):
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(12))
    job = get_job(settings, job_id)
    Storage(settings.resolved_artifact_root).delete(file_key(ORG, job.training_file))

    assert run_job(job_id, settings) == "failed"
    error = get_job(settings, job_id).error
    assert error["code"] == "file_not_found" and error["param"] == "training_file"
    assert job.training_file in error["message"]


def test_a_job_on_a_registered_model_trains_from_its_directory_and_fails_once_it_is_removed(settings, tiny_models):
    from control import models

    with session_scope(settings.resolved_database_url) as session:
        models.register(session, "acme/tiny-bert", str(tiny_models["bert"]))
    job_id = insert_job(settings, "acme/tiny-bert", classification_rows(12))
    assert run_job(job_id, settings) == "succeeded"
    manifest = json.loads((Storage(settings.resolved_artifact_root).path(get_job(settings, job_id).artifact_key)
                           / "manifest.json").read_text())  # fmt: skip
    assert manifest["base_model"] == "acme/tiny-bert"  # its registered name, not the directory

    job_id = insert_job(settings, "acme/tiny-bert", classification_rows(12))
    with session_scope(settings.resolved_database_url) as session:  # (as a removal racing the claim would)
        session.execute(delete(RegisteredModel))
    assert run_job(job_id, settings) == "failed"
    error = get_job(settings, job_id).error
    assert error["code"] == "model_not_found" and error["param"] == "model" and "acme/tiny-bert" in error["message"]


def test_unexpected_error_fails_the_job_with_its_traceback_logged(settings, tiny_models, monkeypatch, caplog):
    import neat_core.train

    def out_of_memory(spec, callbacks=()):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(neat_core.train, "train", out_of_memory)
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(12))
    with caplog.at_level(logging.ERROR, logger="worker.runner"):
        assert run_job(job_id, settings) == "failed"
    error = get_job(settings, job_id).error
    assert error == {"code": "training_error", "message": "RuntimeError: CUDA out of memory", "param": None}
    assert any(r.exc_info for r in caplog.records)


def test_a_worker_stopped_mid_job_hands_the_job_back(settings, tiny_models, monkeypatch):
    import neat_core.train

    def shutdown(spec, callbacks=()):
        raise SystemExit(1)  # what celery's cold shutdown raises inside a running task

    monkeypatch.setattr(neat_core.train, "train", shutdown)
    job_id = insert_job(settings, tiny_models["bert"], classification_rows(12))
    with pytest.raises(SystemExit):
        run_job(job_id, settings)
    job = get_job(settings, job_id)
    assert (job.status, job.attempts) == ("queued", 1)  # the redelivered message can claim it and resume


def test_a_job_too_big_for_the_device_fails_at_claim_with_its_estimate(tmp_path, tiny_models, monkeypatch):
    import neat_core.train

    def must_not_load(spec, callbacks=()):
        raise AssertionError("a job that cannot fit must fail before its model is loaded")

    monkeypatch.setattr(neat_core.train, "train", must_not_load)
    settings = make_settings(tmp_path / "small", device_memory_bytes=2**20)  # a 1 MiB device
    job_id = insert_job(settings, tiny_models["llama"], chat_rows(16), fmt="chat")  # ~13 MB of weights alone
    assert run_job(job_id, settings) == "failed"

    job = get_job(settings, job_id)
    assert (job.status, job.attempts) == ("failed", 1)
    assert (job.error["code"], job.error["param"]) == ("insufficient_memory", None)
    estimate = re.fullmatch(
        r"The job needs an estimated ([\d.]+) MiB \(base weights [\d.]+ MiB for [\d.]+M parameters, adapter and "
        r"optimiser .* at batch 4 x \d+ tokens, activation checkpointing off\); this worker has 1\.0 MiB "
        r"\(configured device memory \(NEAT_DEVICE_MEMORY_BYTES\)\)\. Lower batch_size, or run it on a worker with "
        r"more memory\.",
        job.error["message"],
    )
    assert estimate and float(estimate[1]) > 1
    events = get_events(settings, job_id)
    assert events[-1].level == "error" and events[-1].message == f"Fine-tuning job failed: {job.error['message']}"
    assert not Storage(settings.resolved_artifact_root).path(f"{job_key(ORG, job_id)}/attempt-1").exists()


def test_a_job_asking_for_activation_checkpointing_trains_with_it(settings, tiny_models):
    hyperparameters = {**TWO_EPOCHS, "n_epochs": 1, "gradient_checkpointing": True}
    job_id = insert_job(settings, tiny_models["llama"], chat_rows(16), fmt="chat", hyperparameters=hyperparameters)
    assert run_job(job_id, settings) == "succeeded"
    job = get_job(settings, job_id)
    assert job.resolved_hyperparameters["gradient_checkpointing"] is True  # reported back: it ran with it
    assert job_object(job)["hyperparameters"]["gradient_checkpointing"] is True
