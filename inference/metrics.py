"""The inference tier's Prometheus metrics (docs/metrics.md lists every family).

The engines' figures are read from `ModelHost.stats()` when scraped (`ServingCollector`), not counted a second time
on the way: queue depth, rows running, rows per forward pass (the engine's own tally of batch sizes, exposed as a
histogram), the adapter cache's bytes, hits, misses and evictions, and the models loaded. What only a request sees,
time to first token and generation speed, is observed by `inference.text.Generation` into the families below.

An inference server exposes them on its `/metrics` (inference.server); embedded, the launcher adds them to the
API's registry (launch).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

if TYPE_CHECKING:  # inference.text observes into this module, and the host imports inference.text
    from inference.host import ModelHost

TIME_TO_FIRST_TOKEN = Histogram(
    "neat_inference_time_to_first_token_seconds",
    "From a generation's start (its prompt encoded and queued) to its first token.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=None,
)
TOKENS_PER_SECOND = Histogram(
    "neat_inference_tokens_per_second",
    "Each finished generation's decode speed: its tokens after the first, over the time they took.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
    registry=None,
)
GENERATED_TOKENS = Counter("neat_inference_generated_tokens", "Tokens generated, all models.", registry=None)
ROWS_PER_PASS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def register(registry: CollectorRegistry, host: ModelHost) -> None:
    """Expose `host`'s engines and this process's generation figures in `registry`."""
    for family in (TIME_TO_FIRST_TOKEN, TOKENS_PER_SECOND, GENERATED_TOKENS):
        registry.register(family)
    registry.register(ServingCollector(host))


class ServingCollector(Collector):
    """The engines of one `ModelHost`, per base model and task, as they stand at scrape time."""

    def __init__(self, host: ModelHost):
        self.host = host

    def collect(self) -> Iterator[Metric]:
        stats = self.host.stats()
        labels = ["base_model", "task"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"neat_inference_{name}", doc, labels=labels)

        def counter(name: str, doc: str) -> CounterMetricFamily:
            return CounterMetricFamily(f"neat_inference_{name}", doc, labels=labels)

        queue = gauge("queue_depth", "Requests waiting in an engine for a place in a pass.")
        running = gauge("rows_running", "Generation rows in an engine's running batch.")
        passes = HistogramMetricFamily("neat_inference_rows_per_pass", "Rows in each forward pass of an engine.",
                                       labels=labels)  # fmt: skip
        used = gauge("adapter_cache_bytes", "Bytes of adapter factors held in an engine's cache.")
        budget = gauge("adapter_cache_budget_bytes", "The cache's budget (NEAT_SERVING_CACHE_MB).")
        adapters = gauge("adapters_loaded", "Adapters held in an engine's cache.")
        hits = counter("adapter_cache_hits", "Requests whose adapter was already loaded.")
        misses = counter("adapter_cache_misses", "Requests that loaded their adapter.")
        evictions = counter("adapter_cache_evictions", "Adapters dropped from the cache (for room, or unloaded).")
        prompt = counter("prompt_tokens", "Prompt tokens of the generations an engine started.")
        reused = counter("prefix_cache_hit_tokens", "Of those, the tokens taken from the prefix cache, not computed.")
        for engine in stats["engines"]:
            key = [engine["base_model"], engine["task"]]
            queue.add_metric(key, engine["queue_depth"])
            running.add_metric(key, engine["rows_running"])
            passes.add_metric(key, _buckets(engine["batch_sizes"]), sum_value=_rows(engine["batch_sizes"]))
            used.add_metric(key, engine["bytes_used"])
            budget.add_metric(key, engine["bytes_budget"])
            adapters.add_metric(key, engine["adapters_loaded"])
            hits.add_metric(key, engine["hits"])
            misses.add_metric(key, engine["misses"])
            evictions.add_metric(key, engine["evictions"])
            prompt.add_metric(key, engine["prefix_prompt_tokens"])
            reused.add_metric(key, engine["prefix_hit_tokens"])
        models = GaugeMetricFamily("neat_inference_models_loaded", "Models in memory: base models with their "
                                   "batching engine, and whole models served alone.", labels=["kind"])  # fmt: skip
        models.add_metric(["base"], len(stats["engines"]))
        models.add_metric(["solo"], len(stats["solo_models"]))
        yield from (queue, running, passes, used, budget, adapters, hits, misses, evictions, prompt, reused, models)


def _buckets(sizes: dict[int, int]) -> list[tuple[str, float]]:
    """The engine's {rows in a pass: passes} as cumulative histogram buckets."""
    edges = [*ROWS_PER_PASS_BUCKETS, float("inf")]
    return [(floatToGoString(edge), sum(n for size, n in sizes.items() if size <= edge)) for edge in edges]


def _rows(sizes: dict[int, int]) -> int:
    return sum(size * n for size, n in sizes.items())
