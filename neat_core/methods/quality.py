"""The measured quality of each method, as `bench/quality.py --report … --summary` wrote it (quality.json beside
this module): per task, the mean held-out score ± std over seeds, the paired difference with LoRA, and the anchor of
the method's row in docs/quality.md. Served by `GET /v1/methods` so that a client choosing a method sees the
figures the table shows. Stdlib only: the web tier reads it."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

SUMMARY = Path(__file__).with_name("quality.json")


@cache
def _summary() -> dict:
    return json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {"methods": {}}


def measured(method: str) -> list[dict]:
    """One entry per task the benchmark ran `method` on (empty when it did not)."""
    return list(_summary()["methods"].get(method, []))
