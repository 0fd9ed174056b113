"""Train-step speed and peak memory: our NEAT (factored) vs peft's LoRA vs peft's own PEANuT (dense ΔW).

Both real models, q/v targets, r=8, batch 8 × 64 tokens, on whatever device is picked (CPU here).
- Time: the three variants live in one process over copies of the same base model and take turns, one step
  each per round, so machine noise hits them alike; the median step time of each is reported.
- Memory: each variant runs in a fresh subprocess (peak RSS is a per-process high-water mark); a sampling
  thread records the peak during the steps. Reported: the whole process's peak, and the peak growth over the
  loaded-and-wrapped model (the part the methods actually differ in). On CUDA: torch's peak allocated bytes.

    python bench/step_speed.py                 # both models
    python bench/step_speed.py --models minilm --rounds 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from memory import peak_during, train_step  # bench/memory.py (the script's folder is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "classification"),
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "causal_lm"),
}
VARIANTS = ("neat", "lora", "peft-peanut")
BATCH, SEQ, R = 8, 64, 8


def build(model_key: str, variant: str, device):
    import torch
    from peft import PeanutConfig, get_peft_model

    from neat_core.methods import attach
    from neat_core.methods.base import auto_target_modules, task_type_of
    from neat_core.models import load_base

    model_id, task = MODELS[model_key]
    torch.manual_seed(0)
    base, _ = load_base(model_id, task=task, labels=["negative", "positive"])
    targets = auto_target_modules(base)
    if variant == "peft-peanut":
        model = get_peft_model(base, PeanutConfig(r=R, target_modules=targets, task_type=task_type_of(base)))
    else:
        model = attach(base, variant, r=R, target_modules=targets)
    return model.to(device).train()


def make_batch(model_key: str, device):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 20000, (BATCH, SEQ), generator=generator)
    labels = torch.randint(0, 2, (BATCH,), generator=generator) if MODELS[model_key][1] == "classification" else ids
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
        "labels": labels.to(device),
    }


def time_variants(model_key: str, rounds: int, warmup: int, device) -> dict[str, float]:
    models = {v: build(model_key, v, device) for v in VARIANTS}
    batch = make_batch(model_key, device)
    steps = {v: train_step(m, batch) for v, m in models.items()}
    for _ in range(warmup):
        for v in VARIANTS:
            steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(rounds):
        order = VARIANTS if i % 2 == 0 else VARIANTS[::-1]  # alternate who goes first
        for v in order:
            start = time.perf_counter()
            steps[v]()
            times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def measure_memory(model_key: str, variant: str, steps: int, device_name: str) -> dict[str, float]:
    """Runs inside its own subprocess."""
    import torch

    device = torch.device(device_name)
    model = build(model_key, variant, device)
    return peak_during(train_step(model, make_batch(model_key, device)), steps, device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds (default: 15 MiniLM, 6 SmolLM2)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory-probe", nargs=3, metavar=("MODEL", "VARIANT", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from neat_core.devices import resolve_device

    device = resolve_device(args.device)
    if args.memory_probe:
        model_key, variant, steps = args.memory_probe
        print(json.dumps(measure_memory(model_key, variant, int(steps), str(device))))
        return

    print(
        f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
        f"batch={BATCH}x{SEQ} r={R} targets=q,v"
    )
    for model_key in args.models:
        rounds = args.rounds or (15 if model_key == "minilm" else 6)
        med = time_variants(model_key, rounds, warmup=2, device=device)
        mem = {}
        for v in VARIANTS:
            out = subprocess.run(
                [sys.executable, __file__, "--device", str(device), "--memory-probe", model_key, v, "3"],
                capture_output=True,
                text=True,
                check=True,
            )
            mem[v] = json.loads(out.stdout.strip().splitlines()[-1])
        mib = 2**20
        print(f"\n## {model_key} ({MODELS[model_key][0]}), {rounds} interleaved rounds")
        print("| variant | median step (s) | peak memory (MiB) | peak growth during steps (MiB) |")
        print("|---|---|---|---|")
        for v in VARIANTS:
            print(f"| {v} | {med[v]:.3f} | {mem[v]['peak'] / mib:.0f} | {mem[v]['growth'] / mib:.0f} |")
        print(f"- NEAT / LoRA step time: {med['neat'] / med['lora']:.3f}  (goal <= 1.05)")
        print(f"- peft PEANuT / NEAT step time: {med['peft-peanut'] / med['neat']:.3f}  (goal >= 1.10)")
        print(
            f"- NEAT / LoRA peak memory: {mem['neat']['peak'] / mem['lora']['peak']:.3f}  (goal <= 1.05); "
            f"growth {mem['neat']['growth'] / max(1, mem['lora']['growth']):.3f}"
        )
        print(
            f"- peft PEANuT / NEAT peak memory: {mem['peft-peanut']['peak'] / mem['neat']['peak']:.3f}; "
            f"growth {mem['peft-peanut']['growth'] / max(1, mem['neat']['growth']):.3f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
