"""The inference tier's figures as Prometheus reads them: the engines' stats at scrape time (rows per pass as a
histogram of the engine's own batch-size tally), and the server's /metrics behind the metrics token, not the
internal one."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from control.settings import Settings
from inference.metrics import ServingCollector
from inference.server import create_app

ENGINE = {"base_model": "tiny", "task": "causal_lm", "queue_depth": 3, "rows_running": 2,
          "batch_sizes": {1: 4, 3: 2, 40: 1}, "bytes_used": 1000, "bytes_budget": 4096, "adapters_loaded": 2,
          "hits": 5, "misses": 2, "evictions": 1, "prefix_prompt_tokens": 900, "prefix_hit_tokens": 320,
          "adapters": [], "owners": {}}  # fmt: skip


class FakeHost:
    def stats(self) -> dict:
        return {"engines": [ENGINE], "solo_models": ["ft:a", "ft:b"], "solo_owners": {}, "solo_running": 0}

    def close(self) -> None:
        pass


def _samples(registry: CollectorRegistry) -> dict[tuple, float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip


def test_the_engines_figures_at_scrape_time():
    registry = CollectorRegistry()
    registry.register(ServingCollector(FakeHost()))
    samples = _samples(registry)
    engine = (("base_model", "tiny"), ("task", "causal_lm"))
    assert samples[("neat_inference_queue_depth", engine)] == 3
    assert samples[("neat_inference_rows_running", engine)] == 2
    assert samples[("neat_inference_adapter_cache_bytes", engine)] == 1000
    assert samples[("neat_inference_adapter_cache_hits_total", engine)] == 5
    assert samples[("neat_inference_adapter_cache_evictions_total", engine)] == 1
    assert samples[("neat_inference_prompt_tokens_total", engine)] == 900
    assert samples[("neat_inference_prefix_cache_hit_tokens_total", engine)] == 320

    # 7 passes of 1, 1, 1, 1, 3, 3 and 40 rows
    def bucket(le: str) -> float:
        return samples[("neat_inference_rows_per_pass_bucket", (engine[0], ("le", le), engine[1]))]

    assert (bucket("1.0"), bucket("4.0"), bucket("32.0"), bucket("+Inf")) == (4, 6, 6, 7)
    assert samples[("neat_inference_rows_per_pass_sum", engine)] == 4 + 6 + 40
    assert samples[("neat_inference_models_loaded", (("kind", "base"),))] == 1
    assert samples[("neat_inference_models_loaded", (("kind", "solo"),))] == 2


def test_the_server_wants_the_metrics_token(tmp_path):
    settings = Settings(data_dir=tmp_path, internal_token="internal", metrics_token="scrape")
    with TestClient(create_app(settings, host=FakeHost())) as client:
        for token in ("internal", "wrong"):
            response = client.get("/metrics", headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert client.get("/metrics").status_code == 401
        response = client.get("/metrics", headers={"Authorization": "Bearer scrape"})
        assert response.status_code == 200 and "neat_inference_queue_depth" in response.text
        assert client.get("/stats", headers={"Authorization": "Bearer scrape"}).status_code == 401  # /metrics only
    unset = Settings(data_dir=tmp_path, internal_token="internal")
    with TestClient(create_app(unset, host=FakeHost())) as client:
        assert client.get("/metrics", headers={"Authorization": "Bearer internal"}).status_code == 404
