"""Adapter methods, one package each (peft's layout: `<name>/spec.py` torch-free, then its layers and `model.py`).

`specs` (what a method is before torch: hyperparameters, defaults, serving; discovery), `base` (what a method is to
training and serving), `registry` (by name: `attach`, `get_method`, `method_of`). Registry names resolve lazily so
that importing `neat_core.methods.specs` (and every method's `spec`) stays torch-free. docs/methods.md has the math.
"""

from __future__ import annotations

import importlib
from typing import Any

from neat_core.methods.specs import AUTO, register_package

_LAZY = {"attach", "get_method", "method_names", "method_of"}

__all__ = ["AUTO", "register_package", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module("neat_core.methods.registry"), name)
    raise AttributeError(f"module 'neat_core.methods' has no attribute {name!r}")
