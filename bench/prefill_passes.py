"""Prefill in passes of similar lengths against one padded pass: SmolLM2 through the batching engine, 16 new
prompts at a time (bench/vs_llamacpp.py's chat-templated tweets, 41 to 128 tokens), prefix cache off.

`generation.PREFILL_PASS_OVERHEAD` sets where `length_buckets` cuts: a pass's fixed cost in token positions. The
variants take turns on the same 16 prompts, round after round, so machine noise hits them alike: the recorded
overhead (buckets), and one pass (an overhead too large to ever cut). Printed: per variant the median ms with its
interquartile range, the padded token positions it computed, and the per-round ratio one pass / buckets.

    python bench/prefill_passes.py               # the recorded configuration: 12 rounds
    python bench/prefill_passes.py --rounds 3    # a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from bench.vs_llamacpp import MODEL, prompts  # noqa: E402
from neat_core.models import load_base  # noqa: E402
from neat_core.serving import generation  # noqa: E402
from neat_core.serving.engine import BatchEngine, SamplingParams, TokenStream, _GenRequest  # noqa: E402
from neat_core.serving.scheduler import length_buckets  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=16, help="new prompts per prefill")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    base, tokenizer = load_base(MODEL, task="causal_lm")
    engine = BatchEngine(base, tokenizer, "causal_lm", max_batch=args.prompts, prefix_bytes=0)
    ids = prompts(args.prompts * args.rounds)
    recorded = generation.PREFILL_PASS_OVERHEAD["cpu"]
    variants = {f"buckets (overhead {recorded})": recorded, "one padded pass": 10**9}
    times: dict[str, list[float]] = {name: [] for name in variants}
    positions: dict[str, int] = dict.fromkeys(variants, 0)
    try:
        for r in range(args.rounds + 1):  # the first round warms up, unmeasured
            batch = ids[r % args.rounds * args.prompts : (r % args.rounds + 1) * args.prompts]
            for name, overhead in variants.items():
                generation.PREFILL_PASS_OVERHEAD["cpu"] = overhead
                rows = [_GenRequest(p, None, SamplingParams(2), TokenStream(len(p))) for p in batch]
                start = time.perf_counter()
                engine._prefill(rows, None)
                if r:
                    times[name].append(time.perf_counter() - start)
                    lengths = [len(p) for p in batch]
                    positions[name] += sum(
                        len(c) * max(lengths[i] for i in c) for c in length_buckets(lengths, overhead)
                    )
    finally:
        generation.PREFILL_PASS_OVERHEAD["cpu"] = recorded
        engine.close()

    print(f"{MODEL}, {args.prompts} prompts per prefill, {args.rounds} rounds taking turns; torch threads "
          f"{torch.get_num_threads()}; prompt tokens {sum(map(len, ids))}")  # fmt: skip
    print("\n| variant | median ms | IQR ms | token positions computed |\n|---|---|---|---|")
    for name, values in times.items():
        q = statistics.quantiles(values, n=4)
        print(f"| {name} | {statistics.median(values) * 1e3:.0f} | {q[0] * 1e3:.0f}–{q[2] * 1e3:.0f} "
              f"| {positions[name]} |")  # fmt: skip
    one, buckets = times["one padded pass"], next(iter(times.values()))
    ratios = [a / b for a, b in zip(one, buckets, strict=True)]
    q = statistics.quantiles(ratios, n=4)
    print(f"\none pass / buckets, per round: median {statistics.median(ratios):.2f} (IQR {q[0]:.2f}–{q[2]:.2f})")


if __name__ == "__main__":
    main()
