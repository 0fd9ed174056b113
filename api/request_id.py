"""`x-request-id`: every response carries one, and every log line written while its request is handled names it.

The id is the caller's own `x-request-id` when it is well-formed (a proxy's or a client's trace id, so both sides
log the same one), else a fresh `req_<32 hex>` (OpenAI's shape; the `openai` SDK reads it as `_request_id`). The
middleware wraps the whole app, outside Starlette's error middleware, so a 500 carries the id as well.

Log lines: a log record factory prefixes the message of any record made inside a request with `[<id>] ` and sets
`record.request_id` (None outside requests), so the id shows whatever handlers and formats the process uses (but
in uvicorn's access lines, whose formatter builds its text from the record's arguments, not its message).
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_WELL_FORMED = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")  # nothing a log line or a header could trip on
current: ContextVar[str | None] = ContextVar("request_id", default=None)


def new_id() -> str:
    return f"req_{secrets.token_hex(16)}"


class RequestId:
    """ASGI middleware: picks the request's id, exposes it as `current`, adds it to the response's headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = Headers(scope=scope).get(HEADER)
        request_id = incoming if incoming and _WELL_FORMED.match(incoming) else new_id()

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            current.reset(token)


def install_log_ids() -> None:
    """Makes every log record name the request it was written for (once per process)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "names_requests", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        record.request_id = current.get()
        if record.request_id is not None:
            record.msg = f"[{record.request_id}] {record.msg}"
        return record

    factory.names_requests = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
