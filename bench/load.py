"""Load test on loopback: many clients polling job status and listing events, against the real API (uvicorn) on a
real Postgres (started here, like the test suite's).

Each client is what an SDK's "wait for my job" loop does: every `--interval` seconds it retrieves its job and lists
its latest events, for `--seconds`. Jobs have a few hundred events each (a training run's metrics). Printed:
requests, errors (anything but 200), and latency percentiles per request kind and overall.

    python bench/load.py                           # 100 clients, 1 s interval, 60 s, Postgres
    python bench/load.py --clients 200 --interval 0.5 --api-workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEY = "sk-load-test"
ORG = "org-load"
OTHER_KEY = "sk-load-other"  # a second organisation, for the existence-timing check


def seed(url: str, jobs: int, events: int) -> list[str]:
    """Jobs with `events` events each, as training would have left them."""
    from control.db import session_scope
    from control.ids import new_id
    from control.jobs import JobStatus
    from control.keys import add_key
    from control.orm import File, Job, JobEvent

    ids = []
    with session_scope(url) as session:
        add_key(session, ORG, KEY)
        add_key(session, "org-other", OTHER_KEY)
        session.add(File(id="file-load", organization_id=ORG, filename="t.jsonl", purpose="fine-tune", bytes=1,
                         sha256="0" * 64, format="chat", num_examples=10, storage_key="x"))  # fmt: skip
        for _ in range(jobs):
            job = Job(id=new_id("ftjob"), organization_id=ORG, model="HuggingFaceTB/SmolLM2-135M-Instruct",
                      task="causal_lm", training_file="file-load", seed=0, hyperparameters={}, adapter={"type": "neat"},
                      status=JobStatus.RUNNING)  # fmt: skip
            session.add(job)
            session.flush()
            for step in range(events):
                session.add(JobEvent(id=new_id("ftevent"), job_id=job.id, type="metrics", message=f"Step {step}",
                                     data={"step": step, "train_loss": 1.0 / (step + 1)}))  # fmt: skip
            ids.append(job.id)
    return ids


async def client(http, job_id: str, interval: float, stop_at: float, out: dict[str, list[float]], errors: list,
                 phase: float = 0.0):  # fmt: skip
    await asyncio.sleep(phase)  # where in the interval this client polls: real clients did not all start at once
    while time.perf_counter() < stop_at:
        tick = time.perf_counter()
        for kind, path in (("retrieve job", f"/v1/fine_tuning/jobs/{job_id}"),
                           ("list events", f"/v1/fine_tuning/jobs/{job_id}/events?limit=20")):  # fmt: skip
            start = time.perf_counter()
            try:
                async with http.get(path) as r:
                    await r.read()
                    status = r.status
            except Exception as e:  # noqa: BLE001
                status = repr(e)
            out[kind].append(time.perf_counter() - start)
            if status != 200:
                errors.append(status)
        await asyncio.sleep(max(0.0, interval - (time.perf_counter() - tick)))


async def run_clients(base: str, job_ids: list[str], args, seconds: float) -> tuple[dict[str, list[float]], list]:
    # aiohttp rather than httpx: the load generator shares the two cores with the API and Postgres, so the
    # lighter the client, the less of the measured latency is the generator's own.
    import aiohttp

    out: dict[str, list[float]] = {"retrieve job": [], "list events": []}
    errors: list = []
    connector = aiohttp.TCPConnector(limit=args.clients)
    async with aiohttp.ClientSession(base, headers={"Authorization": f"Bearer {KEY}"}, connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=30)) as http:  # fmt: skip
        stop_at = time.perf_counter() + seconds
        # Phases spread evenly over one interval (--in-step: all at 0, every client polling at the same instant)
        phases = [0.0 if args.in_step else args.interval * i / args.clients for i in range(args.clients)]
        await asyncio.gather(*(client(http, job_ids[i % len(job_ids)], args.interval, stop_at, out, errors, phases[i])
                               for i in range(args.clients)))  # fmt: skip
    return out, errors


def existence_timing(base: str, foreign_job: str, n: int) -> tuple[float, float]:
    """Median latency (ms) of a 404 for another organisation's job vs for an id that does not exist, requests
    interleaved: equal medians mean the answer's timing does not tell a stranger the job exists."""
    import httpx

    missing = "ftjob-" + "0" * 24
    times: dict[str, list[float]] = {foreign_job: [], missing: []}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as http:
        for _ in range(n):
            for job_id in times:
                start = time.perf_counter()
                r = http.get(f"/v1/fine_tuning/jobs/{job_id}")
                times[job_id].append(time.perf_counter() - start)
                assert r.status_code == 404, r.text
    return statistics.median(times[foreign_job]) * 1000, statistics.median(times[missing]) * 1000


def postmaster_of(url: str) -> int:
    """The pid of the Postgres server listening on `url`'s port (its command line names the port)."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if argv and argv[0].endswith(b"postgres") and f"-p {port}".encode() in b" ".join(argv):
            return int(entry.name)
    raise RuntimeError(f"no postgres process for port {port}")


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used by process `root` and every live descendant, plus what its reaped
    children used: sampled before and after a run, the difference is what that process tree spent on it."""
    ticks = os.sysconf("SC_CLK_TCK")
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry.name)] = fields
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            f = stats[pid]  # after the ")": state ppid ... utime(11) stime(12) cutime(13) cstime(14)
            total += sum(int(x) for x in f[11 : 15 if pid == root else 13]) / ticks
        todo += children.get(pid, [])
    return total


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000)[int(q * 10) - 1] * 1000 if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--warmup", type=float, default=0, help="seconds of the same load first, not counted")
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--api-workers", type=int, default=1)
    parser.add_argument("--in-step", action="store_true", help="every client polls at the same instant (bursts)")
    args = parser.parse_args()

    import httpx

    from control.migrate import upgrade
    from tests.services import create_database, free_port, postgres

    tmp = Path(tempfile.mkdtemp(prefix="neat-load-"))
    with postgres(tmp) as server:
        url = create_database(server, "load")
        upgrade(url)
        job_ids = seed(url, args.jobs, args.events)
        port = free_port()
        env = {**os.environ, "NEAT_DATABASE_URL": url, "NEAT_DATA_DIR": str(tmp / "data"), "NEAT_SERVING": "false",
               "NEAT_INFERENCE_RPM": "1000000", "PYTHONPATH": str(ROOT)}  # fmt: skip
        command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port),
                   "--workers", str(args.api_workers), "--log-level", "warning"]  # fmt: skip
        api = subprocess.Popen(command, cwd=ROOT, env=env)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(300):
                try:
                    if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.1)
            # The same load for --warmup seconds first, not counted: the first requests of a fresh process open its
            # connections (16 for the async reads) and prepare its statements, a one-off a running service has paid
            if args.warmup > 0:
                asyncio.run(run_clients(base, job_ids, args, args.warmup))
            postmaster = postmaster_of(url)
            trees = {"API": api.pid, "Postgres": postmaster}
            before = {name: tree_cpu(pid) for name, pid in trees.items()}
            own = time.process_time()  # this process alone: its children are the API and Postgres
            out, errors = asyncio.run(run_clients(base, job_ids, args, args.seconds))
            cpu = {name: tree_cpu(pid) - before[name] for name, pid in trees.items()}
            cpu["load generator"] = time.process_time() - own
            foreign_ms, missing_ms = existence_timing(base, job_ids[0], 500)
        finally:
            api.terminate()
            api.wait(timeout=30)

    every = out["retrieve job"] + out["list events"]
    phasing = "all in step" if args.in_step else "phases spread over the interval"
    print(f"# {args.clients} clients, each every {args.interval:g} s ({phasing}): retrieve its job + list 20 events; "
          f"{args.seconds:g} s after {args.warmup:g} s not counted; Postgres; "
          f"{args.api_workers} uvicorn worker(s); {os.cpu_count()} CPUs\n")  # fmt: skip
    print("| requests | kind | errors | p50 (ms) | p95 (ms) | p99 (ms) | max (ms) |")
    print("|---|---|---|---|---|---|---|")
    for kind, values in [*out.items(), ("all", every)]:
        errs = len(errors) if kind == "all" else "—"
        print(f"| {len(values)} | {kind} | {errs} | {pct(values, 50):.1f} | {pct(values, 95):.1f} | "
              f"{pct(values, 99):.1f} | {max(values) * 1000:.1f} |")  # fmt: skip
    print(f"\nthroughput: {len(every) / args.seconds:.0f} requests/s; errors: {sorted(set(map(str, errors)))}")
    print("CPU per request (ms): " + ", ".join(f"{name} {1000 * t / len(every):.2f}" for name, t in cpu.items()))
    print(
        f"404 for another organisation's job: median {foreign_ms:.2f} ms; for a job that does not exist: "
        f"{missing_ms:.2f} ms (500 each, interleaved)"
    )


if __name__ == "__main__":
    main()
