"""The byte bound on an inference request's body, enforced before the body is parsed.

An inference body is JSON that FastAPI reads whole and pydantic then validates: a body of any size would be held
(and parsed) before the character bounds in `control.protocol` could refuse it. This middleware reads the body of
the inference routes itself, refusing with a 413 in OpenAI's shape as soon as a declared `Content-Length` or the
bytes received pass `max_inference_body_bytes`, and hands what fits on unchanged. Other routes stream their own
bodies (file uploads: `api.uploads`) and are not touched.
"""

from __future__ import annotations

import json
from typing import Any

from api.deps import settings_of
from api.errors import error_body

INFERENCE_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/classifications"})


class InferenceBodyLimit:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in INFERENCE_PATHS:
            await self.app(scope, receive, send)
            return
        settings = settings_of(scope.get("app"))
        limit = settings.max_inference_body_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await _refuse(send, limit)
            return
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > limit:
                await _refuse(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)


async def _refuse(send: Any, limit: int) -> None:
    message = (f"The request body is larger than the limit of {limit:,} bytes for inference requests "
               "(NEAT_MAX_INFERENCE_BODY_BYTES).")  # fmt: skip
    body = json.dumps(error_body(413, message, "request_too_large", None)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]  # fmt: skip
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
