"""Equal trainable-parameter budgets: each method's rank sized so that its adapter has as many parameters as LoRA's
default on the same model.

Why: a method's defaults give it a different size on every model (on SmolLM2, where v_proj is 576 -> 192, NEAT r = 8
has 368,640 parameters against LoRA r = 8's 460,800; Lily's defaults 316,224), and on the benchmark's runs the size
moved the score by more than the seed noise (docs/quality.md). The quality table compares methods at equal budgets;
`auto`, which orders its candidates by that table, compares and trains them at the budget the table measured.

Counts are taken on the architecture alone (`neat_core.models.loading.skeleton`: the meta device, no weights, no
memory), as the adapter is when attached: HEAT and Pear remove parameters later in training (unselected heads,
pruned positions), which is part of the method, not of its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from neat_core.artifacts import parameter_counts
from neat_core.methods.registry import attach, get_method

REFERENCE = "lora"  # the budget: LoRA's default rank on the run's model and targets


def adapter_parameters(build: Callable[[], nn.Module], method: str, **hyperparameters) -> int:
    """The adapter's parameter count when `method` is attached to a fresh `build()` (attaching changes the model)."""
    return parameter_counts(attach(build(), method, **hyperparameters))["adapter_parameters"]


def equal_budget_ranks(build: Callable[[], nn.Module], methods: Sequence[str]) -> tuple[int, dict[str, int]]:
    """(the budget, each method's rank): the rank whose count is nearest the budget, at least 1.

    Every registered method's count is affine in its rank r for fixed targets (per target: r * (d_in + d_out) for
    LoRA, with sharing and routers for Lily; NEAT's encoder/decoder pair likewise), so two counts give the line;
    a method whose count is not (a third point off the line) keeps its default rank rather than being mis-sized.
    """
    budget = adapter_parameters(build, REFERENCE)
    ranks: dict[str, int] = {}
    for name in methods:
        default = get_method(name).spec.defaults.get("r")
        if not isinstance(default, int):
            continue  # no rank to size (none of today's methods)
        one, two = adapter_parameters(build, name, r=1), adapter_parameters(build, name, r=2)
        slope, intercept = two - one, 2 * one - two
        if slope <= 0:
            ranks[name] = default
            continue
        rank = max(1, round((budget - intercept) / slope))
        affine = adapter_parameters(build, name, r=rank) == intercept + slope * rank
        ranks[name] = rank if affine else default
    return budget, ranks
