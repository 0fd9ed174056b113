"""Unpacking an uploaded model archive (a tar, compressed or not, or a zip) into a folder, refusing anything that could
write outside it or run code: a member with an absolute path or a `..` part, a link, a device or other special file,
pickle weights (`neat_core.models.directory.PICKLE_SUFFIXES`), or more bytes than the limit (counted as they are
written, not as the archive declares them: a zip's sizes can lie). Nothing from the archive is trusted before it is
checked: every member is vetted before the first byte is written. Used by `control.models.register_archive`."""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import IO

from neat_core.models.directory import PICKLE_SUFFIXES, InvalidModelDirectory

CHUNK = 1 << 20
MAX_MEMBERS = 10_000


class InvalidArchive(InvalidModelDirectory):
    """An archive that cannot be unpacked safely; the message names the member and why."""


def unpack(archive: Path, into: Path, limit: int) -> None:
    """Unpack `archive` into the existing, empty folder `into`. A single top-level folder holding everything (what
    `tar czf model.tgz model/` makes) is stripped, so that the model's files land in `into` itself."""
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tar:
            _write(archive.name, _tar_members(tar), into, limit)
    elif zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zipped:
            _write(archive.name, _zip_members(zipped), into, limit)
    else:
        raise InvalidArchive(f"{archive.name} is neither a tar (.tar, .tar.gz, ...) nor a zip archive")


Members = list[tuple[str, Callable[[], IO[bytes]]]]


def _write(archive: str, members: Members, into: Path, limit: int) -> None:
    if not members:
        raise InvalidArchive(f"{archive} holds no files")
    if len(members) > MAX_MEMBERS:
        raise InvalidArchive(f"{archive} holds {len(members):,} files; a model directory has a handful")
    paths = {name: _safe(name) for name, _ in members}  # every member vetted before anything is written
    tops = {p.parts[0] for p in paths.values()}
    strip = 1 if len(tops) == 1 and all(len(p.parts) > 1 for p in paths.values()) else 0
    written = 0
    for name, open_member in members:
        target = into.joinpath(*paths[name].parts[strip:])
        target.parent.mkdir(parents=True, exist_ok=True)
        with open_member() as source, open(target, "xb") as out:  # "x": a duplicate member never overwrites
            while chunk := source.read(CHUNK):
                written += len(chunk)
                if written > limit:
                    raise InvalidArchive(f"{archive} unpacks to more than the limit of {limit:,} bytes")
                out.write(chunk)


def _safe(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts or path.parts[0].endswith(":"):
        raise InvalidArchive(f"archive member {name!r} points outside the archive's folder")
    if path.suffix in PICKLE_SUFFIXES:
        raise InvalidArchive(f"archive member {name!r} is pickle weights: refused, loading a pickle can run arbitrary "
                             "code; archive safetensors weights only")  # fmt: skip
    return path


def _tar_members(tar: tarfile.TarFile) -> Members:
    members = []
    for member in tar.getmembers():
        if member.isdir():
            continue
        if not member.isfile():
            raise InvalidArchive(f"archive member {member.name!r} is a link or special file: only files are taken")
        members.append((member.name, lambda m=member: tar.extractfile(m)))
    return members


def _zip_members(zipped: zipfile.ZipFile) -> Members:
    members = []
    for info in zipped.infolist():
        if info.is_dir():
            continue
        if stat.S_ISLNK(info.external_attr >> 16):
            raise InvalidArchive(f"archive member {info.filename!r} is a link: only files are taken")
        members.append((info.filename, lambda i=info: zipped.open(i)))
    return members
