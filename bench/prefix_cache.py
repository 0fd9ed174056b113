"""The prefix cache's effect on prefill (a request's time to its first token): SmolLM2 through two batching
engines, one with the prefix cache (`neat_core.serving.prefix`, the default) and one without, side by side in one
process.

Each request is a chat prompt: a shared system prompt (instructions and a few labelled examples, `--shots` of them)
and a tweet of its own. The two engines take turns, request by request, so machine noise hits them alike; after
the first request the engine with the cache computes only each prompt's own part. Printed per batch size (B
requests joining at once): the median ms per prefill (interquartile range beside), without / with (above 1: the
cache is faster), the prompt and cached tokens, and whether both engines chose the same greedy tokens (16 each).

    python bench/prefix_cache.py                  # the recorded configuration: 0, 2 and 8 shots; B = 1 and 8
    python bench/prefix_cache.py --requests 4     # a smoke run
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
SYSTEM = "You label the sentiment of tweets. Answer with one word, positive or negative, then one short reason."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="measured prefills per engine and configuration")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 2, 8], help="labelled examples in the system")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()

    import torch

    from neat_core.data.samples import tweets
    from neat_core.models import load_base
    from neat_core.serving import BatchEngine, SamplingParams
    from neat_core.serving.engine import TokenStream, _GenRequest

    torch.set_grad_enabled(False)
    engines = {}
    for name, budget in (("without", 0), ("with", 64 * 2**20)):
        base, tokenizer = load_base(MODEL, task="causal_lm")
        engines[name] = BatchEngine(base, tokenizer, "causal_lm", cache_bytes=0, max_batch=max(args.batches),
                                    prefix_bytes=budget)  # fmt: skip
    engine = engines["with"]
    rows = tweets(args.requests * max(args.batches) + 8 * max(args.shots) + 8, 0)[0]
    examples, texts = rows[: 8 * max(args.shots)], [r["text"] for r in rows[8 * max(args.shots) :]]

    def prompt(shots: int, text: str) -> list[int]:
        labelled = "\n".join(f"Tweet: {r['text']}\nLabel: {r['label']}"
                             for r in examples[:shots])  # fmt: skip
        messages = [{"role": "system", "content": f"{SYSTEM}\n{labelled}"}, {"role": "user", "content": text}]
        return engine.encode(engine.chat_prompt(messages))

    print(f"{MODEL}, torch threads {torch.get_num_threads()}, {args.requests} prefills per cell\n")
    print("| shots | B | prompt tokens | cached tokens | without: ms per prefill (IQR) | with: ms (IQR) | without / "
          "with | same tokens |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for shots in args.shots:
        for b in args.batches:
            for e in engines.values():
                e.prefixes.drop(None)  # each configuration starts cold: its first prefill fills the cache
            times: dict[str, list[float]] = {name: [] for name in engines}
            same, cached, lengths = True, [], []
            for i in range(args.requests + 1):
                ids = [prompt(shots, texts[(i * b + j) % len(texts)]) for j in range(b)]
                answers = {}
                for name, e in engines.items():
                    batch = [_GenRequest(p, None, SamplingParams(16), TokenStream(len(p))) for p in ids]
                    start = time.perf_counter()
                    batch, state = e._prefill(batch, None)
                    elapsed = time.perf_counter() - start
                    for _ in range(15):
                        state = e._decode(batch, state)
                    answers[name] = {tuple(r.input_ids): r.tokens for r in batch}
                    if i:  # the first fills the cache
                        times[name].append(elapsed)
                        if name == "with":
                            cached += [r.stream.cached_tokens for r in batch]
                            lengths += [len(p) for p in ids]
                same = same and answers["with"] == answers["without"]
            cells = []
            for name in engines:
                q = statistics.quantiles(times[name], n=4)
                cells.append(f"{statistics.median(times[name]) * 1e3:.1f} ({q[0] * 1e3:.1f}–{q[2] * 1e3:.1f})")
            ratio = statistics.median(times["without"]) / statistics.median(times["with"])
            print(f"| {shots} | {b} | {statistics.median(lengths):.0f} | {statistics.median(cached):.0f} | "
                  f"{cells[0]} | {cells[1]} | {ratio:.2f} | {same} |")  # fmt: skip
    for e in engines.values():
        e.close()


if __name__ == "__main__":
    main()
