"""HEAT's hyperparameters (LoRA's, plus how heads are scored and selected), defaults and serving; torch-free."""

from __future__ import annotations

from typing import Any

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods.lora.spec import DEFAULTS, LEARNING_RATES, PARAMS
from neat_core.methods.specs import MethodSpec, Serving, fraction, one_of, positive_float, positive_int


def _rules(explicit: dict[str, Any]) -> None:
    if "top_k" in explicit and "keep_fraction" in explicit:
        raise InvalidHyperparameterError("top_k", "give top_k or keep_fraction, not both", "one of the two")


SPEC = MethodSpec(
    name="heat",
    description="LoRA on the attention heads that matter most, scored by a Taylor estimate before training.",
    params={
        **PARAMS,
        "score": one_of(["gate", "weight", "adapter"]),
        "selection": one_of(["global", "per_layer"]),
        "top_k": positive_int(),
        "keep_fraction": fraction(),
        "score_batches": positive_int(),
        "warmup_learning_rate": positive_float(1.0),
    },
    defaults={
        **DEFAULTS,
        "score": "gate",
        "selection": "global",
        "top_k": None,
        "keep_fraction": 0.5,
        "score_batches": 8,
        "warmup_learning_rate": 1e-3,
    },
    learning_rates=LEARNING_RATES,
    rules=_rules,
    # Its artifact is plain peft LoRA (unselected heads are exact zeros), so the engine batches it as LoRA.
    serving=Serving(batched=True),
    refused_architectures={
        "gpt_neox": "its fused query_key_value interleaves q, k and v head by head ([q_h | k_h | v_h] per head h), "
        "and HEAT's head masks slice a fused layer as [q | k | v]",
    },
)
