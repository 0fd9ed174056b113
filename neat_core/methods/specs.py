"""Which hyperparameters each method takes and what values they accept: pure data, no torch, so the web tier
rejects a bad job spec at creation (a 400) instead of the worker failing it later. Model-dependent checks (does a
target module exist?) happen in `AdapterMethod.resolve` once the model is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neat_core.errors import InvalidHyperparameterError

AUTO = "auto"

# transformers.activations.ACT2FN's keys (peft's PEANuT accepts exactly these); a test keeps the copy in sync.
ACTIVATIONS = (
    "gelu", "gelu_10", "gelu_accurate", "gelu_fast", "gelu_new", "gelu_python", "gelu_python_tanh",
    "gelu_pytorch_tanh", "hardswish", "laplace", "leaky_relu", "linear", "mish", "prelu", "quick_gelu", "relu",
    "relu2", "relu6", "sigmoid", "silu", "sqrtsoftplus", "swish", "tanh", "xielu",
)  # fmt: skip


@dataclass(frozen=True)
class Param:
    """One user-facing hyperparameter: its check and a short description of the values it accepts."""

    check: Callable[[Any], bool]
    allowed: str


def positive_int() -> Param:
    return Param(lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 4096, "an integer 1..4096")


def non_negative_int(limit: int) -> Param:
    return Param(lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= limit, f"an integer 0..{limit}")


def positive_float(limit: float = 1e4) -> Param:
    return Param(
        lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= limit,
        f"a number > 0 and <= {limit:g}",
    )


def probability() -> Param:
    return Param(lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v < 1, "a number in [0, 1)")


def fraction() -> Param:
    return Param(lambda v: isinstance(v, int | float) and not isinstance(v, bool) and 0 < v <= 1, "a number in (0, 1]")


def one_of(choices: list[str]) -> Param:
    return Param(lambda v: v in choices, ", ".join(choices) if len(choices) < 12 else f"one of {len(choices)} names")


def module_names() -> Param:
    return Param(
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(s, str) and s for s in v),
        "a non-empty list of module names",
    )


METHOD_PARAMS: dict[str, dict[str, Param]] = {
    "neat": {
        "r": positive_int(),
        "depth": non_negative_int(8),
        "act_fn": one_of(list(ACTIVATIONS)),
        "scaling": positive_float(),
        "target_modules": module_names(),
    },
    "lora": {
        "r": positive_int(),
        "lora_alpha": positive_float(),
        "lora_dropout": probability(),
        "target_modules": module_names(),
    },
    "lily": {  # peft's LilyConfig names, plus the router mode (ours; see neat_core/methods/lily.py)
        "r": positive_int(),
        "stride_A": positive_int(),
        "num_B": Param(lambda v: isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 256, "an integer 2..256"),
        "scaling": positive_float(),
        "router_mode": one_of(["batch", "per_sample"]),
        "target_modules": module_names(),
    },
    "heat": {  # LoRA's, plus how heads are scored and selected (neat_core.methods.heat)
        "r": positive_int(),
        "lora_alpha": positive_float(),
        "lora_dropout": probability(),
        "target_modules": module_names(),
        "score": one_of(["gate", "weight", "adapter"]),
        "selection": one_of(["global", "per_layer"]),
        "top_k": positive_int(),
        "keep_fraction": fraction(),
        "score_batches": positive_int(),
        "warmup_learning_rate": positive_float(1.0),
    },
    "pear": {  # LoRA's, plus the prune-and-share schedule (neat_core/methods/pear.py, docs/method-pear.md)
        "r": positive_int(),
        "lora_alpha": positive_float(),
        "lora_dropout": probability(),
        "target_modules": module_names(),
        "warmup_steps": Param(
            lambda v: isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 10_000_000, "an integer >= 1"
        ),
        "prune_fraction": probability(),
        "sharing": one_of(["same_type_best", "nearest"]),  # reconstruction
        "knowledge": one_of(["residual", "none"]),  # reconstruction
    },
}


def _heat_rules(explicit: dict[str, Any]) -> None:
    if "top_k" in explicit and "keep_fraction" in explicit:
        raise InvalidHyperparameterError("top_k", "give top_k or keep_fraction, not both", "one of the two")


# Checks across fields of one method, on the explicitly given values.
METHOD_RULES: dict[str, Callable[[dict[str, Any]], None]] = {"heat": _heat_rules}


# Methods whose adapters are low-rank factors per layer, so the serving engine batches them together over one base
# model (neat_core.serving); the others are served alone (Lily: its router is input-dependent, not low-rank factors).
# HEAT saves plain LoRA; Pear is served through its exact LoRA export.
BATCHED_METHODS = frozenset({"neat", "lora", "heat", "pear"})


def check_hyperparameters(method: str, hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The explicitly given (non-"auto") hyperparameters of `method`, checked; raises naming the bad field."""
    if method not in METHOD_PARAMS:
        raise InvalidHyperparameterError("method", f"unknown adapter method {method!r}", sorted(METHOD_PARAMS))
    params = METHOD_PARAMS[method]
    unknown = sorted(set(hyperparameters) - set(params))
    if unknown:
        raise InvalidHyperparameterError(unknown[0], f"not a hyperparameter of method {method!r}", sorted(params))
    explicit = {}
    for key, value in hyperparameters.items():
        if value is None or value == AUTO:
            continue
        if isinstance(value, tuple | set):
            value = list(value)
        if not params[key].check(value):
            raise InvalidHyperparameterError(key, f"invalid value {value!r}", params[key].allowed)
        explicit[key] = value
    if method in METHOD_RULES:
        METHOD_RULES[method](explicit)
    return explicit
