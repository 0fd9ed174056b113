"""Batched serving over HTTP: concurrent requests from two organisations' adapters share forward passes and each
get what they get alone; /v1/serving/stats; pre-loading."""

from __future__ import annotations

import threading

import anyio

from api.targets import preload
from tests.inference.conftest import KEY_B, backend_for, make_client

HELLO = [{"role": "user", "content": "What colour is item 3?"}]


def _chat(client, model: str, n: int = 6) -> dict:
    r = client.post("/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": n, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def _stats(client) -> dict:
    r = client.get("/v1/serving/stats")
    assert r.status_code == 200, r.text
    return r.json()


def _causal_engine(stats: dict, base: str) -> dict:
    return next(e for e in stats["engines"] if e["task"] == "causal_lm" and e["base_model"] == base)


def test_concurrent_requests_share_batches_and_each_gets_its_own_answer(service, tiny_models):
    a, b = make_client(service.settings), make_client(service.settings, KEY_B)
    base = str(tiny_models["llama"])
    # (client, model): org A's adapter and org B's (same weights, another owner). Base-model rows join mixed
    # batches in tests/neat_core/serving; over HTTP only catalog base models are served, and these adapters are on a
    # tiny test model.
    calls = [(a, service.chat_model), (b, service.other_org_model)] * 4
    alone = {model: _chat(client, model)["choices"][0]["message"]["content"] for client, model in calls[:2]}
    host = backend_for(service.settings).host
    passes_before = _causal_engine(_stats(a), base)["forward_passes"]
    batched_rows_before = sum(n * k for n, k in host.engine(base, "causal_lm").batch_sizes.items() if n > 1)

    answers: list[tuple[str, str]] = []
    barrier = threading.Barrier(len(calls))

    def call(client, model):
        barrier.wait()
        answers.append((model, _chat(client, model)["choices"][0]["message"]["content"]))

    threads = [threading.Thread(target=call, args=c) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert len(answers) == len(calls)
    for model, text in answers:
        assert text == alone[model], model
    stats = _causal_engine(_stats(a), base)
    batched_rows = sum(n * k for n, k in host.engine(base, "causal_lm").batch_sizes.items() if n > 1)
    assert batched_rows > batched_rows_before, "concurrent requests should have shared forward passes"
    assert stats["forward_passes"] - passes_before < len(calls) * 6, "fewer passes than running each alone"


def test_stats_name_only_the_callers_own_adapters(service, tiny_models):
    a, b = make_client(service.settings), make_client(service.settings, KEY_B)
    _chat(a, service.chat_model, 2)
    _chat(b, service.other_org_model, 2)
    mine = _causal_engine(_stats(a), str(tiny_models["llama"]))
    theirs = _causal_engine(_stats(b), str(tiny_models["llama"]))
    assert service.chat_model in mine["your_adapters"] and service.other_org_model not in mine["your_adapters"]
    assert service.other_org_model in theirs["your_adapters"] and service.chat_model not in theirs["your_adapters"]
    for key in ("adapters_loaded", "bytes_used", "bytes_budget", "hits", "misses", "queue_depth", "batch_sizes"):
        assert key in mine
    # the cache figures are the caller's own: its adapters, their bytes, their hits and misses; never B's
    assert mine["adapters_loaded"] == len(mine["your_adapters"]) and mine["bytes_used"] > 0
    own = ("adapters_loaded", "adapters_pinned", "bytes_used", "hits", "misses", "evictions", "mean_load_ms")
    for _ in range(3):
        _chat(b, service.other_org_model, 1)
    assert {k: _causal_engine(_stats(a), str(tiny_models["llama"]))[k] for k in own} == {k: mine[k] for k in own}
    assert _causal_engine(_stats(b), str(tiny_models["llama"]))["hits"] >= theirs["hits"] + 3
    shared = ("base_model", "task", "bytes_budget", "queue_depth", "rows_running", "forward_passes", "mean_batch_size",
              "max_batch_size", "batch_sizes")  # fmt: skip
    assert set(mine) == {"server", "your_adapters", *shared, *own}


def test_another_organisations_model_is_not_found_and_never_batched(service, tiny_models):
    a = make_client(service.settings)
    _chat(a, service.chat_model, 1)  # the engine exists
    before = _causal_engine(_stats(a), str(tiny_models["llama"]))["forward_passes"]
    r = a.post("/v1/chat/completions", json={"model": service.other_org_model, "messages": HELLO, "max_tokens": 2})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert _causal_engine(_stats(a), str(tiny_models["llama"]))["forward_passes"] == before


def test_preload_loads_adapters_before_their_first_request(service):
    a = make_client(service.settings)
    backend = backend_for(service.settings)
    with_preload = service.settings.model_copy(update={"serving_preload": f"{service.classifier}, ft:nope:x"})
    for e in list(backend.host._engines.values()):
        for ref in e.cache.loaded():
            if ref.adapter_id == service.classifier:
                assert e.cache.evict(ref.adapter_id)
    anyio.run(preload, with_preload, backend)  # the unknown name is logged and skipped
    stats = _stats(a)
    (cls,) = [e for e in stats["engines"] if e["task"] == "classification"]
    assert service.classifier in cls["your_adapters"]
    misses = cls["misses"]
    r = a.post("/v1/classifications", json={"model": service.classifier, "input": ["good", "bad"]})
    assert r.status_code == 200, r.text
    (cls,) = [e for e in _stats(a)["engines"] if e["task"] == "classification"]
    assert cls["misses"] == misses and cls["hits"] >= 1
