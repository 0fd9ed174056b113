"""The measured quality of each method, as `bench/quality.py --report … --summary` wrote it (quality.json beside
this module): per task, the mean held-out score ± std over seeds, the paired difference with LoRA, and the anchor of
the method's row in docs/quality.md. Served by `GET /v1/methods` so that a client choosing a method sees the
figures the table shows. Stdlib only: the web tier reads it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path

SUMMARY = Path(__file__).with_name("quality.json")


@cache
def _summary() -> dict:
    return json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {"methods": {}}


def measured(method: str) -> list[dict]:
    """One entry per task the benchmark ran `method` on (empty when it did not)."""
    return list(_summary()["methods"].get(method, []))


def ranking(task: str, methods: Sequence[str], exclude_tasks: Sequence[str] = ()) -> list[str]:
    """`methods`, best measured first, for a run of `task` ("classification" or "causal_lm"): by the mean of each
    method's paired difference with LoRA (LoRA itself 0) over the benchmark's tasks of that kind, or over every
    task when none is of that kind. Paired differences, not scores: a task's scores are on its own scale, and the
    same-seed difference removes most of the seed noise. A method without a figure comes after the measured ones,
    in the order given. `exclude_tasks` leaves tasks out (the benchmark ranks for a task without that task's own
    held-out results)."""
    entries = {m: [e for e in measured(m) if e["task"] not in exclude_tasks] for m in methods}
    of_kind = {m: [e for e in es if e.get("kind") == task] for m, es in entries.items()}
    if any(of_kind.values()):
        entries = of_kind

    def lead(method: str) -> float | None:
        diffs = [0.0 if method == "lora" else (e["difference_vs_lora"] or {}).get("mean") for e in entries[method]]
        diffs = [d for d in diffs if d is not None]
        return sum(diffs) / len(diffs) if diffs else None

    leads = {m: lead(m) for m in methods}
    scored = sorted((m for m in methods if leads[m] is not None), key=lambda m: -leads[m])  # stable: ties keep order
    return scored + [m for m in methods if leads[m] is None]
