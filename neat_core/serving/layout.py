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

import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

# Sibling projections that a decoder layer calls on one and the same input (Llama, Mistral, Qwen, Gemma, ...): each
# group runs as one matmul over their weights stacked (FusedLinears).
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


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


class FusedLinears:
    """Sibling linears that read the same input, e.g. q/k/v, as one packed weight [W_0; W_1; ...] (Σ d_out, d_in).

    Why: SmolLM2's k and v are (192, 576), too small for oneDNN to stream at full speed; one (960, 576) matmul
    instead of three, and one (3072, 576) for gate/up instead of two, makes a layer's matmuls 1.15-1.3x faster
    (docs/benchmarks.md, "fused projections"). Each sibling becomes a `FusedPart`; the first part called with an
    input computes every part's output, and the others take their columns of it when they are called with the same
    tensor object before any part is called twice (anything else recomputes: slower, never wrong). The input is
    trusted not to change in place between the parts' calls (inference tensors keep no version counter to check).

    `choose`, when set (by `batched.MultiAdapterLinear`), picks what a computation runs on: a key, a packed weight
    of this same shape (e.g. one with a hot adapter's deltas merged in), and low-rank factors to add or None:
    A (r, d_in) and B (Σ d_out, r), the group's output becoming x Wᵀ + b + (x Aᵀ) Bᵀ. The key None is the base
    model. Every part of one computation sees the same choice; its key is returned beside the part's columns.
    """

    def __init__(self, linears: list[nn.Linear]):
        self.sizes = [linear.out_features for linear in linears]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(linears))]
        self.in_features = linears[0].in_features
        self.packed = pack(torch.cat([linear.weight.detach() for linear in linears]))  # (Σ d_out, d_in)
        biases = [linear.bias for linear in linears]
        self.bias = (
            None
            if all(b is None for b in biases)
            else torch.cat(
                [b.detach() if b is not None else torch.zeros(n) for b, n in zip(biases, self.sizes, strict=True)]
            )
        )
        self.choose: Callable[[], tuple[object, Tensor, tuple[Tensor, Tensor] | None]] | None = None
        self._last = threading.local()  # per thread: passes on different threads share the model

    def dense(self) -> Tensor:
        """[W_0; W_1; ...] (Σ d_out, d_in), unpacked (a fresh copy)."""
        return self.packed.to_dense()

    def run(self, x: Tensor, part: int) -> tuple[Tensor, object]:
        """x (..., d_in) -> part's output (..., d_out of part), a view into the group's output; and the key `choose`
        gave the computation (None: the base model)."""
        entry = getattr(self._last, "entry", None)
        if entry is None or entry[0] is not x or part in entry[3]:
            key, weight, factors = (None, self.packed, None) if self.choose is None else self.choose()
            y = packed_linear(x, weight, self.bias)  # (..., Σ d_out)
            if factors is not None:
                # Two plain (MKL) matmuls, the second accumulating into y in place. At SmolLM2's q/k/v sizes, timed
                # alone at 1 and 8 rows, this beat the same two as oneDNN ops (0.14 against 0.20 ms per layer at 1
                # row, 0.19 against 0.22 at 8, the base matmul included) and the four of two parts separately.
                a, b = factors
                h = x.reshape(-1, self.in_features) @ a.t()  # (B·T, r)
                y.view(-1, y.shape[-1]).addmm_(h, b.t())
            entry = self._last.entry = (x, key, y, set())
        entry[3].add(part)
        if len(entry[3]) == len(self.sizes):
            self._last.entry = None  # every part has its columns: drop the input and output
        start = self.offsets[part]
        return entry[2][..., start : start + self.sizes[part]], entry[1]


class FusedPart(nn.Linear):
    """One sibling of a `FusedLinears` group, still an `nn.Linear` to every reader: `weight` gives its own
    W (d_out, d_in), unpacked on demand."""

    def __init__(self, group: FusedLinears, part: int):
        nn.Module.__init__(self)  # no weight of its own: the group holds it
        self.group, self.part = group, part
        self.in_features, self.out_features = group.in_features, group.sizes[part]
        self.bias = None  # the group adds it

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        start = self.group.offsets[self.part]
        return self.group.dense()[start : start + self.out_features].clone()

    def run(self, x: Tensor) -> tuple[Tensor, object]:
        return self.group.run(x, self.part)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(x)[0]


def _fuse_siblings(model: nn.Module) -> int:
    """Replace each FUSED_GROUPS group of plain fp32 siblings with the same input width by `FusedPart`s."""
    fused = 0
    for parent in list(model.modules()):
        for names in FUSED_GROUPS:
            linears = [getattr(parent, name, None) for name in names]
            if not all(type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in linears):
                continue
            if len({m.in_features for m in linears}) != 1:
                continue
            group = FusedLinears(linears)
            for i, name in enumerate(names):
                setattr(parent, name, FusedPart(group, i))
            fused += len(names)
    return fused


def pack_linears(model: nn.Module, fuse: bool = True) -> int:
    """Re-store the plain fp32 `nn.Linear` layers of a causal LM on the CPU as `PackedLinear`, in place, sibling
    groups that read the same input fused (`fuse`, FusedLinears), the output head as a packed copy; returns how many
    linears were packed. A model on another device, one holding peft layers (they read and write their base layer's
    weight), or a torch without oneDNN is left as it is."""
    if (
        not available()
        or next(model.parameters()).device.type != "cpu"
        or any(hasattr(m, "base_layer") for m in model.modules())
    ):
        return 0
    head = model.get_output_embeddings()
    packed = _fuse_siblings(model) if fuse else 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child is not head and child.weight.dtype == torch.float32:
                setattr(parent, name, PackedLinear(child))
                packed += 1
    if type(head) is nn.Linear and head.weight.dtype == torch.float32:
        model.set_output_embeddings(PackedLinear(head))  # tied or not, the embeddings keep their own table
        packed += 1
    return packed
