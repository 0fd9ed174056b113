"""The served base model's weight layout on a CPU: every projection, and the output head, pre-packed for oneDNN.

A decode step multiplies a few rows, (B, d_in), by every weight of the model. torch's default CPU matmul for
nn.Linear (MKL's GEMM) streams the weights at ~14-18 GB/s with one row and reaches ~75-100 GFLOP/s with 32 rows on
this machine's two cores. oneDNN's matmul on a weight re-laid-out once, at load, in its own blocked format (the
layout torch.compile's CPU freezing uses) streams at ~32 GB/s with one row and reaches ~240 GFLOP/s with 32: a whole
SmolLM2 decode step 1.5x faster at batch 1 and 2x at 32, a prefill 1.9x (docs/benchmarks.md, "2026-12-03: oneDNN's
packed weights"). The results are fp32 sums of the same products in another order: within 1e-4 of MKL's, and a
row's result does not depend on the other rows of its batch (tests/neat_core/serving/test_layout.py).

So a CPU engine re-stores each plain `nn.Linear` of a causal LM as a `PackedLinear`: still an `nn.Linear` to every
reader (`weight` gives W (d_out, d_in), unpacked on demand), so the adapter tables, NEAT's factors (computed from
W0) and merged copies work unchanged; only the forward differs. The output head gets a packed copy too: it is a
fifth of SmolLM2's weights, and its weight is usually the input embeddings' table, which the lookup keeps reading
(the copy costs vocab x d floats, 113 MB for SmolLM2).

Written by hand over torch's own oneDNN ops (`torch.ops.mkldnn._reorder_linear_weight` / `_linear_pointwise`, the
pair Inductor's freezing pass emits) because no maintained library packs a model's linears for eager inference
(Intel's extension for PyTorch did, and is end-of-life). Not converted: GPT-2's `Conv1D`, anything that is not
exactly `nn.Linear` (peft's layers, quantized ones), non-fp32 weights, models on a GPU (cuBLAS is as fast either
way), and torch builds without oneDNN.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def available() -> bool:
    return torch.backends.mkldnn.is_available()


def pack(weight: Tensor) -> Tensor:
    """W (d_out, d_in) fp32 -> the same values in oneDNN's blocked layout (an opaque `torch._mkldnn` tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), None)  # None: any batch size


def packed_linear(x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """x (..., d_in) -> x Wᵀ + b (..., d_out), W given packed."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An `nn.Linear` whose weight is held packed (a non-persistent buffer, the model's only copy of it)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate and initialise a weight we never keep
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", pack(linear.weight), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        """W (d_out, d_in), unpacked: a fresh copy each time, for readers that run once per adapter load or merge
        (never in a forward)."""
        return self.packed.to_dense()

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.packed, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Re-store the plain fp32 `nn.Linear` layers of a causal LM on the CPU as `PackedLinear`, in place, the output
    head as a packed copy; returns how many were packed. A model on another device, one holding peft layers (they
    read and write their base layer's weight), or a torch without oneDNN is left as it is."""
    if (
        not available()
        or next(model.parameters()).device.type != "cpu"
        or any(hasattr(m, "base_layer") for m in model.modules())
    ):
        return 0
    head = model.get_output_embeddings()
    packed = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not head and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child))
                packed += 1
    if type(head) is nn.Linear and head.weight.dtype == torch.float32:
        model.set_output_embeddings(PackedLinear(head))  # tied or not, the embeddings keep their own table
        packed += 1
    return packed
