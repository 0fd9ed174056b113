"""Adapter methods by name, and the two entry points that use them: `attach` and `method_of`."""

from __future__ import annotations

import importlib
from typing import Any

from peft import PeftModel
from torch import nn

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods.base import METHOD_TAG, AdapterMethod

# One module per method; each calls `register` when imported. Imported on first use of the registry, so that
# importing `neat_core.methods.specs` (torch-free) does not pull them in.
BUILTIN_METHODS = (
    "neat_core.methods.neat",
    "neat_core.methods.lora",
    "neat_core.methods.lily",
    "neat_core.methods.heat",
    "neat_core.methods.pear",
)

_REGISTRY: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    _REGISTRY[method.name] = method
    return method


def _registry() -> dict[str, AdapterMethod]:
    for module in BUILTIN_METHODS:
        importlib.import_module(module)
    return _REGISTRY


def get_method(name: str) -> AdapterMethod:
    methods = _registry()
    if name not in methods:
        raise InvalidHyperparameterError("method", f"unknown adapter method {name!r}", sorted(methods))
    return methods[name]


def method_names() -> list[str]:
    return sorted(_registry())


def attach(model: nn.Module, method: str = "neat", **hyperparameters: Any) -> PeftModel:
    """Wrap a transformers model with a fresh adapter of `method`; left-out or "auto" hyperparameters resolve to
    the method's defaults for this model. Bad names or values raise `InvalidHyperparameterError`."""
    chosen = get_method(method)
    resolved = chosen.resolve(model, hyperparameters)
    return chosen.wrap(model, chosen.peft_config(model, resolved))


def method_of(model: PeftModel) -> AdapterMethod:
    """The registered method behind a wrapped model: the tag `AdapterMethod.wrap`/`load` put on it; else the
    method its peft config names (`neat_method`: Pear's config class carries it); else (a model wrapped or loaded
    by stock peft) the method that owns its peft_type. Several methods save the same format (HEAT's and Pear's
    artifacts are peft LoRA), so the artifact's manifest, not its peft_type, names the method; a HEAT adapter
    loaded by stock peft is a LoRA adapter, which is exactly what it is."""
    tagged = getattr(model, METHOD_TAG, None)
    if tagged is not None:
        return get_method(tagged)
    config = model.peft_config[model.active_adapter]
    named = getattr(config, "neat_method", None)
    if named is not None:
        return get_method(named)
    peft_type = str(config.peft_type.value)
    for method in _registry().values():
        if method.peft_type == peft_type and method.owns_peft_type:
            return method
    raise InvalidHyperparameterError("peft_type", f"no registered method handles {peft_type}", method_names())
