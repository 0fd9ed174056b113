"""One adapter's cost per decode step: SmolLM2 through the batching engine, a batch of B rows all on one adapter
(NEAT or LoRA, r = 8 on q/v) against the same B rows on the base model, at B = 1 and 8.

Each adapter mix runs twice: on the merged copy the engine keeps for a batch on one adapter (W0 + B A per adapted
layer, `neat_core.serving.batched.MERGED_ADAPTERS`), and on the low-rank path (two small matmuls per adapted layer)
that a mixed batch takes. A last mix alternates two adapters step by step at B = 1: neither has a run of MERGE_AFTER
batches alone, so both stay on the low-rank path (a copy per layer rebuilt at every step measured 0.71 of the
base's speed here, which is why a copy waits for a run). The mixes take turns step by step, so machine noise hits
them alike; the medians and the ratios base / mix (1.0 = free) are printed with each mix's interquartile range.

    python bench/adapter_overhead.py                 # the recorded configuration: 60 rounds
    python bench/adapter_overhead.py --rounds 10     # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `bench.serving`, run as a script

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "Is this tweet positive? The new update made the app twice as fast, love it."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60, help="decode steps per mix (after 3 unmeasured ones)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    import torch

    from bench.serving import make_adapters
    from neat_core.models import load_base
    from neat_core.serving import AdapterRef, BatchEngine, MultiAdapterLinear, SamplingParams
    from neat_core.serving.batched import MERGE_AFTER
    from neat_core.serving.engine import TokenStream, _GenRequest

    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for method in ("neat", "lora"):
            dirs = make_adapters(MODEL, "causal_lm", Path(tmp), 2, method)
            refs.update({f"{method}-{i}": AdapterRef(f"{method}-{i}", d) for i, d in enumerate(dirs)})
        base, tokenizer = load_base(MODEL, task="causal_lm")
        engine = BatchEngine(base, tokenizer, "causal_lm", cache_bytes=2**30, max_batch=max(args.batches))
        prompt = engine.encode(engine.chat_prompt([{"role": "user", "content": PROMPT}]))
        for ref in refs.values():  # loaded into the engine's slots before anything is timed
            list(engine.generate(prompt, ref, SamplingParams(1)))
        layers = [m for m in engine.model.model.modules() if isinstance(m, MultiAdapterLinear)]

        # mix name -> (per-step adapter ids of the B rows, merging on?)
        mixes: dict[str, tuple[list[list[str | None]], bool]] = {}
        for b in args.batches:
            mixes[f"B={b} base"] = ([[None] * b], True)
            for method in ("neat", "lora"):
                mixes[f"B={b} {method}, merged"] = ([[f"{method}-0"] * b], True)
                mixes[f"B={b} {method}, low-rank"] = ([[f"{method}-0"] * b], False)
        mixes["B=1 neat, two adapters alternating, merged"] = ([["neat-0"], ["neat-1"]], True)

        def rows_of(ids: list[str | None]) -> list:
            return [_GenRequest(prompt, a, SamplingParams(10**6, ignore_eos=True), TokenStream(1)) for a in ids]

        # each mix keeps its own batches (one per alternating adapter) and their KV states
        state = {name: [[rows_of(ids), None] for ids in steps] for name, (steps, _) in mixes.items()}
        for batches in state.values():
            for batch in batches:
                batch[0], batch[1] = engine._prefill(batch[0], None)
        times: dict[str, list[float]] = {name: [] for name in mixes}
        # Each mix has its own merged copies (the engine's one place per layer, as served): taking turns, the neat
        # and lora mixes would otherwise evict each other's copy at every step and time its rebuild.
        # The layers of one fused group (q/k/v, gate/up) share one MergedCopies.
        holders = list({id(layer.merges): layer.merges for layer in layers}.values())
        copies = {name: [OrderedDict() for _ in holders] for name in mixes}

        def use(name: str) -> None:
            for holder, own in zip(holders, copies[name], strict=True):
                holder.copies, holder.max_merged = own, (1 if mixes[name][1] else 0)

        # A hot adapter's copy comes after MERGE_AFTER batches alone in a row; taking turns, no mix has a run, so
        # each one-adapter mix gets its run first (the alternating mix never has one: it stays low-rank, as served).
        for name, (steps, merging) in mixes.items():
            if merging and len(steps) == 1 and steps[0][0] is not None:
                use(name)
                for _ in range(MERGE_AFTER):
                    state[name][0][1] = engine._decode(state[name][0][0], state[name][0][1])
                assert all(layer.merged_slots() for layer in layers), name
        for step in range(args.rounds + 3):
            for name in mixes:
                use(name)
                batch = state[name][step % len(state[name])]
                start = time.perf_counter()
                batch[1] = engine._decode(batch[0], batch[1])
                if step >= 3:
                    times[name].append(time.perf_counter() - start)
        engine.close()

    print(f"{MODEL}, {args.rounds} decode steps per mix, taking turns; torch threads {torch.get_num_threads()}\n")
    print("| mix | median ms per step | IQR ms | base / mix |")
    print("|---|---|---|---|")
    for name, t in times.items():
        b = name.split()[0]
        base = statistics.median(times[f"{b} base"])
        q = statistics.quantiles(t, n=4)
        print(f"| {name} | {statistics.median(t) * 1e3:.2f} | {q[0] * 1e3:.2f}–{q[2] * 1e3:.2f} | "
              f"{base / statistics.median(t):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
