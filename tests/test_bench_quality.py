"""bench/quality.py's bookkeeping without training: the data it writes, which runs it skips, and its report."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from neat_core.data.samples import topic_chats, topic_preferences

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "quality.py")
quality = importlib.util.module_from_spec(_spec)
sys.modules["bench_quality"] = quality  # dataclasses look their module up
_spec.loader.exec_module(quality)

LABELS = ["business", "entertainment", "politics", "sports", "tech"]
ROWS = [{"text": f"Headline {i}\n\nBody {i} " + "word " * 100, "label": LABELS[i % 5]} for i in range(20)]


def test_chat_rows_and_preference_pairs():
    chat = topic_chats(ROWS, LABELS)
    assert chat[0]["messages"][1] == {"role": "assistant", "content": "business"}
    prompt = chat[0]["messages"][0]["content"]
    assert prompt.startswith("Which topic is this article about? Answer with one word: business, entertainment, ")
    assert "sports or tech." in prompt and "Headline 0" in prompt and len(prompt) < 400  # truncated body
    pairs = topic_preferences(ROWS, LABELS, seed=1)
    assert pairs == topic_preferences(ROWS, LABELS, seed=1)  # seeded
    for row, pair in zip(ROWS, pairs, strict=True):
        assert pair["preferred_output"] == [{"role": "assistant", "content": row["label"]}]
        wrong = pair["non_preferred_output"][0]["content"]
        assert wrong in LABELS and wrong != row["label"]
        assert pair["input"]["messages"][0]["role"] == "user"


def record(method: str, seed: int | None, score: float, objective: str = "sft", **extra) -> dict:
    return {
        "task": "bbc", "model": "m", "method": method, "objective": objective, "seed": seed, "status": "ok",
        "config": {"n_train": 10, "n_epochs": 1, "max_steps": None, "lr_multiplier": "auto", "select": False},
        "n_train": 10, "n_heldout": 5, "majority_baseline": 0.4, "score": score, "metric": "accuracy",
        "scores": {"accuracy": score}, "heldout_loss": 0.5, "adapter_parameters": 100, "trainable_parameters": 110,
        "hyperparameters": {"learning_rate": 1e-3}, "steps": 3, "train_seconds": 10.0, "wall_seconds": 10.0,
        "started": "2026-12-02T00:00:00Z", **extra,
    }  # fmt: skip


def test_failed_runs_are_retried_and_the_report_applies_the_rules(tmp_path):
    results = tmp_path / "results.jsonl"
    rows = [record("lora", s, x) for s, x in enumerate([0.80, 0.82, 0.84])]
    rows += [record("neat", s, x) for s, x in enumerate([0.83, 0.85, 0.87])]
    selection = {"chosen": "neat", "seconds": 2.0, "used_fraction": 0.25, "candidates": [{"method": "neat"}],
                 "basis": "dev_loss", "order": ["neat", "lora"]}  # fmt: skip
    rows += [record("auto", s, x, selection=selection) for s, x in enumerate([0.82, 0.84, 0.86])]
    for row in rows:
        quality.append(results, row)
    quality.append(results, {**record("lily", 0, 0.0), "status": "failed", "error": "boom"})
    done = quality.done_keys(results)
    assert quality.run_key(rows[0]) in done and quality.run_key(record("lily", 0, 0.0)) not in done

    text = quality.report(results)
    assert 'bbc-lora"></a>lora | 0.8000 | 0.8200 | 0.8400 | **0.8200 ± 0.0200** |' in text
    assert "| neat | +0.0300 | +0.0300 | +0.0300 | 0.0300 ± 0.0000 |" in text  # paired with LoRA
    assert "Best single method: **neat**, 0.8500 ± 0.0200." in text
    assert "|0.8400 − 0.8500| = 0.0100 ≤ 0.0200: **yes**" in text
    assert "`auto` mean ≥ LoRA's mean: 0.8400 vs 0.8200: **yes**." in text
    # selection 2 s of 10 s: 2 / 8
    assert "| 0 | neat | dev_loss | neat, lora | neat – | 2 | 8 | 0.25× | 0.25 |" in text
    assert "| bbc | sft | lily | 0 | boom |" in text
    json.loads(results.read_text().splitlines()[0])
