"""NEAT: a tiny network reads each frozen weight W0 and outputs its update (peft ships the method as PEANuT).

Parameters and on-disk format are peft's PEANuT ones (`peanut_A`, `peanut_encoders`, `peanut_decoders`,
`peanut_B`; `peft_type: "PEANUT"`), so a saved adapter loads with stock peft. What differs is the forward:

    peft:  ΔW = s · B_w Hᵀ  (d_out × d_in, built every call)        y = x W0ᵀ + x ΔWᵀ
    ours:  H  = stack(W0ᵀ A_wᵀ)  (d_in × r, once per forward)       y = x W0ᵀ + s · (x H) B_wᵀ

The factored form costs two skinny matmuls per token (like LoRA) plus one d_in·d_out·r product per forward that
does not grow with the number of tokens, and never keeps a dense d_out × d_in tensor for backward. It also
supports GPT-2's `Conv1D` (weight stored as [d_in, d_out]), which peft's PEANuT layer rejects.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft import PeanutConfig
from peft.tuners.peanut.layer import Linear as PeanutLinear
from peft.tuners.peanut.layer import PeanutLayer
from peft.tuners.peanut.model import PeanutModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType
from torch import nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from neat_core.methods.base import tuner_swapped


def neat_hidden(
    weight_t: torch.Tensor, a: torch.Tensor, encoders: list[torch.Tensor], decoders: list[torch.Tensor], act_fn: str
) -> torch.Tensor:
    """H = φ(W0ᵀ A_wᵀ) through the encoder/decoder stack, in peft's exact order (training, merging, LoRA export and
    serving all use this one function). weight_t: (d_in, d_out), a: (r, d_out), encoders/decoders: (r, r) each.
    Returns (d_in, r)."""
    act = ACT2FN[act_fn]
    h = act(torch.matmul(weight_t, a.t()))  # (d_in, r)
    residuals = []
    for encoder in encoders:
        residuals.append(h)
        h = act(F.linear(h, encoder))
    for i, decoder in enumerate(decoders):
        h = act(F.linear(h, decoder)) + residuals[-1 - i]  # U-Net style: add the mirrored encoder input
    return h


class NeatLinear(PeanutLinear):
    """peft's PEANuT layer with the factored forward; wraps `nn.Linear` or `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, r: int, config: PeanutConfig, **kwargs: Any):
        nn.Module.__init__(self)
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        with warnings.catch_warnings():  # PeanutLayer warns on anything but nn.Linear; Conv1D is handled below
            warnings.simplefilter("ignore", UserWarning)
            PeanutLayer.__init__(self, base_layer, **kwargs)
        # Conv1D computes x @ W with W: [d_in, d_out]; all math below uses the nn.Linear view [d_out, d_in].
        self.fan_in_fan_out = isinstance(base, Conv1D)
        if self.fan_in_fan_out:
            self.in_features, self.out_features = base.weight.shape
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, config=config)

    def hidden(self, adapter: str, base_weight: torch.Tensor | None = None) -> torch.Tensor:
        """H for this layer's adapter, from its current (or a given original) base weight. Returns (d_in, r)."""
        weight = self.get_base_layer().weight if base_weight is None else base_weight
        w_t = weight if self.fan_in_fan_out else weight.t()  # (d_in, d_out)
        a = self.peanut_A[adapter].weight  # (r, d_out)
        # Under autocast the matmul runs in the compute dtype with fp32 accumulation; casting W0 to the adapter's
        # fp32 there would copy the whole frozen weight for nothing.
        if w_t.dtype != a.dtype and not torch.is_autocast_enabled(w_t.device.type):
            w_t = w_t.to(a.dtype)
        encoders = [e.weight for e in self.peanut_encoders[adapter]]
        decoders = [d.weight for d in self.peanut_decoders[adapter]]
        return neat_hidden(w_t, a, encoders, decoders, self.act_fn[adapter])

    def _compute_delta_weight(self, adapter: str, base_weight: torch.Tensor) -> torch.Tensor:
        """ΔW = s · B_w Hᵀ in the base layer's own layout. Only merge (and peft's get_delta_weight) call this."""
        h = self.hidden(adapter, base_weight)  # (d_in, r)
        delta = self.scaling[adapter] * (self.peanut_B[adapter].weight @ h.t())  # (d_out, d_in)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)  # (B, T, d_out)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            if adapter not in self.peanut_A:
                continue
            h = self.hidden(adapter)  # (d_in, r): independent of the number of tokens
            x_cast = self._cast_input_dtype(x, h.dtype)
            up = self.peanut_B[adapter](torch.matmul(x_cast, h))  # (B, T, r) -> (B, T, d_out)
            result = result + (self.scaling[adapter] * up).to(result.dtype)
        return result


class NeatTuner(PeanutModel):
    """peft's PEANuT tuner that builds `NeatLinear` layers."""

    @staticmethod
    def _create_new_module(peanut_config: PeanutConfig, adapter_name: str, target: nn.Module) -> nn.Module:
        base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base, nn.Linear | Conv1D):
            return NeatLinear(target, adapter_name, r=peanut_config.r, config=peanut_config)
        raise NotImplementedError(f"NEAT supports nn.Linear and Conv1D layers, not {type(base).__name__}")


def neat_layers() -> contextlib.AbstractContextManager[None]:
    """peft builds `NeatLinear` for PEANuT adapters inside this block (`tuner_swapped`)."""
    return tuner_swapped(PeftType.PEANUT, NeatTuner)
