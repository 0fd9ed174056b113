"""control.storage's temporary bytes: an upload stops being written at the first byte past its limit and removes
itself; the sweeper removes what a dead process or an abandoned write left (uploads under `.tmp/`, neat_core's
`.step-*.tmp` and `.adapter.*.tmp` directories) and nothing that is still being written."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest

from control.processes import process_token
from control.settings import Settings
from control.storage import DiskFull, Storage, TooLarge, no_space
from control.sweeper import Sweeper


def temps(storage: Storage) -> list[str]:
    return sorted(p.name for p in (storage.root / ".tmp").iterdir())


def age(path, seconds: float) -> None:
    """Make `path` and everything in it look last written `seconds` ago."""
    then = time.time() - seconds
    for inner in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(inner, (then, then))


def test_a_stream_past_its_limit_stops_there_and_leaves_nothing(tmp_path):
    storage = Storage(tmp_path)
    pulled = []

    def chunks():
        for i in range(1000):  # 1000 × 1 KiB offered; the limit is 10 KiB
            pulled.append(i)
            yield b"x" * 1024

    with pytest.raises(TooLarge, match="10,240 bytes"):
        storage.receive(chunks(), 10 * 1024)
    assert len(pulled) == 11  # the 11th chunk crossed the limit; nothing after it was read
    assert temps(storage) == []

    path, size, _ = storage.receive(iter([b"a" * 10, b"b" * 10]), 20)
    assert size == 20 and path.read_bytes() == b"a" * 10 + b"b" * 10
    assert path.parent == storage.root / ".tmp" and path.name.startswith(process_token() + ".")


def test_sweep_removes_what_the_dead_and_the_abandoned_left_and_keeps_live_writes(tmp_path):
    storage = Storage(tmp_path)
    live_upload = storage.temp_path()
    live_upload.write_bytes(b"being written")
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead_upload = storage.root / ".tmp" / f"{process_token(child.pid)}.abc"  # its writer was killed mid-body
    dead_upload.write_bytes(b"half a body")
    other_host = storage.root / ".tmp" / "elsewhere.123.456.def"  # another API machine's, recent: kept
    other_host.write_bytes(b"theirs")
    old_other_host = storage.root / ".tmp" / "elsewhere.123.456.old"
    old_other_host.write_bytes(b"abandoned")
    age(old_other_host, 7200)

    job = storage.root / "org-a" / "jobs" / "ftjob-1"
    killed_checkpoint = job / "checkpoints" / ".step-000004.0123.tmp"
    (killed_checkpoint / "adapter").mkdir(parents=True)
    (killed_checkpoint / "optimizer.safetensors").write_bytes(b"o" * 100)
    age(killed_checkpoint, 7200)
    writing_checkpoint = job / "checkpoints" / ".step-000006.4567.tmp"  # an old directory, a file written just now
    (writing_checkpoint / "adapter").mkdir(parents=True)
    age(writing_checkpoint, 7200)
    (writing_checkpoint / "optimizer.safetensors").write_bytes(b"o")
    killed_adapter = job / ".adapter.89ab.tmp"
    killed_adapter.mkdir()
    (killed_adapter / "adapter_model.safetensors").write_bytes(b"w")
    age(killed_adapter, 7200)
    complete = job / "checkpoints" / "step-000002"  # finished work is never touched, however old
    complete.mkdir()
    (complete / "state.json").write_text("{}")
    age(complete, 7200)

    removed = storage.sweep(max_age=3600)
    assert sorted(removed) == sorted([dead_upload, old_other_host, killed_checkpoint, killed_adapter])
    assert sorted(temps(storage)) == sorted([live_upload.name, other_host.name])
    assert writing_checkpoint.is_dir() and (complete / "state.json").is_file()
    assert storage.sweep(max_age=3600) == []


def test_the_sweeper_runs_at_start(tmp_path):
    settings = Settings(data_dir=tmp_path, artifact_root=tmp_path / "artifacts", temp_max_age_seconds=60)
    storage = Storage(settings.resolved_artifact_root)
    leftover = storage.root / "org-a" / "jobs" / "ftjob-1" / ".adapter.1.tmp"
    leftover.mkdir(parents=True)
    age(leftover, 120)
    sweeper = Sweeper(settings).start()
    try:
        assert not leftover.exists()
    finally:
        sweeper.stop()


def test_a_full_disk_is_recognised_in_every_shape_it_comes_in():
    assert no_space(OSError(errno.ENOSPC, "No space left on device"))
    assert no_space(DiskFull(errno.ENOSPC, "full"))
    assert no_space(RuntimeError("Error while serializing: IoError(No space left on device (os error 28))"))
    wrapped = RuntimeError("checkpoint failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert no_space(wrapped)
    assert not no_space(OSError(errno.EACCES, "Permission denied")) and not no_space(ValueError("x"))
