"""Data-parallel training (neat_core.train.distributed) on the CPU: 2 gloo processes train the adapter one process
trains on the same global batches, resume exactly after the whole process group is SIGKILLed, leave no rank behind
when their launcher is killed alone, and hand a rank's error to the caller as itself. (The cancel of a 2-device job,
through the worker: tests/worker/test_multi_device.py.) Each 2-process run costs a few seconds of process start-up:
the runs here are as few as the claims allow."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neat_core.errors import CheckpointError, DataFormatError, InvalidHyperparameterError
from neat_core.train import TrainSpec, latest_checkpoint, train
from tests.conftest import chat_rows, classification_rows, preference_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
RANK_MODULE = "neat_core.train.distributed"
# Run as a process of its own by the SIGKILL tests: the spec (pickled) trains on 2 devices, and after step `at` its
# launcher kills its whole process group, or itself alone.
KILLED_RUN = """
import os, pickle, signal, sys
from neat_core.train import Callback, train

spec, who, at = pickle.load(open(sys.argv[1], "rb")), sys.argv[2], int(sys.argv[3])

class Kill(Callback):
    def on_step_end(self, loop, metrics):
        if loop.step == at:
            print("killing", flush=True)
            if who == "group":
                os.killpg(0, signal.SIGKILL)
            os.kill(os.getpid(), signal.SIGKILL)

train(spec, [Kill()])
"""


@pytest.fixture(scope="module")
def no_dropout(tiny_models, tmp_path_factory) -> Path:
    """The tiny Llama with dropout off: with it, each rank draws its own masks and the runs differ as two seeds do;
    without it, 1 process and 2 must give the same adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("llama-no-dropout")
    AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attention_dropout=0.0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(folder)
    return folder


def adapter_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def spec(model: Path, data: Path, out: Path, **kw) -> TrainSpec:
    base = dict(base_model=str(model), training_file=data, output_dir=out, batch_size=4, n_epochs=1, seed=0,
                device="cpu", learning_rate_multiplier=5.0)  # fmt: skip
    return TrainSpec(**{**base, **kw})


# 11 rows in batches of 4: the last batch has 3 rows, so the ranks' shares differ (2 and 1). Causal LM, where the
# loss is a mean over labelled tokens (the ranks' counts differ), and DPO, where a rank takes whole pairs; a
# classifier's loss, a mean over rows, is the simple case of the same weighting (measured: 1.6e-7).
@pytest.mark.parametrize("rows, method", [(chat_rows(11), "neat"), (preference_rows(11), "lora")])
def test_two_processes_train_the_adapter_one_process_trains(no_dropout, tmp_path, rows, method):
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    objective = {"objective": "dpo"} if "input" in rows[0] else {}
    one = train(spec(no_dropout, data, tmp_path / "one", method=method, **objective))
    two = train(spec(no_dropout, data, tmp_path / "two", method=method, n_devices=2, **objective))
    assert two.status == "succeeded" and two.steps == one.steps == 3
    assert two.hyperparameters == {**one.hyperparameters, "n_devices": 2}
    difference = max_difference(adapter_of(one.adapter_dir), adapter_of(two.adapter_dir))
    print(f"{method}, {objective.get('objective', 'supervised')}: max |1 process - 2 processes| = {difference:.2e}")
    assert difference <= 1e-5
    assert two.metrics["train_loss"] == pytest.approx(one.metrics["train_loss"], abs=1e-5)  # the global batch's
    assert two.trained_tokens == one.trained_tokens


def test_n_devices_is_checked(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", classification_rows(11))
    for bad in (0, "2", 2.0, True):
        with pytest.raises(InvalidHyperparameterError, match="n_devices"):
            train(spec(tiny_models["bert"], data, tmp_path / "run", n_devices=bad))


def ranks_of(launcher: int) -> list[int]:
    """The pids of the rank processes launcher `launcher` started that are still alive."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            zombie = "\nState:\tZ" in (proc / "status").read_text()
        except OSError:
            continue
        if any(RANK_MODULE.encode() in arg for arg in argv) and str(launcher).encode() in argv[-3:] and not zombie:
            alive.append(int(proc.name))
    return alive


def wait_until(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


@pytest.fixture(scope="module")
def eight_steps(tiny_models, tmp_path_factory) -> tuple[TrainSpec, dict[str, torch.Tensor]]:
    """A 2-device run of 8 steps on the tiny Llama *with* dropout (so every rank's generator must be restored), a
    checkpoint every 2 steps; and its adapter, uninterrupted."""
    tmp = tmp_path_factory.mktemp("eight-steps")
    data = write_jsonl(tmp / "chat.jsonl", chat_rows(16))
    base = spec(tiny_models["llama"], data, tmp / "uninterrupted", n_epochs=2, n_devices=2, checkpoint_every=2)
    result = train(base)
    assert result.steps == 8
    return base, adapter_of(result.adapter_dir)


def kill_run(spec: TrainSpec, tmp_path: Path, who: str, at: int) -> int:
    """Run `spec` in a process of its own (a session of its own) that SIGKILLs `who` after step `at`; its pid."""
    (tmp_path / "spec.pickle").write_bytes(pickle.dumps(spec))
    (tmp_path / "run.py").write_text(KILLED_RUN)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(tmp_path / "run.py"), str(tmp_path / "spec.pickle"), who, str(at)]
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL and b"killing" in out, out.decode()[-3000:]
    return proc.pid


def test_a_group_sigkilled_after_a_checkpoint_resumes_to_the_uninterrupted_adapter(eight_steps, tmp_path):
    base, expected = eight_steps
    killed = replace(base, output_dir=tmp_path / "killed")
    kill_run(killed, tmp_path, "group", 5)  # mid-run, after step 4's checkpoint
    last = latest_checkpoint(killed.checkpoint_dir)
    assert last is not None and last.name == "step-000004"

    resumed = train(replace(base, output_dir=tmp_path / "resumed", resume_from=last))
    assert resumed.status == "succeeded" and resumed.steps == 8
    difference = max_difference(adapter_of(resumed.adapter_dir), expected)
    print(f"killed at step 5, resumed from step 4: max |resumed - uninterrupted| = {difference:.2e}")
    assert difference <= 1e-6


def test_ranks_die_with_their_launcher(eight_steps, tmp_path):
    """The worker's pool child SIGKILLed alone (the kernel's OOM killer picks one process): its ranks must not
    train on as orphans (PR_SET_PDEATHSIG)."""
    base, _ = eight_steps
    launcher = kill_run(replace(base, output_dir=tmp_path / "killed"), tmp_path, "launcher", 1)
    assert wait_until(lambda: not ranks_of(launcher)), ranks_of(launcher)


def test_a_checkpoint_resumes_only_on_as_many_devices(eight_steps, tmp_path):
    base, _ = eight_steps
    last = latest_checkpoint(base.checkpoint_dir)
    with pytest.raises(CheckpointError, match="different run"):
        train(replace(base, output_dir=tmp_path / "one", n_devices=1, resume_from=last))


def test_a_rank_error_reaches_the_caller_as_itself(tiny_models, tmp_path):
    data = write_jsonl(tmp_path / "cls.jsonl", [{"text": "only one label", "label": "a"}] * 11)
    with pytest.raises(DataFormatError, match="at least two distinct labels"):
        train(spec(tiny_models["bert"], data, tmp_path / "run", n_devices=2))
    assert ranks_of(os.getpid()) == []


def test_a_rank_without_rows_or_labelled_tokens_runs_a_stand_in_row_that_counts_for_nothing():
    from neat_core.train.distributed import _Group

    labels = torch.tensor([[-100, 5, 6], [-100, -100, -100], [-100, 7, -100]])  # row 1: nothing to predict
    batch = {"input_ids": torch.arange(9).view(3, 3), "attention_mask": torch.ones(3, 3), "labels": labels}

    def units(part):  # the loop's, for causal LM: labelled next-token positions
        return int((part["labels"][:, 1:] != -100).sum())

    parts = [_Group(rank, 2, torch.device("cpu")).shard(batch, units, pairs=False) for rank in range(2)]
    assert parts[0][0]["input_ids"].tolist() == [[0, 1, 2], [6, 7, 8]] and parts[0][1] == 1.0
    assert parts[1][0]["input_ids"].tolist() == [[0, 1, 2]] and parts[1][1] == 0.0  # row 1's stand-in: row 0
    four = [_Group(rank, 4, torch.device("cpu")).shard(batch, units, pairs=False)[1] for rank in range(4)]
    assert four == [2 / 3, 0.0, 1 / 3, 0.0]  # rank 3 has no row at all
    pairs = {k: torch.cat([v, v + 100]) for k, v in batch.items() if k != "labels"}  # 3 pairs: 6 rows
    part, share = _Group(1, 2, torch.device("cpu")).shard(pairs, lambda p: p["input_ids"].shape[0] // 2, pairs=True)
    assert part["input_ids"][:, 0].tolist() == [3, 103] and share == 1 / 3  # pair 1's chosen and rejected rows
