"""HEAT as a registered method: LoRA trained on the attention heads that matter most (neat_core.methods.heat.heads
scores and selects them). Its artifacts are plain LoRA."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from peft import PeftModel
from torch import nn

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods.base import adaptable_modules
from neat_core.methods.heat.heads import (
    HELD,
    adapter_scores,
    apply_selection,
    attention_blocks,
    gate_scores,
    head_shape,
    heat_layers,
    roles,
    select_heads,
    weight_scores,
)
from neat_core.methods.heat.spec import SPEC
from neat_core.methods.lora.model import Lora


class Heat(Lora):
    """LoRA's config, defaults and export, plus head scoring and selection. Its artifacts are plain LoRA."""

    spec = SPEC
    owns_peft_type = False  # peft_type "LORA" stays LoRA's; a HEAT model is known by its tag or manifest

    def resolve(self, model: nn.Module, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        resolved = super().resolve(model, hyperparameters)
        if resolved["top_k"] is not None:
            resolved["keep_fraction"] = None  # top_k given: it decides, not the default fraction
        blocks, shape = attention_blocks(model), head_shape(model)
        if not blocks:
            raise InvalidHyperparameterError("method", "HEAT found no attention block in this model", ["neat", "lora"])
        layer_of = roles(blocks)
        for target in resolved["target_modules"]:
            for name, _ in adaptable_modules(model):
                if (name == target or name.endswith("." + target)) and name not in layer_of:
                    raise InvalidHyperparameterError(
                        "target_modules", f"{target!r} matches {name}, not an attention q/k/v/o projection",
                        "attention projections only",
                    )  # fmt: skip
        limit = shape.heads * (len(blocks) if resolved["selection"] == "global" else 1)
        if resolved["top_k"] is not None and resolved["top_k"] > limit:
            raise InvalidHyperparameterError(
                "top_k", f"{resolved['top_k']} heads asked, {resolved['selection']} selection has {limit}",
                f"an integer 1..{limit}",
            )  # fmt: skip
        return resolved

    def before_training(self, model: PeftModel, hp: dict[str, Any], batches: Iterator[dict]) -> dict[str, Any]:
        blocks, shape = attention_blocks(model), head_shape(model)
        heat_layers(model, blocks)  # fail early on a non-attention target
        taken = list(itertools.islice(batches, hp["score_batches"]))
        was_training = model.training
        model.eval()  # no dropout: the score is a property of the heads, not of a random mask
        try:
            if hp["score"] == "gate":
                scores = gate_scores(model, taken, blocks, shape)
            elif hp["score"] == "weight":
                scores = weight_scores(model, taken, blocks, shape)
            else:
                scores = adapter_scores(model, taken, blocks, shape, hp["warmup_learning_rate"])
        finally:
            model.train(was_training)
        kept = select_heads(scores, hp["selection"], hp["top_k"], hp["keep_fraction"])
        apply_selection(model, kept)
        return {
            "score": hp["score"],
            "scored_batches": len(taken),
            "head_scores": scores.tolist(),  # (L, H)
            "kept_heads": kept,  # per layer, query-head indices
            "heads": {"query": shape.heads, "key_value": shape.kv_heads, "head_dim": shape.head_dim},
        }

    def restore(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any]) -> None:
        apply_selection(model, state["kept_heads"])

    def held_at_zero(self, model: PeftModel) -> int:
        return getattr(model, HELD, 0)


METHOD = Heat()
