"""Activation checkpointing's trade: peak memory and step time of a NEAT training step on SmolLM2-135M-Instruct,
with and without it, at a batch where activations dominate (default 8 x 512 tokens).

- Memory: each variant in a fresh subprocess (bench/memory.py: peak RSS, and its growth during the steps over the
  loaded-and-wrapped model; on CUDA torch's peak allocated bytes). The growth is what checkpointing acts on; it is
  printed beside neat_core.memory's estimate of the same (activations + adapter state) as a check of that formula.
- Time: by default the median of each probe's steps after its first (the first allocates AdamW's state and the
  allocator's pools), which costs no extra steps: on a slow CPU a step at 8 x 512 takes minutes. With
  `--rounds N`, both variants also live in one process and take turns, one step each per round (after a warm-up
  step each), so machine noise hits them alike; the medians of those rounds are reported instead.

The step is the loop's (neat_core.train.loop): checkpointing enabled on the base the way `_enable_checkpointing`
does it, NEAT attached with the method's defaults (r=8 on q,v), AdamW, the model's own causal-LM loss.

    python bench/activation_checkpointing.py                       # 8 x 512, 2 steps per variant
    python bench/activation_checkpointing.py --batch 8 --seq 256 --steps 3 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from memory import peak_during, train_step  # bench/memory.py (the script's folder is on sys.path)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
VARIANTS = ("plain", "checkpointed")


def build(variant: str, device):
    import torch

    from neat_core.methods import attach
    from neat_core.models import load_base
    from neat_core.train.loop import _enable_checkpointing

    torch.manual_seed(0)
    base, _ = load_base(MODEL, task="causal_lm")
    if variant == "checkpointed":
        _enable_checkpointing(base)
    return attach(base, "neat", r=8).to(device).train()


def make_batch(batch: int, seq: int, device):
    import torch

    ids = torch.randint(100, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))  # (B, T)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}


def measure_memory(variant: str, batch: int, seq: int, steps: int, device_name: str) -> dict[str, float]:
    """Runs inside its own subprocess."""
    import torch

    device = torch.device(device_name)
    model = build(variant, device)
    step, times = train_step(model, make_batch(batch, seq, device)), []
    peak = peak_during(lambda: times.append(step()), steps, device)
    return {**peak, "step_s": times}


def time_variants(batch: int, seq: int, rounds: int, device) -> dict[str, float]:
    models = {v: build(v, device) for v in VARIANTS}
    data = make_batch(batch, seq, device)
    steps = {v: train_step(m, data) for v, m in models.items()}
    for v in VARIANTS:  # warm-up: allocates AdamW's state and the allocator's pools
        steps[v]()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(rounds):
        for v in VARIANTS if i % 2 == 0 else VARIANTS[::-1]:  # alternate who goes first
            times[v].append(steps[v]())
    return {v: statistics.median(t) for v, t in times.items()}


def estimates(batch: int, seq: int) -> dict[str, object]:
    from neat_core.memory import estimate_training_memory, model_shape

    shape = model_shape(MODEL)
    return {
        v: estimate_training_memory(
            shape, batch_size=batch, seq_len=seq, causal_lm=True, gradient_checkpointing=v == "checkpointed"
        )  # fmt: skip
        for v in VARIANTS
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2, help="steps per memory probe (timed after the first)")
    parser.add_argument("--rounds", type=int, default=0, help="interleaved timed rounds in one process (0: none)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory-probe", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from neat_core.devices import resolve_device

    device = resolve_device(args.device)
    if args.memory_probe:
        print(json.dumps(measure_memory(args.memory_probe, args.batch, args.seq, args.steps, str(device))))
        return

    print(f"# device={device} torch={torch.__version__} threads={torch.get_num_threads()} model={MODEL} "
          f"batch={args.batch}x{args.seq} NEAT r=8 q,v", flush=True)  # fmt: skip
    mem = {}
    for v in VARIANTS:
        command = [sys.executable, __file__, "--device", str(device), "--batch", str(args.batch), "--seq",
                   str(args.seq), "--steps", str(args.steps), "--memory-probe", v]  # fmt: skip
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        mem[v] = json.loads(out.stdout.strip().splitlines()[-1])
    if args.rounds:
        med, timing = time_variants(args.batch, args.seq, args.rounds, device), f"{args.rounds} interleaved rounds"
    else:
        med = {v: statistics.median(mem[v]["step_s"][1:] or mem[v]["step_s"]) for v in VARIANTS}
        timing = "the probes' steps after their first" if args.steps > 1 else "the probes' single (cold) step"
    est = estimates(args.batch, args.seq)
    mib = 2**20
    print(f"\n{args.steps} steps per memory probe; step time: median of {timing}")
    print("| variant | median step (s) | peak memory (MiB) | peak growth during steps (MiB) | estimated growth (MiB) |")
    print("|---|---|---|---|---|")
    for v in VARIANTS:
        estimated = (est[v].activations + est[v].adapter) / mib
        print(f"| {v} | {med[v]:.2f} | {mem[v]['peak'] / mib:.0f} | {mem[v]['growth'] / mib:.0f} | {estimated:.0f} |")
    plain, ckpt = mem["plain"], mem["checkpointed"]
    print(f"- memory factor (plain / checkpointed): peak {plain['peak'] / ckpt['peak']:.2f}, "
          f"growth {plain['growth'] / max(1, ckpt['growth']):.2f}")  # fmt: skip
    print(f"- time cost (checkpointed / plain step time): {med['checkpointed'] / med['plain']:.2f}", flush=True)


if __name__ == "__main__":
    main()
