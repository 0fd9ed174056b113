"""The served weight layout's effect on one decode step and one prefill: SmolLM2 through two batching engines
side by side in one process, each with one of the layouts of `neat_core.serving.layout`:

- `plain`: nn.Linear (torch's default MKL matmul);
- `packed`: every linear packed for oneDNN on its own;
- `fused`: packed, with q/k/v and gate/up each one matmul (what a CPU engine serves).

At each batch size B both engines hold B running rows of the same prompt and take turns, step by step, so machine
noise hits them alike; printed are the median ms per step (interquartile range beside), first / second (above 1:
the second is faster), and whether both engines chose the same greedy tokens. Then a prefill of one 2x-long
prompt, taking turns the same way.

    python bench/decode_step.py                          # packed against fused; B = 1, 8, 32; 40 steps each
    python bench/decode_step.py --layouts plain packed   # the 2026-12-03 comparison
    python bench/decode_step.py --steps 10               # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
PROMPT = "Is this tweet positive? The new update made the app twice as fast, love it."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="measured decode steps per engine and batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--layouts", nargs=2, default=["packed", "fused"], choices=["plain", "packed", "fused"])
    args = parser.parse_args()

    import torch

    from neat_core.models import load_base
    from neat_core.serving import BatchEngine, SamplingParams
    from neat_core.serving import engine as engine_module
    from neat_core.serving.engine import TokenStream, _GenRequest
    from neat_core.serving.layout import FusedPart, PackedLinear

    torch.set_grad_enabled(False)
    first, second = args.layouts
    engines = {}
    pack = engine_module.pack_linears
    for layout in args.layouts:
        base, tokenizer = load_base(MODEL, task="causal_lm")
        # the engine packs at construction: build this one with packing off, or fusing off
        if layout != "fused":
            engine_module.pack_linears = (lambda model: 0) if layout == "plain" else (lambda m: pack(m, fuse=False))
        engines[layout] = BatchEngine(
            base, tokenizer, "causal_lm", cache_bytes=2**30, max_batch=max(args.batches), prefix_bytes=0
        )  # no prefix cache: the prefill below runs one prompt again and again
        engine_module.pack_linears = pack
        packed = any(isinstance(m, PackedLinear) for m in base.modules())
        fused = any(isinstance(m, FusedPart) for m in base.modules())
        assert (packed, fused) == (layout != "plain", layout == "fused"), layout
    any_engine = engines[first]
    prompt = any_engine.encode(any_engine.chat_prompt([{"role": "user", "content": PROMPT}]))

    def rows(b: int, max_tokens: int) -> list:
        sampling = SamplingParams(max_tokens, ignore_eos=True)
        return [_GenRequest(prompt, None, sampling, TokenStream(1)) for _ in range(b)]

    print(f"{MODEL}, torch threads {torch.get_num_threads()}, prompt {len(prompt)} tokens\n")
    print(f"| B | {first} ms per step (IQR) | {second} ms per step (IQR) | {first} / {second} | same tokens |")
    print("|---|---|---|---|---|")
    for b in args.batches:
        batch = {layout: rows(b, 10**6) for layout in engines}
        state: dict = {}
        for layout, engine in engines.items():
            batch[layout], state[layout] = engine._prefill(batch[layout], None)
        times: dict[str, list[float]] = {layout: [] for layout in engines}
        for step in range(args.steps + 3):
            for layout, engine in engines.items():
                start = time.perf_counter()
                state[layout] = engine._decode(batch[layout], state[layout])
                if step >= 3:
                    times[layout].append(time.perf_counter() - start)
        same = [r.tokens for r in batch[first]] == [r.tokens for r in batch[second]]
        cells = []
        for layout in engines:
            q = statistics.quantiles(times[layout], n=4)
            cells.append(f"{statistics.median(times[layout]) * 1e3:.1f} ({q[0] * 1e3:.1f}–{q[2] * 1e3:.1f})")
        ratio = statistics.median(times[first]) / statistics.median(times[second])
        print(f"| {b} | {cells[0]} | {cells[1]} | {ratio:.2f} | {same} |")

    long = prompt * 2
    prefill: dict[str, list[float]] = {layout: [] for layout in engines}
    for _ in range(8):
        for layout, engine in engines.items():
            row = [_GenRequest(long, None, SamplingParams(1), TokenStream(1))]
            start = time.perf_counter()
            engine._prefill(row, None)
            prefill[layout].append(time.perf_counter() - start)
    medians = {layout: statistics.median(t) * 1e3 for layout, t in prefill.items()}
    print(f"\nprefill of {len(long)} tokens: {first} {medians[first]:.1f} ms, {second} {medians[second]:.1f} ms, "
          f"{first} / {second} {medians[first] / medians[second]:.2f}")  # fmt: skip
    for engine in engines.values():
        engine.close()


if __name__ == "__main__":
    main()
