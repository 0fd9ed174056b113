"""The served base model's weight layout on a CPU: every projection stored input-major, (d_in, d_out).

A decode step at low batch multiplies one row (1, d_in) by every weight of the model, so its time is the time to
stream the weights from memory. nn.Linear keeps W (d_out, d_in) and computes x Wᵀ; on this CPU's BLAS that streams
at ~11 GB/s from one thread, while x W' with W' = Wᵀ stored contiguously, (d_in, d_out), streams at ~17 GB/s
(one row: 1.45x faster per layer; 8 and 32 rows: the same speed either way; bench/vs_llamacpp.py has the whole
step). So a CPU engine re-stores each projection once, at load, as GPT-2's `Conv1D` (transformers' input-major
linear, which the adapter tables, factor loading and merged copies already handle: `linear_view`).

Not converted: the output head (its weight is usually tied to the input embeddings, and a lookup reads rows of
the (vocab, d) table), anything that is not exactly `nn.Linear` (peft's layers, quantized ones), and models on a
GPU, whose BLAS is as fast either way.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D


class InputMajorLinear(Conv1D):
    """A `Conv1D` whose bias may be None (Llama-style projections have none): y = x W' (+ b), W' (d_in, d_out)."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)  # Conv1D's own __init__ would allocate and initialise a weight we replace at once
        self.nf, self.nx = linear.out_features, linear.in_features
        self.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)  # (d_in, d_out)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.nx)  # (B·T, d_in)
        y = flat @ self.weight if self.bias is None else torch.addmm(self.bias, flat, self.weight)
        return y.view(*x.shape[:-1], self.nf)


def input_major(model: nn.Module) -> int:
    """Re-store the plain `nn.Linear` projections of a causal LM on the CPU input-major, in place; returns how many.
    A model on another device, or one holding peft layers (they read their base layer's weight as (d_out, d_in)),
    is left as it is."""
    if next(model.parameters()).device.type != "cpu" or any(hasattr(m, "base_layer") for m in model.modules()):
        return 0
    head = model.get_output_embeddings()
    converted = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not head:
                setattr(parent, name, InputMajorLinear(child))
                converted += 1
    return converted
