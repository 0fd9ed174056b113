"""Datasets: the JSONL formats (torch-free, safe for the web tier) and, in `neat_core.data.encode`,
tokenisation and collation (torch; import that module explicitly)."""

from neat_core.data.formats import DataFormat, FileReport, read_examples, validate_jsonl

__all__ = ["DataFormat", "FileReport", "read_examples", "validate_jsonl"]
