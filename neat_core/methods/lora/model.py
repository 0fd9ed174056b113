"""LoRA as a registered method: peft's LoraConfig and layers, and how the serving engine reads a saved LoRA."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_core.methods.base import AdapterMethod, adaptable_modules, head_modules, linear_view, task_type_of
from neat_core.methods.lora.spec import SPEC

# LoRA options that change the forward beyond `(x Aᵀ) Bᵀ`: config key -> value that means "not used".
LORA_PLAIN = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
}


class Lora(AdapterMethod):
    spec = SPEC
    peft_type = "LORA"
    prefix = "lora_"
    exportable_to_lora = True
    config_class: type[LoraConfig] = LoraConfig  # methods that train LoRA modules of their own (Pear) swap it

    def peft_config(self, model: nn.Module, hp: dict[str, Any]) -> PeftConfig:
        targets = list(hp["target_modules"])
        conv1d = any(
            isinstance(m, Conv1D) and any(n == t or n.endswith("." + t) for t in targets)
            for n, m in adaptable_modules(model)
        )
        return self.config_class(
            r=hp["r"],
            lora_alpha=hp["lora_alpha"],
            lora_dropout=hp["lora_dropout"],
            target_modules=targets,
            fan_in_fan_out=conv1d,  # GPT-2's Conv1D stores its weight transposed
            task_type=task_type_of(model),
            modules_to_save=head_modules(model),
        )

    def lora_factors(self, layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_A[adapter].weight, layer.scaling[adapter] * layer.lora_B[adapter].weight

    # ---- serving: a saved LoRA (this method's, HEAT's, or Pear's export) as factors ----

    def serving_problems(self, config: dict[str, Any]) -> list[str]:
        return [f"{key}={config[key]!r}" for key in LORA_PLAIN if not _is_plain(config, key)]

    def saved_factors(
        self, layer: nn.Module, parts: dict[str, torch.Tensor], config: dict[str, Any], module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        d_out, d_in = linear_view(layer).shape
        device = layer.weight.device
        a, b = parts["A"].to(device, torch.float32), parts["B"].to(device, torch.float32)  # (r, d_in), (d_out, r)
        r = int(_pattern(config.get("rank_pattern"), module, config["r"]))
        if a.shape != (r, d_in) or b.shape != (d_out, r):
            raise ValueError(f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit ({d_out}, {d_in}) at r={r}")
        alpha = float(_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        return a.contiguous(), (scale * b).contiguous()


def _is_plain(config: dict[str, Any], key: str) -> bool:
    value, plain = config.get(key, LORA_PLAIN[key]), LORA_PLAIN[key]
    return value == plain or (not value and not plain)


def _pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    r"""peft's rank_pattern / alpha_pattern lookup: the first key that matches the module name as `(.*\.)?key$`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


METHOD = Lora()
