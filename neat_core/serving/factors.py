"""Every served adapter as per-module low-rank factors, computed once at load time from the shared base model.

    LoRA:  A = lora_A   (r, d_in)     B = s · lora_B   (d_out, r)     s = lora_alpha / r   (rsLoRA: / √r)
    NEAT:  A = Hᵀ       (r, d_in)     B = s · B_w      (d_out, r)     H = stack(W0ᵀ A_wᵀ)  from the base weight W0

    Pear:  its exact LoRA export (the artifact's `lora/`): shared factors, plus the frozen residual's at pruned
           positions (rank 3r there, given in `rank_pattern`)
    HEAT:  plain LoRA (unselected heads are exact zeros)

so all compute `y = base(x) + (x Aᵀ) Bᵀ`, and a batch whose rows use different adapters runs through one base
model (see `neat_core.serving.batched`). Which methods are read, and how, belongs to each method (its spec's
`serving`, its `saved_factors`); this module reads files and matches tensor names. A NEAT adapter's factors are
exact only for the base weights they were computed from, which is why `load_factors` takes the serving base
model itself.

Only JSON and safetensors are read (an artifact cannot carry pickled code), and the base model is only read:
nothing is injected into it, so one frozen copy serves every adapter.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from neat_core.errors import ArtifactError
from neat_core.methods import get_method, method_names
from neat_core.methods.base import AdapterMethod

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"  # = neat_core.artifacts.MANIFEST, whose module pulls in export and model loading
PEFT_PREFIX = "base_model.model."  # peft saves every tensor under the wrapped model's name
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class AdapterFactors:
    """One adapter in servable form. Module names are the base model's own (`model.layers.0.self_attn.q_proj`)."""

    adapter_id: str
    method: str  # the artifact's method ("neat", "lora", "heat", "pear", ...)
    task: str  # "classification" | "causal_lm"
    rank: int
    factors: dict[str, tuple[Tensor, Tensor]]  # module -> (A (r, d_in), B (d_out, r)), every scale folded into B
    head: dict[str, Tensor] | None = None  # a classifier's own trained head, keyed like the base state dict
    labels: list[str] | None = None
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        tensors = [t for pair in self.factors.values() for t in pair] + list((self.head or {}).values())
        self.nbytes = sum(t.numel() * t.element_size() for t in tensors)


def load_factors(adapter_dir: str | Path, base_model: nn.Module, adapter_id: str | None = None) -> AdapterFactors:
    """Read a saved adapter whose method serves batched and turn it into per-module factors against `base_model`'s
    weights.

    Raises `ArtifactError` for a directory that is not a safetensors adapter, carries pickle files, does not fit
    this base model, or uses features a batched LoRA forward cannot express (all such features listed at once).
    """
    adapter_dir = Path(adapter_dir)
    config, tensors, manifest = _read(adapter_dir)
    export_dir = _export_dir(manifest, config)
    if export_dir is not None:  # e.g. Pear: its exact LoRA export is what the engine reads
        config, tensors, _ = _read(adapter_dir / export_dir)
    method = _reader(adapter_dir, str(config.get("peft_type")))
    pattern = re.compile(rf"^(?P<module>.+)\.{method.prefix}(?P<part>{method.spec.serving.factors})\.weight$")
    _check_base(adapter_dir, manifest, base_model)

    # A served model already wraps some layers (MultiAdapterLinear keeps the original as `base_layer`, like peft).
    modules = {name: _unwrapped(module) for name, module in base_model.named_modules()}
    problems = method.serving_problems(config)
    prefix = method.prefix

    parts: dict[str, dict[str, Tensor]] = {}  # module -> {"A": ..., "B": ..., "encoders.0": ...}
    head: dict[str, Tensor] = {}
    for key, tensor in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = pattern.match(name)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = tensor
        elif prefix in name:
            problems.append(f"tensor {name} (not a plain {prefix}A/B weight)")
        elif _is_linear_param(modules, name):
            head[name] = tensor  # modules_to_save: the adapter's own copy of a head layer
        else:
            problems.append(f"tensor {name} (only nn.Linear heads can be served per adapter)")
    for module in parts:
        if not isinstance(modules.get(module), nn.Linear | Conv1D):
            kind = type(modules[module]).__name__ if module in modules else "missing from the base model"
            problems.append(f"module {module} ({kind}; only nn.Linear and Conv1D)")
    labels = manifest.get("labels")
    if labels and head and not any(t.shape[0] == len(labels) for k, t in head.items() if k.endswith(".weight")):
        problems.append(f"no head layer has one output per label ({len(labels)} labels)")
    if problems:
        raise ArtifactError(f"{adapter_dir}: unsupported for batched serving: {'; '.join(problems)}")

    try:
        with torch.no_grad():
            factors = {m: method.saved_factors(modules[m], p, config, m) for m, p in parts.items()}
        rank = max([int(config["r"]), *(a.shape[0] for a, _ in factors.values())])
    except (KeyError, RuntimeError, ValueError) as e:  # missing parts, shapes of another base model
        raise ArtifactError(f"{adapter_dir}: adapter does not fit this base model: {e}") from e

    task = manifest.get("task") or ("classification" if config.get("task_type") == "SEQ_CLS" else "causal_lm")
    return AdapterFactors(
        adapter_id=adapter_id or str(adapter_dir),
        method=manifest.get("method") or method.name,
        task=task,
        rank=rank,
        factors=factors,
        head=head or None,
        labels=list(labels) if labels else None,
    )


def _export_dir(manifest: dict[str, Any], config: dict[str, Any]) -> str | None:
    """The subdirectory to serve instead of the artifact: named by the artifact's method's spec, the method known
    from the manifest or (no manifest) from a config key only that method writes."""
    methods = [get_method(name).spec for name in method_names()]
    named = manifest.get("method")
    for spec in methods:
        marked = spec.serving.config_marker is not None and config.get(spec.serving.config_marker) is not None
        if spec.serving.export_dir and (spec.name == named or marked):
            return spec.serving.export_dir
    return None


def _reader(adapter_dir: Path, peft_type: str) -> AdapterMethod:
    """The method whose own saved format this is and that the engine reads as factors (HEAT's plain LoRA is read by
    LoRA: the method that owns peft_type "LORA")."""
    readers = [get_method(n) for n in method_names() if get_method(n).spec.serving.factors]
    for method in readers:
        if method.peft_type == peft_type and method.owns_peft_type:
            return method
    names = ", ".join(m.name for m in readers)
    raise ArtifactError(f"{adapter_dir}: peft_type {peft_type!r} cannot be served batched (only {names})")


def _read(adapter_dir: Path) -> tuple[dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """(adapter_config, tensors, manifest or {}), refusing anything pickled."""
    if not adapter_dir.is_dir():
        raise ArtifactError(f"{adapter_dir} is not an adapter directory")
    pickled = sorted(str(p.relative_to(adapter_dir)) for p in adapter_dir.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise ArtifactError(f"{adapter_dir} contains pickle files ({', '.join(pickled)}); only safetensors is read")
    try:
        config = json.loads((adapter_dir / CONFIG).read_text())
        manifest = json.loads((adapter_dir / MANIFEST).read_text()) if (adapter_dir / MANIFEST).exists() else {}
        tensors = load_file(adapter_dir / WEIGHTS)
    except (OSError, ValueError, SafetensorError) as e:
        raise ArtifactError(f"{adapter_dir} is not a safetensors adapter: {e}") from e
    return config, tensors, manifest


def _check_base(adapter_dir: Path, manifest: dict[str, Any], base_model: nn.Module) -> None:
    """A NEAT adapter's factors are only right for its own base model; refuse an obviously different one."""
    wanted = manifest.get("base_model")
    loaded = getattr(getattr(base_model, "config", None), "name_or_path", None)
    if wanted and loaded and wanted != loaded:
        raise ArtifactError(f"{adapter_dir} was trained on {wanted}, not on the loaded base model {loaded}")


def _unwrapped(module: nn.Module) -> nn.Module:
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def _is_linear_param(modules: dict[str, nn.Module], name: str) -> bool:
    module, _, param = name.rpartition(".")
    return isinstance(modules.get(module), nn.Linear) and param in ("weight", "bias")
