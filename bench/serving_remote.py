"""Serving through the inference tier against serving in the API's process, side by side (`bench/serving.py
--remote`): the same closed loop of streaming chat clients on SmolLM2 (the base model; the transport is what
differs), once against `python -m launch` (the embedded default, inference in process) and once against
`uvicorn api.main:app` sending to one `python -m inference` server on this machine. The two run one after the
other (never together: they would share the CPU), over `rounds` interleaved rounds.

Printed: generated tokens/s (each streamed content chunk is a token: EOS is ignored, vLLM's `ignore_eos`), p50 /
p95 request latency, p50 time to first token, and the goal ratio remote / in-process (>= 0.9).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.services import free_port, process  # noqa: E402  (the suite's service processes)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY, TOKEN = "sk-bench-remote", "bench-internal-token"


def _process(command: list[str], env: dict, log: Path):
    return process(command, env, log, cwd=ROOT)


def _wait(url: str, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up:\n{log.read_text(errors='replace')[-3000:]}")


@contextmanager
def deployment(kind: str, root: Path, args):
    """An API on a fresh data directory, with inference in process (`embedded`) or on a server (`remote`)."""
    data = root / kind
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NEAT_DATA_DIR": str(data), "NEAT_BOOTSTRAP_API_KEY": KEY,
           "NEAT_SERVING_MAX_BATCH": str(args.clients), "NEAT_SERVING_BATCH_WINDOW_MS": str(args.window_ms),
           "NEAT_INFERENCE_RPM": "100000000"}  # fmt: skip
    port = free_port()
    env["NEAT_PORT"] = str(port)
    with ExitStack() as stack:
        if kind == "embedded":
            stack.enter_context(_process([sys.executable, "-m", "launch"], env, root / f"{kind}.log"))
        else:
            server = free_port()
            env.update(NEAT_INTERNAL_TOKEN=TOKEN, NEAT_INFERENCE_SERVERS=f"http://127.0.0.1:{server}")
            stack.enter_context(_process([sys.executable, "-m", "inference", "--port", str(server)], env,
                                         root / "inference.log"))  # fmt: skip
            subprocess.run([sys.executable, "-m", "control.migrate", "upgrade"], env=env, cwd=ROOT, check=True)
            api = ["uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
            stack.enter_context(_process([sys.executable, "-m", *api], env, root / f"{kind}.log"))
            _wait(f"http://127.0.0.1:{server}/health", root / "inference.log")
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/healthz", root / f"{kind}.log")
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=600) as http:
            stream_once(http, 2, float("inf"))  # the base model loads before the clock starts
        yield url


def stream_once(client: httpx.Client, tokens: int, stop_at: float) -> tuple[list[float], float]:
    """One streamed chat completion: the times its content chunks arrived, seconds to the first."""
    if time.perf_counter() > stop_at:
        return [], 0.0
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about colours."}], "stream": True,
            "max_tokens": tokens, "temperature": 0, "ignore_eos": True}  # fmt: skip
    start, stamps = time.perf_counter(), []
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choices = json.loads(line[6:]).get("choices") or [{}]
                if choices[0].get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
    return stamps, (stamps[0] - start) if stamps else 0.0


def closed_loop(url: str, args) -> dict:
    import threading

    latencies, firsts, units = [], [], [0]
    lock = threading.Lock()
    count_from = time.perf_counter() + args.warmup
    stop_at = count_from + args.seconds

    def client(i: int) -> None:
        time.sleep(i * args.warmup / args.clients / 2)
        headers = {"Authorization": f"Bearer {KEY}"}
        with httpx.Client(base_url=url, headers=headers, timeout=300) as http:
            while time.perf_counter() < stop_at:
                begun = time.perf_counter()
                stamps, first = stream_once(http, args.tokens, stop_at)
                with lock:
                    units[0] += sum(1 for t in stamps if count_from <= t <= stop_at)
                    if stamps and begun >= count_from and stamps[-1] <= stop_at:
                        latencies.append(stamps[-1] - begun)
                        firsts.append(first)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    qs = statistics.quantiles(latencies, n=20) if len(latencies) > 1 else latencies * 19
    return {"throughput": units[0] / args.seconds, "requests": len(latencies),
            "p50": statistics.median(latencies) if latencies else float("nan"), "p95": qs[18] if qs else float("nan"),
            "ttft_p50": statistics.median(firsts) if firsts else float("nan")}  # fmt: skip


def run(args) -> list[str]:
    root = Path(tempfile.mkdtemp(prefix="neat-serving-remote-"))
    results: dict[str, list[dict]] = {"embedded": [], "remote": []}
    for _ in range(args.rounds):
        for kind in results:
            with deployment(kind, root, args) as url:
                results[kind].append(closed_loop(url, args))
    rows = {k: {m: statistics.median(r[m] for r in v) for m in v[0]} for k, v in results.items()}
    ratio = rows["remote"]["throughput"] / rows["embedded"]["throughput"]
    lines = [
        f"### Through the inference tier vs in process: SmolLM2, {args.clients} streams, {args.tokens} tokens",
        "",
        "| deployment | tokens/s | p50 s | p95 s | TTFT p50 s | requests |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in rows.items():
        name = "in process (`python -m launch`)" if kind == "embedded" else "API -> `python -m inference`"
        lines.append(f"| {name} | {r['throughput']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft_p50']:.3f} | "
                     f"{r['requests']:.0f} |")  # fmt: skip
    lines += ["", f"remote / in-process throughput: {ratio:.3f} (goal >= 0.9)", ""]
    return lines
