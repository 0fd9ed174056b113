"""`neatft` against a real service: the embedded deployment (`python -m launch`) started here, the CLI run as a
separate process (`python -m cli`, what the `neatft` script runs) with its own config directory, exactly as a user
would: log in, upload (a bad file refused locally with its line numbers, a good one with a progress bar), create a
job and follow it to the end, download its adapter and load it with stock peft, classify, chat, and script it all
with `--json`."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import MINILM, SMOLLM2, classification_rows, preference_rows
from tests.e2e.test_service_flow import (
    ROOT,
    Service,
    _assert_nothing_left_running,
    _jsonl,
    _process,
    _stock_peft_logits,
    _wait_healthy,
)
from tests.services import free_port

BAR = "━"  # rich's bar character: a progress bar was drawn


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "NEAT_DATA_DIR": str(tmp / "data"),
           "NEAT_PORT": str(port), "NEAT_CHECKPOINT_EVERY": "2"}  # fmt: skip
    url, log = f"http://127.0.0.1:{port}", tmp / "launch.log"
    with ExitStack() as stack:
        stack.enter_context(_process([sys.executable, "-m", "launch"], env, log))
        _wait_healthy(url, log)
        key = re.search(r"API key: (\S+)", log.read_text()).group(1)
        yield Service(url, key, [log])
    _assert_nothing_left_running(env["NEAT_DATA_DIR"])


class Neatft:
    """Runs `python -m cli` in `home` (its working directory and config dir), without the SDK's variables."""

    def __init__(self, home: Path):
        self.home = home
        self.env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_BASE_URL", "OPENAI_API_KEY")}
        self.env.update(XDG_CONFIG_HOME=str(home / "config"), PYTHONPATH=str(ROOT), COLUMNS="160",
                        HF_HUB_OFFLINE="1")  # fmt: skip

    def __call__(self, *args: str, ok: bool = True, env: dict | None = None, timeout: float = 300):
        done = subprocess.run([sys.executable, "-m", "cli", *args], cwd=self.home, env={**self.env, **(env or {})},
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)  # fmt: skip
        assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
        if ok:
            assert done.returncode == 0, f"neatft {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
        return done

    def json(self, *args: str):
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture(scope="module")
def neatft(service, tmp_path_factory) -> Neatft:
    cli = Neatft(tmp_path_factory.mktemp("home"))
    cli("login", "--base-url", f"{service.url}/v1", "--api-key", service.key)
    return cli


def test_login_stores_the_key_for_the_user_alone(service, neatft):
    config = neatft.home / "config" / "neatft" / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"base_url": f"{service.url}/v1", "api_key": service.key}
    assert {MINILM, SMOLLM2} <= {m["id"] for m in neatft.json("models", "list")}

    # OPENAI_API_KEY overrides the stored key: the API's refusal is shown, no traceback, exit code 1
    refused = neatft("models", "list", ok=False, env={"OPENAI_API_KEY": "sk-wrong"})
    assert refused.returncode == 1 and refused.stderr.startswith("error: ") and not refused.stdout
    # a wrong key is refused at login, and nothing is stored
    failed = neatft("login", "--base-url", f"{service.url}/v1", "--api-key", "sk-wrong", ok=False)
    assert failed.returncode == 1 and json.loads(config.read_text())["api_key"] == service.key


def test_a_bad_file_is_refused_before_upload_with_its_line_numbers(neatft):
    rows = _jsonl(classification_rows(12)).decode().splitlines()
    rows[2] = '{"text": "no label"}'
    rows[6] = "{not json"
    (neatft.home / "bad.jsonl").write_text("\n".join(rows) + "\n")
    refused = neatft("files", "upload", "bad.jsonl", ok=False)
    assert refused.returncode == 1, refused.stdout
    lines = refused.stderr.splitlines()
    assert lines[0].startswith("error: Invalid training file:") and "(param: file)" in lines[0]
    assert lines[1].startswith("  line 3: ") and lines[2].startswith("  line 7: "), refused.stderr
    as_json = neatft("files", "upload", "bad.jsonl", "--json", ok=False)
    error = json.loads(as_json.stderr)["error"]
    assert as_json.returncode == 1 and not as_json.stdout
    assert error["param"] == "file" and [e["line"] for e in error["errors"]] == [3, 7]
    assert neatft.json("files", "list") == []  # nothing reached the service

    # valid lines, too few of them for the service (its minimum is its own): its refusal and rows, shown alike
    (neatft.home / "short.jsonl").write_bytes(_jsonl(classification_rows(3)))
    short = neatft("files", "upload", "short.jsonl", ok=False)
    assert short.returncode == 1 and "  file: 3 valid examples; at least 10 needed" in short.stderr, short.stderr


def test_upload_train_follow_download_classify(neatft, service, tmp_path):
    (neatft.home / "tweets.jsonl").write_bytes(_jsonl(classification_rows(16)))
    uploaded = neatft("files", "upload", "tweets.jsonl")
    file_id = re.search(r"Uploaded (file-\S+)", uploaded.stdout).group(1)
    assert BAR in uploaded.stdout and "16 classification examples" in uploaded.stdout
    assert [f["id"] for f in neatft.json("files", "list")] == [file_id]
    assert file_id in neatft("files", "list").stdout

    created = neatft("jobs", "create", "--model", MINILM, "--training-file", file_id, "--validation-file", file_id,
                     "--adapter", "neat", "-p", "r=4", "--n-epochs", "1", "--batch-size", "4", "--suffix", "cli",
                     "--follow")  # fmt: skip
    out = created.stdout
    job_id = re.search(r"Created (ftjob-\S+)", out).group(1)
    assert BAR in out and "step 4/4" in out, out  # the step bar, full
    assert re.search(r"train\s+\d\.\d{4}\s+\d\.\d{4}", out), out  # the latest loss and accuracy
    assert re.search(r"valid\s+\d\.\d{4}\s+\d\.\d{4}", out), out
    assert "succeeded" in out and "Step 4/4: training loss=" in out, out  # the status and the events as they came
    assert re.search(r"loss [▁▂▃▄▅▆▇█]{4}", out), out  # the sparkline: one point per step

    job = neatft.json("jobs", "get", job_id)
    assert job["status"] == "succeeded" and job["adapter"]["r"] == 4 and job["hyperparameters"]["n_epochs"] == 1
    assert job["fine_tuned_model"] == f"ft:{MINILM}:org-default:cli:{job_id}"
    assert job_id in [j["id"] for j in neatft.json("jobs", "list")]

    downloaded = neatft("adapters", "download", job_id, "-o", "adapter")
    assert BAR in downloaded.stdout
    adapter = neatft.home / "adapter"
    assert {p.name for p in adapter.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "manifest.json"}
    from neat_core.models.loading import resolve

    assert _stock_peft_logits(tmp_path, adapter, resolve(MINILM), "classification") == {}
    listing = neatft.json("adapters", "download", job_id, "--checkpoint", "2", "-o", "step-2")
    assert "adapter_model.safetensors" in listing["files"] and (neatft.home / "step-2" / "manifest.json").exists()
    again = neatft("adapters", "download", job_id, "-o", "adapter", ok=False)  # never extracted over files
    assert again.returncode == 1 and "(param: output)" in again.stderr

    answer = neatft.json("classify", job["fine_tuned_model"], "love it", "awful")
    assert [d["index"] for d in answer["data"]] == [0, 1]
    assert all(d["label"] in ("positive", "negative") for d in answer["data"])
    table = neatft("classify", job["fine_tuned_model"], "love it").stdout
    assert "love it" in table and re.search(r"(positive|negative)\s+\d\.\d{3}", table), table


def test_chat_one_turn_streamed_and_as_json(neatft):
    said = neatft("chat", SMOLLM2, "-m", "Say hi", "--max-tokens", "8", "--temperature", "0")
    assert said.stdout.strip(), said
    reply = neatft.json("chat", SMOLLM2, "-m", "Say hi", "--max-tokens", "8", "--temperature", "0")
    assert reply["object"] == "chat.completion" and reply["choices"][0]["message"]["content"].strip()
    assert said.stdout.strip() == reply["choices"][0]["message"]["content"].strip()  # the stream, whole


def test_follow_reports_a_cancelled_job_in_its_exit_code(neatft):
    (file_id,) = [f["id"] for f in neatft.json("files", "list") if f["purpose"] == "fine-tune"]
    job = neatft.json("jobs", "create", "--model", MINILM, "--training-file", file_id, "--n-epochs", "50")
    cancelled = neatft.json("jobs", "cancel", job["id"])
    assert cancelled["id"] == job["id"] and cancelled["status"] in ("queued", "running", "cancelled")
    followed = neatft("jobs", "follow", job["id"], "--json", ok=False)
    assert followed.returncode == 4, followed
    *events, final = [json.loads(line) for line in followed.stdout.splitlines()]
    assert final["status"] == "cancelled" and all(e["object"] == "fine_tuning.job.event" for e in events)


def test_the_apis_errors_are_shown_with_their_param(neatft):
    missing = neatft("jobs", "get", "ftjob-nope", ok=False)
    assert missing.returncode == 1 and missing.stderr.startswith("error: No job found with id 'ftjob-nope'")
    refused = neatft("jobs", "create", "--model", MINILM, "--training-file", "file-nope", ok=False)
    assert refused.returncode == 1 and "(param: training_file)" in refused.stderr, refused.stderr
    usage = neatft("jobs", "create", "--model", MINILM, ok=False)  # click's usage error
    assert usage.returncode == 2


def test_a_dpo_job_is_created_with_its_method_and_beta(neatft, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in preference_rows(12)))
    file_id = neatft.json("files", "upload", str(pairs))["id"]
    job = neatft.json("jobs", "create", "--model", SMOLLM2, "--training-file", file_id, "--method", "dpo",
                      "--beta", "0.2", "--n-epochs", "1")  # fmt: skip
    assert job["method"]["type"] == "dpo" and job["method"]["dpo"]["hyperparameters"]["beta"] == 0.2
    assert neatft.json("jobs", "cancel", job["id"])["id"] == job["id"]  # its training is not this test's
    usage = neatft("jobs", "create", "--model", SMOLLM2, "--training-file", file_id, "--beta", "0.2", ok=False)
    assert usage.returncode == 2 and "--method dpo" in usage.stderr, usage.stderr
