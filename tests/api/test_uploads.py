"""Uploads over a real socket (uvicorn), where FastAPI's spooling would have shown: the size limit holds while the
body streams in (the 413 comes at the first byte past it, long before the body ends), and no upload leaves bytes
behind, whether it is refused, its client vanishes mid-body, or the API process itself is killed mid-body (the
sweeper of the next API process to start removes them)."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import func
from sqlalchemy import select as sql_select

from control.orm import File
from tests.api import sqlite_only, text_rows
from tests.services import free_port

ROOT = Path(__file__).resolve().parents[2]
BOUNDARY = "neat-test-boundary-0123456789"
LINE = (json.dumps({"text": "a line of training text " + "x" * 100}) + "\n").encode()


@contextmanager
def serving(app) -> Iterator[int]:
    """`app` behind a real uvicorn server on loopback, in a thread; yields its port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    try:
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def head(key: str, *, length: int | None = None) -> bytes:
    """Request line and headers of a multipart upload: chunked (no declared length) unless `length` is given."""
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (f"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n{framing}\r\n\r\n").encode()  # fmt: skip


def part_head() -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nfine-tune\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
            "Content-Type: application/jsonl\r\n\r\n").encode()  # fmt: skip


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def answered(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def read_response(sock: socket.socket) -> tuple[int, dict]:
    sock.settimeout(30)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    header, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in header.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return int(header.split()[1]), json.loads(body[:length])


def temp_bytes(api) -> int:
    """Bytes in the artifact store's temp folder now. The server may remove a temp file between the listing and
    its stat (it refuses and cleans up while this reads), so a file gone by then counts as nothing."""
    temp = api.artifact_root / ".tmp"
    total = 0
    for p in temp.iterdir() if temp.is_dir() else ():
        try:
            total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def assert_nothing_left(api) -> None:
    with api.session() as session:
        assert session.scalar(sql_select(func.count()).select_from(File)) == 0
    assert [p for p in api.artifact_root.rglob("*") if p.is_file()] == []


@sqlite_only
def test_an_upload_past_the_limit_is_refused_while_it_streams(make_api):
    limit = 1 << 20
    api = make_api(max_upload_bytes=limit)
    offered, sent, largest_temp = 512 << 20, 0, 0  # a 512 MiB body against a 1 MiB limit
    block = LINE * 512  # ~64 KiB
    with serving(api.client.app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(api.a.key) + chunked(part_head()))
        while sent < offered and not answered(sock):
            try:
                sock.sendall(chunked(block))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(block)
            largest_temp = max(largest_temp, temp_bytes(api))
        status, body = read_response(sock)
    assert status == 413, body
    assert body["error"]["code"] == "file_too_large" and body["error"]["param"] == "file"
    assert "1,048,576 bytes" in body["error"]["message"]  # the limit, named
    # Answered once the limit was passed, not once the body ended: what was sent by then is the limit plus
    # what the sockets' buffers held.
    assert sent < 64 << 20, f"the server read {sent:,} bytes before answering"
    assert largest_temp <= limit
    assert_nothing_left(api)


@sqlite_only
def test_a_declared_length_past_the_limit_is_refused_before_the_body(make_api):
    api = make_api(max_upload_bytes=1 << 20)
    with serving(api.client.app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(api.a.key, length=600 << 20))  # 600 MB announced, not a byte of it sent
        status, body = read_response(sock)
    assert status == 413 and body["error"]["code"] == "file_too_large"
    assert_nothing_left(api)


@sqlite_only
def test_a_client_that_vanishes_mid_body_leaves_nothing(make_api):
    api = make_api(max_upload_bytes=64 << 20)
    with serving(api.client.app) as port:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head(api.a.key) + chunked(part_head()))
        for _ in range(32):  # 2 MiB of the file, then the client dies
            sock.sendall(chunked(LINE * 512))
        deadline = time.monotonic() + 10
        while temp_bytes(api) == 0:
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.05)
        sock.close()
        deadline = time.monotonic() + 10
        while (api.artifact_root / ".tmp").exists() and any((api.artifact_root / ".tmp").iterdir()):
            assert time.monotonic() < deadline, "the vanished client's bytes are still on disk"
            time.sleep(0.05)
    assert_nothing_left(api)


@sqlite_only
def test_a_stalled_upload_is_cut_off(make_api):
    api = make_api(upload_idle_seconds=0.5)
    with serving(api.client.app) as port, socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(head(api.a.key) + chunked(part_head()) + chunked(LINE))
        status, body = read_response(sock)  # and then nothing more
    assert status == 408 and body["error"]["code"] == "upload_timeout"
    assert_nothing_left(api)


def start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "uvicorn", "api.main:app", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=out, start_new_session=True)
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


@sqlite_only
def test_an_api_process_killed_mid_upload_leaves_nothing_once_the_next_one_starts(db_url, orgs, tmp_path):
    artifacts, log, port = tmp_path / "artifacts", tmp_path / "api.log", free_port()
    env = {**os.environ, "NEAT_DATA_DIR": str(tmp_path / "data"), "NEAT_DATABASE_URL": db_url,
           "NEAT_ARTIFACT_ROOT": str(artifacts), "NEAT_SERVING": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    api = start_api(env, port, log)
    try:
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(head(orgs[0].key) + chunked(part_head()))
        for _ in range(32):
            sock.sendall(chunked(LINE * 512))
        deadline = time.monotonic() + 20
        while not list((artifacts / ".tmp").glob("*")) or not any(
            p.stat().st_size for p in (artifacts / ".tmp").iterdir()
        ):
            assert time.monotonic() < deadline, "the upload never reached the disk"
            time.sleep(0.05)
        os.killpg(api.pid, signal.SIGKILL)  # the API process dies mid-body: no finally of its runs
        api.wait(timeout=30)
        sock.close()
        [left] = list((artifacts / ".tmp").iterdir())
        assert left.stat().st_size > 0  # what the dead process left
        api = start_api(env, port, log)  # the next API process sweeps at start
        assert list((artifacts / ".tmp").iterdir()) == []
        r = httpx.post(f"http://127.0.0.1:{port}/v1/files", headers={"Authorization": f"Bearer {orgs[0].key}"},
                       files={"file": ("t.jsonl", b"".join(json.dumps(r).encode() + b"\n" for r in text_rows(12)))},
                       data={"purpose": "fine-tune"}, timeout=30)  # fmt: skip
        assert r.status_code == 200, r.text
    finally:
        if api.poll() is None:
            os.killpg(api.pid, signal.SIGKILL)
            api.wait(timeout=30)
