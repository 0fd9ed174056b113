"""The batching engine: concurrent requests over different adapters (and the bare base model) share forward
passes, rows join and leave a running generation, and every row still gets what it would get alone through peft
with its own adapter. Plus the adapter cache: bounded by bytes, loads once, reloads exactly, refuses strangers."""

from __future__ import annotations

import inspect
import threading

import pytest
import torch

from neat_core.serving import AdapterAccessError, AdapterRef, BatchEngine, SamplingParams, load_factors
from neat_core.serving.engine import KV_CACHE, length_buckets
from tests.neat_core.serving.adapters import fresh_base, reference

# (adapter or None, prompt length, tokens to generate): different lengths, so rows join and leave at different steps
FIRST_WAVE = [("neat-a", 5, 9), (None, 8, 4), ("lora-c", 3, 7)]
SECOND_WAVE = [("neat-b", 6, 5), ("neat-a", 9, 3), (None, 4, 6), ("lora-c", 7, 8)]


def prompt(i: int, n: int) -> list[int]:
    return torch.randint(5, 200, (n,), generator=torch.Generator().manual_seed(100 + i)).tolist()


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_the_key_value_cache_goes_by_the_name_the_installed_transformers_takes(kind, tiny_models):
    """transformers 5.24 renamed `past_key_values` to `cache` (the old name warns until 5.40, then goes): the engine
    must pass and read the current name, or the next release breaks generation."""
    model = fresh_base(kind, tiny_models)
    assert KV_CACHE in inspect.signature(type(model).forward).parameters
    ids = torch.tensor([[5, 6, 7]])
    out = model(input_ids=ids, use_cache=True)
    assert KV_CACHE in type(out).__dataclass_fields__ and getattr(out, KV_CACHE) is not None
    step = model(input_ids=ids[:, -1:], use_cache=True, **{KV_CACHE: getattr(out, KV_CACHE)})
    assert getattr(step, KV_CACHE).get_seq_length() == 4  # the cache was used, not silently dropped


def make_engine(kind, tiny_models, **kwargs) -> BatchEngine:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_models[kind])
    task = "classification" if kind == "bert" else "causal_lm"
    return BatchEngine(fresh_base(kind, tiny_models), tokenizer, task, **kwargs)


def refs(saved, kind, owner=None) -> dict[str | None, AdapterRef | None]:
    out = {a: AdapterRef(a, directory, owner) for a, (_, directory, _) in saved[kind].items()}
    return {**out, None: None}


def alone(kind, tiny_models, saved, adapter_id, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and their log-probabilities from peft's generate, the request alone (batch of one)."""
    model = reference(kind, tiny_models, saved, adapter_id)
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[0, len(ids) :]
    logprobs = torch.stack([step[0].log_softmax(-1)[t] for step, t in zip(out.logits, tokens, strict=True)])
    return tokens.tolist(), logprobs


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_continuous_batching_gives_each_request_what_it_gets_alone(kind, tiny_models, saved):
    engine = make_engine(kind, tiny_models, window_s=0.05, max_batch=16)
    engine._eos = set()  # tiny random models may emit EOS at any step; fixed lengths make joins predictable
    adapters = refs(saved, kind)
    try:
        first = [
            engine.generate(prompt(i, n), adapters[a], SamplingParams(max_tokens=m, logprobs=True))
            for i, (a, n, m) in enumerate(FIRST_WAVE)
        ]
        iterators = [iter(s) for s in first]
        head = [next(it) for it in iterators]  # the first wave is running: its first tokens are out
        second = [
            engine.generate(prompt(10 + i, n), adapters[a], SamplingParams(max_tokens=m, logprobs=True))
            for i, (a, n, m) in enumerate(SECOND_WAVE)
        ]
        streams = [([h, *it], s) for h, it, s in zip(head, iterators, first, strict=True)]
        streams += [(list(s), s) for s in second]
        stats = engine.stats()
    finally:
        engine.close()

    waves = [(i, *w) for i, w in enumerate(FIRST_WAVE)] + [(10 + i, *w) for i, w in enumerate(SECOND_WAVE)]
    for (i, adapter_id, n, m), (tokens, stream) in zip(waves, streams, strict=True):
        expected, expected_logprobs = alone(kind, tiny_models, saved, adapter_id, prompt(i, n), m)
        assert tokens == expected, f"request {i} ({adapter_id})"
        assert (torch.tensor(stream.logprobs) - expected_logprobs).abs().max() <= 1e-4, f"request {i}"
        assert stream.finish_reason == "length" and stream.completion_tokens == m and stream.prompt_tokens == n

    # Rows of both waves and of several adapters shared decode steps: a pass ran with more rows than either wave.
    assert stats["max_batch_size"] > len(SECOND_WAVE)
    assert stats["adapters_pinned"] == 0


def test_long_generations_stay_exact_as_the_key_value_cache_grows(tiny_models, saved):
    """The cache grows in place, by a quarter at a time (generation._GrowingLayer): rows that run for many steps
    cross several growths, and rows that join and leave meanwhile re-stack and trim it. Each must still get its
    answer alone."""
    kind = "llama"
    engine = make_engine(kind, tiny_models, window_s=0.05, max_batch=8)
    engine._eos = set()
    adapters = refs(saved, kind)
    try:
        long = engine.generate(prompt(1, 4), adapters["neat-a"], SamplingParams(max_tokens=90))
        it = iter(long)
        head = [next(it) for _ in range(30)]  # 30 steps in: the cache has grown twice
        joined = [
            engine.generate(prompt(2, 11), None, SamplingParams(max_tokens=20)),
            engine.generate(prompt(3, 6), adapters["lora-c"], SamplingParams(max_tokens=45)),
        ]
        tokens = [[*head, *it], *(list(s) for s in joined)]
    finally:
        engine.close()
    cases = [("neat-a", prompt(1, 4), 90), (None, prompt(2, 11), 20), ("lora-c", prompt(3, 6), 45)]
    for got, (adapter_id, ids, n) in zip(tokens, cases, strict=True):
        assert got == alone(kind, tiny_models, saved, adapter_id, ids, n)[0], adapter_id


def test_prompts_of_very_different_lengths_prefill_in_separate_passes_and_stay_exact(tiny_models, saved):
    """Prompts that arrive together are prefilled in passes of similar lengths (generation.PREFILL_PASS_OVERHEAD):
    two short and two long ones take two passes, not one padded to the longest; every row still gets its answer
    alone, and the rows of both passes decode together afterwards."""
    kind = "llama"
    engine = make_engine(kind, tiny_models, window_s=0.2, max_batch=8)
    engine._eos = set()
    adapters = refs(saved, kind)
    cases = [("neat-a", prompt(1, 3), 5), (None, prompt(2, 60), 5), ("lora-c", prompt(3, 4), 5)]
    cases.append((None, prompt(4, 62), 5))
    try:
        streams = [engine.generate(ids, adapters[a], SamplingParams(max_tokens=n)) for a, ids, n in cases]
        tokens = [list(s) for s in streams]
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["batch_sizes"] == {2: 2, 4: 4}, stats["batch_sizes"]  # two prefill passes, then 4 decode steps
    for got, (adapter_id, ids, n) in zip(tokens, cases, strict=True):
        assert got == alone(kind, tiny_models, saved, adapter_id, ids, n)[0], adapter_id


def test_seeded_sampling_does_not_depend_on_batch_mates(tiny_models, saved):
    engine = make_engine("llama", tiny_models, window_s=0.05)
    adapters = refs(saved, "llama")
    sampling = SamplingParams(max_tokens=6, temperature=0.9, top_p=0.8, seed=7)
    try:
        by_itself = list(engine.generate(prompt(1, 6), adapters["neat-a"], sampling))
        crowd = [engine.generate(prompt(2 + i, 5), adapters["lora-c"], SamplingParams(6, 1.0)) for i in range(3)]
        in_a_crowd = engine.generate(prompt(1, 6), adapters["neat-a"], sampling)
        assert list(in_a_crowd) == by_itself
        for s in crowd:
            list(s)
    finally:
        engine.close()


def test_cancelled_stream_leaves_the_batch_and_unpins_its_adapter(tiny_models, saved):
    engine = make_engine("llama", tiny_models)
    engine._eos = set()
    adapters = refs(saved, "llama")
    try:
        stream = engine.generate(prompt(1, 4), adapters["neat-a"], SamplingParams(max_tokens=2000))
        for _, _ in zip(range(3), stream, strict=False):  # read three tokens, then hang up
            pass
        stream.cancel()
        other = list(engine.generate(prompt(2, 4), adapters["neat-b"], SamplingParams(max_tokens=3)))
        assert len(other) == 3
        assert stream.finish_reason == "stop" and stream.completion_tokens < 2000
        assert engine.stats()["adapters_pinned"] == 0
    finally:
        engine.close()


def test_classification_requests_batch_across_adapters(tiny_models, saved):
    engine = make_engine("bert", tiny_models, window_s=0.2, max_batch=32)
    adapters = refs(saved, "bert")
    # one long text: it gets a pass of its own (length buckets) and must still come back to its own request
    texts = {
        "neat-a": ["good day", "awful"],
        "neat-b": ["a b c d e f g", "on " * 90],
        "lora-c": ["x", "yes indeed", "no"],
    }
    results: dict[str, list[dict]] = {}
    try:
        threads = [
            threading.Thread(target=lambda a=a: results.__setitem__(a, engine.classify(texts[a], adapters[a])[0]))
            for a in texts
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
    finally:
        engine.close()

    assert stats["max_batch_size"] > 3, "the three requests' texts should have shared a forward pass"
    assert stats["forward_passes"] == 2, "the long text should have had a pass of its own"
    for adapter_id, rows in results.items():
        model = reference("bert", tiny_models, saved, adapter_id)
        _, _, labels = saved["bert"][adapter_id]
        for text, row in zip(texts[adapter_id], rows, strict=True):
            batch = engine.tokenizer([text], return_tensors="pt")
            with torch.no_grad():
                probs = model(**batch).logits[0].softmax(-1)
            assert list(row["probabilities"]) == labels
            assert torch.allclose(torch.tensor(list(row["probabilities"].values())), probs, atol=1e-5)
            assert row["label"] == labels[int(probs.argmax())]


def test_cache_is_bounded_by_bytes_and_reloads_exactly(tiny_models, saved):
    engine = make_engine("llama", tiny_models)
    engine._eos = set()
    adapters = refs(saved, "llama")
    greedy = SamplingParams(max_tokens=4, logprobs=True)
    try:
        size = {a: load_factors(adapters[a].path, engine.model.model).nbytes for a in ("neat-a", "neat-b")}
        engine.cache.budget_bytes = max(size.values())  # room for either adapter, never for both

        first = engine.generate(prompt(1, 5), adapters["neat-a"], greedy)
        first_tokens = list(first)
        list(engine.generate(prompt(2, 5), adapters["neat-b"], greedy))  # evicts neat-a
        assert [r.adapter_id for r in engine.cache.loaded()] == ["neat-b"]
        again = engine.generate(prompt(1, 5), adapters["neat-a"], greedy)  # reloads neat-a, evicts neat-b
        assert list(again) == first_tokens and again.logprobs == first.logprobs
        stats = engine.stats()
        assert (stats["misses"], stats["evictions"], stats["adapters_loaded"]) == (3, 2, 1)
        assert stats["bytes_used"] <= stats["bytes_budget"]
    finally:
        engine.close()


def test_concurrent_first_requests_load_an_adapter_once(tiny_models, saved):
    engine = make_engine("llama", tiny_models)
    adapter = refs(saved, "llama")["neat-b"]
    try:
        barrier = threading.Barrier(8)

        def request():
            barrier.wait()
            list(engine.generate(prompt(1, 4), adapter, SamplingParams(max_tokens=2)))

        threads = [threading.Thread(target=request) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
        assert (stats["misses"], stats["hits"], stats["adapters_loaded"]) == (1, 7, 1)
    finally:
        engine.close()


def test_cache_figures_are_kept_per_owner(tiny_models, saved):
    """What /v1/serving/stats may show an organisation: its own adapters' count, bytes and traffic, none of
    another's."""
    engine = make_engine("llama", tiny_models)
    mine, theirs = refs(saved, "llama", owner="org-a")["neat-a"], refs(saved, "llama", owner="org-b")["neat-b"]
    greedy = SamplingParams(max_tokens=2)
    try:
        size = {r.owner: load_factors(r.path, engine.model.model).nbytes for r in (mine, theirs)}
        for _ in range(3):
            list(engine.generate(prompt(1, 4), mine, greedy, caller="org-a"))
        list(engine.generate(prompt(2, 4), theirs, greedy, caller="org-b"))
        figures = ("adapters_loaded", "bytes_used", "hits", "misses", "evictions")
        owners = engine.cache.owner_stats()
        assert [owners["org-a"][k] for k in figures] == [1, size["org-a"], 2, 1, 0]
        assert [owners["org-b"][k] for k in figures] == [1, size["org-b"], 0, 1, 0]
        totals = engine.stats()  # the operator's view: everyone's
        assert [totals[k] for k in figures] == [2, size["org-a"] + size["org-b"], 2, 2, 0]
        assert engine.cache.evict("neat-b")
        owners = engine.cache.owner_stats()
        assert [owners["org-b"][k] for k in ("adapters_loaded", "bytes_used", "evictions")] == [0, 0, 1]
        assert owners["org-a"]["evictions"] == 0 and owners["org-a"]["adapters_loaded"] == 1
    finally:
        engine.close()


def test_another_organisations_adapter_is_refused_before_it_is_batched(tiny_models, saved):
    engine = make_engine("llama", tiny_models)
    theirs = refs(saved, "llama", owner="org-b")["neat-a"]
    try:
        with pytest.raises(AdapterAccessError):
            engine.generate(prompt(1, 4), theirs, SamplingParams(max_tokens=2), caller="org-a")
        stats = engine.stats()
        assert (stats["forward_passes"], stats["adapters_loaded"], stats["misses"]) == (0, 0, 0)
        # Once org-b has it loaded, org-a still cannot ride along.
        assert len(list(engine.generate(prompt(1, 4), theirs, SamplingParams(max_tokens=2), caller="org-b"))) == 2
        passes = engine.stats()["forward_passes"]
        with pytest.raises(AdapterAccessError):
            engine.generate(prompt(1, 4), theirs, SamplingParams(max_tokens=2), caller="org-a")
        spoofed = AdapterRef("neat-a", theirs.path, owner="org-a")  # same id, claimed by another owner
        with pytest.raises(AdapterAccessError):
            engine.generate(prompt(1, 4), spoofed, SamplingParams(max_tokens=2), caller="org-a")
        assert engine.stats()["forward_passes"] == passes
    finally:
        engine.close()


def test_length_buckets_cut_only_where_the_padding_saved_pays_for_a_pass():
    lengths = [30, 7, 58, 8, 31, 9, 57, 29]
    chunks = length_buckets(lengths, pass_overhead=48)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in c) for c in chunks] == [[7, 8, 9], [29, 30, 31], [57, 58]]
    assert length_buckets(lengths, pass_overhead=10_000) == [sorted(range(8), key=lengths.__getitem__)]
    assert len(length_buckets(lengths, pass_overhead=0)) == len(set(lengths))
