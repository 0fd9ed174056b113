"""Every served adapter as per-module low-rank factors, computed once at load time from the shared base model.

    LoRA:  A = lora_A   (r, d_in)     B = s · lora_B   (d_out, r)     s = lora_alpha / r   (rsLoRA: / √r)
    NEAT:  A = Hᵀ       (r, d_in)     B = s · B_w      (d_out, r)     H = stack(W0ᵀ A_wᵀ)  from the base weight W0

    Pear:  its exact LoRA export (the artifact's `lora/`): shared factors, plus the frozen residual's at pruned
           positions (rank 3r there, given in `rank_pattern`)

so all compute `y = base(x) + (x Aᵀ) Bᵀ`, and a batch whose rows use different adapters runs through one base
model (see `neat_core.serving.batched`). A NEAT adapter's factors are exact only for the base weights they were
computed from, which is why `load_factors` takes the serving base model itself.

Only JSON and safetensors are read (an artifact cannot carry pickled code), and the base model is only read:
nothing is injected into it, so one frozen copy serves every adapter.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from neat_core.errors import ArtifactError
from neat_core.methods import get_method
from neat_core.methods.neat import neat_hidden

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
MANIFEST = "manifest.json"  # = neat_core.artifacts.MANIFEST, whose module pulls in export and model loading
PEFT_PREFIX = "base_model.model."  # peft saves every tensor under the wrapped model's name
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

# The methods whose saved adapters become factors here, and the parts of each (after the method's prefix) that
# the key of every adapter tensor must name: NEAT's A, B and encoder/decoder stack, LoRA's A and B.
SERVABLE = {"neat": r"A|B|encoders\.\d+|decoders\.\d+", "lora": r"A|B"}

# LoRA options that change the forward beyond `(x Aᵀ) Bᵀ`: config key -> value that means "not used".
LORA_PLAIN = {
    "use_dora": False,
    "bias": "none",
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,
}


@dataclass
class AdapterFactors:
    """One adapter in servable form. Module names are the base model's own (`model.layers.0.self_attn.q_proj`)."""

    adapter_id: str
    method: str  # "neat" | "lora"
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
    """Read a saved NEAT or LoRA adapter and turn it into per-module factors against `base_model`'s weights.

    Raises `ArtifactError` for a directory that is not a safetensors adapter, carries pickle files, does not fit
    this base model, or uses features a batched LoRA forward cannot express (all such features listed at once).
    """
    adapter_dir = Path(adapter_dir)
    config, tensors, manifest = _read(adapter_dir)
    if manifest.get("method") == "pear" or config.get("pear") is not None:
        # Pear's own weights share tensors between positions and carry residuals; its exact LoRA export, written
        # beside them, is plain LoRA (per-module ranks in rank_pattern).
        config, tensors, _ = _read(adapter_dir / "lora")
    peft_type = str(config.get("peft_type"))
    method = next((m for m in map(get_method, SERVABLE) if m.peft_type == peft_type), None)
    if method is None:
        raise ArtifactError(f"{adapter_dir}: peft_type {peft_type!r} cannot be served batched (only NEAT and LoRA)")
    _check_base(adapter_dir, manifest, base_model)

    # A served model already wraps some layers (MultiAdapterLinear keeps the original as `base_layer`, like peft).
    modules = {name: _unwrapped(module) for name, module in base_model.named_modules()}
    problems: list[str] = []
    if method.name == "lora":
        problems += [f"{key}={config[key]!r}" for key in LORA_PLAIN if not _is_plain(config, key)]
    elif config.get("act_fn", "relu") not in ACT2FN:
        problems.append(f"act_fn={config['act_fn']!r}")
    prefix = method.prefix
    pattern = re.compile(rf"^(?P<module>.+)\.{prefix}(?P<part>{SERVABLE[method.name]})\.weight$")

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

    to_factors = _neat_module if method.name == "neat" else _lora_module
    try:
        with torch.no_grad():
            factors = {m: to_factors(modules[m], p, config, m) for m, p in parts.items()}
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


def _is_plain(config: dict[str, Any], key: str) -> bool:
    value, plain = config.get(key, LORA_PLAIN[key]), LORA_PLAIN[key]
    return value == plain or (not value and not plain)


def _is_linear_param(modules: dict[str, nn.Module], name: str) -> bool:
    module, _, param = name.rpartition(".")
    return isinstance(modules.get(module), nn.Linear) and param in ("weight", "bias")


def _linear_view(layer: nn.Module) -> Tensor:
    """The base weight as (d_out, d_in): GPT-2's Conv1D stores it transposed."""
    return layer.weight.t() if isinstance(layer, Conv1D) else layer.weight


def _neat_module(
    layer: nn.Module, parts: dict[str, Tensor], config: dict[str, Any], module: str
) -> tuple[Tensor, Tensor]:
    w0 = _linear_view(layer)  # (d_out, d_in)
    depth = int(config.get("depth", 0))
    device = w0.device
    a_w = parts["A"].to(device, torch.float32)  # (r, d_out)
    encoders = [parts[f"encoders.{i}"].to(device, torch.float32) for i in range(depth)]
    decoders = [parts[f"decoders.{i}"].to(device, torch.float32) for i in range(depth)]
    if a_w.shape[1] != w0.shape[0]:
        raise ValueError(f"peanut_A is {tuple(a_w.shape)} but the base weight has d_out={w0.shape[0]}")
    if len(parts) != 2 + 2 * depth:
        raise ValueError(f"expected depth {depth} (A, B, {depth} encoders and decoders), found {sorted(parts)}")
    # The adapter's dtype is fp32, as when it was trained; a low-precision base weight is upcast one module at a
    # time here (a transient copy), exactly as NeatLinear.hidden does outside autocast.
    h = neat_hidden(w0.t().to(torch.float32), a_w, encoders, decoders, config.get("act_fn", "relu"))  # (d_in, r)
    b = float(config.get("scaling", 1.0)) * parts["B"].to(device, torch.float32)  # (d_out, r)
    return h.t().contiguous(), b.contiguous()


def _pattern(patterns: dict[str, Any] | None, module: str, default: Any) -> Any:
    r"""peft's rank_pattern / alpha_pattern lookup: the first key that matches the module name as `(.*\.)?key$`."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _lora_module(
    layer: nn.Module, parts: dict[str, Tensor], config: dict[str, Any], module: str
) -> tuple[Tensor, Tensor]:
    d_out, d_in = _linear_view(layer).shape
    device = layer.weight.device
    a, b = parts["A"].to(device, torch.float32), parts["B"].to(device, torch.float32)  # (r, d_in), (d_out, r)
    r = int(_pattern(config.get("rank_pattern"), module, config["r"]))
    if a.shape != (r, d_in) or b.shape != (d_out, r):
        raise ValueError(f"lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit ({d_out}, {d_in}) at r={r}")
    alpha = float(_pattern(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return a.contiguous(), (scale * b).contiguous()
