"""What every tier's `/metrics` shares: who may scrape it, and the answer.

The families themselves live with what they measure: `api/metrics.py` (requests, and the jobs table),
`inference/metrics.py` (the engines, generation speed), `worker/metrics.py` (training, leases, the reaper);
docs/metrics.md lists them all.

A scrape needs `Authorization: Bearer <NEAT_METRICS_TOKEN>` on every tier: one read-only credential for the
monitoring system, not the admin key (which creates keys for any organisation) nor the internal token (which runs
inference on any adapter). Without a metrics token configured there is no `/metrics` (404) and no worker port.
"""

from __future__ import annotations

import hmac
import json

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from control.settings import Settings


def scrape(registry: CollectorRegistry, settings: Settings, authorization: str | None) -> tuple[int, str, bytes]:
    """(status, content type, body): the exposition of `registry`, or a refusal in OpenAI's error shape."""
    token = settings.metrics_token
    if not token:
        return _refusal(404, "Not found.", "not_found")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return _refusal(401, "Scraping /metrics needs the metrics token (NEAT_METRICS_TOKEN).", "invalid_api_key")
    return 200, CONTENT_TYPE_LATEST, generate_latest(registry)


def _refusal(status: int, message: str, code: str) -> tuple[int, str, bytes]:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return status, "application/json", json.dumps(body).encode()
