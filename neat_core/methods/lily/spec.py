"""Lily's hyperparameters (peft's LilyConfig names, plus our router mode), defaults and serving; torch-free."""

from __future__ import annotations

from neat_core.methods.specs import (
    AUTO,
    MethodSpec,
    Serving,
    int_range,
    module_names,
    one_of,
    positive_float,
    positive_int,
)

ROUTER_MODES = ("batch", "per_sample")
TRAINING_ROUTER_MODE = "batch"  # faithful to the paper and to peft
SERVING_ROUTER_MODE = "per_sample"  # a request's answer must not depend on what else is in its batch

SPEC = MethodSpec(
    name="lily",
    description="LoRA with its halves shared across layers: experts mixed per layer by a router.",
    params={
        "r": positive_int(),
        "stride_A": positive_int(),
        "num_B": int_range(2, 256),
        "scaling": positive_float(),
        "router_mode": one_of(ROUTER_MODES),
        "target_modules": module_names(),
    },
    # Equal budget with LoRA r=8 on query,value of MiniLM (73,728 adapter parameters): per target type
    # n_A·d_in·r + E·r·d_out + L·r·E = 2·384·24 + 2·24·384 + 6·24·2 = 37,152, so 74,304 in all (+0.8%).
    # r = 3× LoRA's, stride_A = 3, num_B = 2 = layers / stride_A: peft's advice (larger r, fewer A and B).
    defaults={
        "r": 24,
        "stride_A": 3,
        "num_B": 2,
        "scaling": 1.0,
        "router_mode": TRAINING_ROUTER_MODE,
        "target_modules": AUTO,
    },
    # scaling 1 where LoRA's default alpha/r is 2: twice LoRA's rate keeps the update's step comparable.
    learning_rates={"classification": 2e-3, "causal_lm": 1e-3},
    # Not batched: the router makes the update input-dependent, not low-rank factors. Served alone, on a whole
    # peft model per adapter, concurrent requests batched together in per-sample mode.
    serving=Serving(batched=False),
)
