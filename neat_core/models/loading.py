"""Loading a base model and its tokenizer for a task, from the catalog, a local directory, or the directory an
operator registered the model from (`model_dir`: the service looks registered ids up in its database, control.models,
and passes the directory here, so the model keeps its registered id as its name)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from neat_core.errors import IncompatibleTaskError, ModelNotFoundError
from neat_core.models.catalog import (
    CLASSIFICATION,
    CatalogEntry,
    catalog,
    entry,
    local_model_dir,
    package_dir,
    supported_tasks,
)

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "neat_core"
# Attribute on a loaded classifier: its randomly initialised Linear layers outside `classifier`/`score` (which peft
# saves anyway), e.g. DeBERTa-v2's `pooler.dense` and ModernBERT's `head.dense` (DistilBERT's `pre_classifier` too,
# which peft's `classifier` already matches as a suffix). Adapters train and save them with the head
# (`neat_core.methods.base.head_modules`): frozen, a reloaded adapter would meet a different random layer than the
# one it was trained with.
FRESH_HEAD = "neat_fresh_head"


def resolve(model_id: str, cache_dir: Path | None = None) -> Path:
    """The local directory holding `model_id`'s weights (converting a GGUF catalog entry the first time)."""
    found = entry(model_id)
    if found is not None:
        try:
            if found.gguf_file:
                return _dequantised(found, Path(cache_dir or DEFAULT_CACHE_DIR))
            return package_dir(found.package) / found.subdir
        except FileNotFoundError as e:
            raise ModelNotFoundError(model_id, sorted(e.id for e in catalog())) from e
    path = local_model_dir(model_id)
    if path is None:
        raise ModelNotFoundError(model_id, sorted(e.id for e in catalog()))
    return path


def _dequantised(found: CatalogEntry, cache: Path) -> Path:
    """Dequantise a GGUF file to an fp32 safetensors directory, once (about 20 s for SmolLM2; the cached directory
    then loads in well under a second). Written under a temporary name and renamed into place, so a crash or a
    concurrent conversion never leaves a half-written model behind."""
    target = cache / "models" / found.id.replace("/", "--")
    if (target / "config.json").exists():
        return target
    source = package_dir(found.package)
    if not (source / found.gguf_file).exists():
        raise FileNotFoundError(source / found.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=found.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=found.gguf_file)
    # save_pretrained refuses a model that still looks quantised; the weights are plain fp32 by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, target)
    except OSError:  # another process finished first; its copy is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _fresh_linear_layers(model: PreTrainedModel, missing_keys: set[str] | list[str]) -> list[str]:
    """The Linear layers whose weights the checkpoint lacks (transformers initialised them), heads peft saves aside."""
    modules = {key.rpartition(".")[0] for key in missing_keys}
    return sorted(
        name
        for name in modules
        if name
        and not {"classifier", "score"} & set(name.split("."))
        and isinstance(model.get_submodule(name), torch.nn.Linear)
    )


def load_base(
    model_id: str,
    *,
    task: str,
    labels: list[str] | None = None,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
    model_dir: Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen-to-be base model and its tokenizer for `task`; classification needs the label names.
    `model_dir`: the weights of `model_id` are there (a registered model; safetensors only, never a pickle)."""
    tasks = supported_tasks(str(model_dir) if model_dir is not None else model_id)
    if task not in tasks:
        raise IncompatibleTaskError(f"{model_id} cannot be fine-tuned for {task}; it supports: {', '.join(tasks)}")
    path = Path(model_dir) if model_dir is not None else resolve(model_id, cache_dir)
    # A registered directory was checked to hold no pickle; use_safetensors makes sure one added since is not read.
    safe = {"use_safetensors": True} if model_dir is not None else {}
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if task == CLASSIFICATION:
        if not labels:
            raise IncompatibleTaskError("classification needs at least one label")
        model, info = AutoModelForSequenceClassification.from_pretrained(
            path,
            local_files_only=True,
            dtype=dtype,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            output_loading_info=True,
            **safe,
        )
        setattr(model, FRESH_HEAD, _fresh_linear_layers(model, info["missing_keys"]))
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers pool at the last non-pad token
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype, **safe)
    model.config.name_or_path = model_id  # peft writes this as base_model_name_or_path
    return model, tokenizer


def skeleton(
    model_id: str, *, task: str, cache_dir: Path | None = None, model_dir: Path | None = None
) -> PreTrainedModel:
    """`model_id`'s architecture for `task` on the meta device: its modules and shapes, no weights read and no memory
    held. For counting what an adapter would add (`neat_core.methods.budget`), not for running. `model_dir`: as for
    `load_base`."""
    path = Path(model_dir) if model_dir is not None else resolve(model_id, cache_dir)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):
        if task == CLASSIFICATION:
            return AutoModelForSequenceClassification.from_config(config)  # the head is not the adapter's
        return AutoModelForCausalLM.from_config(config)
