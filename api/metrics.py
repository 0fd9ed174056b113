"""The API process's Prometheus metrics and its `/metrics` route (docs/metrics.md lists every family).

- Requests by route template (`/v1/fine_tuning/jobs/{fine_tuning_job_id}`, never the raw path: one series per
  route, not per job), method and status, with latency histograms: prometheus-fastapi-instrumentator.
- Requests in flight, by route template: our own small middleware, because the instrumentator's gauge registers
  in the process-wide registry, where a second app in the same process (every test) is a duplicate.
- The jobs table, read at scrape time (`JobsCollector`): jobs per status and the age of the oldest unfinished one
  in each. Every API process reports the same figures; aggregate them with `max`, not `sum`.

Each app has its own registry (`app.state.metrics`); the launcher adds the in-process inference tier's collectors
to it (launch). Scraping needs the metrics token (control.metrics).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Gauge, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from prometheus_fastapi_instrumentator import Instrumentator
from prometheus_fastapi_instrumentator.middleware import PrometheusInstrumentatorMiddleware
from prometheus_fastapi_instrumentator.routing import get_route_name
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Receive, Scope, Send

from api.deps import SettingsDep
from control import jobs
from control.db import session_scope
from control.metrics import scrape

log = logging.getLogger("api.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
NOT_A_ROUTE = "none"  # what the instrumentator calls a path that matches no route; so do we

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
def metrics(request: Request, settings: SettingsDep) -> Response:
    scraped = CollectorRegistry()  # the app's figures, and the census of the database this request's settings name
    scraped.register(request.app.state.metrics)
    scraped.register(JobsCollector(settings.resolved_database_url))
    status, content_type, body = scrape(scraped, settings, request.headers.get("authorization"))
    return Response(body, status_code=status, media_type=content_type)


def instrument(app: FastAPI) -> CollectorRegistry:
    """Measure `app`'s requests into a registry of its own (also `app.state.metrics`), with this process's CPU
    and memory, and add the `/metrics` route (which adds the jobs census)."""
    registry = CollectorRegistry()
    Instrumentator(should_group_status_codes=False, excluded_handlers=["^/metrics$"], registry=registry).instrument(
        app, metric_namespace="neat", metric_subsystem="api", latency_lowr_buckets=LATENCY_BUCKETS
    )
    # The instrumentator resolves each request's route template itself, as InFlight does: matching the path
    # against every route, about 40 us a time. InFlight (outside it) resolves it once and hands it on.
    for middleware in app.user_middleware:
        if middleware.cls is PrometheusInstrumentatorMiddleware:
            middleware.cls = _ResolvedOnce
    in_flight = Gauge("neat_api_requests_in_flight", "Requests being handled now, by route template.",
                      ["handler"], registry=registry)  # fmt: skip
    app.add_middleware(InFlight, gauge=in_flight)
    ProcessCollector(registry=registry)
    app.state.metrics = registry
    app.include_router(router)
    return registry


ROUTE_KEY = "neat.route_template"  # where InFlight leaves the request's route template (None: no route) in its scope


class _ResolvedOnce(PrometheusInstrumentatorMiddleware):
    """The instrumentator, reading the route template InFlight resolved (its own lookup is the fallback)."""

    def _get_handler(self, request: Request) -> tuple[str, bool]:
        if ROUTE_KEY not in request.scope:
            return super()._get_handler(request)
        name = request.scope[ROUTE_KEY]
        return (name, True) if name else (request.url.path, False)


class InFlight:
    """Counts each request in `gauge` under its route template while it runs (a streamed answer until its last
    byte is sent)."""

    def __init__(self, app: ASGIApp, gauge: Gauge):
        self.app, self.gauge = app, gauge
        # Resolving a template matches the path against every route (about 40 us); the answer depends on nothing
        # else, and a polling client asks for the same path again and again.
        self._template = functools.lru_cache(maxsize=4096)(self._resolve)

    @staticmethod
    def _resolve(method: str, root_path: str, path: str, app: Any) -> str | None:
        scope = {"type": "http", "method": method, "root_path": root_path, "path": path, "app": app}
        return get_route_name(Request(scope), should_include_root_path=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            return await self.app(scope, receive, send)
        # the template as the instrumentator resolves it (routers included by FastAPI are not plain routes)
        name = scope[ROUTE_KEY] = self._template(
            scope["method"], scope.get("root_path", ""), scope["path"], scope["app"]
        )
        child = self.gauge.labels(name or NOT_A_ROUTE)
        child.inc()
        try:
            await self.app(scope, receive, send)
        finally:
            child.dec()


class JobsCollector(Collector):
    """Jobs per status, and the age of the oldest unfinished job in each status, queried when scraped."""

    def __init__(self, database_url: str):
        self.database_url = database_url

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs_family = GaugeMetricFamily("neat_jobs", "Jobs in each status (the jobs table).", labels=["status"])
        age = GaugeMetricFamily("neat_jobs_oldest_age_seconds", "Age of the oldest job in each unfinished status.",
                                labels=["status"])  # fmt: skip
        up = GaugeMetricFamily("neat_jobs_database_up", "1 when the jobs census could read the database.")
        try:
            with session_scope(self.database_url) as session:
                census = jobs.census(session)
        except SQLAlchemyError as e:  # the database is away: say so, and leave the figures out
            log.warning("jobs census failed: %s", type(e).__name__)
            up.add_metric([], 0)
            yield up
            return
        at = time.time()
        for status, (count, oldest) in census.items():
            jobs_family.add_metric([status.value], count)
            if status in jobs.UNFINISHED:
                age.add_metric([status.value], 0.0 if oldest is None else max(0.0, at - oldest))
        up.add_metric([], 1)
        yield from (jobs_family, age, up)
