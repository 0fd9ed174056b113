"""The service, as the commands reach it: the `openai` SDK for every OpenAI route, a plain httpx client for the
rest (our `/v1/classifications`, the adapter download) and for uploads that report their bytes as they go (the SDK
reads a file whole before sending it). Whichever answered, a refusal becomes one `CLIError` carrying the API's
message, param and code (and, for a refused dataset, its line-numbered errors)."""

from __future__ import annotations

from functools import cached_property
from typing import Any

import httpx
import openai

from cli import config

TIMEOUT = httpx.Timeout(600, connect=10)  # a first inference request may wait for its model to load


class CLIError(Exception):
    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 errors: list[dict] | None = None):  # fmt: skip
        super().__init__(message)
        self.message, self.param, self.code, self.errors = message, param, code, errors or []

    def as_dict(self) -> dict[str, Any]:
        error = {"message": self.message, "param": self.param, "code": self.code}
        return {"error": {**error, **({"errors": self.errors} if self.errors else {})}}


def _from_body(body: Any, fallback: str) -> CLIError:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return CLIError(fallback)
    return CLIError(str(error.get("message") or fallback), param=error.get("param"), code=error.get("code"),
                    errors=error.get("errors") if isinstance(error.get("errors"), list) else None)  # fmt: skip


def from_openai(exc: openai.APIError) -> CLIError:
    if isinstance(exc, openai.APIConnectionError):
        return CLIError(f"Cannot reach the service at {exc.request.url}: {exc.__cause__ or exc}", code="unreachable")
    if isinstance(exc, openai.APIStatusError):
        try:
            body = exc.response.json()
        except ValueError:
            body = None
        return _from_body(body, f"HTTP {exc.status_code}: {exc.response.text[:200]}")
    return CLIError(str(exc))


def check(response: httpx.Response) -> httpx.Response:
    """`response`, unless it is a refusal (read in full first when it was streamed)."""
    if response.is_success:
        return response
    response.read()
    try:
        body = response.json()
    except ValueError:
        body = None
    raise _from_body(body, f"HTTP {response.status_code}: {response.text[:200]}")


class Service:
    def __init__(self, credentials: config.Credentials):
        self.credentials = credentials

    @cached_property
    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.credentials.base_url, api_key=self.credentials.api_key, timeout=TIMEOUT)

    @cached_property
    def http(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.credentials.api_key}"}
        return httpx.Client(base_url=f"{self.credentials.base_url}/", headers=headers, timeout=TIMEOUT)
