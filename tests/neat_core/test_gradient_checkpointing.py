"""Activation checkpointing changes memory and time, never the numbers: every method × every tiny architecture
computes the same loss and gradients with it as without, and a checkpointed run resumes exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neat_core.methods import get_method, method_names
from neat_core.train import StopAtStep, TrainSpec, train
from neat_core.train.loop import _batch, _batches_of_epoch, _method_state, _set_up, _step_loss
from tests.conftest import TINY_KINDS, preference_rows, write_jsonl

CASES = [(method, kind) for method in method_names() for kind in TINY_KINDS]
PROJECTIONS = ("query", "q_proj", "c_attn")  # one adapted projection per layer, per family


def _spec(tiny_models, datasets, kind: str, method: str, out: Path, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(tiny_models[kind]), training_file=datasets[kind], output_dir=out, method=method,
                     adapter={"r": 4}, batch_size=4, n_epochs=2, seed=3, device="cpu", **kw)  # fmt: skip


def _one_step(spec: TrainSpec) -> tuple[float, dict[str, torch.Tensor], int]:
    """(loss, trainable gradients, calls of the layers' query projections) of the run's first training step."""
    method, device = get_method(spec.method), torch.device("cpu")
    run = _set_up(spec, method, device)
    _method_state(spec, method, run, device)  # HEAT selects its heads here: both runs must train the same ones
    calls = []
    for name, module in run.model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS and hasattr(module, "base_layer"):  # the adapter-wrapped layer
            module.register_forward_hook(lambda *_: calls.append(1))
    first = _batches_of_epoch(len(run.train_set), run.schedule.batch_size, spec.seed, 0)[0]
    batch = _batch(run, first, device)
    torch.manual_seed(7)  # the tiny Llama's attention dropout draws from here, identically in both runs
    loss, _ = _step_loss(run, run.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in run.model.named_parameters() if p.requires_grad and p.grad is not None}
    return float(loss.detach()), grads, len(calls)


@pytest.mark.parametrize(("method", "kind"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_a_checkpointed_step_has_the_loss_and_gradients_of_a_plain_one(method, kind, tiny_models, datasets, tmp_path):
    plain_loss, plain, plain_calls = _one_step(_spec(tiny_models, datasets, kind, method, tmp_path / "a"))
    loss, grads, calls = _one_step(
        _spec(tiny_models, datasets, kind, method, tmp_path / "b", gradient_checkpointing=True)
    )
    assert calls == 2 * plain_calls > 0  # each layer's forward really ran again in the backward
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    assert grads.keys() == plain.keys() and plain  # every trainable parameter got its gradient
    assert max(float((grads[n] - plain[n]).abs().max()) for n in plain) <= 1e-5


def test_a_checkpointed_dpo_step_has_the_loss_and_gradients_of_a_plain_one(tiny_models, tmp_path):
    # DPO's reference pass (the adapter off, no gradients) goes through the checkpointed layers too
    pairs = {"llama": write_jsonl(tmp_path / "pairs.jsonl", preference_rows(8))}
    plain_loss, plain, plain_calls = _one_step(_spec(tiny_models, pairs, "llama", "neat", tmp_path / "a",
                                                     objective="dpo"))  # fmt: skip
    loss, grads, calls = _one_step(_spec(tiny_models, pairs, "llama", "neat", tmp_path / "b", objective="dpo",
                                         gradient_checkpointing=True))  # fmt: skip
    assert 2 * calls == 3 * plain_calls > 0  # policy pass, its recomputation, the reference pass (never recomputed)
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    assert grads.keys() == plain.keys() and max(float((grads[n] - plain[n]).abs().max()) for n in plain) <= 1e-5


def test_a_checkpointed_run_resumes_exactly_and_trains_what_a_plain_run_trains(tiny_models, datasets, tmp_path):
    # the tiny Llama has attention dropout: the recomputation must redraw the same masks, and resume must replay them
    def spec(out: Path, resume: Path | None = None, **kw) -> TrainSpec:
        return _spec(tiny_models, datasets, "llama", "neat", out, max_steps=5, checkpoint_every=2,
                     resume_from=resume, **kw)  # fmt: skip

    plain = train(spec(tmp_path / "plain"))
    assert "gradient_checkpointing" not in plain.hyperparameters  # "auto" on a tiny model: off, and not recorded
    full = train(spec(tmp_path / "full", gradient_checkpointing=True))
    assert full.hyperparameters["gradient_checkpointing"] is True
    stopped = train(spec(tmp_path / "split", gradient_checkpointing=True), callbacks=[StopAtStep(3)])
    assert stopped.status == "cancelled"
    resumed = train(spec(tmp_path / "split", stopped.last_checkpoint, gradient_checkpointing=True))
    assert resumed.status == "succeeded" and resumed.steps == 5

    adapters = [load_file(r.adapter_dir / "adapter_model.safetensors") for r in (plain, full, resumed)]
    for other in adapters[1:]:
        assert other.keys() == adapters[0].keys()
        assert max(float((other[k] - adapters[0][k]).abs().max()) for k in other) <= 1e-5
    assert resumed.metrics["train_loss"] == pytest.approx(full.metrics["train_loss"], abs=1e-6)
