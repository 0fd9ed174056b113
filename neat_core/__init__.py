"""neat_core: NEAT and other adapter methods, trained and served on transformers models via peft.

    import neat_core
    model = neat_core.attach(base_model, "neat", r=8)          # a peft.PeftModel with a fresh NEAT adapter
    neat_core.export_lora(model, "out/lora")                    # exact LoRA form of the same update
    result = neat_core.train(neat_core.TrainSpec(...))          # fine-tune from a JSONL file

Names are resolved lazily: `import neat_core.data.formats` (upload validation in the web tier) must not pull in
torch, so this package imports nothing heavy until one of the names below is used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "attach": "neat_core.methods",
    "get_method": "neat_core.methods",
    "method_names": "neat_core.methods",
    "export_lora": "neat_core.export",
    "train": "neat_core.train",
    "TrainSpec": "neat_core.train",
    "TrainResult": "neat_core.train",
    "Callback": "neat_core.train",
    "CancelFlag": "neat_core.train",
    "load_base": "neat_core.models",
    "catalog": "neat_core.models",
    "save_artifact": "neat_core.artifacts",
    "load_artifact": "neat_core.artifacts",
    "read_manifest": "neat_core.artifacts",
    "classify": "neat_core.inference",
    "generate": "neat_core.inference",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'neat_core' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
