"""LoRA's hyperparameters (peft's LoraConfig names), defaults and serving; torch-free. HEAT and Pear extend them."""

from __future__ import annotations

from neat_core.methods.specs import AUTO, MethodSpec, Serving, module_names, positive_float, positive_int, probability

PARAMS = {
    "r": positive_int(),
    "lora_alpha": positive_float(),
    "lora_dropout": probability(),
    "target_modules": module_names(),
}
DEFAULTS = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": AUTO}
LEARNING_RATES = {"classification": 1e-3, "causal_lm": 5e-4}

SPEC = MethodSpec(
    name="lora",
    description="Low-rank update matrices beside each frozen weight (the baseline).",
    params=PARAMS,
    defaults=DEFAULTS,
    learning_rates=LEARNING_RATES,
    serving=Serving(batched=True, factors=r"A|B"),
)
