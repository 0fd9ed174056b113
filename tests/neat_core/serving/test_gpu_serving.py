"""Multi-adapter batched serving on a CUDA device (`pytest -m gpu`; bench/gpu_check.sh runs it): a mixed batch on
the GPU gives, row by row, what each row gets alone through peft on the CPU. Skipped where no CUDA device is
visible."""

from __future__ import annotations

import pytest
import torch

from neat_core.serving import MultiAdapterModel, load_factors
from tests.neat_core.serving.adapters import fresh_base, reference
from tests.neat_core.serving.test_batched import LENGTHS, ROWS, padded_batch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_a_mixed_batch_on_cuda_equals_each_row_alone_on_the_cpu(kind, tiny_models, saved):
    base = fresh_base(kind, tiny_models).to("cuda")
    served = MultiAdapterModel(base)
    for adapter_id, (_, directory, _) in saved[kind].items():
        served.add(load_factors(directory, base, adapter_id=adapter_id))  # factors on the base layers' device
    ids, mask = padded_batch(LENGTHS)
    with torch.no_grad():
        if kind == "bert":
            batched = [row.cpu() for row in served.classify(ids.cuda(), mask.cuda(), adapter_ids=ROWS)]
        else:
            batched = served(ids.cuda(), mask.cuda(), adapter_ids=ROWS).logits.cpu()  # (N, T, V)
        for i, (adapter_id, n) in enumerate(zip(ROWS, LENGTHS, strict=True)):
            alone = reference(kind, tiny_models, saved, adapter_id)(input_ids=ids[i : i + 1, :n]).logits[0]
            row = batched[i] if kind == "bert" else batched[i, :n]
            assert row.shape == alone.shape
            assert (row - alone).abs().max() <= 1e-3, f"row {i} ({adapter_id})"  # fp32 on both; kernels differ
