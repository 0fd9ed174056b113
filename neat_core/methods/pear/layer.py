"""Pear's layers and pruning (prune and share adapters) — partly a reconstruction (docs/methods.md, "Pear").

LoRA modules at every target position train for `warmup_steps`; meanwhile each position accumulates a first-order
Taylor importance, Σ_steps |Σ_θ θ·∂L/∂θ| over its lora_A/lora_B. At the end of the warm-up the lowest
`prune_fraction` of positions are pruned: each pruned position's lora_A/lora_B become the very same `nn.Parameter`
objects as a kept adapter's of the same target type, so both positions train it and the rebuilt optimiser holds
it once. Reconstructed, and exposed as options:

- `sharing` — which kept adapter a pruned position calls: "same_type_best" (the most important kept one of its
  type) or "nearest" (the kept one of its type nearest in depth; ties go to the more important).
- `knowledge` — the "knowledge checkpoint": "residual" keeps, frozen at the pruned position, exactly what it lost:
  ΔW_p − ΔW_k (its own update minus the keeper's at the prune step), as factors of rank 2r

      A_res = [A_p ; A_k]          (2r, d_in)
      B_res = s · [B_p , −B_k]     (d_out, 2r)

  so the model's output right after pruning equals the output right before it; afterwards the position computes
  ΔW_k(t) + ΔW_p(t₀) − ΔW_k(t₀) and keeps adapting through the shared adapter. "none" drops the pruned adapters.
  Folding the knowledge into the base weight ("merge") is what merging a Pear adapter does (`merge_and_unload`
  adds the residual with the rest); it is not a separate training option, because a per-adapter base weight could
  not be batched over one shared base model in serving.

On disk (peft's LoRA layout, `peft_type: "LORA"`): kept positions' lora_A/lora_B once, each pruned position's frozen
`lora_residual_A/B`, and the prune record (share map, knowledge) in adapter_config.json under "pear". Before the
prune step the artifact is plain LoRA and stock peft loads it; after it, stock peft cannot (it would miss the
sharing and the residuals): load it with `neat_core` (`get_method("pear").load`), or load the exact LoRA export
(`lora/`: per position the shared factors, concatenated with the residual's at pruned ones — rank 3r there, given
in `rank_pattern`), which stock peft and the batched serving engine take as plain LoRA.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import transpose
from torch import nn
from transformers.pytorch_utils import Conv1D


class PearLinear(LoraLinear):
    """peft's LoRA layer plus an optional frozen residual per adapter (the knowledge checkpoint of a pruned
    position) and a note of which position's factors it shares. Wraps `nn.Linear` or GPT-2's `Conv1D`."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any):
        base = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        kwargs["is_target_conv_1d_layer"] = isinstance(base, Conv1D)  # merge_and_unload rebuilds a Conv1D
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        # Frozen, scale folded into B: A (2r, d_in), B (d_out, 2r). Not in `adapter_layer_names`, so peft's
        # set_adapter never makes them trainable; their names contain "lora_", so peft saves and loads them.
        self.lora_residual_A = nn.ParameterDict()
        self.lora_residual_B = nn.ParameterDict()
        self.shared_from: dict[str, str] = {}  # adapter -> the position whose lora_A/lora_B this one uses
        self.register_state_dict_post_hook(_drop_shared_factors)

    def residual(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if adapter not in self.lora_residual_A:
            return None
        return self.lora_residual_A[adapter], self.lora_residual_B[adapter]

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """LoRA's s·B A plus the residual's B_res A_res, in the base layer's layout (merge and unmerge use it)."""
        delta = super().get_delta_weight(adapter)
        residual = self.residual(adapter)
        if residual is not None:
            a, b = residual
            delta = delta + transpose(b @ a, self.fan_in_fan_out).to(delta.dtype)
        return delta

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("adapter_names") is not None and len(self.lora_residual_A):
            raise NotImplementedError("Pear layers with a residual do not support peft's mixed-adapter batches")
        result = super().forward(x, *args, **kwargs)  # (B, T, d_out)
        if self.disable_adapters or self.merged:
            return result
        for adapter in self.active_adapters:
            residual = self.residual(adapter)
            if residual is not None:
                a, b = residual
                up = F.linear(F.linear(self._cast_input_dtype(x, a.dtype), a), b)  # (B, T, 2r) -> (B, T, d_out)
                result = result + up.to(result.dtype)
        return result


def _drop_shared_factors(module: PearLinear, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    """A pruned position's lora_A/lora_B are its keeper's: save them once, under the keeper's name (safetensors
    refuses aliased tensors, and peft would otherwise write a clone per position)."""
    for adapter in module.shared_from:
        for part in ("lora_A", "lora_B"):
            state_dict.pop(f"{prefix}{part}.{adapter}.weight", None)


@dataclasses.dataclass
class PearConfig(LoraConfig):
    """peft's LoraConfig (so `peft_type` stays "LORA" and peft's LoRA machinery applies) that builds `PearLinear`
    layers and carries the prune record, so a saved adapter describes its own sharing."""

    pear: dict[str, Any] | None = dataclasses.field(
        default=None,
        metadata={"help": "the prune record: {'shares': {pruned position: kept position}, 'knowledge': ...}"},
    )
    neat_method: ClassVar[str] = "pear"  # registry.method_of: LoRA owns peft_type "LORA"; this config names Pear

    def __post_init__(self) -> None:
        super().__post_init__()
        self._register_custom_module({nn.Linear: PearLinear, Conv1D: PearLinear})


def pear_layers(model: nn.Module) -> Iterator[tuple[str, PearLinear]]:
    """(name, layer) of every adapter position, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, PearLinear):
            yield name, module


def target_type(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def choose_pruning(
    importance: dict[str, float], shapes: dict[str, tuple[int, int]], fraction: float, sharing: str
) -> dict[str, str]:
    """{pruned position: kept position it will share}. `importance` and `shapes` are keyed by position in model
    order. The lowest `fraction` of positions (rounded down) are pruned, least important first (ties: the earlier
    position), except that every target type keeps at least one adapter. A keeper always has the pruned
    position's type and shape."""
    names = list(importance)
    by_type: dict[str, list[str]] = {}
    for name in names:
        by_type.setdefault(target_type(name), []).append(name)
    kept_left = {t: len(members) for t, members in by_type.items()}
    budget = int(fraction * len(names))
    pruned: list[str] = []
    for name in sorted(names, key=lambda n: (importance[n], names.index(n))):
        if len(pruned) == budget:
            break
        if kept_left[target_type(name)] > 1:
            pruned.append(name)
            kept_left[target_type(name)] -= 1
    shares = {}
    for name in pruned:
        members = by_type[target_type(name)]
        kept = [n for n in members if n not in pruned and shapes[n] == shapes[name]]
        if not kept:
            raise ValueError(f"no kept adapter of the shape of {name}")
        if sharing == "same_type_best":
            keeper = max(kept, key=lambda n: (importance[n], -names.index(n)))
        else:  # "nearest": depth = index among the positions of the same type
            depth = members.index(name)
            keeper = min(kept, key=lambda n: (abs(members.index(n) - depth), -importance[n], names.index(n)))
        shares[name] = keeper
    return shares


@torch.no_grad()
def apply_pruning(model: PeftModel, adapter: str, record: dict[str, Any], fresh: bool) -> None:
    """Make every pruned position share its keeper's lora_A/lora_B (the same nn.Parameter objects) and, for
    knowledge "residual", give it its frozen residual: computed from the current weights when `fresh` (the prune
    step), zero-filled otherwise (resume, load: the saved values are loaded into it afterwards)."""
    layers = dict(pear_layers(model))
    for pruned, keeper in record["shares"].items():
        p, k = layers[pruned], layers[keeper]
        if record["knowledge"] == "residual":
            a_p, a_k = p.lora_A[adapter].weight, k.lora_A[adapter].weight  # (r, d_in)
            b_p, b_k = p.lora_B[adapter].weight, k.lora_B[adapter].weight  # (d_out, r)
            if fresh:
                a_res = torch.cat([a_p, a_k], dim=0)  # (2r, d_in)
                b_res = torch.cat([p.scaling[adapter] * b_p, -k.scaling[adapter] * b_k], dim=1)  # (d_out, 2r)
            else:
                a_res = a_p.new_zeros(2 * a_p.shape[0], a_p.shape[1])
                b_res = b_p.new_zeros(b_p.shape[0], 2 * b_p.shape[1])
            p.lora_residual_A[adapter] = nn.Parameter(a_res.detach().clone(), requires_grad=False)
            p.lora_residual_B[adapter] = nn.Parameter(b_res.detach().clone(), requires_grad=False)
        p.lora_A[adapter].weight = k.lora_A[adapter].weight
        p.lora_B[adapter].weight = k.lora_B[adapter].weight
        p.shared_from[adapter] = keeper
    model.peft_config[adapter].pear = {"shares": dict(record["shares"]), "knowledge": record["knowledge"]}
