"""The loop's contract with its callers: progress callbacks, cancellation, checkpoint hygiene, artifact."""

from __future__ import annotations

import json

import pytest
import torch

from neat_core.errors import CheckpointError, DataFormatError
from neat_core.train import Callback, CancelFlag, TrainSpec, latest_checkpoint, list_checkpoints, train
from tests.conftest import classification_rows, write_jsonl


class Recorder(Callback):
    def __init__(self, cancel_at: int | None = None):
        self.events: list[tuple] = []
        self.flag = CancelFlag()
        self.cancel_at = cancel_at

    def on_train_begin(self, loop, info):
        self.events.append(("begin", loop.step, info))

    def on_step_end(self, loop, metrics):
        self.events.append(("step", loop.step, dict(metrics)))
        if self.cancel_at == loop.step:
            self.flag.cancel()  # as another thread (the worker's cancel watcher) would

    def on_evaluate(self, loop, metrics):
        self.events.append(("evaluate", loop.step, dict(metrics)))

    def on_epoch_end(self, loop, metrics):
        self.events.append(("epoch", loop.step, loop.epoch))

    def on_checkpoint(self, loop, path, metrics):
        assert (path / "adapter" / "adapter_model.safetensors").exists()  # complete when announced
        self.events.append(("checkpoint", loop.step, path.name))

    def should_stop(self, loop):
        return self.flag.should_stop(loop)


def _spec(tiny_models, tmp_path, **kw) -> TrainSpec:
    data = write_jsonl(tmp_path / "cls.jsonl", classification_rows(20))
    base = dict(
        base_model=str(tiny_models["bert"]),
        training_file=data,
        validation_file=data,
        output_dir=tmp_path / "run",
        batch_size=4,
        n_epochs=2,
        seed=0,
        device="cpu",
    )
    return TrainSpec(**{**base, **kw})


def test_progress_callbacks_and_artifact(tiny_models, tmp_path):
    rec = Recorder()
    result = train(_spec(tiny_models, tmp_path, checkpoint_every=3, keep_checkpoints=2), callbacks=[rec])
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "begin" and kinds.count("step") == 10 and kinds.count("epoch") == 2
    begin = rec.events[0][2]
    assert begin["hyperparameters"]["n_epochs"] == 2 and begin["hyperparameters"]["adapter"]["r"] == 8
    assert begin["adapter_parameters"] > 0 and begin["trainable_parameters"] > begin["adapter_parameters"]
    steps = [e for e in rec.events if e[0] == "step"]
    assert [s[1] for s in steps] == list(range(1, 11))
    assert all({"train_loss", "learning_rate", "train_accuracy", "epoch"} <= set(s[2]) for s in steps)
    evaluations = [e for e in rec.events if e[0] == "evaluate"]
    assert evaluations and all({"full_valid_loss", "full_valid_accuracy"} <= set(e[2]) for e in evaluations)
    saved = [e[1] for e in rec.events if e[0] == "checkpoint"]
    assert saved == [3, 5, 6, 9, 10]  # every 3 steps, each epoch end (5, 10), and the last step
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000009", "step-000010"]

    manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
    assert manifest["method"] == "neat" and manifest["labels"] == ["negative", "positive"]
    assert manifest["hyperparameters"]["learning_rate"] == result.hyperparameters["learning_rate"]
    assert manifest["metrics"]["full_valid_accuracy"] == result.metrics["full_valid_accuracy"]
    assert len(manifest["base_weights_sha256"]) == 64 and len(manifest["training_file_sha256"]) == 64
    assert {"torch", "transformers", "peft"} <= set(manifest["versions"])
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "lora",
        "manifest.json",
    ]


def test_cancellation_stops_after_the_current_step_with_a_checkpoint(tiny_models, tmp_path):
    rec = Recorder(cancel_at=4)
    result = train(_spec(tiny_models, tmp_path), callbacks=[rec])
    assert result.status == "cancelled" and result.steps == 4 and result.adapter_dir is None
    assert result.last_checkpoint.name == "step-000004" and result.last_checkpoint.exists()
    assert [e[1] for e in rec.events if e[0] == "step"][-1] == 4
    assert not (tmp_path / "run" / "adapter").exists()


def test_half_written_checkpoints_are_ignored(tiny_models, tmp_path):
    train(_spec(tiny_models, tmp_path, max_steps=2, n_epochs=1))
    root = tmp_path / "run" / "checkpoints"
    (root / ".step-000099.abc.tmp").mkdir()  # what a crash in the middle of a save leaves behind
    (root / "step-00001").mkdir()  # not a name we write
    assert latest_checkpoint(root).name == "step-000002"


def test_resume_refuses_a_checkpoint_from_another_run(tiny_models, tmp_path):
    first = train(_spec(tiny_models, tmp_path, max_steps=2, n_epochs=1))
    with pytest.raises(CheckpointError, match="different run"):
        train(
            _spec(
                tiny_models,
                tmp_path,
                max_steps=2,
                n_epochs=1,
                learning_rate_multiplier=2.0,
                output_dir=tmp_path / "other",
                resume_from=first.last_checkpoint,
            )
        )


def test_checkpoints_hold_no_pickle(tiny_models, tmp_path):
    result = train(_spec(tiny_models, tmp_path, max_steps=2, n_epochs=1))
    files = sorted(p.name for p in result.last_checkpoint.rglob("*") if p.is_file())
    assert files == [
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",  # adapter/ is an artifact of its own: a checkpoint is servable
        "optimizer.safetensors",
        "rng.safetensors",
        "state.json",
    ]


def test_a_checkpoint_adapter_loads_as_an_artifact_and_answers_as_its_step_did(tiny_models, tmp_path):
    """A checkpoint's adapter/ is an artifact: the last checkpoint's gives exactly the final artifact's logits,
    and an earlier one's its own step's (different) model."""
    from neat_core.artifacts import load_artifact, read_manifest

    result = train(_spec(tiny_models, tmp_path, max_steps=4, n_epochs=1, checkpoint_every=2))
    step_2, step_4 = (result.last_checkpoint.parent / f"step-00000{n}" / "adapter" for n in (2, 4))
    assert read_manifest(step_2)["steps"] == 2 and read_manifest(step_4)["steps"] == 4
    assert read_manifest(step_4)["base_weights_sha256"] == read_manifest(result.adapter_dir)["base_weights_sha256"]
    ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102]])

    def logits(directory):
        with torch.no_grad():
            return load_artifact(directory, device="cpu").model(input_ids=ids).logits

    torch.testing.assert_close(logits(step_4), logits(result.adapter_dir), rtol=0, atol=0)
    assert not torch.allclose(logits(step_2), logits(step_4))


def test_single_label_classification_is_refused(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "a"} for i in range(5)])
    with pytest.raises(DataFormatError, match="two distinct labels"):
        train(_spec(tiny_models, tmp_path, training_file=data, validation_file=None))
