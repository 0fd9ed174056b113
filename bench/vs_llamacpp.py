"""Our inference server against llama.cpp's llama-server, side by side: generated tokens/s at 1, 8 and 32 streams,
on the base model and on one adapter (issue 18; goal: ours / llama.cpp >= 1.0).

Both servers run on loopback with 2 CPU threads each and serve the same weights: SmolLM2-135M-Instruct as our
catalog materialises it (fp32), converted to an f32 GGUF for llama.cpp; the adapter is a NEAT r=8 adapter on the
q/v projections (random weights, non-zero B so it changes the output), saved as our artifact (which ours loads
through vLLM's `POST /v1/load_lora_adapter`), and its exact LoRA export (the artifact's `lora/`) converted to a GGUF
LoRA. llama-server loads it with `--lora-init-without-apply`, so its base stays bare and a request selects the
adapter with `"lora": [{"id": 0, "scale": 1.0}]`.

Every request is a streamed OpenAI `/v1/completions` call whose prompt is token ids (a chat-templated tweet,
tokenised once by our tokenizer, so both servers see identical input: no chat template or BOS handling differs),
greedy (temperature 0), `max_tokens` tokens with EOS ignored. Closed loop: each client sends its next request when
its answer is done; a request still running when the window closes is dropped (its connection closed). Tokens are
counted as they arrive inside the measured window (after a warm-up).

Variants {ours, llama.cpp} x {base, adapter} x {streams} take turns, one at a time, round after round, so machine
noise hits them alike. Printed: per variant the median tokens/s over rounds with its min-max, and ours / llama.cpp
per model and stream count (ratio of medians, and the min-max of the per-round ratios). First a correctness check:
for a few prompts, the greedy texts of both servers, base and adapter, must be equal.

`--engines ours,llamacpp,service` adds the service's own llama.cpp path: our API (`python -m launch`: SQLite, its
own worker) with `NEAT_LLAMACPP_SERVERS` naming the same llama-server, asked with an API key as a
customer asks. The service trains a job (1 epoch of 16 chat rows) for a fine-tuned model id its records own; the
GGUF llama-server holds under that id's file name is the bench's adapter, converted by `python -m inference.gguf`,
so all three engines run the same weights. (A freshly trained adapter would not do: past its EOS, which the bench
ignores, ours generates special tokens that stream as empty text, and the token count would read them as nothing.)
Printed besides: service / llama.cpp, what the API's hop costs.

    scripts/llamacpp/build.sh                                   # once: llama-server and llama-bench into .llamacpp/
    python bench/vs_llamacpp.py                               # the recorded configuration (~20 min on 2 cores)
    python bench/vs_llamacpp.py --streams 1,8 --rounds 1 --seconds 10
    python bench/vs_llamacpp.py --out bench/results/vs_llamacpp.jsonl
    python bench/vs_llamacpp.py --prepare-only                # convert the model and make the adapter, then stop

The converted files and the adapter are kept in <llamacpp-dir>/models and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
from tests.services import free_port, process, wait_healthy  # noqa: E402  (the suite's service processes)

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER = "neat-r8-qv"
TOKEN = "bench-internal-token"
ENGINES = ("ours", "llamacpp", "service")
API_KEY = "sk-bench-vs-llamacpp"
TARGETS = ("base", "adapter")


def _run(command: list[str], env: dict | None = None) -> None:
    # nice: conversions are one-off preparation and should not compete with anything measured
    subprocess.run(["nice", "-n", "19", *command], env=env, check=True, cwd=ROOT)


def prepare(llamacpp_dir: Path) -> dict[str, Path]:
    """The base model's f32 GGUF, our adapter artifact and its LoRA export's GGUF, made once into
    <llamacpp_dir>/models."""
    from neat_core.models.loading import resolve

    src, models = llamacpp_dir / "src", llamacpp_dir / "models"
    for script in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py"):
        if not (src / script).exists():
            raise SystemExit(f"{src / script} is missing: run scripts/llamacpp/build.sh (LLAMACPP_DIR={llamacpp_dir})")
    models.mkdir(parents=True, exist_ok=True)
    hf_dir = resolve(MODEL)  # the catalog's GGUF dequantised once to an fp32 HF directory: the weights ours serves
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}  # the tree's own gguf, not a PyPI one
    paths = {
        "hf": hf_dir,
        "base": models / "SmolLM2-135M-Instruct.f32.gguf",
        "artifact": models / ADAPTER,
        "lora": models / f"{ADAPTER}.lora.f32.gguf",
    }
    if not paths["base"].exists():
        tmp = paths["base"].with_suffix(".tmp")
        _run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(hf_dir), "--outtype", "f32", "--outfile",
              str(tmp)], env)  # fmt: skip
        tmp.rename(paths["base"])
    if not (paths["artifact"] / "manifest.json").exists():
        make_adapter(paths["artifact"])
    if not paths["lora"].exists():
        tmp = paths["lora"].with_suffix(".tmp")
        _run([sys.executable, str(src / "convert_lora_to_gguf.py"), "--base", str(hf_dir), "--outtype", "f32",
              "--outfile", str(tmp), str(paths["artifact"] / "lora")], env)  # fmt: skip
        tmp.rename(paths["lora"])
    return paths


def make_adapter(out: Path) -> None:
    """A NEAT r=8 q/v adapter with random weights, saved as training saves it (peft files, manifest, `lora/`)."""
    import torch

    from neat_core.artifacts import save_artifact
    from neat_core.methods import attach
    from neat_core.models import load_base

    base, _ = load_base(MODEL, task="causal_lm")
    model = attach(base, "neat", r=8)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peanut_B" in name:  # zero at initialisation: the adapter would be a no-op
                # 0.2: the update is about a fifth of each weight's norm, enough to change greedy answers (0.02,
                # bench/serving.py's, changed none of the token check's)
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    save_artifact(model, out, base_model=MODEL, manifest={"task": "causal_lm", "hyperparameters": {"r": 8}})


def prompts(n: int) -> list[list[int]]:
    """n chat-templated tweets as token ids, by our tokenizer: both servers get the very same ids."""
    from transformers import AutoTokenizer

    from neat_core.data.samples import tweets
    from neat_core.models.loading import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve(MODEL))
    out = []
    for row in tweets(n, 0)[0]:
        messages = [{"role": "user", "content": f"Is this tweet positive? {row['text']}"}]
        out.append(list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)))
    return out


class Server:
    """One of the two servers, as a base URL plus how a request for the base model or the adapter is shaped."""

    def __init__(self, engine: str, url: str, headers: dict, models: dict | None = None, slots_url: str = ""):
        self.engine, self.url, self.headers = engine, url, headers
        self.models = models or {}  # the service: target -> the model id it is asked for
        self.slots_url = slots_url or url  # where the llama-server that does the work answers GET /slots

    def body(self, target: str, prompt: list[int], tokens: int, stream: bool, ignore_eos: bool = True) -> dict:
        body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": ignore_eos, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if self.engine == "ours":
            body["model"] = ADAPTER if target == "adapter" else MODEL
        elif self.engine == "service":
            body["model"] = self.models[target]  # the API picks the llama-server and the adapter's scales
        else:
            body["model"] = MODEL  # llama-server serves one model; the field is not used to route
            # Every adapter the server loaded is listed with its scale: 0 leaves the base bare.
            # Listed even for the base: an adapter a request leaves out runs at its start-up scale, 1.0.
            body["lora"] = [{"id": 0, "scale": 1.0 if target == "adapter" else 0.0}]
        return body


def start_ours(stack: ExitStack, paths: dict, args, logs: Path) -> Server:
    port = free_port()
    # Every stream is one caller here, and no caller may hold the batch's reserved rows (room for other
    # organisations, NEAT_SERVING_RESERVED_ROWS, 4 by default): the batch is sized so that the streams all run at
    # once, as llama.cpp's `--parallel` slots do. With max_batch = streams, 4 of 32 streams always waited.
    from control.settings import Settings  # the server's own reading of NEAT_SERVING_RESERVED_ROWS and its default

    reserved = Settings().serving_reserved_rows
    env = {**os.environ, "NEAT_INTERNAL_TOKEN": TOKEN, "NEAT_DATA_DIR": str(logs / "ours-data"),
           "NEAT_SERVING_MAX_BATCH": str(max(args.streams) + reserved), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}  # fmt: skip
    log = logs / "ours.log"
    stack.enter_context(process([sys.executable, "-m", "inference", "--port", str(port)], env, log, cwd=ROOT))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, log, timeout=300, path="/health")
    headers = {"Authorization": f"Bearer {TOKEN}"}
    load = {"lora_name": ADAPTER, "lora_path": str(paths["artifact"])}
    httpx.post(f"{url}/v1/load_lora_adapter", json=load, headers=headers, timeout=60).raise_for_status()
    return Server("ours", url, headers)


def start_llamacpp(stack: ExitStack, paths: dict, args, logs: Path, port: int = 0) -> Server:
    port = port or free_port()
    binary = args.llamacpp_dir / "build" / "bin" / "llama-server"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run scripts/llamacpp/build.sh (LLAMACPP_DIR={args.llamacpp_dir})")
    slots = max(args.streams)
    # --cache-ram 0: llama-server's host-memory prompt cache (on by default, 8 GiB) restores a cached prompt's KV
    # state by its tokens alone, whatever adapter computed it, so an adapter request after a base request with the
    # same prompt answers from the base's cache (the token check finds 4 of 6 answers wrong with it). Each slot
    # still reuses its own previous prompt's prefix (cleared when the adapter changes).
    command = [str(binary), "-m", str(paths["base"]), "--lora", str(paths["lora"]), "--lora-init-without-apply",
               "-t", str(args.threads), "-tb", str(args.threads), "--parallel", str(slots),
               "-c", str(slots * args.context), "--cont-batching", "--host", "127.0.0.1", "--port", str(port),
               "--no-webui", "--cache-ram", "0", "--alias", MODEL]  # fmt: skip
    log = logs / "llamacpp.log"
    stack.enter_context(process(command, dict(os.environ), log, cwd=ROOT))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, log, timeout=300, path="/health")
    return Server("llamacpp", url, {})


def start_service(stack: ExitStack, paths: dict, args, logs: Path, llama_port: int) -> tuple[Server, Path]:
    """Our API in front of the llama-server that will listen on `llama_port`, and the GGUF that server is to hold:
    the bench's adapter, named for a fine-tuned model the service trained."""
    port = free_port()
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {API_KEY}"}
    env = {**os.environ, "NEAT_DATA_DIR": str(logs / "service-data"), "NEAT_PORT": str(port),
           "NEAT_BOOTSTRAP_API_KEY": API_KEY, "NEAT_INTERNAL_TOKEN": TOKEN,
           "NEAT_LLAMACPP_SERVERS": f"http://127.0.0.1:{llama_port}",
           "NEAT_LLAMACPP_DIR": str(args.llamacpp_dir)}  # fmt: skip
    log = logs / "service.log"
    stack.enter_context(process([sys.executable, "-m", "launch"], env, log, cwd=ROOT))
    wait_healthy(url, log, timeout=300)
    rows = [{"messages": [{"role": "user", "content": f"What colour is item {i}?"},
                          {"role": "assistant", "content": ["red", "green", "blue", "yellow"][i % 4]}]}
            for i in range(16)]  # fmt: skip
    with httpx.Client(base_url=url, headers=headers, timeout=120) as http:
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        upload = http.post("/v1/files", files={"file": ("c.jsonl", data)}, data={"purpose": "fine-tune"})
        hyper = {"n_epochs": 1, "batch_size": 4}
        job = http.post("/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": upload.json()["id"],
                        "suffix": "bench", "adapter": {"type": "neat", "r": 8},
                        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}}}).json()  # fmt: skip
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(1)
            job = http.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise RuntimeError(f"the service's training job ended {job['status']}: {job.get('error')}")
    convert = [sys.executable, "-m", "inference.gguf", "adapter", str(paths["artifact"]),
               "--model", job["fine_tuned_model"], "--out-dir", str(logs / "service-gguf")]  # fmt: skip
    _run(convert, env)
    from control.backends import gguf_adapter_file

    models = {"base": MODEL, "adapter": job["fine_tuned_model"]}
    server = Server("service", url, headers, models, slots_url=f"http://127.0.0.1:{llama_port}")
    return server, logs / "service-gguf" / gguf_adapter_file(job["fine_tuned_model"])


def wait_idle(server: Server, timeout: float = 60) -> None:
    """Until the server runs nothing: requests dropped at the end of a window must not eat into the next variant's
    (the servers cancel a closed stream at their next step, but that takes a step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.engine == "ours":
            busy = httpx.get(f"{server.url}/stats", headers=server.headers, timeout=10).json()["rows_running"]
        else:
            busy = sum(s["is_processing"] for s in httpx.get(f"{server.slots_url}/slots", timeout=10).json())
        if not busy:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{server.engine} still busy {timeout:g} s after its window closed")


def complete(server: Server, target: str, prompt: list[int], tokens: int, ignore_eos: bool = True) -> str:
    body = server.body(target, prompt, tokens, stream=False, ignore_eos=ignore_eos)
    response = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers, timeout=300)
    response.raise_for_status()
    return response.json()["choices"][0]["text"]


def check_tokens(servers: dict[str, Server], ids: list[list[int]], n: int, tokens: int) -> dict:
    """Greedy texts of both servers for the first n prompts, base and adapter: how many are equal, and whether the
    adapter changes the output at all (a no-op adapter would make the adapter comparison meaningless). Answers stop
    at EOS here: past it the two differ by design. Ours continues after EOS like vLLM's `ignore_eos`, llama-server
    bans the end-of-generation tokens instead (a -inf logit bias), so from there the texts part."""
    result = {"prompts": n, "tokens": tokens}
    texts = {}
    for target in TARGETS:
        texts[target] = {
            e: [complete(s, target, p, tokens, ignore_eos=False) for p in ids[:n]] for e, s in servers.items()
        }
        pairs = list(zip(texts[target]["ours"], texts[target]["llamacpp"], strict=True))
        result[f"{target}_equal"] = sum(a == b for a, b in pairs)
        result[f"{target}_first_mismatch"] = next(({"ours": a, "llamacpp": b} for a, b in pairs if a != b), None)
    result["adapter_changes_output"] = sum(a != b for a, b in zip(*(texts[t]["ours"] for t in TARGETS), strict=True))
    return result


def check_service(servers: dict[str, Server], ids: list[list[int]], n: int, tokens: int) -> dict:
    """The service's greedy texts against llama-server's own, base and adapter: equal unless the API changed the
    request (sampling, adapter scales) on its way."""
    result = {"prompts": n, "tokens": tokens}
    for target in TARGETS:
        pairs = [(complete(servers["llamacpp"], target, p, tokens, False), complete(servers["service"], target, p,
                  tokens, False)) for p in ids[:n]]  # fmt: skip
        result[f"{target}_equal"] = sum(a == b for a, b in pairs)
    return result


def stream_once(server: Server, client: httpx.Client, target: str, prompt: list[int], tokens: int, stop_at: float):
    """One streamed completion: the arrival time of each generated token. A chunk normally carries one token;
    tokens a server held back (an incomplete UTF-8 character) are counted at the chunk that brings them, from the
    usage the stream ends with. Closed (the server cancels it) once the window is over."""
    stamps, total = [], None
    body = server.body(target, prompt, tokens, stream=True)
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage") and event["usage"].get("completion_tokens"):
                total = event["usage"]["completion_tokens"]
            if any(c.get("text") for c in event.get("choices") or []):
                stamps.append(time.perf_counter())
            if time.perf_counter() > stop_at:
                return stamps
    if total is not None and stamps and total > len(stamps):
        stamps += [stamps[-1]] * (total - len(stamps))
    return stamps


def closed_loop(server: Server, target: str, streams: int, args, ids: list[list[int]]) -> dict:
    """`streams` clients sending back to back for warm-up + seconds; tokens/s over the measured seconds."""
    counted, requests, errors = [0], [0], []
    lock = threading.Lock()
    count_from = time.perf_counter() + args.warmup
    stop_at = count_from + args.seconds

    def client(i: int) -> None:
        time.sleep(i * args.warmup / streams / 2)  # staggered starts: no lockstep waves
        n = i
        try:
            # A connection per request: llama-server (cpp-httplib) may close a kept-alive connection just as the
            # next request goes out on it; both servers pay the same loopback connect, well under a millisecond.
            limits = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(base_url=server.url, headers=server.headers, timeout=600, limits=limits) as http:
                while time.perf_counter() < stop_at:
                    stamps = stream_once(server, http, target, ids[n % len(ids)], args.tokens, stop_at)
                    n += streams  # the clients walk through the prompts without sharing one
                    with lock:
                        counted[0] += sum(1 for t in stamps if count_from <= t <= stop_at)
                        requests[0] += 1
        except Exception as e:  # a failing server must fail the run, not read as a slow one
            errors.append(e)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{server.engine}, {target}, {streams} streams: {errors[0]!r}") from errors[0]
    wait_idle(server)
    return {"tokens_per_s": counted[0] / args.seconds, "requests": requests[0]}


def summarise(results: dict, args) -> list[str]:
    med = {k: statistics.median(v) for k, v in results.items()}
    targets = [t for t in TARGETS if any(k[1] == t for k in results)]
    engines = [e for e in ENGINES if any(k[0] == e for k in results)]
    names = {"ours": "ours", "llamacpp": "llama.cpp", "service": "service (API + llama.cpp)"}
    compared = [e for e in engines if e != "llamacpp"]
    lines = [
        f"### {' and '.join(names[e] for e in compared)} vs llama.cpp: {MODEL}, {args.tokens} tokens per request "
        f"(EOS ignored), {args.threads} threads each, {args.warmup:g} s warm-up + {args.seconds:g} s measured x "
        f"{args.rounds} rounds per variant",
        "",
        "| model | streams | "
        + " | ".join(f"{names[e]} tokens/s (min-max)" for e in engines)
        + " | "
        + " | ".join(f"{names[e]} / llama.cpp (per-round min-max)" for e in compared)
        + " |",
        "|---|---|" + "---|" * (len(engines) + len(compared)),
    ]
    for target in targets:
        for streams in args.streams:
            cells = []
            for engine in engines:
                rs = results.get((engine, target, streams))
                cells.append(f"{med[engine, target, streams]:.1f} ({min(rs):.1f}-{max(rs):.1f})" if rs else "-")
            theirs = results.get(("llamacpp", target, streams))
            for engine in compared:
                ours = results.get((engine, target, streams))
                if ours and theirs:
                    per_round = [a / b for a, b in zip(ours, theirs, strict=True)]
                    ratio = f"{med[engine, target, streams] / med['llamacpp', target, streams]:.2f} "
                    cells.append(ratio + f"({min(per_round):.2f}-{max(per_round):.2f})")
                else:
                    cells.append("-")
            name = "base" if target == "base" else "1 adapter (NEAT r=8 q/v)"
            lines.append(f"| {name} | {streams} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default="1,8,32", help="concurrent streams, comma-separated")
    parser.add_argument("--engines", default="ours,llamacpp", help=f"of {', '.join(ENGINES)}, comma-separated")
    parser.add_argument("--targets", default="base,adapter", help="base, adapter or both")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=25, help="measured, per variant and round")
    # 15 s: at 32 streams the first answers' prefill alone takes about 10 s on 2 cores
    parser.add_argument("--warmup", type=float, default=15, help="run before measuring, per variant and round")
    parser.add_argument("--tokens", type=int, default=64, help="generated per request (EOS ignored)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of each server")
    parser.add_argument("--context", type=int, default=256, help="llama.cpp's context per stream (slot)")
    parser.add_argument("--check", type=int, default=4, help="prompts in the token check (0: skip it)")
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument("--llamacpp-dir", type=Path, default=Path(os.environ.get("LLAMACPP_DIR", ROOT / ".llamacpp")))
    parser.add_argument("--out", type=Path, help="JSON lines: one per variant and round, then the check")
    parser.add_argument("--prepare-only", action="store_true", help="make the GGUF files and the adapter, then stop")
    args = parser.parse_args()
    args.streams = [int(s) for s in args.streams.split(",")]
    args.llamacpp_dir = args.llamacpp_dir.resolve()
    targets = [t for t in args.targets.split(",") if t]
    engines = [e for e in args.engines.split(",") if e]
    if not set(engines) <= set(ENGINES) or ("service" in engines and "llamacpp" not in engines):
        parser.error(f"--engines: of {', '.join(ENGINES)}; service needs llamacpp (it runs in front of it)")

    paths = prepare(args.llamacpp_dir)
    if args.prepare_only:
        print("\n".join(f"{k}: {v}" for k, v in paths.items()))
        return
    ids = prompts(200)
    logs = Path(os.environ.get("TMPDIR", "/tmp")) / f"vs-llamacpp-{os.getpid()}"
    logs.mkdir(parents=True, exist_ok=True)
    out = open(args.out, "a") if args.out else None  # noqa: SIM115  (closed at the end)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def record(row: dict) -> None:
        if out:
            out.write(json.dumps({"started": started, **row}) + "\n")
            out.flush()

    with ExitStack() as stack:
        servers, llama_port = {}, free_port()
        if "service" in engines:  # first: llama-server starts holding the bench's adapter under the service's name
            servers["service"], paths["lora"] = start_service(stack, paths, args, logs, llama_port)
        if "ours" in engines:
            servers["ours"] = start_ours(stack, paths, args, logs)
        if "llamacpp" in engines:
            servers["llamacpp"] = start_llamacpp(stack, paths, args, logs, llama_port)
        print(f"servers up (logs in {logs})", flush=True)
        for server in servers.values():  # first calls allocate what they need; loads the adapter in ours
            for target in targets:
                complete(server, target, ids[0], 4)
        if "service" in servers and args.check:
            check = check_service(servers, ids, args.check, args.check_tokens)
            record({"check_service": check})
            print(f"token check, service vs llama.cpp: base {check['base_equal']}/{check['prompts']}, adapter "
                  f"{check['adapter_equal']}/{check['prompts']} equal", flush=True)  # fmt: skip
        if "ours" in servers and "llamacpp" in servers and args.check:
            check = check_tokens(servers, ids, args.check, args.check_tokens)
            record({"check": check})
            for target in TARGETS:
                print(f"token check, {target}: {check[f'{target}_equal']}/{check['prompts']} greedy answers of "
                      f"{check['tokens']} tokens equal", flush=True)  # fmt: skip
                if check[f"{target}_first_mismatch"]:
                    print(f"  first mismatch: {json.dumps(check[f'{target}_first_mismatch'])}", flush=True)
            print(f"adapter changes ours' answer on {check['adapter_changes_output']}/{check['prompts']} prompts")

        results: dict[tuple, list[float]] = {}
        for r in range(args.rounds):
            for target in targets:
                for streams in args.streams:
                    # odd rounds reverse the order: neither engine always runs right after the other
                    for engine in engines if r % 2 == 0 else engines[::-1]:
                        result = closed_loop(servers[engine], target, streams, args, ids)
                        results.setdefault((engine, target, streams), []).append(result["tokens_per_s"])
                        # the machine's load beside each figure: on a shared machine it says which ones to trust
                        result["load_1min"] = os.getloadavg()[0]
                        record({"round": r, "engine": engine, "target": target, "streams": streams, **result})
                        tps, n, load = result["tokens_per_s"], result["requests"], result["load_1min"]
                        what = f"round {r + 1}: {engine} {target} {streams} streams"
                        print(f"  {what}: {tps:.1f} tokens/s ({n} requests, load {load:.1f})", flush=True)
    if out:
        out.close()
    print("\n".join(summarise(results, args)) if "llamacpp" in engines and len(engines) > 1 else "")
    if len(engines) == 1:
        for (engine, target, streams), rs in results.items():
            print(f"{engine} {target} {streams} streams: {statistics.median(rs):.1f} ({min(rs):.1f}-{max(rs):.1f})")


if __name__ == "__main__":
    main()
