"""Pear as a registered method: LoRA's config and learning rates, with Pear's layers (neat_core.methods.pear.layer)
and its prune-and-share schedule as training hooks."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from torch import nn

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods.base import adaptable_modules
from neat_core.methods.lora.model import Lora
from neat_core.methods.pear.layer import PearConfig, apply_pruning, choose_pruning, pear_layers
from neat_core.methods.pear.spec import SPEC


class Pear(Lora):
    """LoRA's config, defaults and learning rates, with Pear's layers and its prune-and-share schedule."""

    spec = SPEC
    owns_peft_type = False  # peft_type "LORA" stays LoRA's; a Pear model is known by its tag, config or manifest
    config_class = PearConfig

    def resolve(self, model: nn.Module, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        resolved = super().resolve(model, hyperparameters)
        positions = sum(
            1
            for name, _ in adaptable_modules(model)
            if any(name == t or name.endswith("." + t) for t in resolved["target_modules"])
        )
        if positions < 2 and resolved["prune_fraction"] > 0:
            raise InvalidHyperparameterError(
                "target_modules", f"Pear needs at least two adapter positions to prune, got {positions}", ">= 2"
            )
        return resolved

    def load(self, model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
        """Attach a fresh Pear adapter with the saved config, re-apply the saved pruning, load the weights."""
        directory = Path(adapter_dir)
        saved = json.loads((directory / "adapter_config.json").read_text())
        ours = {"peft_type", "runtime_config", "inference_mode"}  # set by PearConfig / by this call
        fields = {f.name for f in dataclasses.fields(PearConfig) if f.init} - ours
        config = PearConfig(**{k: v for k, v in saved.items() if k in fields}, inference_mode=not is_trainable)
        record = config.pear
        peft_model = get_peft_model(model, config)
        adapter = peft_model.active_adapter
        if record:
            apply_pruning(peft_model, adapter, record, fresh=False)
        device = next(peft_model.parameters()).device
        result = set_peft_model_state_dict(peft_model, load_file(directory / "adapter_model.safetensors", str(device)))
        shared = {
            f"{name}.{part}.{adapter}.weight"
            for name in (record or {}).get("shares", {})
            for part in ("lora_A", "lora_B")
        }
        missing = [k for k in result.missing_keys if adapter in k and "lora_" in k and k not in shared]
        if result.unexpected_keys or missing:
            raise ValueError(
                f"Pear adapter does not fit: unexpected {result.unexpected_keys[:3]}, missing {missing[:3]}"
            )
        if not is_trainable:
            for p in peft_model.parameters():
                p.requires_grad_(False)
        return self.tag(peft_model)

    def lora_factors(self, layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = layer.lora_A[adapter].weight, layer.scaling[adapter] * layer.lora_B[adapter].weight
        residual = layer.residual(adapter)
        if residual is not None:  # rank 3r: the shared factors, then the residual's
            a, b = torch.cat([a, residual[0]], dim=0), torch.cat([b, residual[1]], dim=1)
        return a, b  # (r or 3r, d_in), (d_out, r or 3r)

    # ---- training hooks ----

    def before_training(self, model: PeftModel, hp: dict[str, Any], batches: Iterator[dict]) -> dict[str, Any]:
        # Python floats in JSON round-trip exactly, so a run resumed mid-warm-up continues the same sums.
        return {"importance": {name: 0.0 for name, _ in pear_layers(model)}, "scored_steps": 0, "prune": None}

    def restore(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any]) -> None:
        if state.get("prune"):
            apply_pruning(model, model.active_adapter, state["prune"], fresh=False)

    def after_backward(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any], step: int) -> None:
        if state["prune"] is not None or step > hp["warmup_steps"]:
            return
        adapter = model.active_adapter
        with torch.no_grad():
            for name, layer in pear_layers(model):
                score = torch.zeros((), dtype=torch.float64)
                for part in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                    if part.grad is not None:
                        score += (part.double() * part.grad.double()).sum().cpu()
                state["importance"][name] += abs(float(score))  # first-order Taylor: |Σ θ·∂L/∂θ| this step
        state["scored_steps"] = step

    def after_step(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any], step: int) -> bool:
        if state["prune"] is not None or step != hp["warmup_steps"] or hp["prune_fraction"] == 0:
            return False
        adapter = model.active_adapter
        shapes = {name: (layer.out_features, layer.in_features) for name, layer in pear_layers(model)}
        shares = choose_pruning(state["importance"], shapes, hp["prune_fraction"], hp["sharing"])
        before = _adapter_parameters(model)
        state["prune"] = {"step": step, "shares": shares, "knowledge": hp["knowledge"]}
        apply_pruning(model, adapter, state["prune"], fresh=True)
        state["prune"]["adapter_parameters"] = {"before": before, "after": _adapter_parameters(model)}
        return True


def _adapter_parameters(model: nn.Module) -> int:
    """Trainable adapter parameters, each shared one counted once (named_parameters de-duplicates)."""
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n and p.requires_grad)


METHOD = Pear()
