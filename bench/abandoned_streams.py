"""Abandoned streams: how long the engine keeps generating for clients that have gone (issue 13, item 6).

For each topology (`embedded`: `python -m launch`, inference in the API's process; `remote`: `uvicorn api.main:app`
in front of one `python -m inference`), and for each stream count: open that many concurrent streaming chat
completions on SmolLM2 with a long `max_tokens` (EOS ignored, so none ends by itself), read each one's first
content chunk, hold them a moment (to time a decode step), then close every connection at once. The engine's
`rows_running` and `forward_passes` (the API's `/v1/serving/stats`) are sampled every `--sample-ms` from then on.

Printed per run: the rows running when the clients left, the seconds and decode steps until none were, and how long
the generations would have run on (their remaining tokens times the measured step time).

    python bench/abandoned_streams.py                        # 32 and 64 streams, both topologies
    python bench/abandoned_streams.py --streams 8 --topologies remote
    python bench/abandoned_streams.py --drop idle --max-tokens 300   # clients that stop reading, still connected

With `--drop idle` the clients stop reading but keep their connections open (a client that breaks out of its loop
over the stream without closing it, and keeps its HTTP client): to the server that is a slow reader, not a
departure, and its rows run on; the kernel's socket buffers take a few hundred kilobytes of events before anything
pushes back, more than a whole 2,000-token stream.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_remote import KEY, MODEL, deployment  # noqa: E402

CHAT = [{"role": "user", "content": "Tell me a long story about colours."}]


class Sampler:
    """Polls the API's serving stats for the SmolLM2 engine: (seconds, rows_running, forward_passes)."""

    def __init__(self, url: str, every_s: float):
        self.url, self.every_s = url, every_s
        self.samples: list[tuple[float, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def now(self) -> tuple[float, int, int]:
        return self.samples[-1]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as http:
            while not self._stop.is_set():
                engines = http.get("/v1/serving/stats").json()["engines"]
                (engine,) = [e for e in engines if e["base_model"] == MODEL]
                self.samples.append((time.perf_counter(), engine["rows_running"], engine["forward_passes"]))
                self._stop.wait(self.every_s)


def abandon(url: str, streams: int, max_tokens: int, sample_ms: float, hold_s: float, bound_s: float,
            drop: str = "close") -> dict:  # fmt: skip
    started = threading.Barrier(streams + 1, timeout=300)  # every stream has its first chunk
    leave = threading.Event()  # every client stops reading now (and, with drop "close", closes its connection)
    done = threading.Event()  # the measurement is over

    def client() -> None:
        body = {"model": MODEL, "messages": CHAT, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True}  # fmt: skip
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=300) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                response.raise_for_status()
                lines = response.iter_lines()  # kept: a dropped line iterator would close the connection now
                for line in lines:
                    if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                        break  # the first content chunk
                started.wait()
                leave.wait()
                if drop == "idle":  # a client that stops reading but keeps its connection (and its client) open
                    done.wait()
            # leaving the block closed the response unread: the connection is closed, as a client that dies

    threads = [threading.Thread(target=client, daemon=True) for _ in range(streams)]
    with Sampler(url, sample_ms / 1000) as sampler:
        for t in threads:
            t.start()
        started.wait()
        tb, _, passes_b = sampler.now()
        time.sleep(hold_s)
        t0, rows0, passes0 = sampler.now()
        # a decode step's time while every row runs (nan: no step finished during the hold)
        step_s = (t0 - tb) / (passes0 - passes_b) if passes0 > passes_b else float("nan")
        leave.set()
        closed = time.perf_counter()
        while time.perf_counter() - closed < bound_s and (not sampler.samples or sampler.now()[1] > 0
                                                          or sampler.now()[0] < closed):  # fmt: skip
            time.sleep(sample_ms / 1000)
        t1, rows1, passes1 = sampler.now()
    done.set()
    for t in threads:
        t.join(timeout=30)
    return {"streams": streams, "rows_at_close": rows0, "rows_left": rows1, "seconds": t1 - closed,
            "steps": passes1 - passes0, "step_s": step_s,
            "would_run_s": (max_tokens - (passes0 - passes_b) - 1) * step_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--topologies", nargs="+", default=["embedded", "remote"], choices=["embedded", "remote"])
    parser.add_argument("--max-tokens", type=int, default=2000)
    parser.add_argument("--sample-ms", type=float, default=50)
    parser.add_argument("--hold-s", type=float, default=3, help="streams held open after their first chunk")
    parser.add_argument(
        "--drop",
        choices=["close", "idle"],
        default="close",
        help="close: clients close their connections; idle: they stop reading, connections open",
    )
    parser.add_argument("--bound-s", type=float, default=60, help="give up waiting for the rows after this long")
    args = parser.parse_args()
    # deployment() sizes the engine's batch by `clients`: every stream gets a row at once.
    settings = argparse.Namespace(clients=max(args.streams), window_ms=5)
    root = Path(tempfile.mkdtemp(prefix="neat-abandoned-"))
    lines = ["| topology | streams | rows at close | rows left | seconds to 0 | decode steps to 0 | step s | "
             "would have run s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for kind in args.topologies:
        with deployment(kind, root, settings) as url:
            for n in args.streams:
                r = abandon(url, n, args.max_tokens, args.sample_ms, args.hold_s, args.bound_s, args.drop)
                line = (f"| {kind} | {n} | {r['rows_at_close']} | {r['rows_left']} | {r['seconds']:.2f} | "
                        f"{r['steps']} | {r['step_s']:.3f} | {r['would_run_s']:.0f} |")  # fmt: skip
                print(line, flush=True)
                lines.append(line)
    title = f"SmolLM2, max_tokens {args.max_tokens}, stats sampled every {args.sample_ms:.0f} ms"
    print("\n".join(["", title, *lines]))


if __name__ == "__main__":
    main()
