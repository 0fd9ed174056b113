"""Serving benchmark: many adapters over one base model, batched, against the base model and the naive server.

On the real SmolLM2 (generation) and MiniLM (classification), one process, closed-loop clients (each sends its
next request when the previous answer is complete) for a fixed time per scenario:

  (a) base      every request on the bare base model, through the batching engine
  (b) 1 NEAT    every request on one NEAT adapter
  (c) 8 / 32    requests spread over 8 / 32 distinct NEAT adapters (client i uses adapter i mod K)
  (d) naive     8 adapters in one peft model; each request alone, after `set_adapter` (one at a time)

Printed: throughput (generated tokens/s; classified texts/s for MiniLM), p50/p95 request latency, p50 time to
first token, mean rows per forward pass, and the goal ratios. Then the cold-adapter cost: the latency of a
request whose adapter is not loaded minus that of the same request once it is (median over several adapters, no
other load). Adapters are NEAT r=8 on the q/v projections with random weights (speed does not depend on what
they learnt); scenarios are interleaved over `--rounds` so machine noise hits them alike.

    python bench/serving.py                               # both models, the recorded configuration
    python bench/serving.py --models smollm2 --seconds 10 --rounds 1
    python bench/serving.py --remote --seconds 20 --rounds 1   # API -> inference server vs in process (32 streams)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {
    "smollm2": ("HuggingFaceTB/SmolLM2-135M-Instruct", "causal_lm"),
    "minilm": ("sentence-transformers/all-MiniLM-L6-v2", "classification"),
}
LABELS = ["negative", "positive"]
N_ADAPTERS = 32
N_COLD = 6


def make_adapters(model_id: str, task: str, root: Path, n: int, method: str = "neat") -> list[Path]:
    """n adapters of `method` (NEAT or LoRA, r=8, q/v) with random weights, saved as training saves them."""
    import torch

    from neat_core.methods import attach
    from neat_core.models import load_base

    base, _ = load_base(model_id, task=task, labels=LABELS)
    model = attach(base, method, r=8)
    trained = {"neat": "peanut_B", "lora": "lora_B"}[method]  # zero at initialisation: the adapter would be a no-op
    dirs = []
    for i in range(n):
        generator = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if trained in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        out = root / f"{method}-{i:02d}"
        model.save_pretrained(out)
        manifest = {"method": method, "task": task, "base_model": model_id, "labels": LABELS}
        (out / "manifest.json").write_text(json.dumps(manifest))
        dirs.append(out)
    return dirs


def closed_loop(clients: int, seconds: float, warmup: float, request, window: dict) -> dict:
    """`clients` threads calling request(client) back to back for `warmup + seconds`. request returns (the times at
    which its units came out, seconds to the first one). Only the last `seconds` count (the first `warmup` lets the
    clients fall out of step): throughput counts every unit produced inside that window, so a long request that
    straddles an edge counts for what it produced there; latencies are those of the requests that started and
    finished inside it. `window["stop"]` tells requests still queued at the end not to start."""
    latencies, firsts, units = [], [], [0]
    lock = threading.Lock()
    count_from = time.perf_counter() + warmup
    stop_at = window["stop"] = count_from + seconds

    def client(i: int) -> None:
        time.sleep(i * warmup / clients / 2)  # staggered starts: no lockstep waves
        while time.perf_counter() < stop_at:
            begun = time.perf_counter()
            stamps, first = request(i)
            with lock:
                units[0] += sum(1 for t in stamps if count_from <= t <= stop_at)
                if stamps and begun >= count_from and stamps[-1] <= stop_at:
                    latencies.append(stamps[-1] - begun)
                    firsts.append(first)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window["stop"] = float("inf")
    qs = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {
        "throughput": units[0] / seconds,
        "requests": len(latencies),
        "p50": statistics.median(latencies) if latencies else float("nan"),
        "p95": qs[18] if qs else float("nan"),
        "ttft_p50": statistics.median(firsts) if firsts else float("nan"),
    }


class Naive:
    """The baseline: one peft model holding every adapter, one request at a time, `set_adapter` before each."""

    def __init__(self, model_id: str, task: str, dirs: list[Path], tokens: int, window: dict):
        from neat_core.methods import get_method
        from neat_core.methods.neat.layer import neat_layers
        from neat_core.models import load_base

        base, self.tokenizer = load_base(model_id, task=task, labels=LABELS)
        self.model = get_method("neat").load(base, str(dirs[0])).eval()
        with neat_layers():
            for i, d in enumerate(dirs[1:], start=1):
                self.model.load_adapter(str(d), adapter_name=f"a{i}")
        self.names = ["default"] + [f"a{i}" for i in range(1, len(dirs))]
        self.tokens = tokens
        self.window = window  # a request still queued when the measuring window closes is not run
        self.lock = threading.Lock()

    def generate(self, adapter: int, ids: list[int]) -> tuple[int, float]:
        import torch

        with self.lock, torch.inference_mode():
            start = time.perf_counter()
            if start > self.window["stop"]:
                return [], 0.0
            self.model.set_adapter(self.names[adapter])
            input_ids = torch.tensor([ids])
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=self.tokens,
                min_new_tokens=self.tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            done = time.perf_counter()  # generate gives every token at the end
            return [done] * (out.shape[1] - len(ids)), done - start

    def classify(self, adapter: int, text: str) -> tuple[int, float]:
        import torch

        with self.lock, torch.inference_mode():
            start = time.perf_counter()
            if start > self.window["stop"]:
                return [], 0.0
            self.model.set_adapter(self.names[adapter])
            batch = self.tokenizer([text], truncation=True, max_length=128, return_tensors="pt")
            self.model(**batch).logits.softmax(-1)
            done = time.perf_counter()
            return [done], done - start


def decode_steps(engine, mixes: dict[str, list], prompt: list[int], rounds: int) -> dict[str, float]:
    """Median seconds of one decode step of a full batch, per adapter mix (a list of AdapterRef | None per row),
    the mixes taking turns step by step so that machine noise hits them alike. Drives the engine's own prefill and
    decode on this thread while its scheduler is idle: the closed-loop figures include queueing and the clients'
    rhythm, these isolate what the adapters cost per step."""
    from neat_core.serving.engine import SamplingParams, TokenStream, _GenRequest

    batches, states, times = {}, {}, {name: [] for name in mixes}
    for name, refs in mixes.items():
        rows = [_GenRequest(prompt, r and r.adapter_id, SamplingParams(10**6, ignore_eos=True), TokenStream(1))
                for r in refs]  # fmt: skip
        batches[name], states[name] = engine._prefill(rows, None)
    for _ in range(rounds):
        for name, rows in batches.items():
            start = time.perf_counter()
            states[name] = engine._decode(rows, states[name])
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def classify_passes(engine, mixes: dict[str, list], texts: list[str], rounds: int) -> dict[str, float]:
    """Median seconds to classify one full batch of texts (length buckets included), per adapter mix, the mixes
    taking turns: the classification counterpart of `decode_steps`."""
    from neat_core.serving.engine import _ClassifyRow

    times = {name: [] for name in mixes}
    for _ in range(rounds):
        for name, refs in mixes.items():
            rows = [_ClassifyRow(t, r and r.adapter_id) for t, r in zip(texts, refs, strict=False)]
            start = time.perf_counter()
            engine._classify_batch(rows)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_model(key: str, args, root: Path) -> list[str]:
    import torch

    from neat_core.data.samples import tweets
    from neat_core.models import load_base
    from neat_core.serving import AdapterRef, BatchEngine, SamplingParams

    model_id, task = MODELS[key]
    dirs = make_adapters(model_id, task, root / key, N_ADAPTERS + N_COLD)
    refs = [AdapterRef(f"{key}-{i}", d) for i, d in enumerate(dirs)]
    base, tokenizer = load_base(model_id, task=task, labels=LABELS)
    engine = BatchEngine(
        base, tokenizer, task, cache_bytes=2**30, max_batch=args.clients, window_s=args.window_ms / 1000
    )
    texts = [r["text"] for r in tweets(200, 0)[0]]
    if task == "causal_lm":
        prompts = [
            engine.encode(engine.chat_prompt([{"role": "user", "content": f"Is this tweet positive? {t}"}]))
            for t in texts
        ]
        sampling = SamplingParams(max_tokens=args.tokens, ignore_eos=True)

        def served(adapter: AdapterRef | None, i: int) -> tuple[list[float], float]:
            start = time.perf_counter()
            stamps = [time.perf_counter() for _ in engine.generate(prompts[i % len(prompts)], adapter, sampling)]
            return stamps, stamps[0] - start
    else:

        def served(adapter: AdapterRef | None, i: int) -> tuple[list[float], float]:
            start = time.perf_counter()
            engine.classify([texts[i % len(texts)]], adapter)
            done = time.perf_counter()
            return [done], done - start

    window = {"stop": float("inf")}
    naive = Naive(model_id, task, dirs[:8], args.tokens, window)
    scenarios = {
        "(a) base model": lambda i: served(None, i),
        "(b) 1 NEAT adapter": lambda i: served(refs[0], i),
        "(c) 8 NEAT adapters": lambda i: served(refs[i % 8], i),
        "(c) 32 NEAT adapters": lambda i: served(refs[i % 32], i),
        "(d) naive, 8 adapters": (
            (lambda i: naive.generate(i % 8, prompts[i % len(prompts)]))
            if task == "causal_lm"
            else (lambda i: naive.classify(i % 8, texts[i % len(texts)]))
        ),
    }
    for ref in refs[:N_ADAPTERS]:
        engine.preload(ref)
    for run in scenarios.values():  # warm-up: first calls allocate and compile what they need
        run(0)

    results: dict[str, list[dict]] = {name: [] for name in scenarios}
    for _ in range(args.rounds):
        for name, run in scenarios.items():
            before = dict(engine.batch_sizes)
            result = closed_loop(args.clients, args.seconds, args.warmup, run, window)
            after = engine.batch_sizes
            passes = {k: after[k] - before.get(k, 0) for k in after}
            total = sum(passes.values())
            result["mean_batch"] = sum(k * v for k, v in passes.items()) / total if total else 1.0
            results[name].append(result)
            print(f"  {key} {name}: {result['throughput']:.1f}/s over {result['requests']} requests", flush=True)

    mixes = {
        "(a) base model": [None] * args.clients,
        "(b) 1 NEAT adapter": [refs[0]] * args.clients,
        "(c) 8 NEAT adapters": [refs[i % 8] for i in range(args.clients)],
        "(c) 32 NEAT adapters": [refs[i % 32] for i in range(args.clients)],
    }
    if task == "causal_lm":
        steps = decode_steps(engine, mixes, prompts[0], args.step_rounds)
    else:
        steps = classify_passes(engine, mixes, texts[: args.clients], args.step_rounds)

    # Cold adapters: not loaded before; one request alone, then the same request warm.
    cold, warm = [], []
    for ref in refs[N_ADAPTERS:]:
        for out in (cold, warm):
            start = time.perf_counter()
            served(ref, 0) if task == "classification" else list(engine.generate(prompts[0], ref, SamplingParams(1)))
            out.append(time.perf_counter() - start)
    engine.close()

    unit = "tokens/s" if task == "causal_lm" else "texts/s"
    lines = [
        f"### {model_id} ({task}; {args.clients} clients, "
        + (f"{args.tokens} tokens per request, " if task == "causal_lm" else "one text per request, ")
        + f"{args.warmup:g} s warm-up + {args.seconds:g} s measured × {args.rounds} rounds per scenario, "
        + f"torch threads {torch.get_num_threads()})",
        "",
        f"| scenario | {unit} | p50 latency (s) | p95 latency (s) | p50 first token (s) | rows per pass |",
        "|---|---|---|---|---|---|",
    ]
    med = {}
    for name, rs in results.items():
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        med[name] = m
        lines.append(
            f"| {name} | {m['throughput']:.1f} | {m['p50']:.3f} | {m['p95']:.3f} | {m['ttft_p50']:.3f} | "
            f"{m['mean_batch']:.1f} |"
        )
    tp = {name: m["throughput"] for name, m in med.items()}
    b, a = tp["(b) 1 NEAT adapter"], tp["(a) base model"]
    c8, d = tp["(c) 8 NEAT adapters"], tp["(d) naive, 8 adapters"]
    extra = statistics.median(c - w for c, w in zip(cold, warm, strict=True)) * 1000
    if steps:
        what = "Decode step" if task == "causal_lm" else "Classifying"
        lines += [
            "",
            f"{what} of a full batch ({args.clients} rows), median of {args.step_rounds} taking turns:",
            "",
            f"| scenario | time (ms) | {unit} at that rate |",
            "|---|---|---|",
            *[f"| {name} | {t * 1000:.1f} | {args.clients / t:.1f} |" for name, t in steps.items()],
        ]
        b_step = steps["(b) 1 NEAT adapter"]
        lines += [
            "",
            f"| ratio ({what.lower()} of a full batch) | value | goal |",
            "|---|---|---|",
            f"| (b) / (a) throughput | {steps['(a) base model'] / b_step:.3f} | ≥ 0.95 |",
            f"| (c, 8) / (b) throughput | {b_step / steps['(c) 8 NEAT adapters']:.3f} | ≥ 0.8 |",
            f"| (c, 32) / (b) throughput | {b_step / steps['(c) 32 NEAT adapters']:.3f} | — |",
        ]
    lines += [
        "",
        "End to end (closed loop, the table above):",
        "",
        "| ratio | value | goal |",
        "|---|---|---|",
        f"| (b) / (a) throughput | {b / a:.3f} | ≥ 0.95 |",
        f"| (c, 8) / (b) throughput | {c8 / b:.3f} | ≥ 0.8 |",
        f"| (c, 32) / (b) throughput | {tp['(c) 32 NEAT adapters'] / b:.3f} | — |",
        f"| (c, 8) / (d) throughput | {c8 / d:.2f} | ≥ 3 |",
        f"| cold − warm first request (ms, median of {len(cold)}) | {extra:.1f} | ≤ 100 |",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32, help="generated per request (EOS ignored)")
    parser.add_argument("--seconds", type=float, default=40, help="measured, per scenario and round")
    parser.add_argument("--warmup", type=float, default=10, help="run before measuring, per scenario and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--window-ms", type=float, default=5)
    parser.add_argument(
        "--step-rounds", type=int, default=30, help="decode steps (causal LM) or full-batch classifications, per mix"
    )
    parser.add_argument("--remote", action="store_true", help="through the inference tier vs in process (SmolLM2)")
    args = parser.parse_args()
    if args.remote:
        from serving_remote import run  # bench/ is on the path when this file runs as a script

        print("\n".join(run(args)))
        return

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    root = Path(tempfile.mkdtemp(prefix="neat-serving-"))
    report = []
    for key in args.models:
        report += bench_model(key, args, root)
    print("\n".join(report))


if __name__ == "__main__":
    main()
