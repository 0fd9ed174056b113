"""llama.cpp's llama-server in front of our engine (`NEAT_LLAMACPP_SERVERS`), with real processes: the embedded
service (`python -m launch`, our engine in process behind the llama-server) trains a SmolLM2 adapter and answers
with it while no llama-server is up; its LoRA download and the base model are converted with `python -m
inference.gguf`; a llama-server built by scripts/llamacpp/build.sh holds them, beside a decoy adapter listed first;
the stock openai client asks the API. llama-server's own token counter says which engine answered: llama.cpp for
what it holds and can honour, with our engine's greedy tokens (streamed or not, alone or four at once); ours for
the rest."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import anyio
import httpx
import pytest

from api.llamacpp import LlamaCppBackend, LlamaCppFirst, NotHere
from control.backends import Target, gguf_adapter_file
from control.protocol import ChatRequest
from tests.conftest import SMOLLM2, chat_rows
from tests.e2e.test_service_flow import ROOT, Service, _jsonl, _process, _wait_for, _wait_healthy
from tests.services import free_port

TOKEN = "llamacpp-tier-token"
KEY = "sk-llamacpp-tier"
LLAMACPP = Path(os.environ.get("NEAT_LLAMACPP_DIR", ROOT / ".llamacpp"))
SERVER = LLAMACPP / "build" / "bin" / "llama-server"
QUESTIONS = [f"What colour is item {i}?" for i in (3, 40, 7, 12)]


def _chat(question: str) -> list[dict]:
    return [
        {"role": "system", "content": "You answer with the colour of things."},
        {"role": "user", "content": question},
    ]


def _decoy(out: Path) -> Path:
    """A NEAT adapter with large random weights, saved as training saves it: its answers differ from everyone's."""
    import torch

    from neat_core.artifacts import save_artifact
    from neat_core.methods import attach
    from neat_core.models import load_base

    model = attach(load_base(SMOLLM2, task="causal_lm")[0], "neat", r=8)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "peanut_B" in name:  # zero at initialisation
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return save_artifact(model, out, base_model=SMOLLM2, manifest={"task": "causal_lm", "hyperparameters": {"r": 8}})


class LlamaServer:
    """llama-server on a fixed port, restartable with another adapter list (as an operator would)."""

    def __init__(self, port: int, base: Path, tmp: Path):
        self.port, self.base, self.tmp, self.url, self._stack = port, base, tmp, f"http://127.0.0.1:{port}", None

    def start(self, adapters: list[Path]) -> None:
        self.stop()
        # --cache-ram 0: llama-server's host-memory prompt cache matches prompts by their tokens alone, whichever
        # adapter computed them (docs/serving.md).
        command = [str(SERVER), "-m", str(self.base), "--alias", SMOLLM2, "--lora-init-without-apply",
                   "--parallel", "4", "-c", "4096", "-t", "2", "--host", "127.0.0.1", "--port", str(self.port),
                   "--no-webui", "--cache-ram", "0", "--api-key", TOKEN, "--jinja", "--metrics"]  # fmt: skip
        for adapter in adapters:
            command += ["--lora", str(adapter)]
        self._stack = ExitStack()
        log = self.tmp / f"llama-server-{time.monotonic_ns()}.log"
        self._stack.enter_context(_process(command, dict(os.environ), log))
        _wait_healthy(self.url, log, path="/health")

    def stop(self) -> None:
        if self._stack is not None:
            self._stack.close()
            self._stack = None

    def complete(self, body: dict) -> str:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        r = httpx.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    def predicted(self) -> int:
        """Tokens this llama-server has generated since it started (its Prometheus counter)."""
        r = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)
        assert r.status_code == 200, r.text
        (line,) = [x for x in r.text.splitlines() if x.startswith("llamacpp:tokens_predicted_total")]
        return int(float(line.split()[-1]))


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    assert SERVER.exists(), f"{SERVER} is missing: scripts/test builds it (scripts/llamacpp/build.sh)"
    tmp = tmp_path_factory.mktemp("llamacpp")
    port, llama_port = free_port(), free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NEAT_DATA_DIR": str(tmp / "data"),
           "NEAT_PORT": str(port), "NEAT_BOOTSTRAP_API_KEY": KEY, "NEAT_INTERNAL_TOKEN": TOKEN,
           "NEAT_LLAMACPP_SERVERS": f"http://127.0.0.1:{llama_port}", "NEAT_LLAMACPP_DIR": str(LLAMACPP)}  # fmt: skip
    with ExitStack() as stack:
        log = tmp / "launch.log"
        stack.enter_context(_process([sys.executable, "-m", "launch"], env, log))
        _wait_healthy(f"http://127.0.0.1:{port}", log)
        llama = LlamaServer(llama_port, tmp / "gguf" / "base.f32.gguf", tmp)
        stack.callback(llama.stop)
        yield Service(f"http://127.0.0.1:{port}", KEY, [log], env), llama, tmp


def test_llamacpp_servers_answer_what_they_hold_with_our_tokens_and_ours_the_rest(tier):
    service, llama, tmp = tier
    client = service.client()
    prompts = [_chat(q) for q in QUESTIONS]

    def greedy(model: str, messages: list[dict], **extra) -> str:
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0, **extra)
        assert reply.model == model
        return reply.choices[0].message.content

    # Train an adapter (the service's own worker), download its LoRA form, convert it and the base model.
    upload = client.files.create(file=("colours.jsonl", _jsonl(chat_rows(16))), purpose="fine-tune")
    hyperparameters = {"n_epochs": 3, "batch_size": 4, "learning_rate_multiplier": 10}
    method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    job = client.fine_tuning.jobs.create(model=SMOLLM2, training_file=upload.id, suffix="colours", method=method)
    job = _wait_for(client, job.id, {"succeeded"}, service, timeout=600)
    name = job.fine_tuned_model

    # No llama-server is up: our engine, behind it, answers. These are the answers llama.cpp must give.
    ours = {model: [greedy(model, m) for m in prompts] for model in (SMOLLM2, name)}
    assert ours[name] != ours[SMOLLM2], "training left the greedy answers unchanged: the checks below would be blind"

    with service.http() as http:
        r = http.get(f"/v1/fine_tuning/jobs/{job.id}/adapter", params={"format": "lora"})
        assert r.status_code == 200, r.text
        tarfile.open(fileobj=io.BytesIO(r.content)).extractall(tmp / "lora", filter="data")
    gguf = tmp / "gguf"
    convert = [sys.executable, "-m", "inference.gguf"]
    subprocess.run([*convert, "base", SMOLLM2, "--out", str(gguf / "base.f32.gguf")], env=service.env, check=True,
                   cwd=ROOT, timeout=600)  # fmt: skip
    subprocess.run([*convert, "adapter", str(tmp / "lora" / job.id), "--model", name, "--out-dir", str(gguf)],
                   env=service.env, check=True, cwd=ROOT, timeout=600)  # fmt: skip
    adapter = gguf / gguf_adapter_file(name)
    decoy_name = f"ft:{SMOLLM2}:org-other:decoy:ftjob-decoy"
    subprocess.run([*convert, "adapter", str(_decoy(tmp / "decoy")), "--model", decoy_name, "--out-dir", str(gguf)],
                   env=service.env, check=True, cwd=ROOT, timeout=600)  # fmt: skip
    decoy = gguf / gguf_adapter_file(decoy_name)
    assert adapter.exists() and decoy.exists() and not list(gguf.glob(".*.tmp"))

    llama.start([decoy, adapter])  # the decoy is id 0: a request that took the first adapter would get its answers
    decoy_only = [{"id": 0, "scale": 1.0}, {"id": 1, "scale": 0.0}]
    decoy_answers = [llama.complete({"messages": m, "max_tokens": 12, "temperature": 0, "lora": decoy_only})
                     for m in prompts]  # fmt: skip
    assert decoy_answers != ours[name] and decoy_answers != ours[SMOLLM2]

    # llama.cpp answers now (its counter moves), with our engine's greedy tokens; the base with every adapter off.
    before = llama.predicted()
    assert [greedy(SMOLLM2, m) for m in prompts] == ours[SMOLLM2]
    assert [greedy(name, m) for m in prompts] == ours[name]
    assert llama.predicted() - before >= 8
    # Four at once: each row's answer is its answer alone.
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda m: greedy(name, m), prompts))
    assert together == ours[name]

    # The serving stats show the llama-server's engine, and nothing of the adapters it holds (other organisations').
    with service.http() as http:
        stats = http.get("/v1/serving/stats").json()
    assert (llama.url, SMOLLM2) in [(e["server"], e["base_model"]) for e in stats["engines"]]
    assert "decoy" not in json.dumps(stats)

    # Streamed: the same text, every chunk naming the model asked for, usage in a final chunk of its own.
    before = llama.predicted()
    chunks = list(client.chat.completions.create(model=name, messages=prompts[0], max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert all(c.model == name for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ours[name][0]
    assert not chunks[-1].choices and chunks[-1].usage.completion_tokens >= 1
    text = list(client.completions.create(model=name, prompt="Colours:", max_tokens=4, temperature=0, stream=True,
                                          stream_options={"include_usage": True},
                                          extra_body={"ignore_eos": True}))  # fmt: skip
    assert text[-1].usage.completion_tokens == 4 and not text[-1].choices
    assert all(c.usage is None for c in text[:-1]) and all(c.id.startswith("cmpl-") for c in text)
    assert llama.predicted() - before == chunks[-1].usage.completion_tokens + 4

    # Seeded sampling is reproducible.
    sampled = [client.chat.completions.create(model=name, messages=prompts[1], max_tokens=12, temperature=1.0,
                                              seed=1234).choices[0].message.content for _ in range(2)]  # fmt: skip
    assert sampled[0] == sampled[1]

    # What llama.cpp would not honour goes to our engine (llama.cpp's counter stands still).
    before = llama.predicted()
    reply = client.chat.completions.create(model=name, messages=prompts[0], max_tokens=3, temperature=0,
                                           logprobs=True, top_logprobs=2)  # fmt: skip
    assert len(reply.choices[0].logprobs.content) == reply.usage.completion_tokens and llama.predicted() == before

    # Restarted with its adapters in the other order: the ids are read again, the answers stay the adapter's.
    llama.start([adapter, decoy])
    assert [greedy(name, m) for m in prompts[:2]] == ours[name][:2] and llama.predicted() >= 1
    # Restarted without it: our engine answers for the adapter, llama.cpp still for the base.
    llama.start([decoy])
    assert greedy(name, prompts[0]) == ours[name][0] and llama.predicted() == 0
    assert greedy(SMOLLM2, prompts[0]) == ours[SMOLLM2][0] and llama.predicted() >= 1

    # With nothing behind the llama-servers, what they cannot serve is answered: 404, 400 naming the field, 503.
    async def alone(servers: list[str], model: str, **fields) -> None:
        front = LlamaCppFirst(LlamaCppBackend(servers, TOKEN, connect_timeout_s=2), None)
        target = Target(model, "causal_lm", SMOLLM2, None if model == SMOLLM2 else "/artifact", owner="org-default")
        try:
            await front.complete(target, ChatRequest(model=model, messages=prompts[0], max_tokens=2, **fields))
        finally:
            await front.close()

    for servers, model, fields, status in (([llama.url], name, {}, 404), ([llama.url], SMOLLM2, {"n": 2}, 400),
                                           ([f"http://127.0.0.1:{free_port()}"], SMOLLM2, {}, 503)):  # fmt: skip
        with pytest.raises(NotHere) as caught:
            anyio.run(lambda: alone(servers, model, **fields))  # noqa: B023  (run at once, inside the loop)
        assert caught.value.status == status, caught.value.message
