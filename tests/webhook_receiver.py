"""A webhook receiver for tests: a tiny `http.server` on loopback, in a thread, that records every request it gets
(headers and the exact body bytes) and answers with the statuses it is given, in turn (then 200)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int  # what the receiver answered


@dataclass
class Receiver:
    url: str
    statuses: list[int] = field(default_factory=list)  # answered in turn; 200 once used up
    redirect_to: str | None = None  # with a 3xx status: its Location
    received: list[Received] = field(default_factory=list)

    def wait(self, count: int, timeout: float = 60) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}: {len(self.received)} requests after {timeout} s, wanted {count}")
            time.sleep(0.1)
        return self.received


@contextmanager
def receiver(statuses: list[int] | None = None, redirect_to: str | None = None) -> Iterator[Receiver]:
    state = Receiver("", list(statuses or []), redirect_to)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802  (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            status = state.statuses.pop(0) if state.statuses else 200
            state.received.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, status))
            self.send_response(status)
            if 300 <= status < 400 and state.redirect_to:
                self.send_header("location", state.redirect_to)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
