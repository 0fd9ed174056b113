"""The architectures neat_core knows, by transformers' `model_type` (config.json): a display name and the layers
`target_modules: "auto"` adapts there, the attention query and value projections (the setting the NEAT and LoRA
papers report their main results with) or, where one layer computes q, k and v together, that fused layer.

Torch-free data, like the catalog: the web tier checks a job's (architecture, method) pair with it before anything
is loaded (`neat_core.methods.specs.check_architecture`; a method's own refusals are in its spec), and
`neat_core.methods.base` resolves "auto" from it once the model is loaded. docs/methods.md, "Architectures", has
the table with the methods each architecture takes; tests/neat_core/test_architectures.py runs every pair.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Architecture:
    model_type: str  # transformers' config.model_type
    name: str  # for people: error messages, docs
    auto_targets: tuple[str, ...]  # module-name suffixes "auto" adapts


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        # Decoders with separate projections (grouped-query attention where the config says so).
        Architecture("llama", "Llama", ("q_proj", "v_proj")),  # SmolLM2 too
        Architecture("qwen2", "Qwen2", ("q_proj", "v_proj")),
        Architecture("qwen3", "Qwen3", ("q_proj", "v_proj")),
        Architecture("mistral", "Mistral", ("q_proj", "v_proj")),
        Architecture("gemma2", "Gemma 2", ("q_proj", "v_proj")),
        Architecture("gemma3_text", "Gemma 3 (text)", ("q_proj", "v_proj")),
        Architecture("opt", "OPT", ("q_proj", "v_proj")),
        # Decoders with one fused projection: its output rows are q, k and v.
        Architecture("phi3", "Phi-3", ("qkv_proj",)),  # [q (H·d) | k (K·d) | v (K·d)]
        Architecture("gpt_neox", "GPT-NeoX", ("query_key_value",)),  # per head h: [q_h | k_h | v_h]
        Architecture("gpt2", "GPT-2", ("c_attn",)),  # a Conv1D, [q | k | v]
        # Encoders.
        Architecture("bert", "BERT", ("query", "value")),  # MiniLM too
        Architecture("roberta", "RoBERTa", ("query", "value")),
        Architecture("deberta-v2", "DeBERTa-v2", ("query_proj", "value_proj")),
        Architecture("modernbert", "ModernBERT", ("Wqkv",)),  # fused, [q | k | v]
        Architecture("distilbert", "DistilBERT", ("q_lin", "v_lin")),
    )
}


def architecture_name(model_type: str | None) -> str:
    """'GPT-NeoX (gpt_neox)' for a known type, the bare type otherwise: what error messages call a model."""
    known = ARCHITECTURES.get(model_type or "")
    return f"{known.name} ({model_type})" if known else repr(model_type or "unknown")


def auto_targets(model_type: str | None, suffixes: set[str]) -> list[str] | None:
    """The layers "auto" adapts in a model of `model_type` whose linear layers end in `suffixes`: the table's entry;
    for a type it does not list, the first entry whose targets the model has (ViT and XLM-RoBERTa name their layers
    as BERT does); None when nothing fits."""
    known = ARCHITECTURES.get(model_type or "")
    if known is not None and set(known.auto_targets) <= suffixes:
        return list(known.auto_targets)
    for candidate in ARCHITECTURES.values():
        if set(candidate.auto_targets) <= suffixes:
            return list(candidate.auto_targets)
    return None


def model_type_of(model_dir: Path) -> str | None:
    """A local transformers directory's `model_type`, read from its config.json without loading anything."""
    return json.loads((Path(model_dir) / "config.json").read_text()).get("model_type")
