"""Pear's hyperparameters (LoRA's, plus the prune-and-share schedule), defaults and serving; torch-free."""

from __future__ import annotations

from neat_core.methods.lora.spec import DEFAULTS, LEARNING_RATES, PARAMS
from neat_core.methods.specs import MethodSpec, Serving, int_range, one_of, probability

SPEC = MethodSpec(
    name="pear",
    description="LoRA that, after a warm-up, prunes its least important positions; they then share a kept adapter.",
    params={
        **PARAMS,
        "warmup_steps": int_range(1, 10_000_000, "an integer >= 1"),
        "prune_fraction": probability(),
        "sharing": one_of(["same_type_best", "nearest"]),  # reconstruction
        "knowledge": one_of(["residual", "none"]),  # reconstruction
    },
    defaults={
        **DEFAULTS,
        # A step count, not a fraction: the method's hooks do not know the run's length. 100 steps of batch 16 is
        # most of one epoch of the 2,000-tweet benchmark (bench/quality.py).
        "warmup_steps": 100,
        "prune_fraction": 0.5,
        "sharing": "same_type_best",
        "knowledge": "residual",
    },
    learning_rates=LEARNING_RATES,
    # Pear's own weights share tensors between positions and carry residuals; its exact LoRA export, written
    # beside them in `lora/`, is plain LoRA (per-module ranks in rank_pattern), and that is what the engine batches.
    # Without a manifest, the "pear" key of adapter_config.json (the prune record) marks a Pear artifact.
    serving=Serving(batched=True, export_dir="lora", config_marker="pear"),
)
