"""Base models: the offline catalog and loading."""

from neat_core.models.catalog import CatalogEntry, catalog, load_base, resolve, supported_tasks

__all__ = ["CatalogEntry", "catalog", "load_base", "resolve", "supported_tasks"]
