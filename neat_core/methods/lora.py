"""LoRA, the baseline: peft's implementation as is."""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig, PeftConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_core.methods.base import (
    AdapterMethod,
    adaptable_modules,
    auto_target_modules,
    task_type_of,
)
from neat_core.methods.registry import register


class Lora(AdapterMethod):
    name = "lora"
    peft_type = "LORA"
    prefix = "lora_"
    exportable_to_lora = True
    config_class: type[LoraConfig] = LoraConfig  # methods that train LoRA modules of their own (Pear) swap it

    def defaults(self, model: nn.Module) -> dict[str, Any]:
        return {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": auto_target_modules(model)}

    def learning_rate(self, task: str) -> float:
        return 1e-3 if task == "classification" else 5e-4

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
        )

    def lora_factors(self, layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        return layer.lora_A[adapter].weight, layer.scaling[adapter] * layer.lora_B[adapter].weight


register(Lora())
