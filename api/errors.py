"""Every error leaves the API in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, mapped here and
only here. Domain errors are `APIError`s; a backend's (inference) failures arrive as `BackendError`s."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from control.backends import BackendError
from control.protocol import named_param, refusal
from control.storage import DiskFull

log = logging.getLogger("api")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "invalid_request_error",
          404: "invalid_request_error",
          405: "invalid_request_error", 408: "invalid_request_error", 409: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable", 507: "server_error"}  # fmt: skip
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# OpenAI's API routes this service does not have (its resources); an unknown path under
# one of them answers `unsupported_route`, naming it, instead of the generic 404.
OFFERED = ("/v1/files, /v1/fine_tuning/jobs, /v1/models, /v1/chat/completions, /v1/completions, "
           "/v1/webhook_endpoints, and (ours) /v1/classifications, /v1/serving/stats and /v1/methods")  # fmt: skip
_UNOFFERED = re.compile(
    r"^/v1/(embeddings|batches|uploads|images|audio|assistants|threads|responses|moderations|vector_stores|evals"
    r"|realtime|containers|conversations|chatkit|videos|organization|projects|edits|engines|fine-tunes|webhooks"
    r"|skills|fine_tuning/checkpoints|fine_tuning/alpha)(/.*)?$"
)


def _unoffered(path: str) -> bool:
    return _UNOFFERED.match(path) is not None


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers, self.extra = headers or {}, extra or {}


def not_found(kind: str, ident: str, param: str | None = None) -> APIError:
    """Another organisation's resource answers exactly like a missing one."""
    return APIError(404, f"No {kind} found with id '{ident}'.", code=f"{kind}_not_found", param=param)


def error_body(status: int, message: str, code: str | None, param: str | None, **extra: Any) -> dict:
    error = {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}
    return {"error": {**error, **extra}}


def _first_problem(errors: list[dict]) -> tuple[str | None, str]:
    """(param, message) of the first invalid field. pydantic reports a union (`"auto" | int`) once per branch,
    with the branch's name in `loc`: drop those names, and prefer a branch's own complaint ("must be >= 1") over
    the literal branch's ("should be 'auto'")."""

    def field_path(error: dict) -> str:
        parts = [p for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
        return ".".join(str(p) for p in parts if isinstance(p, int) or _FIELD.match(str(p)))

    if not errors:
        return None, "Invalid request."
    path = field_path(errors[0])
    same_field = [e for e in errors if field_path(e) == path]
    best = next((e for e in same_field if e.get("type") != "literal_error"), same_field[0])
    return path or None, best.get("msg", "Invalid request.")


def api_error_response(exc: APIError) -> JSONResponse:
    body = error_body(exc.status, exc.message, exc.code, exc.param, **exc.extra)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(BackendError)
    async def _backend_error(_: Request, exc: BackendError) -> JSONResponse:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else {}
        body = error_body(exc.status, exc.message, exc.code, exc.param)
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        param, message = _first_problem(exc.errors())
        param = named_param(exc.errors()[0], param) if exc.errors() else param
        code, message = refusal(exc.errors()[0], param) or (
            "invalid_request",
            f"{param}: {message}" if param else message,
        )
        return JSONResponse(error_body(400, message, code, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # The framework's own refusals (no route, wrong method, a body it cannot parse) get a code too: clients
        # branch on `code`, never on the message.
        status = exc.status_code
        if status == 404 and exc.detail == "Not Found" and _unoffered(request.url.path):
            # an OpenAI route this service does not have: say so, rather than a bare 404 a client takes for a typo
            message = (f"{request.method} {request.url.path} is an OpenAI API route this service does not offer; it "
                       f"offers {OFFERED}.")  # fmt: skip
            return JSONResponse(error_body(404, message, "unsupported_route", None), status_code=404)
        if status == 400 and request.headers.get("content-type", "").lower().startswith("multipart/"):
            code = "invalid_multipart"  # Starlette's multipart parser refused the body (no boundary, bad parts)
        else:
            code = _HTTP_CODES.get(status, "invalid_request" if 400 <= status < 500 else "server_error")
        return JSONResponse(error_body(status, str(exc.detail), code, None), status_code=status,
                            headers=getattr(exc, "headers", None))  # fmt: skip

    @app.exception_handler(OperationalError)
    @app.exception_handler(DBAPIError)
    async def _database_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("database unavailable: %s", exc)
        body = error_body(503, "The database is unavailable; retry shortly.", "database_unavailable", None)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "5"})

    @app.exception_handler(PoolTimeout)
    async def _overloaded(_: Request, exc: Exception) -> JSONResponse:
        # every pooled connection stayed busy for pool_timeout: overload, which a retry a moment later resolves
        log.warning("database connection pool exhausted: %s", exc)
        body = error_body(503, "The service is overloaded; retry shortly.", "service_overloaded", None)
        return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})

    @app.exception_handler(DiskFull)
    async def _disk_full(_: Request, exc: DiskFull) -> JSONResponse:
        # the artifact volume is full: nothing was stored, and a retry once there is space succeeds
        log.error("storage full: %s", exc)
        body = error_body(507, "The service's storage is full; nothing was stored. Retry later.", "storage_full",
                          None)  # fmt: skip
        return JSONResponse(body, status_code=507, headers={"Retry-After": "60"})

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body(500, "Internal server error.", "internal_error", None), status_code=500)
