"""End to end, with real processes and the stock `openai` client, on both topologies:

- distributed: Postgres + Redis (started here, on loopback), `alembic upgrade head`, a `celery worker` process, an
  inference server (`python -m inference`) and uvicorn serving the API, which sends inference to it;
- embedded: the README's run command, `python -m launch`, alone (SQLite, the SQLite broker, local disk, inference
  in the API's process).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests import conformance
from tests.conftest import MINILM, SMOLLM2, chat_rows, classification_rows, tool_chat_rows
from tests.services import free_port, postgres, process, redis
from tests.services import wait_healthy as _wait_healthy  # the name the e2e modules import

ROOT = Path(__file__).resolve().parents[2]
PROBE = ROOT / "tests" / "neat_core" / "stock_peft_probe.py"


@dataclass
class Service:
    url: str
    key: str
    logs: list[Path]
    env: dict[str, str] | None = None  # the deployment's settings, for operator commands (python -m api.admin)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=self.key, max_retries=0, timeout=120,
                             http_client=conformance.install(openai.DefaultHttpxClient(timeout=120)))  # fmt: skip

    def http(self) -> httpx.Client:
        client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120)
        return conformance.install(client)

    def tail(self) -> str:
        return "\n".join(f"--- {p.name}\n" + p.read_text(errors="replace")[-4000:] for p in self.logs if p.exists())


def _process(command: list[str], env: dict, log: Path):
    return process(command, env, log, cwd=ROOT)


@pytest.fixture(scope="module", params=["distributed", "embedded"])
def service(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "NEAT_DATA_DIR": str(tmp / "data"),
        "NEAT_PORT": str(port),
        "NEAT_CHECKPOINT_EVERY": "2",
    }
    url = f"http://127.0.0.1:{port}"
    with ExitStack() as stack:
        if request.param == "distributed":
            env["DATABASE_URL"] = stack.enter_context(postgres(tmp / "pg"))
            env["BROKER_URL"] = stack.enter_context(redis(tmp / "redis"))
            env["NEAT_ARTIFACT_ROOT"] = str(tmp / "shared-artifacts")
            env["NEAT_BOOTSTRAP_API_KEY"] = key = "sk-e2e-distributed-key"
            migrate = [sys.executable, "-m", "control.migrate", "upgrade"]
            subprocess.run(migrate, env=env, cwd=ROOT, check=True, timeout=120)
            logs = [tmp / "worker.log", tmp / "api.log", tmp / "inference.log"]
            worker = ["celery", "-A", "worker.app", "worker", "--pool=prefork", "--concurrency=1", "-Q", "training"]
            stack.enter_context(_process([sys.executable, "-m", *worker], env, logs[0]))
            inference_url = f"http://127.0.0.1:{free_port()}"
            env["NEAT_INTERNAL_TOKEN"] = "e2e-internal-token"
            env["NEAT_INFERENCE_SERVERS"] = inference_url
            server = [sys.executable, "-m", "inference", "--port", inference_url.rsplit(":", 1)[1]]
            stack.enter_context(_process(server, env, logs[2]))
            _wait_healthy(inference_url, logs[2], path="/health")
            uvicorn = ["uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
            stack.enter_context(_process([sys.executable, "-m", *uvicorn], env, logs[1]))
            _wait_healthy(url, logs[1])
        else:
            logs = [tmp / "launch.log"]
            stack.enter_context(_process([sys.executable, "-m", "launch"], env, logs[0]))
            _wait_healthy(url, logs[0])
            printed = re.search(r"API key: (\S+)", logs[0].read_text())
            assert printed, "the run command must print the API key"
            key = printed.group(1)
            assert (Path(env["NEAT_DATA_DIR"]) / "neat.sqlite").exists()  # embedded: SQLite under the data dir
        yield Service(url, key, logs, env)
    _assert_nothing_left_running(env["NEAT_DATA_DIR"])


def _assert_nothing_left_running(data_dir: str, timeout: float = 10) -> None:
    """Stopping the service stops all of it: no worker (or pool child) of this data directory outlives it."""
    marker = f"NEAT_DATA_DIR={data_dir}".encode()
    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                    alive.append((proc.name, (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:120]))
            except OSError:  # gone meanwhile, or not ours to read
                continue
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not alive, f"processes left running: {alive}"


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _wait_for(client: openai.OpenAI, job_id: str, statuses: set[str], service: Service, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        if job.status == "failed":
            events = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100).data]
            raise AssertionError(f"job failed: {job.error}\nevents: {events}\n{service.tail()}")
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {job.status} after {timeout} s\n{service.tail()}")


def _stock_peft_logits(tmp: Path, adapter_dir: Path, base_dir: Path, task: str) -> dict:
    spec = {"base_dir": str(base_dir), "task": task, "num_labels": 2, "input_ids": [[1, 2, 3, 4, 5]],
            "out": str(tmp / "probe"), "adapters": {"native": str(adapter_dir)}}  # fmt: skip
    (tmp / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, str(PROBE), str(tmp / "spec.json")], check=True, timeout=300)
    return json.loads((tmp / "probe.json").read_text())


def test_full_flow_with_the_openai_client(service, tmp_path):
    client = service.client()
    cls_file = client.files.create(file=("tweets.jsonl", _jsonl(classification_rows(16))), purpose="fine-tune")
    chat_file = client.files.create(file=("colours.jsonl", _jsonl(chat_rows(12))), purpose="fine-tune")
    assert cls_file.status == "processed" and chat_file.id.startswith("file-")

    def supervised(**hp) -> dict:
        return {"type": "supervised", "supervised": {"hyperparameters": hp}}

    cls_job = client.fine_tuning.jobs.create(
        model=MINILM, training_file=cls_file.id, validation_file=cls_file.id, suffix="sentiment",
        method=supervised(n_epochs=1, batch_size=4), extra_body={"adapter": {"type": "neat", "r": 4}},
    )  # fmt: skip
    chat_job = client.fine_tuning.jobs.create(
        model=SMOLLM2, training_file=chat_file.id, suffix="colours", method=supervised(n_epochs=1, batch_size=6)
    )
    assert cls_job.status == "queued" and cls_job.model == MINILM

    cls_job = _wait_for(client, cls_job.id, {"succeeded"}, service)
    chat_job = _wait_for(client, chat_job.id, {"succeeded"}, service)
    assert cls_job.fine_tuned_model == f"ft:{MINILM}:org-default:sentiment:{cls_job.id}"
    assert cls_job.hyperparameters.n_epochs == 1 and cls_job.trained_tokens > 0

    events = client.fine_tuning.jobs.list_events(chat_job.id, limit=100).data
    messages = [e.message for e in events]
    assert any("started" in m for m in messages) and any("successfully completed" in m for m in messages)
    assert any(e.type == "metrics" for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(cls_job.id).data
    assert checkpoints and all(c.step_number > 0 for c in checkpoints)
    # The results CSV, read through the files API as OpenAI's clients read it: a row per step with metrics.
    (results_id,) = chat_job.result_files
    assert client.files.retrieve(results_id).purpose == "fine-tune-results"
    lines = client.files.content(results_id).text.splitlines()
    assert lines[0].startswith("step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy")
    train_steps = {e.data["step"] for e in events if e.type == "metrics" and "train_loss" in e.data}
    assert {int(line.split(",")[0]) for line in lines[1:]} == train_steps
    model_ids = {m.id for m in client.models.list()}
    assert {MINILM, SMOLLM2, cls_job.fine_tuned_model, chat_job.fine_tuned_model} <= model_ids

    # Download the adapter and load it with stock peft in a process that never imports neat_core.
    with service.http() as http:
        response = http.get(f"/v1/fine_tuning/jobs/{chat_job.id}/adapter", params={"format": "native"})
        assert response.status_code == 200 and response.headers["content-type"] == "application/gzip"
        tarfile.open(fileobj=io.BytesIO(response.content)).extractall(tmp_path / "download", filter="data")
        from neat_core.models.loading import resolve

        errors = _stock_peft_logits(tmp_path, tmp_path / "download" / chat_job.id, resolve(SMOLLM2), "causal_lm")
        assert errors == {}

        # Classification through our extension endpoint.
        result = http.post(
            "/v1/classifications", json={"model": cls_job.fine_tuned_model, "input": ["love it", "awful"]}
        )
        assert result.status_code == 200, result.text
        data = result.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and all(d["label"] in ("negative", "positive") for d in data)

    # Inference with the fine-tuned chat model, whole and streamed.
    messages = [{"role": "user", "content": "What colour is item 2?"}]
    reply = client.chat.completions.create(model=chat_job.fine_tuned_model, messages=messages, max_tokens=5,
                                           temperature=0)  # fmt: skip
    assert reply.object == "chat.completion" and reply.usage.completion_tokens >= 1
    streamed = client.chat.completions.create(model=chat_job.fine_tuned_model, messages=messages, max_tokens=5,
                                              temperature=0, stream=True)  # fmt: skip
    chunks = list(streamed)
    assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content

    # Cancel a running job: it stops within a step and keeps its last checkpoint.
    long_job = client.fine_tuning.jobs.create(model=MINILM, training_file=cls_file.id,
                                              method=supervised(n_epochs=50, batch_size=4))  # fmt: skip
    deadline = time.monotonic() + 180
    while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(long_job.id, limit=100).data):
        assert time.monotonic() < deadline, service.tail()
        time.sleep(0.5)
    cancelled = client.fine_tuning.jobs.cancel(long_job.id)
    assert cancelled.status in ("running", "cancelled")  # running until it ends its current step
    final = _wait_for(client, long_job.id, {"cancelled"}, service, timeout=120)
    assert final.fine_tuned_model is None
    assert client.fine_tuning.jobs.checkpoints.list(long_job.id).data, "the last checkpoint is kept"


def test_a_job_trains_on_openai_chat_with_tools(service):
    """OpenAI's full chat format (`tools`, assistant `tool_calls` with content null, `role: tool` results, `weight`
    0) uploads and trains on SmolLM2; the job's input is the conversation as `chat.render` writes it, the tools'
    description and the results included, token for token."""
    from transformers import AutoTokenizer

    from neat_core.data import chat
    from neat_core.models.loading import resolve

    client = service.client()
    rows = tool_chat_rows(12)
    file = client.files.create(file=("weather.jsonl", _jsonl(rows)), purpose="fine-tune")
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 6}}}
    job = client.fine_tuning.jobs.create(model=SMOLLM2, training_file=file.id, suffix="weather", method=method)
    job = _wait_for(client, job.id, {"succeeded"}, service)
    assert job.fine_tuned_model and job.result_files

    tokenizer = AutoTokenizer.from_pretrained(resolve(SMOLLM2))
    rendered = [chat.render(tokenizer, row["messages"], row["tools"]) for row in rows]
    assert all('"name": "get_weather"' in text and "<tool_response>" in text for text in rendered)
    assert job.trained_tokens == sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in rendered)


def test_an_auto_adapter_job_picks_its_method_on_the_data(service):
    """`adapter: {"type": "auto"}` through the stock client: the worker scores the candidates on a dev split of
    the training file, the job object reports the choice and shows the winner's adapter, and events tell the story."""
    client = service.client()
    file = client.files.create(file=("tweets.jsonl", _jsonl(classification_rows(16))), purpose="fine-tune")
    # 6 epochs (24 steps): long enough to race both candidates within the budget (shorter runs take the first)
    method = {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 6, "batch_size": 4}}}
    auto = {"adapter": {"type": "auto", "candidates": ["neat", "lora"]}}
    job = client.fine_tuning.jobs.create(model=MINILM, training_file=file.id, method=method, extra_body=auto)
    _wait_for(client, job.id, {"succeeded"}, service)
    with service.http() as http:
        shown = http.get(f"/v1/fine_tuning/jobs/{job.id}").json()
    selection = shown["adapter_selection"]
    assert [c["method"] for c in selection["candidates"]] == ["neat", "lora"]
    assert selection["chosen"] in ("neat", "lora") and shown["adapter"]["type"] == selection["chosen"]
    assert all(c["dev_loss"] > 0 and c["adapter_parameters"] > 0 for c in selection["candidates"])
    # raced at one budget, LoRA's default count (on MiniLM NEAT's default rank already gives it)
    assert {c["adapter_parameters"] for c in selection["candidates"]} == {selection["budget"]["adapter_parameters"]}
    messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data]
    assert sum(m.startswith("Method selection: ") for m in messages) == 2
    assert any(m.startswith(f"Selected {selection['chosen']} for the full run") for m in messages)


ABANDONED_STREAMS = 6


def test_streams_whose_clients_leave_stop_generating(service):
    """Streamed chat completions on SmolLM2 through the API (the stock client; EOS ignored, 1,000 tokens each, far
    longer than this test) whose clients close their connections after the first content chunk: the engine's
    running rows drop to 0 within a few decode steps and seconds, long before any generation would have ended.
    Embedded, the API cancels the generation in its own process; distributed, it closes its stream from the
    inference server, which cancels it there."""
    client = service.client()
    messages = [{"role": "user", "content": "Tell me a long story about colours."}]

    def engine(http: httpx.Client) -> dict:
        engines = http.get("/v1/serving/stats").json()["engines"]
        (smollm2,) = [e for e in engines if e["base_model"] == SMOLLM2]
        return smollm2

    streams = []
    for _ in range(ABANDONED_STREAMS):
        stream = client.chat.completions.create(model=SMOLLM2, messages=messages, max_tokens=1000, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first content chunk
        streams.append(stream)
    with service.http() as http:
        deadline = time.monotonic() + 10  # the last row is counted once its prefill step has ended
        while engine(http)["rows_running"] < ABANDONED_STREAMS and time.monotonic() < deadline:
            time.sleep(0.05)
        before = engine(http)
        assert before["rows_running"] == ABANDONED_STREAMS, before
        for stream in streams:
            stream.close()  # the connection goes: as a client that gives up, or dies
        left = time.monotonic()
        while (after := engine(http))["rows_running"] and time.monotonic() - left < 20:
            time.sleep(0.05)
        seconds, steps = time.monotonic() - left, after["forward_passes"] - before["forward_passes"]
    still = f"{after['rows_running']} rows still generating {seconds:.1f} s after their clients left ({steps} steps)"
    assert after["rows_running"] == 0, still
    # A row leaves at the engine's next step once its cancel arrives; the cancel crosses the API (and, distributed,
    # the inference server) on event loops that share this machine with the engine, so allow a few steps' slack.
    # Not cancelled, the rows would have run ~990 more steps.
    assert steps <= 12, f"the rows ran {steps} decode steps after their clients left"
    assert seconds < 20
