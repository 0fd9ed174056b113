"""Exact LoRA export: a NEAT update has rank <= r, so for fixed base weights it *is* a LoRA adapter.

    lora_A.weight = Hᵀ       (r, d_in)      H computed from the original base weight
    lora_B.weight = s · B_w  (d_out, r)     lora_alpha = r, so LoRA's own scale is 1

The result is a standard peft LoRA directory (any LoRA server loads it). It is exact only for the base weights it
was computed from, so `export.json` records their hash; `check_base` refuses any other revision.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import save_file

from neat_core.errors import ArtifactError
from neat_core.methods import method_of


def adapted_layers(model: PeftModel) -> list[tuple[str, BaseTunerLayer]]:
    """(peft module name, layer) of every layer carrying the active adapter, in model order."""
    adapter = model.active_adapter
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, BaseTunerLayer) and any(adapter in getattr(module, n) for n in module.adapter_layer_names)
    ]


def _original_weight(layer: BaseTunerLayer) -> torch.Tensor:
    saved = getattr(layer, "_base_weight_before_merge", None)  # NEAT keeps W0 while merged
    return saved if layer.merged and saved is not None else layer.get_base_layer().weight


def base_weights_sha256(model: PeftModel, dtype: torch.dtype | None = None) -> str:
    """Hash of the frozen weights the adapter reads (every adapted layer, original values, model order), as they
    are or cast to `dtype`: an fp32 base cast to bf16 hashes as the same base loaded in bf16 (the same rounding)."""
    digest = hashlib.sha256()
    for name, layer in adapted_layers(model):
        weight = _original_weight(layer).detach().to("cpu", dtype=dtype).contiguous()
        digest.update(f"{name}:{weight.dtype}:{tuple(weight.shape)};".encode())
        digest.update(weight.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def export_lora(
    model: PeftModel, out_dir: str | os.PathLike, base_model_id: str | None = None, base_weights_hash: str | None = None
) -> Path:
    """Write the active adapter of `model` as a stock peft LoRA directory; returns its path. `base_weights_hash`:
    `base_weights_sha256(model)` if the caller already has it (hashing reads every adapted weight)."""
    method = method_of(model)
    if not method.exportable_to_lora:
        raise ArtifactError(f"{method.name} adapters have no exact LoRA form")
    adapter = model.active_adapter
    config = model.peft_config[adapter]
    r = config.r

    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}  # modules whose exported rank is not r (Pear's pruned positions: 3r)
    with torch.no_grad():
        for name, layer in adapted_layers(model):
            lora_a, lora_b = method.lora_factors(layer, adapter)  # (r, d_in), (d_out, r)
            tensors[f"{name}.lora_A.weight"] = lora_a.detach().float().cpu().contiguous()
            tensors[f"{name}.lora_B.weight"] = lora_b.detach().float().cpu().contiguous()
            if lora_a.shape[0] != r:
                rank_pattern[name.removeprefix("base_model.model.")] = lora_a.shape[0]
    # Non-adapter trainables (a classification head) travel unchanged, under peft's own saved names.
    for key, value in get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False).items():
        if method.prefix not in key:
            tensors[key] = value.detach().cpu().contiguous()

    fan_in_fan_out = any(getattr(layer, "fan_in_fan_out", False) for _, layer in adapted_layers(model))
    lora_config = LoraConfig(
        r=r,
        lora_alpha=r,  # scale 1: s is already folded into lora_B
        rank_pattern=rank_pattern,  # keys are full module names: peft matches them as `(.*\.)?name$`
        alpha_pattern=rank_pattern,  # scale 1 there too
        target_modules=sorted(config.target_modules) if config.target_modules else None,
        modules_to_save=config.modules_to_save,
        fan_in_fan_out=fan_in_fan_out,
        task_type=config.task_type,
        base_model_name_or_path=base_model_id or config.base_model_name_or_path,
    )

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.tmp"
    try:  # a write that fails removes its temporary directory
        tmp.mkdir(parents=True)
        lora_config.save_pretrained(tmp)
        save_file(tensors, tmp / "adapter_model.safetensors")
        (tmp / "export.json").write_text(
            json.dumps(
                {
                    "source_method": method.name,
                    "rank": r,
                    "base_weights_sha256": base_weights_hash or base_weights_sha256(model),
                    # the dtype the factors were computed against: exact for that base, off by its rounding on
                    # another (a bf16-trained adapter served on the fp32 base)
                    "base_dtype": str(_base_dtype(model)).removeprefix("torch."),
                },
                indent=2,
            )
        )
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_base(model: PeftModel, lora_dir: str | os.PathLike) -> None:
    """Raise unless `model`'s base weights are the ones the export in `lora_dir` was computed from."""
    info = json.loads((Path(lora_dir) / "export.json").read_text())
    dtype = getattr(torch, info.get("base_dtype", "float32"))
    if info["base_weights_sha256"] != base_weights_sha256(model, dtype if dtype != _base_dtype(model) else None):
        raise ArtifactError("this LoRA export was computed from different base weights; re-export it")


def _base_dtype(model: PeftModel) -> torch.dtype:
    return next(_original_weight(layer).dtype for _, layer in adapted_layers(model))
