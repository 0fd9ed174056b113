"""Base models: the offline catalog (torch-free) and loading (lazy, so the catalog can be used without torch)."""

from __future__ import annotations

import importlib
from typing import Any

from neat_core.models.catalog import CatalogEntry, catalog, supported_tasks

__all__ = ["CatalogEntry", "catalog", "load_base", "resolve", "supported_tasks"]


def __getattr__(name: str) -> Any:
    if name in ("load_base", "resolve", "DEFAULT_CACHE_DIR"):
        return getattr(importlib.import_module("neat_core.models.loading"), name)
    raise AttributeError(f"module 'neat_core.models' has no attribute {name!r}")
