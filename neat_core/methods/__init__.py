"""Adapter methods by name. Importing this package registers every built-in method (one module each)."""

from __future__ import annotations

from typing import Any

from peft import PeftModel
from torch import nn

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods import lora, neat  # noqa: F401  (registration side effect)
from neat_core.methods.base import AUTO, AdapterMethod, get_method, method_names, register

__all__ = ["AUTO", "AdapterMethod", "attach", "get_method", "method_names", "method_of", "register"]


def attach(model: nn.Module, method: str = "neat", **hyperparameters: Any) -> PeftModel:
    """Wrap a transformers model with a fresh adapter of `method`; left-out or "auto" hyperparameters resolve to
    the method's defaults for this model. Bad names or values raise `InvalidHyperparameterError`."""
    chosen = get_method(method)
    resolved = chosen.resolve(model, hyperparameters)
    return chosen.wrap(model, chosen.peft_config(model, resolved))


def method_of(model: PeftModel) -> AdapterMethod:
    """The registered method behind a wrapped model, from its peft config."""
    peft_type = str(model.peft_config[model.active_adapter].peft_type.value)
    for name in method_names():
        if get_method(name).peft_type == peft_type:
            return get_method(name)
    raise InvalidHyperparameterError("peft_type", f"no registered method handles {peft_type}", method_names())
