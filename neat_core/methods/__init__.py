"""Adapter methods: `specs` (which hyperparameters, torch-free), `base` (what a method is), `registry` (by name:
`attach`, `get_method`, `method_of`), and one module per method. Names below resolve lazily so that importing
`neat_core.methods.specs` stays torch-free."""

from __future__ import annotations

import importlib
from typing import Any

from neat_core.methods.specs import AUTO

_LAZY = {"attach", "get_method", "method_names", "method_of", "register"}

__all__ = ["AUTO", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("neat_core.methods.registry"), name)
    raise AttributeError(f"module 'neat_core.methods' has no attribute {name!r}")
