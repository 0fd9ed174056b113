"""Admission control and fairness with the issue's sizes, against the embedded deployment (`python -m launch`:
the API with inference in its process), on MiniLM classifiers fine-tuned here for a few steps.

Organisation A sends what the issue reported: three completions of 4,000,000 words each, and a classification of
2,048 texts of 20 KB; both are past the bounds now (a 400 naming the limit, or a 413 for the body), so A also
sends the largest classification the bounds admit (16 Mi characters: 838 texts of 20 KB), which is served.
Meanwhile organisation B sends one-line classifications one after another. Printed: B's p50/p95 latency on the
idle engine and while A's work is in (it should stay within a few times idle: the engine takes work round-robin
by organisation), A's answers and how long its admissible classification took, and the API process's resident
memory (RSS) before and after.

    python bench/fairness.py                     # the issue's sizes
    python bench/fairness.py --words 400000 --texts 2048 --text-bytes 20000 --idle 50
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serving_remote import _process, _wait  # noqa: E402
from tests.services import free_port  # noqa: E402

ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
GENERATOR = "HuggingFaceTB/SmolLM2-135M-Instruct"
KEY_A, KEY_B = "sk-bench-fair-a", "sk-bench-fair-b"
ORG_A, ORG_B = "org-a", "org-b"


def prepare(data: Path, encoder: str) -> tuple[str, str]:
    """A database with both organisations' keys and a classifier for each (the same trained weights)."""
    from control.db import session_scope
    from control.ids import new_id
    from control.keys import add_key
    from control.migrate import upgrade
    from control.settings import Settings
    from control.storage import Storage
    from tests.conftest import classification_rows
    from tests.inference.conftest import _job, _train

    data.mkdir(parents=True, exist_ok=True)
    settings = Settings(data_dir=data)
    upgrade(settings.resolved_database_url)
    storage = Storage(settings.resolved_artifact_root)
    job_id = new_id("ftjob")
    key = _train(encoder, classification_rows(), storage, ORG_A, job_id)  # type: ignore[arg-type]
    names = []
    with session_scope(settings.resolved_database_url) as session:
        for org, api_key in ((ORG_A, KEY_A), (ORG_B, KEY_B)):
            add_key(session, org, api_key)
        session.flush()
        for org, ident in ((ORG_A, job_id), (ORG_B, new_id("ftjob"))):
            job = _job(org, ident, encoder, "classification", key)  # type: ignore[arg-type]
            session.add(job)
            names.append(job.fine_tuned_model)
    return names[0], names[1]


def send_as_a(url: str, path: str, body: dict, times: int) -> list[tuple[int, str, str]]:
    """(status, the error's message, seconds) of each of `times` posts of `body` as organisation A."""
    import httpx

    out = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=3600) as a:
        for _ in range(times):
            start = time.perf_counter()
            r = a.post(path, json=body)
            message = r.json().get("error", {}).get("message", "") if r.status_code >= 400 else ""
            out.append((r.status_code, message[:110], f"{time.perf_counter() - start:.1f} s"))
    return out


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else values[0] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--words", type=int, default=4_000_000, help="words in each of A's three prompts")
    parser.add_argument("--texts", type=int, default=2048, help="texts in A's oversized classification")
    parser.add_argument("--text-bytes", type=int, default=20_000, help="characters per text of A's")
    parser.add_argument("--idle", type=int, default=50, help="B's requests on the idle engine")
    parser.add_argument("--encoder", default=ENCODER, help="the classifiers' base model (a catalog id or a path)")
    args = parser.parse_args()

    import httpx

    from control.protocol import MAX_INPUT_CHARS

    root = Path(tempfile.mkdtemp(prefix="neat-fair-"))
    classifier_a, classifier_b = prepare(root / "data", args.encoder)
    port = free_port()
    env = {**os.environ, "NEAT_DATA_DIR": str(root / "data"), "NEAT_PORT": str(port), "PYTHONPATH": str(ROOT),
           "NEAT_INFERENCE_RPM": "100000000", "NEAT_BOOTSTRAP_API_KEY": KEY_A, "NEAT_BOOTSTRAP_ORG": ORG_A}  # fmt: skip
    with _process([sys.executable, "-m", "launch"], env, root / "api.log") as api:
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/healthz", root / "api.log")
        a = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=3600)
        b = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY_B}"}, timeout=3600)

        def small() -> float:
            start = time.perf_counter()
            r = b.post("/v1/classifications", json={"model": classifier_b, "input": ["good day to you"]})
            r.raise_for_status()
            return time.perf_counter() - start

        assert a.post("/v1/classifications", json={"model": classifier_a, "input": ["warm up"]}).status_code == 200
        small()
        idle = [small() for _ in range(args.idle)]
        rss_before = rss_mb(api.pid)

        text = ("lorem ipsum dolor sit amet " * (args.text_bytes // 27 + 1))[: args.text_bytes]
        admissible = max(1, min(2048, MAX_INPUT_CHARS // args.text_bytes))
        # A's senders run in processes of their own: encoding their bodies here would take this process's CPU
        # from B's client, and B's latency is to measure the API.
        prompt = {"model": GENERATOR, "prompt": "word " * args.words, "max_tokens": 1}
        jobs = {
            "prompts": (url, "/v1/completions", prompt, 3),
            "oversized classification": (url, "/v1/classifications", {"model": classifier_a,
                                                                       "input": [text] * args.texts}, 1),
            "admissible classification": (url, "/v1/classifications", {"model": classifier_a,
                                                                        "input": [text] * admissible}, 1),
        }  # fmt: skip
        with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
            pending = {name: pool.apply_async(send_as_a, job) for name, job in jobs.items()}
            loaded = []
            while not all(p.ready() for p in pending.values()):
                loaded.append(small())
            answers = {name: p.get() for name, p in pending.items()}
        rss_peak = rss_mb(api.pid)
        time.sleep(3)  # the engine gives freed memory back once idle (at most once a second)
        rss_after = rss_mb(api.pid)

    print(f"# B's one-line classifications, idle vs while A's requests are in ({os.cpu_count()} CPUs)\n")
    print("| engine | requests | p50 (ms) | p95 (ms) | max (ms) |")
    print("|---|---|---|---|---|")
    for name, values in (("idle", idle), ("loaded", loaded)):
        print(f"| {name} | {len(values)} | {pct(values, 50):.1f} | {pct(values, 95):.1f} | {max(values) * 1000:.1f} |")
    print(f"\nloaded p95 / idle p95: {pct(loaded, 95) / pct(idle, 95):.2f}")
    print(
        f"API process RSS: {rss_before:.0f} MB before A's requests, {rss_peak:.0f} MB as they ended, "
        f"{rss_after:.0f} MB 3 s later ({rss_after / rss_before:.2f}x)"
    )
    print(f"A's admissible classification: {admissible} texts of {args.text_bytes} characters")
    for name, got in answers.items():
        print(f"A's {name}: {got}")


if __name__ == "__main__":
    main()
