"""The API's /metrics in process (the real processes: tests/e2e/test_metrics.py): refused without the metrics
token, absent without one configured; requests counted under their route templates; the jobs census read from
this app's own database at scrape time."""

from __future__ import annotations

import time

from prometheus_client.parser import text_string_to_metric_families

from control.jobs import JobStatus
from tests.api import assert_error, classification_rows

TOKEN = "metrics-unit-token"


def _families(response) -> dict[str, dict[tuple, float]]:
    assert response.status_code == 200, response.text
    return {f.name: {tuple(sorted(s.labels.items())): s.value for s in f.samples if not s.name.endswith("_created")}
            for f in text_string_to_metric_families(response.text)}  # fmt: skip


def test_scraping_needs_the_metrics_token(make_api):
    api = make_api(metrics_token=TOKEN, admin_api_key="an-admin-key")
    for header in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer an-admin-key"},
                   api.a.headers, {"Authorization": TOKEN}):  # fmt: skip
        assert_error(api.client.get("/metrics", headers=header), 401, code="invalid_api_key")
    assert api.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert_error(make_api().client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}), 404)


def test_requests_by_route_template_and_the_jobs_census(make_api):
    api = make_api(metrics_token=TOKEN)
    file = api.upload_ok(classification_rows())
    job = api.create_job_ok(file["id"])
    api.set_job(job["id"], created_at=int(time.time()) - 30)
    for _ in range(2):
        assert api.get(f"/v1/fine_tuning/jobs/{job['id']}").status_code == 200
    assert api.get("/v1/fine_tuning/jobs/ftjob-nosuchjob").status_code == 404
    assert api.get("/v1/no/such/route").status_code == 404

    scraped = _families(api.client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}))
    requests = scraped["neat_api_http_requests"]
    route = "/v1/fine_tuning/jobs/{job_id}"
    assert requests[(("handler", route), ("method", "GET"), ("status", "200"))] == 2
    assert requests[(("handler", route), ("method", "GET"), ("status", "404"))] == 1
    assert requests[(("handler", "none"), ("method", "GET"), ("status", "404"))] == 1
    assert not any(job["id"] in str(labels) or "/metrics" in str(labels) for labels in requests)
    assert scraped["neat_api_http_request_duration_seconds"]
    assert scraped["neat_api_requests_in_flight"][(("handler", route),)] == 0  # all answered

    assert scraped["neat_jobs"][(("status", JobStatus.QUEUED.value),)] == 1
    assert scraped["neat_jobs"][(("status", JobStatus.RUNNING.value),)] == 0
    assert 30 <= scraped["neat_jobs_oldest_age_seconds"][(("status", JobStatus.QUEUED.value),)] < 120
    assert scraped["neat_jobs_database_up"][()] == 1
