"""The polling fast path: the routes an SDK's "wait for my job" loop calls every second (retrieve a job, list its
events) answered without FastAPI's per-request machinery, when the request is an ordinary one.

Why by hand: in a burst of 100 clients polling at the same instant, two thirds of a poll's CPU in the API was
FastAPI's, not the route's (matching the path against every route, solving the dependencies, two more middleware
layers): about 0.25 of 0.38 ms a request, profiled in-process (docs/benchmarks.md, "API load"). The burst's
slowest answer waits for all the others, so that share is most of its latency.

What it does not change: the routes stay where they are (`api.routes.jobs`), declared to FastAPI as before (the
OpenAPI schema, and every request this path passes on). This path calls the same endpoint function with the same
arguments FastAPI would have given it, and answers what it returns, or the `APIError` it raises, in the same
shape. It takes only what it can decide exactly:
- a GET whose path the route's own pattern matches;
- a bearer key this process found valid in the last few seconds (`api.deps.remembered_org`);
- query parameters the endpoint declares, once each, non-empty, digits where it takes an int.
Everything else (a key to look up, an unknown or repeated parameter, a malformed limit) goes on to FastAPI, which
answers it as it always has, refusals included. So does a request whose endpoint fails with anything but an
`APIError` (the database away, say): FastAPI runs it again and maps that failure, as only it does (`api.errors`).
It sits inside the metrics middleware: these requests are counted and timed as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qsl

from fastapi.routing import APIRoute
from starlette.convertors import StringConvertor
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import app_settings, current_org, remembered_org, settings_of
from api.errors import APIError, api_error_response

_INT = re.compile(r"[0-9]{1,9}")


class _Polled:
    """One route this path may answer: its pattern, its endpoint, how each argument is filled."""

    def __init__(self, route: APIRoute):
        if route.methods != {"GET"} or not all(isinstance(c, StringConvertor) for c in route.param_convertors.values()):
            raise ValueError(f"{route.path}: only GET routes with plain string path parameters can be polled")
        self.pattern, self.endpoint = route.path_regex, route.endpoint
        self.org_arg = self.settings_arg = None
        for dependency in route.dependant.dependencies:
            if dependency.call is current_org:
                self.org_arg = dependency.name
            elif dependency.call is app_settings:
                self.settings_arg = dependency.name
            elif getattr(dependency.call, "only_params", None) is None:  # api.pagination.known_params: checks names
                raise ValueError(f"{route.path}: the dependency {dependency.call!r} is not one this path can fill")
        if self.org_arg is None:
            raise ValueError(f"{route.path}: a polled route takes the caller's organisation")
        self.query: dict[str, tuple[str, bool]] = {}  # query name -> (argument, whether an int)
        for field in route.dependant.query_params:
            annotation = field.field_info.annotation
            if annotation not in (int, str, str | None):
                raise ValueError(f"{route.path}: the query parameter {field.alias} is neither a string nor an int")
            self.query[field.alias] = (field.name, annotation is int)

    def arguments(self, scope: Scope, path_params: dict[str, str]) -> dict[str, Any] | None:
        """The endpoint's keyword arguments, or None where FastAPI must decide."""
        headers = scope["headers"]
        authorization = next((v for k, v in headers if k == b"authorization"), None)  # the first, as Starlette's
        settings = settings_of(scope["app"])
        org = remembered_org(settings, authorization.decode("latin-1") if authorization is not None else None)
        if org is None:
            return None
        kwargs: dict[str, Any] = {**path_params, self.org_arg: org}
        if self.settings_arg is not None:
            kwargs[self.settings_arg] = settings
        query = scope.get("query_string", b"")
        if query:
            pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)  # (Starlette's own parsing)
            for name, value in pairs:
                argument, is_int = self.query.get(name, (None, False))
                if argument is None or argument in kwargs or not value:
                    return None
                if is_int and not _INT.fullmatch(value):
                    return None
                kwargs[argument] = int(value) if is_int else value
        return kwargs


class PollingFastPath:
    """ASGI middleware answering `routes` (endpoint functions of GET routes) itself where it can (module doc)."""

    def __init__(self, app: ASGIApp, routes: Sequence[APIRoute], endpoints: Sequence[Callable[..., Any]]):
        self.app = app
        self.polled = [_Polled(r) for r in routes if isinstance(r, APIRoute) and r.endpoint in endpoints]
        if len(self.polled) != len(endpoints):
            raise ValueError("every polled endpoint must be one of the routes'")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            for polled in self.polled:
                match = polled.pattern.match(scope["path"])
                if match is None:
                    continue
                kwargs = polled.arguments(scope, match.groupdict())
                if kwargs is None:
                    break
                try:
                    response = JSONResponse(await polled.endpoint(**kwargs))
                except APIError as e:
                    response = api_error_response(e)
                except Exception:  # noqa: BLE001 - FastAPI runs it again and maps the failure (module doc)
                    break
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
