"""Our training loop against trl's SFTTrainer, side by side: the same model, data, batch, adapter and optimiser.

SmolLM2-135M-Instruct (fp32, CPU) on BBC News topic chats (`neat_core.data.samples.topic_chats`: the topic
question above an article's excerpt, answered with the class name; ~110 tokens each), batch 8, AdamW at a fixed
learning rate with a linear decay, gradient clipping at 1.0, metrics every step. Two adapters, each trained by both:

  LoRA    ours: `method="lora"` r 8 on q/v          trl: peft's LoraConfig(r=8, lora_alpha=16, q_proj/v_proj)
  NEAT    ours: `method="neat"` r 8 on q/v          trl: peft's PeanutConfig(r=8, q_proj/v_proj), NEAT's peft form

Each run trains `--steps` optimiser steps; the time of a step is the interval between consecutive step ends (the
first step, which pays for lazy set-up on both sides, is left out), so set-up, model loading and saving are not
counted. Runs take turns (ours, trl, ours, trl, ...) over `--rounds` so that machine noise hits both alike. Printed:
per adapter and trainer, the median step time over every measured step of every round and its interquartile
range, and the ratio trl / ours (> 1: ours is faster).

Runs in its own environment (trl is not a dependency of the service; requirements/bench.txt):

    scripts/bootstrap --bench && .venv-bench/bin/python bench/train_vs_trl.py
    .venv-bench/bin/python bench/train_vs_trl.py --rounds 1 --steps 6      # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
BATCH = 8
LEARNING_RATE = 5e-4  # LoRA's causal-LM `auto` rate here; the same for both trainers and both adapters
TARGETS = ["q_proj", "v_proj"]


def chats(n: int) -> list[dict]:
    from neat_core.data.samples import bbc_news, topic_chats

    rows, _ = bbc_news(n, 0)
    return topic_chats(rows, sorted({r["label"] for r in rows}))


def ours(method: str, train_file: Path, out: Path, steps: int, seed: int) -> list[float]:
    """Step-end times of one run of our loop."""
    from neat_core.train import Callback, TrainSpec, train

    class Clock(Callback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, loop, metrics) -> None:
            self.ends.append(time.perf_counter())

    adapter = {"r": 8, "target_modules": TARGETS} | ({"lora_alpha": 16} if method == "lora" else {})
    clock = Clock()
    spec = TrainSpec(base_model=MODEL, training_file=train_file, output_dir=out, method=method, adapter=adapter,
                     batch_size=BATCH, n_epochs=1, max_steps=steps, seed=seed, device="cpu", max_seq_len=512,
                     learning_rate_multiplier=LEARNING_RATE / _our_rate(method), gradient_checkpointing=False,
                     checkpoint_every=10**6)  # fmt: skip
    train(spec, [clock])
    return clock.ends


def _our_rate(method: str) -> float:
    from neat_core.methods import get_method

    return get_method(method).learning_rate("causal_lm")


def trl_run(method: str, rows: list[dict], out: Path, steps: int, seed: int) -> list[float]:
    """Step-end times of one run of trl's SFTTrainer with peft."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig, PeanutConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from neat_core.models import resolve

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    path = resolve(MODEL)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if method == "lora":
        peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    else:
        peft_config = PeanutConfig(r=8, target_modules=TARGETS, task_type="CAUSAL_LM")
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=BATCH, num_train_epochs=1, max_steps=steps,
        learning_rate=LEARNING_RATE, lr_scheduler_type="linear", warmup_steps=1, max_grad_norm=1.0,
        optim="adamw_torch", weight_decay=0.0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        max_length=512, seed=seed, disable_tqdm=True, dataloader_num_workers=0, bf16=False, fp16=False,
    )  # fmt: skip
    clock = Clock()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[clock])  # fmt: skip
    trainer.train()
    return clock.ends


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run (the first is not timed)")
    parser.add_argument("--methods", nargs="+", default=["lora", "neat"], choices=["lora", "neat"])
    args = parser.parse_args()

    import torch

    rows = chats(BATCH * args.steps)
    steps: dict[tuple[str, str], list[float]] = {(m, t): [] for m in args.methods for t in ("ours", "trl")}
    with tempfile.TemporaryDirectory() as tmp:
        train_file = Path(tmp) / "train.jsonl"
        train_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for round_ in range(args.rounds):
            for method in args.methods:
                for trainer in ("ours", "trl"):
                    out = Path(tmp) / f"{method}-{trainer}-{round_}"
                    ends = (ours(method, train_file, out, args.steps, round_) if trainer == "ours"
                            else trl_run(method, rows, out, args.steps, round_))  # fmt: skip
                    assert len(ends) == args.steps, (method, trainer, len(ends))
                    steps[(method, trainer)] += [b - a for a, b in zip(ends, ends[1:], strict=False)]

    print(f"{MODEL}, fp32 CPU, torch threads {torch.get_num_threads()}; batch {BATCH}, {args.steps} steps per run "
          f"({args.steps - 1} timed), {args.rounds} rounds taking turns\n")  # fmt: skip
    print("| adapter | trainer | median s per step | IQR s | trl / ours |")
    print("|---|---|---|---|---|")
    for method in args.methods:
        mine = statistics.median(steps[(method, "ours")])
        for trainer in ("ours", "trl"):
            t = steps[(method, trainer)]
            q = statistics.quantiles(t, n=4)
            ratio = f"**{statistics.median(t) / mine:.2f}**" if trainer == "trl" else ""
            print(f"| {method} | {trainer} | {statistics.median(t):.3f} | {q[0]:.3f}–{q[2]:.3f} | {ratio} |")


if __name__ == "__main__":
    main()
