"""bf16 base weights with fp32 adapter master weights (TrainSpec.base_dtype; "auto" picks it on GPUs with bf16,
fp32 on the CPU): the frozen base takes half the memory, every trainable weight stays fp32, the run resumes
exactly, and the adapter's LoRA export says which base it is exact for. Forced here on the CPU, the same code
path a GPU takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neat_core.errors import CheckpointError
from neat_core.export import check_base
from neat_core.methods import attach, get_method, method_names
from neat_core.models.loading import load_base
from neat_core.train import StopAtStep, TrainSpec, train
from neat_core.train.loop import _batch, _batches_of_epoch, _method_state, _set_up, _step_loss

CASES = [(method, kind) for method in method_names() for kind in ("bert", "llama")]


def _spec(tiny_models, datasets, kind: str, method: str, out: Path, **kw) -> TrainSpec:
    return TrainSpec(base_model=str(tiny_models[kind]), training_file=datasets[kind], output_dir=out, method=method,
                     adapter={"r": 4}, batch_size=4, n_epochs=2, seed=3, device="cpu", **kw)  # fmt: skip


def _frozen_and_trainable(model) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    return ({n: p for n, p in params.items() if not p.requires_grad},
            {n: p for n, p in params.items() if p.requires_grad})  # fmt: skip


@pytest.mark.parametrize(("method", "kind"), CASES, ids=[f"{m}-{k}" for m, k in CASES])
def test_a_bf16_base_trains_fp32_masters_at_half_the_base_memory(method, kind, tiny_models, datasets, tmp_path):
    cpu = torch.device("cpu")
    runs = {}
    for dtype in ("float32", "bfloat16"):
        spec = _spec(tiny_models, datasets, kind, method, tmp_path / dtype, base_dtype=dtype)
        run = _set_up(spec, get_method(method), cpu)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):  # as the loop does
            _method_state(spec, get_method(method), run, cpu)
        frozen, trainable = _frozen_and_trainable(run.model)
        assert {p.dtype for p in frozen.values()} == {getattr(torch, dtype)}
        assert {p.dtype for p in trainable.values()} == {torch.float32} and trainable  # the head too (bert)
        first = _batches_of_epoch(len(run.train_set), run.schedule.batch_size, spec.seed, 0)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss, _ = _step_loss(run, run.model, _batch(run, first, cpu))
        loss.backward()
        assert torch.isfinite(loss) and all(p.grad is None or p.grad.dtype == torch.float32
                                            for p in trainable.values())  # fmt: skip
        runs[dtype] = (sum(p.numel() * p.element_size() for p in frozen.values()), float(loss))
    assert runs["bfloat16"][0] * 2 == runs["float32"][0]
    assert runs["bfloat16"][1] == pytest.approx(runs["float32"][1], rel=0.05)  # the same model, rounded


def test_a_bf16_run_resumes_exactly_and_its_export_names_its_base(tiny_models, datasets, tmp_path):
    def spec(out: Path, resume: Path | None = None, **kw) -> TrainSpec:
        return _spec(tiny_models, datasets, "llama", "neat", out, max_steps=5, checkpoint_every=2,
                     resume_from=resume, **{"base_dtype": "bfloat16", **kw})  # fmt: skip

    full = train(spec(tmp_path / "full"))
    assert full.hyperparameters["base_dtype"] == "bfloat16"
    assert "base_dtype" not in train(spec(tmp_path / "fp32", base_dtype="float32")).hyperparameters  # as before
    stopped = train(spec(tmp_path / "split"), callbacks=[StopAtStep(3)])
    with pytest.raises(CheckpointError):  # a bf16 checkpoint does not resume into an fp32 run
        train(spec(tmp_path / "other", stopped.last_checkpoint, base_dtype="float32"))
    resumed = train(spec(tmp_path / "split", stopped.last_checkpoint))
    assert resumed.status == "succeeded" and resumed.steps == 5
    a, b = (load_file(r.adapter_dir / "adapter_model.safetensors") for r in (full, resumed))
    assert a.keys() == b.keys() and {t.dtype for t in a.values()} == {torch.float32}
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6

    # The LoRA export is exact for the bf16 base: it says so, and an fp32 copy of the base passes its check
    # (rounded to bf16 it is the same base); another base does not.
    lora = full.adapter_dir / "lora"
    assert json.loads((lora / "export.json").read_text())["base_dtype"] == "bfloat16"
    model, _ = load_base(str(tiny_models["llama"]), task="causal_lm")
    check_base(attach(model, "neat", r=4), lora)
    other, _ = load_base(str(tiny_models["llama"]), task="causal_lm")
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.weight.add_(0.5)
    with pytest.raises(Exception, match="different base weights"):
        check_base(attach(other, "neat", r=4), lora)
