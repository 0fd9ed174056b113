"""The finished-adapter directory, and loading it back for inference.

    adapter_config.json, adapter_model.safetensors   stock peft format (base_model_name_or_path filled in)
    manifest.json                                    method, hyperparameters, base model + weight hash, data
                                                     hashes, metrics, parameter counts, library versions
    lora/                                            the exact LoRA export (methods whose update is low-rank)

Only safetensors and JSON are ever read back: an artifact cannot carry pickled code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from neat_core.devices import resolve_device
from neat_core.errors import ArtifactError
from neat_core.export import base_weights_sha256, export_lora
from neat_core.methods import get_method, method_of
from neat_core.models.loading import load_base

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def parameter_counts(model: PeftModel) -> dict[str, int]:
    """Adapter parameters alone, and everything trainable (adapter + a classification head)."""
    method = method_of(model)
    held = method.held_at_zero(model)  # masked entries (HEAT): they require grad but never change
    adapter = sum(p.numel() for n, p in model.named_parameters() if method.prefix in n and p.requires_grad) - held
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) - held
    return {"adapter_parameters": adapter, "trainable_parameters": trainable}


def library_versions() -> dict[str, str]:
    return {name: version(name) for name in ("torch", "transformers", "peft", "safetensors")}


def save_artifact(model: PeftModel, out_dir: Path, *, base_model: str, manifest: dict[str, Any]) -> Path:
    """Write the artifact atomically (temporary directory, then rename); returns its path."""
    tmp = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex}.tmp"
    try:  # a write that fails (a full disk, an interrupt) removes its temporary directory; a killed one is swept
        tmp.mkdir(parents=True)
        write_adapter(model, tmp, base_model=base_model, manifest=manifest)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def write_adapter(
    model: PeftModel,
    directory: Path,
    *,
    base_model: str,
    manifest: dict[str, Any],
    weights_hash: str | None = None,
    export: bool = True,
) -> None:
    """An artifact's files into `directory`: peft's, the LoRA export (`export`, where the method's update is
    low-rank) and manifest.json. Also a checkpoint's `adapter/` (no export there: it costs a pass over the
    adapted weights, and a checkpoint is served from the native files). `weights_hash`: `base_weights_sha256`
    when the caller has it (hashing reads every adapted base weight; the base is frozen, so once per run)."""
    method = method_of(model)
    model.peft_config[model.active_adapter].base_model_name_or_path = base_model
    model.save_pretrained(directory, save_embedding_layers=False)  # True/"auto" would look the base up on a hub
    weights_hash = weights_hash or base_weights_sha256(model)
    if export and method.exportable_to_lora:
        export_lora(model, directory / "lora", base_model_id=base_model, base_weights_hash=weights_hash)
    full = {
        "format_version": FORMAT_VERSION,
        "created_at": int(time.time()),
        "method": method.name,
        "base_model": base_model,
        "base_weights_sha256": weights_hash,
        **parameter_counts(model),
        "versions": library_versions(),
        **manifest,
    }
    (directory / MANIFEST).write_text(json.dumps(full, indent=2, sort_keys=True))


def read_manifest(adapter_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(adapter_dir) / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{adapter_dir} is not an adapter artifact: {e}") from e


@dataclass
class LoadedAdapter:
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    manifest: dict[str, Any]


def load_artifact(
    adapter_dir: Path, *, cache_dir: Path | None = None, device: str = "auto", base_model_dir: Path | None = None
) -> LoadedAdapter:
    """Base model from the catalog (or `base_model_dir`, a registered model's) + the adapter on top, in eval mode,
    ready for inference."""
    manifest = read_manifest(adapter_dir)
    model, tokenizer = load_base(manifest["base_model"], task=manifest["task"], labels=manifest.get("labels"),
                                 cache_dir=cache_dir, model_dir=base_model_dir)  # fmt: skip
    try:
        peft_model = get_method(manifest["method"]).load(model, str(adapter_dir))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ArtifactError(f"cannot load the adapter in {adapter_dir}: {e}") from e
    return LoadedAdapter(peft_model.to(resolve_device(device)).eval(), tokenizer, manifest)
