"""Uploads and downloads with a byte progress bar. The SDK's `files.create` reads the file whole before sending
it, so an upload goes through httpx's streaming multipart body instead (same route, same form fields), with the
file wrapped to count the bytes as httpx reads them for the socket. A downloaded adapter archive is spooled to a
temporary file and extracted without its top folder into the directory asked for."""

from __future__ import annotations

import tarfile
import tempfile
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from cli.client import CLIError, check

CHUNK = 1 << 16


def _bar(console: Console, quiet: bool) -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())  # fmt: skip
    return Progress(*columns, console=console, disable=quiet)


class _Counting:
    """A binary file that reports every read to `advance`; the rest (fileno, seek, tell: how httpx sizes and
    rewinds a multipart field) is the file's own."""

    def __init__(self, file, advance):
        self._file, self._advance = file, advance

    def read(self, size: int = -1) -> bytes:
        data = self._file.read(size)
        self._advance(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


def upload(http: httpx.Client, path: Path, console: Console, *, quiet: bool) -> dict:
    size = path.stat().st_size
    with path.open("rb") as file, _bar(console, quiet) as progress:
        task = progress.add_task(f"upload {path.name}", total=size)
        counting = _Counting(file, lambda n: progress.advance(task, n))
        files = {"file": (path.name, counting, "application/jsonl")}
        response = check(http.post("files", data={"purpose": "fine-tune"}, files=files))
        progress.update(task, completed=size)  # a retried read (a rewind) must not leave the bar past its end
    return response.json()


def download(http: httpx.Client, url: str, params: dict, dest: Path, console: Console, *, quiet: bool) -> list[str]:
    """Extract the archive at `url` into `dest` (created; it must not hold anything yet); the names extracted."""
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise CLIError(f"{dest} already exists and is not an empty directory; choose another with --output.",
                       param="output")  # fmt: skip
    with http.stream("GET", url, params=params) as response, tempfile.TemporaryFile() as spool:
        check(response)
        total = int(response.headers.get("content-length") or 0) or None
        with _bar(console, quiet) as progress:
            task = progress.add_task(f"download {dest.name}", total=total)
            for chunk in response.iter_bytes(CHUNK):
                spool.write(chunk)
                progress.advance(task, len(chunk))
        spool.seek(0)
        with tarfile.open(fileobj=spool, mode="r:gz") as tar:
            members = []
            for member in tar.getmembers():
                _, _, rest = member.name.partition("/")  # the archive's one top folder: the job id
                if rest:
                    member.name = rest
                    members.append(member)
            dest.mkdir(parents=True, exist_ok=True)
            tar.extractall(dest, members=members, filter="data")  # "data": no absolute paths, links or devices out
    return sorted(m.name for m in members)
