"""DPO's cost against a supervised step on the same sequences: peak memory and step time, NEAT on SmolLM2.

The batch: B preference pairs built from real labelled tweets (`neat_core.data.samples.tweets`; the user asks for
the sentiment in one word, the preferred reply is the label, the non-preferred one the other label). Variants:
- `sft`: one supervised step on the 2B sequences (every pair's two replies as plain chat rows: the same tokens);
- `dpo`: one DPO step on the B pairs, the reference being the same model with its adapter off (what the service
  runs: `neat_core.train.dpo.step_loss`);
- `dpo-copy`: the same DPO step with the reference a second, frozen copy of the base model, as a trainer without
  adapters must hold it. Shown to make visible what the adapter-off reference saves.

Memory: each variant in a fresh subprocess (bench/memory.py: peak RSS, and its growth during the steps over the
loaded model). Time: `sft` and `dpo` take turns step by step in one process (median of the rounds), so machine
noise hits both alike.

    python bench/dpo_memory.py                   # B = 4 pairs, 3 steps per memory probe, 6 timed rounds
    python bench/dpo_memory.py --pairs 8 --rounds 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
VARIANTS = ("sft", "dpo", "dpo-copy")
BETA = 0.1


def pairs(n: int) -> list[dict]:
    from neat_core.data.samples import tweets

    rows, _ = tweets(n, 0)
    return [
        {
            "input": {
                "messages": [{"role": "user", "content": f"Positive or negative? One word.\n\n{r['text'][:200]}"}]
            },
            "preferred_output": [{"role": "assistant", "content": r["label"]}],
            "non_preferred_output": [
                {"role": "assistant", "content": "negative" if r["label"] == "positive" else "positive"}
            ],
        }
        for r in rows
    ]


def build(n_pairs: int, device):
    """(NEAT-wrapped SmolLM2 in train mode, the collated [2B, T] batch)."""
    import torch

    from neat_core.data import DataFormat
    from neat_core.data.encode import Collator, encode_examples
    from neat_core.methods import attach
    from neat_core.models import load_base

    torch.manual_seed(0)
    base, tokenizer = load_base(MODEL, task="causal_lm")
    model = attach(base, "neat", r=8).to(device)
    model.train()
    rows = encode_examples(pairs(n_pairs), DataFormat.PREFERENCE, tokenizer, max_length=256)
    batch = {k: v.to(device) for k, v in Collator(tokenizer.pad_token_id)(rows).items()}
    return model, batch


def step_fn(model, batch: dict, variant: str, reference=None):
    import torch

    from neat_core.train import dpo

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def copy_reference_loss():
        with torch.no_grad():
            ref = dpo.sequence_logps(reference(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                     .logits, batch["labels"])  # fmt: skip
        policy = dpo.sequence_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                                    .logits, batch["labels"])  # fmt: skip
        return dpo.pair_terms(policy, ref, BETA)["loss"].mean()

    def step() -> None:
        if variant == "sft":
            loss = model(**batch).loss
        elif variant == "dpo":
            loss, _ = dpo.step_loss(model, batch, BETA)
        else:
            loss = copy_reference_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def memory_probe(variant: str, n_pairs: int, steps: int, device_name: str) -> dict:
    import torch
    from memory import peak_during

    device = torch.device(device_name)
    model, batch = build(n_pairs, device)
    reference = None
    if variant == "dpo-copy":  # a frozen second copy of the base weights, as a reference model held apart
        reference = copy.deepcopy(model.get_base_model()).eval().requires_grad_(False)
    return peak_during(step_fn(model, batch, variant, reference), steps, device)


def time_variants(n_pairs: int, rounds: int, device) -> dict[str, float]:
    model, batch = build(n_pairs, device)
    steps = {v: step_fn(model, batch, v) for v in ("sft", "dpo")}
    times: dict[str, list[float]] = {v: [] for v in steps}
    for r in range(rounds + 1):
        for v, step in steps.items():
            start = time.perf_counter()
            step()
            if r:  # round 0 warms up
                times[v].append(time.perf_counter() - start)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="steps per memory probe")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds (sft and dpo take turns)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--memory-probe", metavar="VARIANT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    from neat_core.devices import resolve_device

    device = resolve_device(args.device)
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, args.pairs, args.steps, str(device))))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    _, batch = build(args.pairs, device)
    shape = tuple(batch["input_ids"].shape)
    print(f"# {MODEL}, NEAT r=8 q/v, {args.pairs} pairs = {shape[0]} sequences x {shape[1]} tokens, device={device}")
    mem = {}
    for v in VARIANTS:
        out = subprocess.run(
            [sys.executable, __file__, "--device", str(device), "--pairs", str(args.pairs), "--steps",
             str(args.steps), "--memory-probe", v],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        mem[v] = json.loads(out.stdout.strip().splitlines()[-1])
    med = time_variants(args.pairs, args.rounds, device)
    mib = 2**20
    print("| variant | peak memory (MiB) | growth during the steps (MiB) | median step (s) |")
    print("|---|---|---|---|")
    for v in VARIANTS:
        t = f"{med[v]:.2f}" if v in med else "-"
        print(f"| {v} | {mem[v]['peak'] / mib:.0f} | {mem[v]['growth'] / mib:.0f} | {t} |")
    print(f"- DPO / supervised peak memory: {mem['dpo']['peak'] / mem['sft']['peak']:.3f} (goal <= 1.1); growth "
          f"{mem['dpo']['growth'] / mem['sft']['growth']:.3f}")  # fmt: skip
    print(f"- DPO with a reference copy / supervised peak memory: {mem['dpo-copy']['peak'] / mem['sft']['peak']:.3f}")
    print(f"- DPO / supervised step time: {med['dpo'] / med['sft']:.3f} ({args.rounds} interleaved rounds)", flush=True)


if __name__ == "__main__":
    main()
