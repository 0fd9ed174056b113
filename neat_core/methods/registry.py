"""Adapter methods by name, and the two entry points that use them: `attach` and `method_of`.

Methods are discovered (`specs.method_packages`: the subpackages of neat_core.methods, `NEAT_METHOD_PACKAGES`,
`register_package`); each package's `model.METHOD` is imported on first use, never at import of this module's
torch-free neighbour `specs`."""

from __future__ import annotations

import importlib
from typing import Any

from peft import PeftModel
from torch import nn

from neat_core.errors import InvalidHyperparameterError, MethodDefinitionError
from neat_core.methods.base import METHOD_TAG, AdapterMethod
from neat_core.methods.specs import all_specs


def _registry() -> dict[str, AdapterMethod]:
    """name -> method for every discovered package, in name order. Imports are cached by Python, so this is cheap
    after the first call and picks up packages registered since."""
    methods = {}
    for name, (package, spec) in sorted(all_specs().items()):
        try:
            method = importlib.import_module(f"{package}.model").METHOD
        except (ImportError, AttributeError) as e:
            raise MethodDefinitionError(f"method package {package!r} has no importable model.METHOD: {e}") from e
        if not isinstance(method, AdapterMethod) or method.spec is not spec:
            raise MethodDefinitionError(
                f"{package}.model.METHOD must be an AdapterMethod whose spec is {package}.spec.SPEC"
            )
        methods[name] = method
    return methods


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
