"""NEAT as a registered method: peft's PEANuT config and format, our `NeatLinear` layers (`.layer`)."""

from __future__ import annotations

from typing import Any

import torch
from peft import PeanutConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn
from transformers.activations import ACT2FN

from neat_core.methods.base import AdapterMethod, head_modules, linear_view, task_type_of
from neat_core.methods.neat.layer import neat_hidden, neat_layers
from neat_core.methods.neat.spec import SPEC


class Neat(AdapterMethod):
    spec = SPEC
    peft_type = "PEANUT"
    prefix = "peanut_"
    exportable_to_lora = True
    exact_unmerge = True  # ΔW depends on W0, so peft's PEANuT keeps W0 and copies it back

    def peft_config(self, model: nn.Module, hp: dict[str, Any]) -> PeftConfig:
        return PeanutConfig(
            r=hp["r"],
            depth=hp["depth"],
            act_fn=hp["act_fn"],
            scaling=float(hp["scaling"]),
            target_modules=list(hp["target_modules"]),
            task_type=task_type_of(model),
            modules_to_save=head_modules(model),
        )

    def wrap(self, model: nn.Module, config: PeftConfig) -> PeftModel:
        with neat_layers():
            return get_peft_model(model, config)

    def load(self, model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
        with neat_layers():
            return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)

    def lora_factors(self, layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        # H must come from the original weight: after a merge the layer holds W0 + ΔW.
        original = layer._base_weight_before_merge if layer.merged else None
        if original is not None:
            original = original.to(layer.get_base_layer().weight.device)
        h = layer.hidden(adapter, original)  # (d_in, r)
        return h.t().contiguous(), layer.scaling[adapter] * layer.peanut_B[adapter].weight  # (r, d_in), (d_out, r)

    # ---- serving: factors from a saved adapter, against the serving base model's own weights ----

    def serving_problems(self, config: dict[str, Any]) -> list[str]:
        return [] if config.get("act_fn", "relu") in ACT2FN else [f"act_fn={config['act_fn']!r}"]

    def saved_factors(
        self, layer: nn.Module, parts: dict[str, torch.Tensor], config: dict[str, Any], module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        w0 = linear_view(layer)  # (d_out, d_in)
        depth = int(config.get("depth", 0))
        device = w0.device
        a_w = parts["A"].to(device, torch.float32)  # (r, d_out)
        encoders = [parts[f"encoders.{i}"].to(device, torch.float32) for i in range(depth)]
        decoders = [parts[f"decoders.{i}"].to(device, torch.float32) for i in range(depth)]
        if a_w.shape[1] != w0.shape[0]:
            raise ValueError(f"peanut_A is {tuple(a_w.shape)} but the base weight has d_out={w0.shape[0]}")
        if len(parts) != 2 + 2 * depth:
            raise ValueError(f"expected depth {depth} (A, B, {depth} encoders and decoders), found {sorted(parts)}")
        # The adapter's dtype is fp32, as when it was trained; a low-precision base weight is upcast one module at
        # a time here (a transient copy), exactly as NeatLinear.hidden does outside autocast.
        h = neat_hidden(w0.t().to(torch.float32), a_w, encoders, decoders, config.get("act_fn", "relu"))  # (d_in, r)
        b = float(config.get("scaling", 1.0)) * parts["B"].to(device, torch.float32)  # (d_out, r)
        return h.t().contiguous(), b.contiguous()


METHOD = Neat()
