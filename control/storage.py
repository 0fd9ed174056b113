"""Artifact storage: uploaded files, checkpoints and finished adapters under organisation-prefixed keys.

A local directory (embedded) or a shared volume mounted on every machine (distributed). Keys are built by our code
from ids, never from user input; `path` still refuses anything that could leave the root.

Temporary bytes: an upload is written under `.tmp/` (same filesystem as the root, so `commit` is an atomic rename),
named after the process writing it; neat_core writes checkpoints and adapters into `.step-*.tmp` and
`.adapter.*.tmp` directories beside their final place and renames them. A write that fails removes its own
temporary bytes; what a killed process left behind is removed by `sweep`, which the API and the workers run at
start and every `sweep_seconds`: an entry whose writer (on this host) is gone, or that nobody has written to for
`temp_max_age_seconds` (longer than any live request or write: an upload idle for `upload_idle_seconds` is cut off).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from control.processes import process_alive, process_token

_KEY = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
TEMP_DIR = ".tmp"
# neat_core's temporary directories beside a checkpoint or an adapter (neat_core.train.checkpoint, .artifacts)
# neat_core's temporary directories in a job attempt's folder (worker.trainspec), and in a job's folder as laid out
# before attempts had folders of their own
_LIBRARY_TEMPS = tuple(
    f"*/jobs/*/{folder}{name}"
    for folder in ("attempt-*/", "")
    for name in ("checkpoints/.step-*.tmp", ".adapter.*.tmp")
)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
log = logging.getLogger(__name__)


class TooLarge(Exception):
    """A stream passed its byte limit; nothing was stored."""


class DiskFull(OSError):
    """The storage volume is full (or over its quota); nothing was stored."""


def no_space(e: BaseException | None) -> bool:
    """Whether `e` (or what caused it) is the filesystem saying it is full: ENOSPC, or EDQUOT on a volume with
    quotas. Libraries that write from native code report it in words (safetensors: "No space left on device (os
    error 28)"; torch: a RuntimeError), so the message counts too."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, DiskFull) or (isinstance(e, OSError) and e.errno in _NO_SPACE):
            return True
        if any(words in str(e) for words in (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT))):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


class TempFile:
    """A file being written under `.tmp/`, hashed and counted as it goes: `write` chunks, then `finish` (fsynced;
    returns (path, bytes, sha256)) or `discard`. Past `limit` bytes it raises TooLarge, on a full disk DiskFull;
    either way it has removed its bytes already."""

    def __init__(self, path: Path, limit: int):
        self.path, self.limit = path, limit
        self.size, self._digest = 0, hashlib.sha256()
        self._file = open(path, "wb")  # noqa: SIM115 (closed by finish/discard)

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.limit:
            self.discard()
            raise TooLarge(f"larger than the limit of {self.limit:,} bytes")
        self._digest.update(chunk)
        self._guarded(self._file.write, chunk)

    def finish(self) -> tuple[Path, int, str]:
        self._guarded(self._file.flush)
        self._guarded(os.fsync, self._file.fileno())
        self._file.close()
        return self.path, self.size, self._digest.hexdigest()

    def discard(self) -> None:
        try:
            self._file.close()
        except OSError:  # a full disk fails the close's flush too; the bytes go with the unlink below
            pass
        self.path.unlink(missing_ok=True)

    def _guarded(self, call, *args) -> None:
        try:
            call(*args)
        except BaseException as e:
            self.discard()
            if no_space(e):
                raise DiskFull(e.errno, "the storage volume is full") from e
            raise


class Storage:
    def __init__(self, root: Path):
        self.root = root.resolve()
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if no_space(e):
                raise DiskFull(e.errno, "the storage volume is full") from e
            raise

    def path(self, key: str) -> Path:
        if not _KEY.match(key) or any(part in (".", "..") for part in key.split("/")):
            raise ValueError(f"invalid storage key {key!r}")
        return self.root / key

    def key(self, path: Path) -> str:
        """The key of a path under the root (the inverse of `path`): how a file neat_core wrote is recorded."""
        key = path.resolve().relative_to(self.root).as_posix()
        self.path(key)  # the same rules as any key
        return key

    def temp_path(self) -> Path:
        """A fresh path under `.tmp/`, on the same filesystem as the root (so that `commit` is an atomic rename),
        named after this process so that `sweep` knows when its writer is gone."""
        tmp = self.root / TEMP_DIR
        tmp.mkdir(exist_ok=True)
        return tmp / f"{process_token()}.{uuid.uuid4().hex}"

    def temp_file(self, limit: int) -> TempFile:
        try:
            return TempFile(self.temp_path(), limit)
        except OSError as e:
            if no_space(e):
                raise DiskFull(e.errno, "the storage volume is full") from e
            raise

    def receive(self, chunks: Iterable[bytes], limit: int) -> tuple[Path, int, str]:
        """Write a stream to a temporary file, hashing as it goes; returns (path, bytes, sha256)."""
        temp = self.temp_file(limit)
        try:
            for chunk in chunks:
                temp.write(chunk)
        except BaseException:
            temp.discard()
            raise
        return temp.finish()

    def commit(self, temp: Path, key: str) -> Path:
        target = self.path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            if no_space(e):
                raise DiskFull(e.errno, "the storage volume is full") from e
            raise
        os.replace(temp, target)
        return target

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)

    def sweep(self, max_age: float) -> list[Path]:
        """Remove temporary bytes nobody will finish: under `.tmp/`, entries whose writing process is gone or that
        were last written more than `max_age` seconds ago; neat_core's `.step-*.tmp` / `.adapter.*.tmp`
        directories last written that long ago. Returns what it removed."""
        cutoff, removed = time.time() - max_age, []
        temps = self.root / TEMP_DIR
        candidates = list(temps.iterdir()) if temps.is_dir() else []
        for pattern in _LIBRARY_TEMPS:
            candidates += self.root.glob(pattern)
        for path in candidates:
            owner = path.name.rsplit(".", 1)[0] if path.parent == temps else None
            try:
                stale = (owner is not None and not process_alive(owner)) or _last_written(path) < cutoff
                if not stale:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
            except FileNotFoundError:  # finished (renamed) or removed by another sweeper meanwhile
                continue
            removed.append(path)
        if removed:
            log.info("removed %d abandoned temporary entries under %s", len(removed), self.root)
        return removed


def _last_written(path: Path) -> float:
    """The newest modification time in `path` (a file, or a directory and everything in it)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for inner in path.rglob("*"):
            try:
                newest = max(newest, inner.lstat().st_mtime)
            except FileNotFoundError:
                continue
    return newest


def file_key(org_id: str, file_id: str) -> str:
    return f"{org_id}/files/{file_id}.jsonl"


def job_key(org_id: str, job_id: str) -> str:
    """The job's working directory: checkpoints/ and adapter/ (neat_core's layout under a TrainSpec.output_dir)."""
    return f"{org_id}/jobs/{job_id}"
