"""Lily as a registered method: peft's LilyConfig and format, our `LilyLinear` layers and router modes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from peft import LilyConfig, PeftConfig, PeftModel, get_peft_model
from torch import nn

from neat_core.methods.base import AdapterMethod, head_modules, task_type_of
from neat_core.methods.lily.layer import check_mode, install_routing, lily_layers, router_mode
from neat_core.methods.lily.spec import SERVING_ROUTER_MODE, SPEC, TRAINING_ROUTER_MODE


class Lily(AdapterMethod):
    spec = SPEC
    peft_type = "LILY"
    prefix = "lily_"
    exportable_to_lora = False
    mergeable = False

    def peft_config(self, model: nn.Module, hp: dict[str, Any]) -> PeftConfig:
        config = LilyConfig(
            r=hp["r"],
            stride_A=hp["stride_A"],
            num_B=hp["num_B"],
            scaling=float(hp["scaling"]),
            target_modules=list(hp["target_modules"]),
            task_type=task_type_of(model),
            modules_to_save=head_modules(model),
        )
        # Carried to `wrap` on the instance, not as a dataclass field: adapter_config.json stays exactly peft's
        # (the manifest records the mode).
        config.neat_router_mode = check_mode(hp["router_mode"])
        return config

    def wrap(self, model: nn.Module, config: PeftConfig) -> PeftModel:
        with lily_layers():
            peft_model = get_peft_model(model, config)
        install_routing(peft_model, getattr(config, "neat_router_mode", TRAINING_ROUTER_MODE))
        return self.tag(peft_model)

    def load(
        self, model: nn.Module, adapter_dir: str, is_trainable: bool = False, router: str = SERVING_ROUTER_MODE
    ) -> PeftModel:
        """Loads for serving: the per-sample router unless `router` says otherwise."""
        with lily_layers():
            peft_model = PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)
        install_routing(peft_model, router)
        return self.tag(peft_model)

    def before_training(self, model: PeftModel, hp: dict[str, Any], batches: Iterator[dict]) -> dict[str, Any]:
        # Nothing is computed from data; the state records the modes in checkpoints and the manifest.
        return {"router_mode": router_mode(model), "serving_router_mode": SERVING_ROUTER_MODE}

    def restore(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any]) -> None:
        install_routing(model, state.get("router_mode", hp["router_mode"]))


METHOD = Lily()
