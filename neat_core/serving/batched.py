"""Many adapters, one base model, one batch: each row of a batch picks its own adapter (or none).

Every adapter is per-module low-rank factors (`factors.AdapterFactors`), loaded into a numbered *slot*. Each
targeted base layer is wrapped once by a `MultiAdapterLinear` holding the stacked factors of all slots, and a batch
gathers them per row (the Punica / S-LoRA layout):

    y = base(x) + (x A[idx]ᵀ) B[idx]ᵀ      A: (n_slots, r_max, d_in)   B: (n_slots, d_out, r_max)   idx: (B,)

Slot 0 is all zeros (base-model rows) and smaller ranks are zero-padded to r_max, both exact. A batch whose rows all
share one adapter (an interactive user alone on the server) runs on a merged copy, W0 + B A, of each adapted layer
instead: the base's own single op, where the low-rank path adds two small ones per layer whose dispatch on a CPU
costs as much as their arithmetic (docs/benchmarks.md, "One adapter's cost per decode step"). A classification
adapter's own head (peft's modules_to_save) is served the same way with full per-row weights (`MultiAdapterHead`).

Written by hand because peft serves one adapter per forward (its mixed-batch mode loops over adapters in Python and
still wraps the model per adapter), and NEAT's factors are computed here, not by peft.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from neat_core.errors import ArtifactError
from neat_core.serving.factors import AdapterFactors
from neat_core.serving.layout import FusedLinears, FusedPart, PackedLinear, pack, packed_linear

# Per adapted layer, how many adapters keep a merged copy (W0 + B A): the hot one. Each copy is the size of the
# layer's base weight (SmolLM2's q/v: 53 MB in fp32; a 7B model's q/v in bf16: 1.3 GB; on a fused group, the whole
# group's: SmolLM2's q/k/v, 66 MB), memory the adapter cache's budget does not count; 0 turns merging off (every
# batch on the low-rank path).
MERGED_ADAPTERS = 1
# A copy is built once its adapter has had MERGE_AFTER batches to itself in a row (decode steps, mostly): building
# one costs several of its layer's decode steps, so two adapters taking turns alone would otherwise rebuild their
# copies at every step (bench/adapter_overhead.py measured that at 0.71 of the base's speed); they stay on the
# low-rank path instead.
MERGE_AFTER = 8


class SlotContext(threading.local):
    """The current batch's slot per row, shared by every wrapped layer of one `MultiAdapterModel`. Per thread:
    passes of different callers may run at once, each on its own thread with its own rows."""

    def __init__(self) -> None:
        self.idx: Tensor | None = None  # (B,) long; None = every row on the base model
        self.slots: frozenset[int] = frozenset()  # the non-zero slots in this batch, to skip untouched layers
        self.only: int | None = None  # the slot of every row, when they all share one adapter

    def rows(self, idx: Tensor | None, slots: frozenset[int], only: int | None = None) -> None:
        self.idx, self.slots, self.only = idx, slots, only

    def active_for(self, occupied: set[int]) -> bool:
        return self.idx is not None and not self.slots.isdisjoint(occupied)


class MultiAdapterLinear(nn.Module):
    """A base `nn.Linear` or GPT-2 `Conv1D` plus the low-rank factors of every slot. The base layer stays a child
    (`base_layer`), so its weights are shared, never copied; the factor tables are non-persistent buffers."""

    def __init__(self, base_layer: nn.Module, context: SlotContext):
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        weight = base_layer.weight  # (a PackedLinear's: an unpacked copy, read once here)
        # Conv1D stores (d_in, d_out); the factors use the nn.Linear view (d_out, d_in).
        self.out_features, self.in_features = weight.shape if isinstance(base_layer, nn.Linear) else weight.t().shape
        self.weight_dtype = weight.dtype
        self.register_buffer("A", weight.new_zeros(1, 0, self.in_features), persistent=False)  # (n_slots, r, d_in)
        self.register_buffer("B", weight.new_zeros(1, self.out_features, 0), persistent=False)  # (n_slots, d_out, r)
        self.occupied: set[int] = set()
        # A hot adapter's W0 + B A in the base layer's own layout; on a FusedPart base (q/k/v, gate/up), the shared
        # copies of the whole group (`FusedMerges`), which replace this layer's own.
        self.merges = MergedCopies()
        self.fused: FusedMerges | None = None
        # slot -> (A, B) packed for oneDNN, on a PackedLinear base: several rows on one adapter before its merged
        # copy (see forward)
        self._packed_factors: dict[int, tuple[Tensor, Tensor]] = {}
        self._factors_lock = threading.Lock()  # passes of different threads may share this layer

    def reserve(self, n_slots: int, rank: int = 0) -> None:
        """Grow the tables to `n_slots` slots and rank `rank` at least, zero-filled: existing slots are unchanged.
        Slots grow by doubling, so loading the k-th adapter does not copy every table again (a cold load stays
        cheap with hundreds loaded)."""
        n = self.A.shape[0] if n_slots <= self.A.shape[0] else max(n_slots, 2 * self.A.shape[0])
        r = max(rank, self.A.shape[1])
        if (n, r) == (self.A.shape[0], self.A.shape[1]):
            return
        a = self.A.new_zeros(n, r, self.in_features)
        b = self.B.new_zeros(n, self.out_features, r)
        a[: self.A.shape[0], : self.A.shape[1]] = self.A
        b[: self.B.shape[0], :, : self.B.shape[2]] = self.B
        self.A, self.B = a, b

    def set_slot(self, slot: int, a: Tensor, b: Tensor) -> None:
        """a: (r, d_in), b: (d_out, r), any scale already folded into b."""
        self.reserve(slot + 1, a.shape[0])
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.A[slot, : a.shape[0]] = a.to(self.A)
        self.B[slot, :, : b.shape[1]] = b.to(self.B)
        self.occupied.add(slot)
        self.forget_merged(slot)

    def clear_slot(self, slot: int) -> None:
        if slot < self.A.shape[0]:
            self.A[slot].zero_()
            self.B[slot].zero_()
        self.occupied.discard(slot)
        self.forget_merged(slot)

    def forget_merged(self, slot: int | None = None) -> None:
        """Drop a slot's merged copy and packed factors (every slot's with None); the next copy waits for a new run
        of batches."""
        with self._factors_lock:
            if slot is None:
                self._packed_factors.clear()
            else:
                self._packed_factors.pop(slot, None)
        if self.fused is not None:
            self.fused.forget(slot)  # the group's copies and its stacked factors
        else:
            self.merges.forget(slot)

    def merged_slots(self) -> list[int]:
        """The slots with a merged copy of this layer (its fused group's copies, on a FusedPart base), least
        recently used first."""
        return self.merges.slots()

    def merged_weight(self, slot: int) -> Tensor | None:
        """W0 + B A for `slot`, in the base weight's layout ((d_out, d_in) nn.Linear, (d_in, d_out) Conv1D), or
        None until the slot has had its run of batches alone (`MergedCopies`)."""

        def build() -> Tensor:
            base = self.base_layer.weight
            delta = self.B[slot] @ self.A[slot]  # (d_out, r) @ (r, d_in) -> (d_out, d_in)
            weight = base + (delta if isinstance(self.base_layer, nn.Linear) else delta.t()).to(base.dtype)
            # the copy runs as fast as the base layer it stands in for
            return pack(weight) if isinstance(self.base_layer, PackedLinear) else weight

        return self.merges.get(slot, build)

    def packed_factors(self, slot: int) -> tuple[Tensor, Tensor]:
        """`slot`'s A (r, d_in) and B (d_out, r) packed as two linear weights, kept until the slot changes."""
        with self._factors_lock:
            factors = self._packed_factors.get(slot)
            if factors is None:
                factors = self._packed_factors[slot] = (pack(self.A[slot]), pack(self.B[slot]))
            return factors

    def forward(self, x: Tensor) -> Tensor:
        if not self.context.active_for(self.occupied):
            return self.base_layer(x)  # no row of this batch has an adapter on this layer: base speed
        only = self.context.only
        merged = None
        if self.fused is not None:
            y, slot = self.base_layer.run(x)  # (B, T, d_out), this layer's columns of the group's output
            if slot is not None:
                return y  # the group added `slot`'s deltas (merged copy or stacked factors): this layer's are here
        elif only is None:
            self.merges.mixed()
        elif x.dtype == self.weight_dtype == self.A.dtype:
            merged = self.merged_weight(only)
        if merged is not None:
            # Every row on one adapter: the base layer's one op on W0 + B A (x (B, T, d_in) -> (B, T, d_out)).
            weight, bias = merged, self.base_layer.bias
            if isinstance(self.base_layer, PackedLinear):
                return packed_linear(x, weight, bias)
            if isinstance(self.base_layer, nn.Linear):
                return F.linear(x, weight, bias)
            flat = x.reshape(-1, self.in_features)  # Conv1D: y = x W + b with W (d_in, d_out)
            y = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
            return y.view(*x.shape[:-1], self.out_features)
        if self.fused is None:
            y = self.base_layer(x)  # (B, T, d_out)
        if (
            only is not None
            and isinstance(self.base_layer, PackedLinear)
            and y.dtype == self.A.dtype
            and y.numel() > y.shape[-1]
        ):
            # Several rows: MKL would split the two tiny matmuls over both threads, whose wake-up between oneDNN's
            # ops costs ~130 us each; oneDNN's own op ~40 us. One row stays on MKL (one thread, ~4 us).
            a, b = self.packed_factors(only)
            return y.add_(packed_linear(packed_linear(x, a, None), b, None))  # x Aᵀ (B, T, r), then Bᵀ
        if only is not None and y.dtype == self.A.dtype:
            # One adapter for the whole batch: two plain matmuls, the second accumulating into the base output in
            # place (y is this forward's own fresh tensor; a fused group adds its parts' in `FusedMerges`). On CPU
            # each op's dispatch costs as much as its math at these sizes, so fewer ops is what keeps an adapter
            # near base speed.
            h = x.reshape(-1, self.in_features) @ self.A[only].t()  # (B·T, r)
            return y.view(-1, self.out_features).addmm_(h, self.B[only].t()).view(y.shape)
        idx = self.context.idx
        xs = x.reshape(idx.shape[0], -1, self.in_features).to(self.A.dtype)  # (B, T, d_in)
        h = torch.bmm(xs, self.A[idx].transpose(1, 2))  # (B, T, r_max)
        delta = torch.bmm(h, self.B[idx].transpose(1, 2))  # (B, T, d_out)
        return y + delta.reshape(y.shape).to(y.dtype)


class MergedCopies:
    """The merged copies (W0 + B A) of one weight for its hot adapters: a lone layer's, or a fused group's stack.

    A copy is built once its slot has had MERGE_AFTER batches to itself in a row, and kept while among the
    `max_merged` most recently used (0: never built). A mixed batch ends every slot's run."""

    def __init__(self) -> None:
        self.copies: OrderedDict[int, Tensor] = OrderedDict()  # slot -> weight, least recently used first
        self.max_merged = MERGED_ADAPTERS
        self._streak = (0, 0)  # (slot, how many batches in a row it has had to itself)
        self._lock = threading.Lock()  # passes of different threads may share the weight

    def get(self, slot: int, build: Callable[[], Tensor]) -> Tensor | None:
        """`slot`'s copy, built with `build` on the MERGE_AFTER-th batch alone in a row; None before that. Counts
        this batch toward the slot's run."""
        if not self.max_merged:
            return None
        with self._lock:
            weight = self.copies.get(slot)
            if weight is not None:
                self.copies.move_to_end(slot)
                return weight
            streak = self._streak[1] + 1 if self._streak[0] == slot else 1
            self._streak = (slot, streak)
            if streak < MERGE_AFTER:
                return None
        weight = build()  # outside the lock: building takes several decode steps' time
        with self._lock:
            self.copies[slot] = weight
            while len(self.copies) > self.max_merged:
                self.copies.popitem(last=False)
        return weight

    def mixed(self) -> None:
        self._streak = (0, 0)

    def forget(self, slot: int | None = None) -> None:
        """Drop `slot`'s copy (every copy with None): its factors changed."""
        with self._lock:
            self._streak = (0, 0)
            if slot is None:
                self.copies.clear()
            else:
                self.copies.pop(slot, None)

    def slots(self) -> list[int]:
        return list(self.copies)


class FusedMerges:
    """A fused group's (`layout.FusedLinears`: q/k/v, or gate/up) adapter work for a batch on one adapter.

    Its hot adapter's merged copy: the group's one matmul on [W_i + B_i A_i] (each adapted part's delta, the others
    unchanged) instead of the base stack plus low-rank work; merging part by part would compute the base stack for
    the unadapted parts and each adapted one again. Every part's layer shares this group's `MergedCopies`.

    Before the copy (an adapter's first MERGE_AFTER batches, or with merging off), the group's low-rank work in two
    ops instead of two per adapted part: every adapted part's A stacked, [A_q; A_v] (Σ r, d_in), and their B as one
    block-diagonal (Σ d_out, Σ r) with zeros in the unadapted parts' rows. Fewer, larger ops are what counts on a
    CPU, where each small op's dispatch costs as much as its math (bench/adapter_overhead.py, "low-rank").

    The group asks `choose` once per computation, so every part of one batch sees the same choice."""

    def __init__(self, group: FusedLinears, context: SlotContext):
        self.group, self.context = group, context
        self.layers: dict[int, MultiAdapterLinear] = {}  # part -> the adapter layer wrapping it
        self.merges = MergedCopies()
        self._stacked: dict[int, tuple[Tensor, Tensor]] = {}  # slot -> (A (Σ r, d_in), B (Σ d_out, Σ r))
        self._lock = threading.Lock()  # passes of different threads may share the group
        group.choose = self.choose

    def choose(self) -> tuple[int | None, Tensor, tuple[Tensor, Tensor] | None]:
        only = self.context.only
        if self.context.idx is None:
            return None, self.group.packed, None
        if only is None:
            self.merges.mixed()
            return None, self.group.packed, None
        parts = {part: layer for part, layer in self.layers.items() if only in layer.occupied}
        if not parts:
            return None, self.group.packed, None

        def build() -> Tensor:
            stack = self.group.dense()  # (Σ d_out, d_in)
            for part, layer in parts.items():
                start = self.group.offsets[part]
                stack[start : start + self.group.sizes[part]] += layer.B[only] @ layer.A[only]
            return pack(stack)

        weight = self.merges.get(only, build)
        if weight is not None:
            return only, weight, None
        return only, self.group.packed, self.stacked(only, parts)

    def stacked(self, slot: int, parts: dict[int, MultiAdapterLinear]) -> tuple[Tensor, Tensor]:
        """`slot`'s factors of the adapted parts as one A (Σ r, d_in) and one block-diagonal B (Σ d_out, Σ r),
        kept until the slot changes."""
        with self._lock:
            factors = self._stacked.get(slot)
            if factors is None:
                a = torch.cat([layer.A[slot] for layer in parts.values()])  # ranks zero-padded to each layer's r_max
                b = a.new_zeros(sum(self.group.sizes), a.shape[0])
                col = 0
                for part, layer in parts.items():
                    start, rank = self.group.offsets[part], layer.A.shape[1]
                    b[start : start + self.group.sizes[part], col : col + rank] = layer.B[slot]
                    col += rank
                factors = self._stacked[slot] = (a, b)
            return factors

    def forget(self, slot: int | None) -> None:
        with self._lock:
            if slot is None:
                self._stacked.clear()
            else:
                self._stacked.pop(slot, None)
        self.merges.forget(slot)

    def add(self, part: int, layer: MultiAdapterLinear) -> None:
        self.layers[part] = layer
        layer.fused, layer.merges = self, self.merges


class MultiAdapterHead(nn.Module):
    """A base head `nn.Linear` (e.g. `classifier`, `score`) plus each slot's own trained copy of it.

    Adapters may have different label counts: the output is zero-padded to the widest head loaded, and
    `MultiAdapterModel.classify` cuts each row back to its own labels. Rows whose slot has no head here (base
    rows) use the base layer itself."""

    def __init__(self, base_layer: nn.Linear, context: SlotContext):
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        weight = base_layer.weight  # (L0, d_in)
        self.register_buffer("W", weight.new_zeros(1, 0, weight.shape[1]), persistent=False)  # (n_slots, L, d_in)
        self.register_buffer("b", weight.new_zeros(1, 0), persistent=False)  # (n_slots, L)
        self.register_buffer("has_head", torch.zeros(1, dtype=torch.bool, device=weight.device), persistent=False)
        self.occupied: set[int] = set()

    def reserve(self, n_slots: int, width: int = 0) -> None:
        n = self.W.shape[0] if n_slots <= self.W.shape[0] else max(n_slots, 2 * self.W.shape[0])
        w = max(width, self.W.shape[1])
        if (n, w) == tuple(self.W.shape[:2]):
            return
        weight, bias = self.W.new_zeros(n, w, self.W.shape[2]), self.b.new_zeros(n, w)
        has_head = self.has_head.new_zeros(n)
        weight[: self.W.shape[0], : self.W.shape[1]] = self.W
        bias[: self.b.shape[0], : self.b.shape[1]] = self.b
        has_head[: self.has_head.shape[0]] = self.has_head
        self.W, self.b, self.has_head = weight, bias, has_head

    def set_slot(self, slot: int, weight: Tensor, bias: Tensor | None) -> None:
        """weight: (L, d_in), bias: (L,) or None."""
        self.reserve(slot + 1, weight.shape[0])
        self.clear_slot(slot)
        self.W[slot, : weight.shape[0]] = weight.to(self.W)
        if bias is not None:
            self.b[slot, : bias.shape[0]] = bias.to(self.b)
        self.has_head[slot] = True
        self.occupied.add(slot)

    def clear_slot(self, slot: int) -> None:
        if slot < self.W.shape[0]:
            self.W[slot].zero_()
            self.b[slot].zero_()
            self.has_head[slot] = False
        self.occupied.discard(slot)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)  # (B, ..., L0)
        if not self.context.active_for(self.occupied):
            return y
        idx = self.context.idx
        own = torch.einsum("b...i,boi->b...o", x.to(self.W.dtype), self.W[idx])  # (B, ..., L)
        own = own + self.b[idx].view(idx.shape[0], *[1] * (x.dim() - 2), -1)
        width = max(y.shape[-1], own.shape[-1])
        pick = self.has_head[idx].view(-1, *[1] * (y.dim() - 1))  # (B, 1, ..., 1)
        return torch.where(pick, F.pad(own, (0, width - own.shape[-1])).to(y.dtype), F.pad(y, (0, width - y.shape[-1])))


class MultiAdapterModel:
    """One frozen base model serving every loaded adapter; each batch row names its adapter (None = base).

    Not thread-safe: the per-row slots live in a context shared by the wrapped layers for the duration of one
    forward, so a `MultiAdapterModel` runs one batch at a time (the serving loop owns it). `add`/`remove` must not
    run during a forward either.

    Wrapping is lazy: the first adapter that targets a layer replaces it in the base model with a
    `MultiAdapterLinear` (or `MultiAdapterHead`) around the same layer object; the base weights are never copied
    or changed. Callers put the base model in eval mode and run under `torch.no_grad()` / `inference_mode()`.
    """

    def __init__(self, base_model: nn.Module):
        self.model = base_model
        self.context = SlotContext()
        self._slots: dict[str, int] = {}
        self._adapters: dict[str, AdapterFactors] = {}
        self._num_labels: dict[str, int | None] = {}
        self._layers: dict[str, MultiAdapterLinear | MultiAdapterHead] = {}
        self._fused: dict[int, FusedMerges] = {}  # id(FusedLinears) -> its merged copies
        self.merged_adapters = MERGED_ADAPTERS

    def set_merged_adapters(self, n: int) -> None:
        """How many adapters keep a merged copy of each adapted layer (MERGED_ADAPTERS; 0: none)."""
        self.merged_adapters = n
        for layer in self._layers.values():
            if isinstance(layer, MultiAdapterLinear):
                layer.merges.max_merged = n
                layer.forget_merged()

    def slots(self) -> dict[str, int]:
        """adapter id -> slot, for every loaded adapter."""
        return dict(self._slots)

    def add(self, factors: AdapterFactors) -> int:
        """Load an adapter's factors into a free slot (the lowest one) and return it."""
        if factors.adapter_id in self._slots:
            raise ValueError(
                f"adapter {factors.adapter_id!r} is already loaded (slot {self._slots[factors.adapter_id]})"
            )
        heads = self._group_head(factors)
        self._check_fits(factors, heads)  # before touching any table, so a bad adapter leaves nothing behind
        used = set(self._slots.values())
        slot = next(s for s in range(1, len(used) + 2) if s not in used)
        for name, (a, b) in factors.factors.items():
            self._wrap(name, MultiAdapterLinear).set_slot(slot, a, b)
        for name, (weight, bias) in heads.items():
            self._wrap(name, MultiAdapterHead).set_slot(slot, weight, bias)
        self._slots[factors.adapter_id] = slot
        self._adapters[factors.adapter_id] = factors
        # The number of logits this adapter's rows produce: its labels, else the width of its last head layer.
        self._num_labels[factors.adapter_id] = (
            len(factors.labels) if factors.labels else (heads[self._last(heads)][0].shape[0] if heads else None)
        )
        n_slots = max(self._slots.values()) + 1
        for layer in self._layers.values():  # every table covers every slot, so idx never runs past one
            layer.reserve(n_slots)
        return slot

    def remove(self, adapter_id: str) -> None:
        """Free the adapter's slot (its rows of every table become zeros); wrapped layers stay wrapped."""
        if adapter_id not in self._slots:
            raise KeyError(f"adapter {adapter_id!r} is not loaded")
        slot = self._slots.pop(adapter_id)
        del self._adapters[adapter_id]
        del self._num_labels[adapter_id]
        for layer in self._layers.values():
            layer.clear_slot(slot)

    @contextmanager
    def rows(self, adapter_ids: list[str | None], device: torch.device | str) -> Iterator[None]:
        """Set each row's slot for the forwards inside the block (None = the base model)."""
        unknown = sorted({a for a in adapter_ids if a is not None and a not in self._slots})
        if unknown:
            raise KeyError(f"adapters not loaded: {unknown}")
        slots = [0 if a is None else self._slots[a] for a in adapter_ids]
        active = frozenset(slots) - {0}
        only = slots[0] if active and len(set(slots)) == 1 else None
        self.context.rows(torch.tensor(slots, device=device) if active else None, active, only)
        try:
            yield
        finally:
            self.context.rows(None, frozenset())

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        adapter_ids: list[str | None] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run the base model with row i on adapter `adapter_ids[i]` (None: every row on the base model); returns
        the base model's own output. Don't pass `labels`: a row's logits may be wider than the base head's.

        Causal LM: logits (B, T, V); the key/value cache (keyword `engine.KV_CACHE`) and `use_cache` pass through,
        so a generation loop calls this once per step with the same `adapter_ids` (the cache holds each row's
        adapted keys and values).
        Classification: logits (B, L_max), zero-padded past each row's label count; `classify` trims them.
        """
        adapter_ids = [None] * input_ids.shape[0] if adapter_ids is None else adapter_ids
        if len(adapter_ids) != input_ids.shape[0]:
            raise ValueError(f"{len(adapter_ids)} adapter ids for a batch of {input_ids.shape[0]} rows")
        with self.rows(adapter_ids, input_ids.device):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    __call__ = forward

    def classify(self, input_ids: Tensor, attention_mask: Tensor | None, adapter_ids: list[str | None]) -> list[Tensor]:
        """Per-row classification logits, each (n_labels of that row's adapter,): rows of one batch may use heads
        with different label counts, so the result is a list rather than one tensor."""
        logits = self.forward(input_ids, attention_mask, adapter_ids=adapter_ids).logits  # (B, L_max)
        return [row[: self.num_labels(a)] for row, a in zip(logits, adapter_ids, strict=True)]

    def num_labels(self, adapter_id: str | None) -> int:
        """How many logits a row on this adapter has (the base model's own count for base rows)."""
        own = self._num_labels[adapter_id] if adapter_id is not None else None
        return own if own is not None else int(self.model.config.num_labels)

    def labels(self, adapter_id: str | None) -> list[str]:
        """The label names of a row's head: the adapter's manifest labels, else the base model's id2label."""
        own = self._adapters[adapter_id].labels if adapter_id is not None else None
        if own:
            return list(own)
        id2label = self.model.config.id2label
        return [id2label[i] for i in range(self.num_labels(adapter_id))]

    def _wrap(
        self, name: str, kind: type[MultiAdapterLinear | MultiAdapterHead]
    ) -> MultiAdapterLinear | MultiAdapterHead:
        if name not in self._layers:
            parent, _, child = name.rpartition(".")
            owner = self.model.get_submodule(parent) if parent else self.model
            base = getattr(owner, child)
            layer = kind(base, self.context)
            if isinstance(layer, MultiAdapterLinear):
                if isinstance(base, FusedPart):
                    fused = self._fused.get(id(base.group))
                    if fused is None:
                        fused = self._fused[id(base.group)] = FusedMerges(base.group, self.context)
                    fused.add(base.part, layer)
                layer.merges.max_merged = self.merged_adapters
            setattr(owner, child, layer)
            self._layers[name] = layer
        return self._layers[name]

    def _base_layer(self, name: str) -> nn.Module | None:
        if name in self._layers:
            return self._layers[name].base_layer
        try:
            return self.model.get_submodule(name)
        except AttributeError:
            return None

    def _last(self, heads: dict[str, Any]) -> str:
        """The head layer that comes last in the model (RoBERTa's `classifier.out_proj` after `classifier.dense`)."""
        order = {name: i for i, (name, _) in enumerate(self.model.named_modules())}
        return max(heads, key=lambda name: order.get(name, -1))

    @staticmethod
    def _group_head(factors: AdapterFactors) -> dict[str, tuple[Tensor, Tensor | None]]:
        """{"classifier.weight", "classifier.bias"} -> {"classifier": (weight (L, d_in), bias (L,) | None)}."""
        heads: dict[str, tuple[Tensor, Tensor | None]] = {}
        for key in sorted(factors.head or {}):
            module, _, param = key.rpartition(".")
            if param == "weight":
                heads[module] = (factors.head[key], (factors.head or {}).get(f"{module}.bias"))
        return heads

    def _check_fits(self, factors: AdapterFactors, heads: dict[str, tuple[Tensor, Tensor | None]]) -> None:
        problems = []
        for name, (a, b) in factors.factors.items():
            layer = self._base_layer(name)
            if not isinstance(layer, nn.Linear | Conv1D):
                problems.append(f"{name}: not a Linear/Conv1D layer of this model")
                continue
            d_out, d_in = layer.weight.shape if isinstance(layer, nn.Linear) else layer.weight.t().shape
            if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                problems.append(f"{name}: factors {tuple(a.shape)}, {tuple(b.shape)} vs weight ({d_out}, {d_in})")
        for name, (weight, _) in heads.items():
            layer = self._base_layer(name)
            if not isinstance(layer, nn.Linear) or weight.shape[1] != layer.in_features:
                problems.append(f"{name}: head {tuple(weight.shape)} does not fit this model")
        if problems:
            raise ArtifactError(f"adapter {factors.adapter_id!r} does not fit this base model: {'; '.join(problems)}")
