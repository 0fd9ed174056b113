"""`adapter: {"type": "auto"}`: pick the adapter method on the customer's own data, then train it.

How (`train_auto`, which `train` calls for `spec.method == "auto"`):

1. The order. The candidates are every registered method, best measured first (`neat_core.methods.quality.ranking`:
   the benchmark's paired differences with LoRA on tasks of the run's kind), or `adapter.candidates` in the order
   given. The order is the prior: it decides what the customer's data cannot.
2. A development split is carved from the *training* file only (the validation file, when given, is the
   customer's and stays untouched): a shuffle seeded by `spec.seed`, dev = 20% of the examples, at most 256, at
   least 1; the rest is the candidates' training part. For classification a row only goes to dev while its label
   keeps at least one row in the training part, so every candidate sees every label (and has the final run's head).
3. The size. Every candidate is sized to one trainable-parameter budget, LoRA's default count on the run's model
   (`neat_core.methods.budget`: each method's rank r with the nearest count), the budget the order was measured at:
   on SmolLM2 NEAT r = 10 and Lily r = 35, where their default ranks give 20% and 31% fewer parameters.
4. The race. The first m candidates in the order each train with the final run's schedule (its resolved n_epochs,
   batch size, learning rate, sequence length) capped at k steps, and are scored by their loss on dev
   (`full_valid_loss`, lower is better: less noisy than accuracy after a few steps). The lowest wins, except that
   dev losses within TIE_TOLERANCE (1%, relative) of the lowest are a tie, and a tie goes to the earlier candidate:
   differences that small after a few steps are within the seed noise (docs/quality.md), so the prior decides.
5. The winner trains on the whole training file (and the validation file, if any) at that size, with its other
   hyperparameters at their defaults ("auto"); the report goes into `TrainResult.selection`,
   `output_dir/selection.json` and `Callback.on_selection`.

Compute budget. With N the final run's optimiser steps, s = the candidates' steps per epoch on the training part and
d = dev batches per evaluation (the loop evaluates at each epoch end and at its last step, so a candidate of
k steps evaluates ceil(k/s) times), a dev evaluation of d batches is counted as d/3 training steps (forward only,
no backward). m candidates of k steps cost

    m * (k + ceil(k / s) * d / 3)  <=  SELECTION_BUDGET * N        (SELECTION_BUDGET = 0.3)

The race takes the most candidates (at least 2) that the budget gives MIN_RACE_STEPS steps each, and the most
steps each within it. When not even two fit (a short run), there is no race: the first candidate in the order is
chosen at no cost, and the report says so (`basis: "order"`). One or two steps compare the methods' first steps,
not the methods: on the benchmark's 16-40-step runs those dev losses differed in the third decimal. So selection
costs at most 30% of the final run's steps, counted this way; its wall time also pays one model load per raced
candidate, which the report's `seconds` includes (docs/quality.md gives both, measured).

Resume: the report is written before the winner trains. A resumed run (`spec.resume_from`, a checkpoint of the
winner's run at `<earlier output_dir>/checkpoints/<step>`) reads the report beside that checkpoint's folder,
copies it into its own output_dir and resumes the winner without training any candidate; if the report is missing,
selection runs again (it is deterministic for a seed). Same seed, same data: same choice, same adapter.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from neat_core.artifacts import read_manifest
from neat_core.data.formats import read_examples
from neat_core.errors import DataFormatError
from neat_core.methods import get_method, method_names
from neat_core.methods.budget import REFERENCE, equal_budget_ranks
from neat_core.methods.quality import ranking
from neat_core.methods.specs import AUTO, check_auto_options, usable_methods
from neat_core.models.catalog import model_type
from neat_core.models.loading import skeleton
from neat_core.train.callbacks import Callback
from neat_core.train.checkpoint import LoopState
from neat_core.train.loop import TrainResult, train
from neat_core.train.spec import Schedule, TrainSpec, resolve_schedule

SELECTION_BUDGET = 0.3  # of the final run's optimiser steps, for every candidate's training and dev evaluations
MIN_RACE_STEPS = 3  # per raced candidate: fewer compare first steps, not methods
TIE_TOLERANCE = 0.01  # relative dev-loss difference within which the order decides
EVALUATION_COST = 1 / 3  # of a training step, per evaluation batch: a forward pass without backward
DEV_FRACTION, MAX_DEV_EXAMPLES = 0.2, 256
REPORT = "selection.json"  # in the run's output_dir
SCRATCH = "selection"  # output_dir/selection/: the split and the candidates' runs, removed once the choice is made


def train_auto(spec: TrainSpec, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Choose the method (or, resuming, read the choice made before), then train the winner: its `TrainResult`,
    with `selection` set. A cancel during selection returns a cancelled result with no adapter and no checkpoint."""
    given = check_auto_options(spec.adapter).get("candidates")
    report = _earlier_report(spec.resume_from) if spec.resume_from is not None else None
    if report is None:
        report = _select(spec, given, callbacks)
        if report is None:
            return TrainResult("cancelled", None, None, {}, {"method": AUTO, "seed": spec.seed}, 0, 0, None)
        _write_report(spec.output_dir / REPORT, report)
        for cb in callbacks:
            cb.on_selection(report)
    else:  # reported when it was made: the resumed run only carries it over
        _write_report(spec.output_dir / REPORT, report)
    # The winner at the equal budget it was compared at (an earlier report without one: the method's defaults)
    sized = report.get("budget", {}).get("ranks", {}).get(report["chosen"])
    result = train(replace(spec, method=report["chosen"], adapter={} if sized is None else {"r": sized}), callbacks)
    result.selection = report
    return result


def split_dev(examples: list[dict], task: str, seed: int) -> tuple[list[dict], list[dict]]:
    """(dev, rest) as described in the module docstring; both keep the file's order."""
    if len(examples) < 2:
        raise DataFormatError("automatic method choice needs at least 2 training examples (1 for a dev split)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, min(MAX_DEV_EXAMPLES, math.floor(DEV_FRACTION * len(examples))))
    # classification: how many rows of each label the training part still has; a label's last one stays there
    left = Counter(e["label"] for e in examples) if task == "classification" else None
    dev: set[int] = set()
    for i in order:
        if len(dev) == n_dev:
            break
        if left is not None:
            if left[examples[i]["label"]] < 2:
                continue
            left[examples[i]["label"]] -= 1
        dev.add(i)
    if not dev:
        raise DataFormatError("automatic method choice needs a label with at least 2 examples for a dev split")
    return [e for i, e in enumerate(examples) if i in dev], [e for i, e in enumerate(examples) if i not in dev]


def candidate_steps(final_steps: int, n_candidates: int, steps_per_epoch: int, dev_batches: int) -> int:
    """The largest k with n_candidates * (k + ceil(k / steps_per_epoch) * dev_batches / 3) <= budget; at least 1."""
    budget = SELECTION_BUDGET * final_steps

    def cost(k: int) -> float:
        return n_candidates * selection_cost(k, steps_per_epoch, dev_batches)

    low, high = 1, max(1, math.floor(budget / n_candidates))
    if cost(low) > budget:
        return 1
    while low < high:  # cost is increasing in k: binary search for the last k within budget
        mid = (low + high + 1) // 2
        low, high = (mid, high) if cost(mid) <= budget else (low, mid - 1)
    return low


def race_plan(final_steps: int, n_candidates: int, steps_per_epoch: int, dev_batches: int) -> tuple[int, int]:
    """(m, k): race the first m candidates for k steps each, as the module docstring says; (0, 0): no race."""
    for m in range(n_candidates, 1, -1):
        k = candidate_steps(final_steps, m, steps_per_epoch, dev_batches)
        fits = m * selection_cost(k, steps_per_epoch, dev_batches) <= SELECTION_BUDGET * final_steps
        if k >= MIN_RACE_STEPS and fits:
            return m, k
    return 0, 0


def choose(rows: list[dict[str, Any]]) -> str:
    """The first raced candidate whose dev loss is within TIE_TOLERANCE of the lowest (a diverged one, None, never)."""
    finite = [r["dev_loss"] for r in rows if r["dev_loss"] is not None]
    if not finite:
        return rows[0]["method"]  # all diverged: the order decides
    best = min(finite)
    return next(r["method"] for r in rows if r["dev_loss"] is not None and r["dev_loss"] <= best * (1 + TIE_TOLERANCE))


def selection_cost(steps: int, steps_per_epoch: int, dev_batches: int) -> float:
    """One candidate's cost in training steps: its steps plus its dev evaluations (one per epoch end and one at
    the last step, when that is not an epoch end), each batch a third of a step."""
    return steps + math.ceil(steps / steps_per_epoch) * dev_batches * EVALUATION_COST


class _StopOnly(Callback):
    """The only hook candidates get from the caller's callbacks: `should_stop`, so that a cancel or pause stops
    selection too. Their steps, evaluations and checkpoints are not the job's, and their folders are scratch."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks = callbacks

    def should_stop(self, loop: LoopState) -> bool:
        return any(cb.should_stop(loop) for cb in self.callbacks)


def _select(spec: TrainSpec, given: list[str] | None, callbacks: Sequence[Callback]) -> dict[str, Any] | None:
    started = time.monotonic()
    fmt, examples = read_examples(spec.training_file)
    # Every method that can work on this architecture (docs/methods.md, "Architectures"); named candidates were
    # checked against it when the job was created.
    architecture = model_type(str(spec.base_model_dir or spec.base_model))
    usable = [m for m in method_names() if m in usable_methods(architecture)]
    order = given or ranking(fmt.task, usable)
    dev, rest = split_dev(examples, fmt.task, spec.seed)
    # The final run's schedule; its step count does not depend on the method's learning rate.
    rate = get_method(order[0]).learning_rate(fmt.task)
    final = resolve_schedule(spec, task=fmt.task, n_examples=len(examples), base_learning_rate=rate)
    steps_per_epoch = math.ceil(len(rest) / final.batch_size)
    dev_batches = math.ceil(len(dev) / final.batch_size)
    m, k = race_plan(final.total_steps, len(order), steps_per_epoch, dev_batches)

    def build():  # the run's architecture, no weights: for each method's parameter count
        return skeleton(str(spec.base_model), task=fmt.task, cache_dir=spec.cache_dir, model_dir=spec.base_model_dir)

    budget, ranks = equal_budget_ranks(build, order)
    rows = _race(spec, order[:m], k, final, rest, dev, ranks, callbacks) if m else []
    if rows is None:
        return None
    cost = sum(selection_cost(r["steps"], steps_per_epoch, dev_batches) for r in rows)
    return {
        "chosen": choose(rows) if rows else order[0],
        "basis": "dev_loss" if rows else "order",  # "order": too short to race; the first candidate, at no cost
        "order": order,
        "candidates": rows,  # the raced ones, in order
        "not_raced": order[m:] if m else order,
        "tie_tolerance": TIE_TOLERANCE,
        # every candidate (raced, and the winner) at LoRA's default parameter count: neat_core.methods.budget
        "budget": {"reference": REFERENCE, "adapter_parameters": budget, "ranks": ranks},
        "dev_examples": len(dev),
        "train_examples": len(rest),
        "budget_fraction": SELECTION_BUDGET,
        "steps_per_candidate": k,
        "selection_steps": sum(r["steps"] for r in rows),
        "selection_cost_steps": round(cost, 3),  # training steps plus evaluations counted as steps
        "used_fraction": round(cost / final.total_steps, 4),
        "final_steps": final.total_steps,
        "seconds": round(time.monotonic() - started, 3),
    }


def _race(spec: TrainSpec, names: list[str], k: int, final: Schedule, rest: list[dict], dev: list[dict],
          ranks: dict[str, int], callbacks: Sequence[Callback]) -> list[dict[str, Any]] | None:  # fmt: skip
    """Each candidate's row (see `_candidate_row`), or None when the caller cancelled."""
    scratch = spec.output_dir / SCRATCH
    shutil.rmtree(scratch, ignore_errors=True)  # an interrupted earlier selection in this folder
    scratch.mkdir(parents=True)
    rows = []
    try:
        train_part, dev_part = _write_jsonl(scratch / "train.jsonl", rest), _write_jsonl(scratch / "dev.jsonl", dev)
        for name in names:
            # The final run's resolved schedule, pinned (auto n_epochs and batch size would otherwise resolve
            # anew for the smaller training part), capped at k steps. resolve_schedule then derives warm-up and
            # decay from the capped total: each candidate runs a whole short schedule, which is what we want to
            # compare, not the first k steps of a long one.
            candidate = replace(
                spec, method=name, adapter={"r": ranks[name]} if name in ranks else {},
                training_file=train_part, validation_file=dev_part,
                output_dir=scratch / name, max_steps=k, n_epochs=final.n_epochs, batch_size=final.batch_size,
                resume_from=None, checkpoint_every=None, keep_checkpoints=1,
            )  # fmt: skip
            at = time.monotonic()
            result = train(candidate, [_StopOnly(callbacks)])
            if result.cancelled:
                return None
            rows.append(_candidate_row(name, result, time.monotonic() - at))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return rows


def _candidate_row(name: str, result: TrainResult, seconds: float) -> dict[str, Any]:
    loss = result.metrics.get("full_valid_loss")
    accuracy = result.metrics.get("full_valid_accuracy", result.metrics.get("full_valid_mean_token_accuracy"))
    manifest = read_manifest(result.adapter_dir)
    return {
        "method": name,
        "dev_loss": loss if loss is not None and math.isfinite(loss) else None,  # a diverged run scores last
        "dev_accuracy": accuracy,
        "adapter_parameters": manifest["adapter_parameters"],
        "trainable_parameters": manifest["trainable_parameters"],
        "steps": result.steps,
        "seconds": round(seconds, 3),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _write_report(path: Path, report: dict[str, Any]) -> None:
    """Atomically: a resumed run must never read half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _earlier_report(resume_from: Path) -> dict[str, Any] | None:
    """The report of the run that wrote the checkpoint `resume_from` (`<its output_dir>/checkpoints/<step>`)."""
    path = Path(resume_from).parent.parent / REPORT
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) and report.get("chosen") in method_names() else None
