"""What an adapter method is, to the rest of neat_core: a named recipe that validates hyperparameters, resolves
"auto" values for a model, wraps the model in a peft adapter, and (if its update is low-rank) yields LoRA factors.

A new method is one module that defines an `AdapterMethod` subclass and calls `register(...)` on it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from peft import PeftConfig, PeftModel, TaskType, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_core.errors import InvalidHyperparameterError

AUTO = "auto"

# Which projections "auto" targets, per architecture family: the attention query and value projections, the
# setting the NEAT and LoRA papers report for their main results. Keyed by a module-name suffix that identifies
# the family (see shared/design/methods.md, "Where adapters go").
AUTO_TARGETS: dict[str, list[str]] = {
    "q_proj": ["q_proj", "v_proj"],  # Llama / SmolLM2 / Qwen2 / Mistral
    "query": ["query", "value"],  # BERT / RoBERTa / MiniLM / ViT
    "c_attn": ["c_attn"],  # GPT-2 (fused q,k,v Conv1D)
}


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


def one_of(choices: list[str]) -> Param:
    return Param(lambda v: v in choices, ", ".join(choices) if len(choices) < 12 else f"one of {len(choices)} names")


def module_names() -> Param:
    return Param(
        lambda v: isinstance(v, list) and len(v) > 0 and all(isinstance(s, str) and s for s in v),
        "a non-empty list of module names",
    )


def adaptable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every layer an adapter can wrap: `nn.Linear` and GPT-2's `Conv1D`, heads excluded."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear | Conv1D) and name.rsplit(".", 1)[-1] not in (
            "classifier",
            "score",
            "lm_head",
        ):
            yield name, module


def auto_target_modules(model: nn.Module) -> list[str]:
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in adaptable_modules(model)}
    for marker, targets in AUTO_TARGETS.items():
        if marker in suffixes:
            return targets
    raise InvalidHyperparameterError(
        "target_modules", "'auto' does not know this architecture; name the modules", sorted(suffixes)
    )


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Every listed name must match (as a dotted-name suffix, peft's rule) at least one adaptable layer."""
    names = [name for name, _ in adaptable_modules(model)]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise InvalidHyperparameterError(
                "target_modules", f"{target!r} matches no linear layer of this model", suffixes
            )


def task_type_of(model: nn.Module) -> TaskType:
    """Sequence classification heads need peft's SEQ_CLS (it trains and saves the head); the rest is causal LM."""
    return TaskType.SEQ_CLS if type(model).__name__.endswith("ForSequenceClassification") else TaskType.CAUSAL_LM


class AdapterMethod:
    """Base class for one registered method. Subclasses set the class attributes and `peft_config`."""

    name: ClassVar[str]
    peft_type: ClassVar[str]  # the peft_type its artifacts are saved with
    prefix: ClassVar[str]  # every adapter parameter name contains this; save/load and freezing rely on it
    params: ClassVar[dict[str, Param]]
    exportable_to_lora: ClassVar[bool] = False
    # True when unmerge restores a saved copy of the original weight (bit-for-bit); False when it subtracts the
    # recomputed update (peft's LoRA), which is exact only up to float rounding.
    exact_unmerge: ClassVar[bool] = False

    def defaults(self, model: nn.Module) -> dict[str, Any]:
        """Concrete values for every hyperparameter left out or given as "auto"."""
        raise NotImplementedError

    def learning_rate(self, task: str) -> float:
        """The measured base learning rate for `task` ("classification" | "causal_lm"); see docs/benchmarks.md."""
        raise NotImplementedError

    def peft_config(self, model: nn.Module, hp: dict[str, Any]) -> PeftConfig:
        raise NotImplementedError

    def wrap(self, model: nn.Module, config: PeftConfig) -> PeftModel:
        return get_peft_model(model, config)

    def load(self, model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable)

    def lora_factors(self, layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A [r, d_in], lora_B [d_out, r]) with the scale folded into B, for exact LoRA export."""
        raise NotImplementedError(f"{self.name} adapters cannot be exported to LoRA")

    def resolve(self, model: nn.Module, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """Validate user hyperparameters and fill in every "auto" one; the result is what gets reported back."""
        unknown = sorted(set(hyperparameters) - set(self.params))
        if unknown:
            raise InvalidHyperparameterError(
                unknown[0], f"not a hyperparameter of method {self.name!r}", sorted(self.params)
            )
        resolved = self.defaults(model)
        for key, value in hyperparameters.items():
            if value is None or value == AUTO:
                continue
            if isinstance(value, tuple | set):
                value = list(value)
            if not self.params[key].check(value):
                raise InvalidHyperparameterError(key, f"invalid value {value!r}", self.params[key].allowed)
            resolved[key] = value
        check_target_modules(model, resolved["target_modules"])
        return resolved


_REGISTRY: dict[str, AdapterMethod] = {}


def register(method: AdapterMethod) -> AdapterMethod:
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> AdapterMethod:
    if name not in _REGISTRY:
        raise InvalidHyperparameterError("method", f"unknown adapter method {name!r}", sorted(_REGISTRY))
    return _REGISTRY[name]


def method_names() -> list[str]:
    return sorted(_REGISTRY)
