"""Lily's layers: low-rank interconnected adaptation across layers (peft's `LilyConfig` as is, plus a router mode).

For each target type (e.g. every `query`), peft builds:
    lily_A       Linear(d_in → r)            shared by each block of `stride_A` consecutive layers
    lily_B       Linear(d_out → E·r)         one per target type, shared by all its layers: E experts (E, r, d_out)
    lily_router  Linear(r → E)               one per layer
and computes, at layer l, `h = A(x)` (B, T, r), `p = softmax(R_l h)` (B, T, E), mixing weights `w` from `p`,
`B_mix = Σ_e w_e B_e` (r, d_out), `y = base(x) + scaling · h B_mix`.

The mixing weights are where the two router modes differ:
    "batch"       w = mean of p over the whole batch and every token, padding included (E,): peft's forward,
                  the method as published; the training default. A row's output depends on its batch-mates.
    "per_sample"  w_b = mean of p over row b's own non-padding tokens (B, E): each row gets exactly what it
                  gets alone; the serving default. (Ours: a serving fix, not in the paper or peft.)
The layers see only hidden states, so a forward pre-hook on the transformers model records the call's
`attention_mask` where the layers read it (`_Routing`). With a KV cache each decode step feeds one token per row:
that row's mixing weights are then its new token's router probabilities (the cached prompt does not enter them),
exactly as peft's own forward does for a batch of one. Generation is deterministic and independent of batch-mates
either way, but a cached decode step is not the same computation as re-running the whole sequence.

The router makes the update input-dependent, so Lily cannot be merged into the base weights or exported to LoRA;
it is served by whole peft models (the serving tier's solo path), concurrent requests batched together in
per-sample mode. Artifacts are peft's own Lily format (`peft_type: "LILY"`; stock peft loads nn.Linear ones) plus
our manifest, which records the router modes. GPT-2's `Conv1D` is supported here (peft's Lily layer rejects it), so
GPT-2 Lily artifacts load through neat_core only.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft import LilyConfig, PeftModel
from peft.tuners.lily.layer import LilyLayer
from peft.tuners.lily.layer import Linear as PeftLilyLinear
from peft.tuners.lily.model import LilyModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods.base import tuner_swapped
from neat_core.methods.lily.spec import ROUTER_MODES

NOT_MERGEABLE = (
    "Lily adapters cannot be merged or exported to LoRA: the router mixes the shared B experts with weights "
    "computed from each input, so the update is not one fixed matrix"
)


class _Routing:
    """Shared by every Lily layer of one model: the router mode, and the attention mask of the forward in flight
    (recorded by a pre-hook on the transformers model). One forward at a time per model, as everywhere here."""

    def __init__(self, mode: str):
        self.mode = mode
        self.mask: torch.Tensor | None = None  # (B, S): S = past + current tokens during cached generation

    def record_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # transformers' forward and generate pass attention_mask by keyword; positional slots differ by model
        # (GPT-2's second argument is past_key_values), so only the keyword is read.
        self.mask = kwargs.get("attention_mask")

    def token_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """1 for a real token, 0 for padding, shaped (B, T, 1) for hidden (B, T, r)."""
        batch, tokens = hidden.shape[0], hidden.shape[1]
        mask = self.mask
        if mask is None:
            return hidden.new_ones(batch, tokens, 1)
        if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < tokens:
            raise RuntimeError(
                f"Lily per-sample routing needs a 2-D attention mask (batch, >= {tokens} tokens) for hidden states "
                f"{tuple(hidden.shape)}; got {tuple(mask.shape)}"
            )
        # The mask covers past + current tokens; the current ones are its last T columns (all of it without cache).
        return mask[:, -tokens:].to(hidden.dtype).unsqueeze(-1)


class LilyLinear(PeftLilyLinear):
    """peft's Lily layer (its parameters, sharing and "batch" forward unchanged) with the per-sample router mode,
    a clear error on merge, and GPT-2's `Conv1D` as a base layer."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, config: LilyConfig, **kwargs: Any):
        nn.Module.__init__(self)
        with warnings.catch_warnings():  # LilyLayer warns on anything but nn.Linear; Conv1D is handled below
            warnings.simplefilter("ignore", UserWarning)
            LilyLayer.__init__(self, base_layer, **kwargs)
        base = self.get_base_layer()
        if isinstance(base, Conv1D):  # weight stored as [d_in, d_out]; Lily's A and B only need the two sizes
            self.in_features, self.out_features = base.weight.shape
        self._active_adapter = adapter_name
        self.routing: _Routing | None = None  # set by `install_routing`; None behaves as "batch"
        self.update_layer(adapter_name, r, config=config)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(NOT_MERGEABLE)

    def unmerge(self) -> None:
        raise NotImplementedError(NOT_MERGEABLE)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        raise NotImplementedError(NOT_MERGEABLE)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.routing is None or self.routing.mode == "batch":
            return super().forward(x, *args, **kwargs)  # peft's forward: the batch-mean router, bit for bit
        result = self.base_layer(x, *args, **kwargs)  # (B, T, d_out)
        if self.disable_adapters or not self.active_adapters:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.lily_A:
                continue
            num_b = self.num_B[adapter]
            b_weight = self.lily_B[adapter].weight  # (E·r, d_out)
            experts = b_weight.reshape(num_b, -1, b_weight.shape[1])  # (E, r, d_out), as peft reshapes it
            hidden = self.lily_A[adapter](self._cast_input_dtype(x, self.lily_A[adapter].weight.dtype))  # (B, T, r)
            squeeze = hidden.dim() == 2  # an unbatched (T, d_in) input is one sample
            if squeeze:
                hidden = hidden.unsqueeze(0)
            probs = F.softmax(self.lily_router[adapter](hidden), dim=-1)  # (B, T, E)
            keep = self.routing.token_weights(hidden)  # (B, T, 1)
            weights = (probs * keep).sum(1) / keep.sum(1).clamp_min(1)  # (B, E): each row's own token mean
            mixed = torch.einsum("be,eio->bio", weights, experts)  # (B, r, d_out)
            delta = torch.matmul(hidden, mixed)  # (B, T, d_out)
            if squeeze:
                delta = delta.squeeze(0)
            result = result + (delta * self.scaling[adapter]).to(result.dtype)
        return result


class LilyTuner(LilyModel):
    """peft's Lily tuner that builds `LilyLinear` layers (its A/B sharing hook is inherited unchanged)."""

    @staticmethod
    def _create_new_module(lily_config: LilyConfig, adapter_name: str, target: nn.Module) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear | Conv1D):
            return LilyLinear(target, adapter_name, r=lily_config.r, config=lily_config)
        raise NotImplementedError(f"Lily supports nn.Linear and Conv1D layers, not {type(base).__name__}")


def lily_layers() -> contextlib.AbstractContextManager[None]:
    """peft builds `LilyLinear` for LILY adapters inside this block (`tuner_swapped`)."""
    return tuner_swapped(PeftType.LILY, LilyTuner)


def check_mode(mode: str) -> str:
    if mode not in ROUTER_MODES:
        raise InvalidHyperparameterError("router_mode", f"invalid value {mode!r}", ", ".join(ROUTER_MODES))
    return mode


def install_routing(model: PeftModel, mode: str) -> None:
    """Give every Lily layer of `model` one shared `_Routing` in `mode`, fed by a mask-recording pre-hook on the
    transformers model; calling it again only changes the mode."""
    check_mode(mode)
    routing = getattr(model, "_lily_routing", None)
    if routing is None:
        routing = _Routing(mode)
        model.get_base_model().register_forward_pre_hook(routing.record_mask, with_kwargs=True)
        model._lily_routing = routing
        for module in model.modules():
            if isinstance(module, LilyLinear):
                module.routing = routing
    routing.mode = mode


def router_mode(model: PeftModel) -> str:
    routing = getattr(model, "_lily_routing", None)
    return routing.mode if routing is not None else "batch"
