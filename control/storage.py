"""Artifact storage: uploaded files, checkpoints and finished adapters under organisation-prefixed keys.

A local directory (embedded) or a shared volume mounted on every machine (distributed). Keys are built by our code
from ids, never from user input; `path` still refuses anything that could leave the root.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path

_KEY = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


class TooLarge(Exception):
    """A stream passed its byte limit; nothing was stored."""


class Storage:
    def __init__(self, root: Path):
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

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
        """A fresh path on the same filesystem as the root, so that `commit` is an atomic rename."""
        tmp = self.root / ".tmp"
        tmp.mkdir(exist_ok=True)
        return tmp / uuid.uuid4().hex

    def receive(self, chunks: Iterable[bytes], limit: int) -> tuple[Path, int, str]:
        """Write a stream to a temporary file, hashing as it goes; returns (path, bytes, sha256)."""
        path = self.temp_path()
        digest, size = hashlib.sha256(), 0
        try:
            with open(path, "wb") as f:
                for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise TooLarge(f"larger than {limit} bytes")
                    digest.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path, size, digest.hexdigest()

    def commit(self, temp: Path, key: str) -> Path:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp, target)
        return target

    def delete(self, key: str) -> None:
        target = self.path(key)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)


def file_key(org_id: str, file_id: str) -> str:
    return f"{org_id}/files/{file_id}.jsonl"


def job_key(org_id: str, job_id: str) -> str:
    """The job's working directory: checkpoints/ and adapter/ (neat_core's layout under a TrainSpec.output_dir)."""
    return f"{org_id}/jobs/{job_id}"
