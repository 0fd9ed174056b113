"""What an adapter method is, to the rest of neat_core: a named recipe that validates hyperparameters, resolves
"auto" values for a model, wraps the model in a peft adapter, and (if its update is low-rank) yields LoRA factors.

A method is one package (see `neat_core.methods.specs`): its torch-free `spec.SPEC` and, in `model.py`, `METHOD`,
an instance of an `AdapterMethod` subclass whose `spec` is that SPEC. The registry discovers it; nothing else
names it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch
from peft import PeftConfig, PeftModel, PeftType, TaskType, get_peft_model
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from torch import nn
from transformers.pytorch_utils import Conv1D

from neat_core.errors import InvalidHyperparameterError
from neat_core.methods.specs import AUTO, MethodSpec, check_architecture
from neat_core.models.architectures import architecture_name, auto_targets
from neat_core.models.loading import FRESH_HEAD

METHOD_TAG = "neat_adapter_method"  # attribute on a wrapped PeftModel: the registered method's name

_TUNER_SWAP = threading.Lock()  # one lock: every swap edits the same global map


@contextmanager
def tuner_swapped(peft_type: PeftType, tuner: type) -> Iterator[None]:
    """Make peft build `tuner`'s layers for `peft_type` adapters while a model is wrapped or loaded. peft picks the
    tuner class from a global map keyed by `peft_type`, and PEANuT and Lily have no hook for custom layers (unlike
    LoRA): swapping our subclass in for the duration of the call keeps the artifact's `peft_type` (and so stock-peft
    loading) while the layers in memory are ours. The lock keeps concurrent wraps from interleaving."""
    with _TUNER_SWAP:
        original = PEFT_TYPE_TO_TUNER_MAPPING[peft_type]
        PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = tuner
        try:
            yield
        finally:
            PEFT_TYPE_TO_TUNER_MAPPING[peft_type] = original


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
    """What `target_modules: "auto"` means for this model: its architecture's attention query and value projections
    (or the fused layer holding them), from `neat_core.models.architectures`."""
    suffixes = {name.rsplit(".", 1)[-1] for name, _ in adaptable_modules(model)}
    targets = auto_targets(model_type_of(model), suffixes)
    if targets is None:
        raise InvalidHyperparameterError(
            "target_modules", f"'auto' does not know {architecture_name(model_type_of(model))} models; name the "
            "modules", sorted(suffixes),
        )  # fmt: skip
    return targets


def model_type_of(model: nn.Module) -> str | None:
    """transformers' `model_type` of a (possibly peft-wrapped) model: which row of the architecture table it is."""
    return getattr(getattr(model, "config", None), "model_type", None)


def check_target_modules(model: nn.Module, targets: list[str]) -> None:
    """Every listed name must match (as a dotted-name suffix, peft's rule) at least one adaptable layer."""
    names = [name for name, _ in adaptable_modules(model)]
    for target in targets:
        if not any(name == target or name.endswith("." + target) for name in names):
            suffixes = sorted({n.rsplit(".", 1)[-1] for n in names})
            raise InvalidHyperparameterError(
                "target_modules", f"{target!r} matches no linear layer of this model", suffixes
            )


def head_modules(model: nn.Module) -> list[str] | None:
    """The modules peft must train and save beside the adapter besides `classifier`/`score` (which SEQ_CLS adds
    itself): a classifier's randomly initialised head layers (`neat_core.models.loading.FRESH_HEAD`), or None."""
    return list(getattr(model, FRESH_HEAD, None) or []) or None


def task_type_of(model: nn.Module) -> TaskType:
    """Sequence classification heads need peft's SEQ_CLS (it trains and saves the head); the rest is causal LM."""
    return TaskType.SEQ_CLS if type(model).__name__.endswith("ForSequenceClassification") else TaskType.CAUSAL_LM


def task_of(model: nn.Module) -> str:
    """The task name specs key their defaults and learning rates by: "classification" | "causal_lm"."""
    return "classification" if task_type_of(model) == TaskType.SEQ_CLS else "causal_lm"


def linear_view(layer: nn.Module) -> torch.Tensor:
    """The base weight as (d_out, d_in): GPT-2's Conv1D stores it transposed."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


class AdapterMethod:
    """Base class for one method. Subclasses set `spec` (its name comes from there), the other class attributes
    and `peft_config`."""

    spec: ClassVar[MethodSpec]
    name: ClassVar[str]
    peft_type: ClassVar[str]  # the peft_type its artifacts are saved with
    # False for a method whose artifacts are another method's format (HEAT saves plain LoRA): a wrapped model is
    # then recognised as this method only by the tag `wrap`/`load` put on it (see `registry.method_of`).
    owns_peft_type: ClassVar[bool] = True
    prefix: ClassVar[str]  # every adapter parameter name contains this; save/load and freezing rely on it
    exportable_to_lora: ClassVar[bool] = False
    # False when the update depends on the input (Lily's router): merge raises NotImplementedError, never merges.
    mergeable: ClassVar[bool] = True
    # True when unmerge restores a saved copy of the original weight (bit-for-bit); False when it subtracts the
    # recomputed update (peft's LoRA), which is exact only up to float rounding.
    exact_unmerge: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            cls.name = cls.spec.name

    def defaults(self, model: nn.Module) -> dict[str, Any]:
        """Concrete values for every hyperparameter left out or given as "auto": the spec's for this model's task,
        with `target_modules: "auto"` resolved from the architecture."""
        values = self.spec.defaults_for(task_of(model))
        if values.get("target_modules") == AUTO:
            values["target_modules"] = auto_target_modules(model)
        return values

    def learning_rate(self, task: str) -> float:
        """The measured base learning rate for `task` ("classification" | "causal_lm"); see docs/benchmarks.md."""
        return self.spec.learning_rates[task]

    def peft_config(self, model: nn.Module, hp: dict[str, Any]) -> PeftConfig:
        raise NotImplementedError

    def wrap(self, model: nn.Module, config: PeftConfig) -> PeftModel:
        return self.tag(get_peft_model(model, config))

    def load(self, model: nn.Module, adapter_dir: str, is_trainable: bool = False) -> PeftModel:
        return self.tag(PeftModel.from_pretrained(model, adapter_dir, is_trainable=is_trainable))

    def tag(self, model: PeftModel) -> PeftModel:
        """Record on the wrapped model which method made it: `registry.method_of` reads it first, since a peft_type
        alone does not say (HEAT and LoRA both save "LORA")."""
        setattr(model, METHOD_TAG, self.name)
        return model

    def held_at_zero(self, model: PeftModel) -> int:
        """Adapter entries that require grad but a gradient mask keeps at exactly zero (HEAT's unselected heads):
        never trained, so `parameter_counts` does not count them."""
        return 0

    def lora_factors(self, layer: nn.Module, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(lora_A [r, d_in], lora_B [d_out, r]) with the scale folded into B, for exact LoRA export."""
        raise NotImplementedError(f"{self.name} adapters cannot be exported to LoRA")

    # ---- serving: only for methods whose spec names `serving.factors` (their own format, read as factors) ----

    def serving_problems(self, config: dict[str, Any]) -> list[str]:
        """adapter_config.json options the batched forward `y = base(x) + (x Aᵀ) Bᵀ` cannot express, as `key=value`
        strings (the serving tier lists them all at once)."""
        return []

    def saved_factors(
        self, layer: nn.Module, parts: dict[str, torch.Tensor], config: dict[str, Any], module: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (r, d_in), B (d_out, r)), every scale folded into B, fp32, on `layer`'s device, from one module's saved
        tensors (`parts`: keyed by what `spec.serving.factors` matched) and the base `layer` they adapt. Raises
        ValueError/KeyError when they do not fit the layer."""
        raise NotImplementedError(f"{self.name} adapters are not served from their own format")

    # ---- training hooks: the loop calls these; the defaults do nothing (NEAT, LoRA) ----
    # A method's `state` is JSON: it goes into every checkpoint and the artifact's manifest, and on resume it is
    # handed to `restore` rather than recomputed, so a resumed run makes the decisions the first run made.

    def before_training(self, model: PeftModel, hp: dict[str, Any], batches: Iterator[dict]) -> dict[str, Any]:
        """Data-dependent set-up once the adapter is attached and before the optimiser exists (HEAT scores heads
        on `batches`: training batches on the model's device, epoch 0's order, as many as it takes). Returns the
        method's state."""
        return {}

    def restore(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any]) -> None:
        """Re-apply what `before_training` and `after_step` did, from `state`, to a freshly attached adapter
        (resume); the optimiser is built afterwards."""

    def after_backward(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any], step: int) -> None:
        """Gradients are in `.grad` (before clipping and the optimiser step): accumulate importance into `state`."""

    def after_step(self, model: PeftModel, hp: dict[str, Any], state: dict[str, Any], step: int) -> bool:
        """After optimiser step `step` (1-based). True when the set of trainable parameters changed (Pear's
        pruning): the loop rebuilds the optimiser over the new set, keeping surviving parameters' moments."""
        return False

    def resolve(self, model: nn.Module, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        """Validate user hyperparameters and fill in every "auto" one; the result is what gets reported back. A method
        refused on this architecture is refused here too (the web tier refuses it earlier, at job creation)."""
        check_architecture(self.name, model_type_of(model))
        resolved = {**self.defaults(model), **self.spec.check(hyperparameters)}
        check_target_modules(model, resolved["target_modules"])
        return resolved
