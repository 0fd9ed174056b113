"""Training on a CUDA device (`pytest -m gpu`; bench/gpu_check.sh runs these): bf16 autocast, with and without
activation checkpointing. Skipped where no CUDA device is visible."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from neat_core.devices import autocast_dtype
from neat_core.train import TrainSpec, train
from tests.conftest import chat_rows, write_jsonl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


def test_bf16_autocast_training_on_cuda_with_and_without_checkpointing(tiny_models, tmp_path):
    assert autocast_dtype(torch.device("cuda")) == torch.bfloat16  # every GPU the service targets has bf16
    data = write_jsonl(tmp_path / "chat.jsonl", chat_rows(16))

    def run(name: str, **kw):
        spec = TrainSpec(base_model=str(tiny_models["llama"]), training_file=data, output_dir=tmp_path / name,
                         adapter={"r": 4}, batch_size=4, n_epochs=2, seed=0, device="cuda", **kw)  # fmt: skip
        return train(spec)

    plain, checkpointed = run("plain"), run("checkpointed", gradient_checkpointing=True)
    for result in (plain, checkpointed):
        assert result.status == "succeeded" and result.steps == 8
        assert torch.isfinite(torch.tensor(result.metrics["train_loss"]))
    assert checkpointed.hyperparameters["gradient_checkpointing"] is True
    a = load_file(plain.adapter_dir / "adapter_model.safetensors")
    b = load_file(checkpointed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(t.abs().max() > 0 for t in a.values())  # trained: B left zero
    # the recomputed forward runs the same bf16 kernels on the same inputs: close, if not bit-for-bit
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-2
