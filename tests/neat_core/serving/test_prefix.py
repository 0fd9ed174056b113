"""The prefix cache: a prompt that starts like an earlier one on the same adapter prefills only the rest, and still
gets what it gets alone through peft; blocks never cross adapters, go with their adapter, and stay in budget."""

from __future__ import annotations

import pytest
import torch

from neat_core.serving import SamplingParams
from neat_core.serving.prefix import BLOCK, PrefixCache, _keys
from tests.neat_core.serving.test_engine import alone, make_engine, prompt, refs

SHARED = prompt(50, 2 * BLOCK + 5)  # a "system prompt": two whole blocks and a part


def tails(i: int, n: int) -> list[int]:
    return SHARED + prompt(60 + i, n)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_prompt_that_starts_like_an_earlier_one_reuses_its_blocks_and_answers_as_alone(kind, tiny_models, saved):
    engine = make_engine(kind, tiny_models, window_s=0.05, max_batch=16)
    engine._eos = set()
    adapters = refs(saved, kind)
    cases = [("neat-a", tails(0, 7), 6), (None, tails(1, 3), 5)]  # each computes the shared blocks first
    later = [("neat-a", tails(2, 9), 6), (None, tails(3, 20), 4), ("neat-a", tails(4, 1), 5),
             ("lora-c", tails(5, 4), 5)]  # fmt: skip
    try:
        first = [list(engine.generate(ids, adapters[a], SamplingParams(max_tokens=m))) for a, ids, m in cases]
        streams = [engine.generate(ids, adapters[a], SamplingParams(max_tokens=m, logprobs=True))
                   for a, ids, m in later]  # fmt: skip
        tokens = [list(s) for s in streams]
        stats = engine.stats()
    finally:
        engine.close()
    for got, (a, ids, m) in zip(first, cases, strict=True):
        assert got == alone(kind, tiny_models, saved, a, ids, m)[0], a
    # The two neat-a rows and the base row start with the blocks their adapter computed; lora-c's own are not there.
    assert [s.cached_tokens for s in streams] == [2 * BLOCK, 2 * BLOCK, 2 * BLOCK, 0]
    for got, stream, (a, ids, m) in zip(tokens, streams, later, strict=True):
        expected, logprobs = alone(kind, tiny_models, saved, a, ids, m)
        assert got == expected, a
        assert (torch.tensor(stream.logprobs) - logprobs).abs().max() <= 1e-4, a
    assert stats["prefix_hit_tokens"] == 6 * BLOCK and stats["prefix_blocks"] > 0


def test_a_whole_block_prompt_leaves_its_last_token_to_compute_and_eviction_drops_its_blocks(tiny_models, saved):
    kind = "llama"
    engine = make_engine(kind, tiny_models, window_s=0.01)
    engine._eos = set()
    adapters = refs(saved, kind)
    ids = prompt(70, 2 * BLOCK)
    try:
        runs, tokens = [], []
        for _ in range(2):  # one after the other: the second finds the first's blocks
            runs.append(engine.generate(ids, adapters["neat-b"], SamplingParams(max_tokens=4)))
            tokens.append(list(runs[-1]))
        assert [r.cached_tokens for r in runs] == [0, BLOCK]  # the second keeps one block: its logits need a token
        assert engine.cache.evict("neat-b")
        assert engine.stats()["prefix_blocks"] == 0  # evicted with the adapter (the id may come back re-trained)
        again = engine.generate(ids, adapters["neat-b"], SamplingParams(max_tokens=4))
        assert list(again) == tokens[0] and again.cached_tokens == 0
    finally:
        engine.close()
    assert tokens[0] == tokens[1] == alone(kind, tiny_models, saved, "neat-b", ids, 4)[0]


def test_the_cache_keeps_to_its_budget_and_zero_turns_it_off(tiny_models):
    kv = torch.randn(3, 2, 2, 5 * BLOCK, 4)  # (layers, k/v, kv heads, positions, head dim)
    block_bytes = kv[:, :, :, :BLOCK].numel() * kv.element_size()
    cache = PrefixCache(3 * block_bytes)
    tokens = list(range(5 * BLOCK + 1))
    cache.add("a", tokens[: 5 * BLOCK], kv)
    assert cache.stats()["prefix_bytes"] == 3 * block_bytes  # the two oldest blocks went
    assert cache.match("a", tokens) == []  # a run must start at the first block
    cache = PrefixCache(10 * block_bytes)
    cache.add("a", tokens[: 5 * BLOCK], kv)
    run = cache.match("a", tokens)
    assert len(run) == 5 and torch.equal(torch.cat(run, dim=3), kv)
    assert cache.match("b", tokens) == [] and cache.match(None, tokens) == []
    assert len(cache.match("a", [999] + tokens[1:])) == 0  # one token differs: the whole prefix differs
    off = PrefixCache(0)
    off.add("a", tokens[: 5 * BLOCK], kv)
    assert off.match("a", tokens) == [] and off.stats()["prefix_blocks"] == 0


def test_a_key_names_the_whole_prefix_not_just_the_block():
    a = _keys("x", [1] * BLOCK + [2] * BLOCK, 2)
    b = _keys("x", [3] * BLOCK + [2] * BLOCK, 2)
    assert a[1] != b[1] and a[0] != b[0]
    assert _keys("x", [1] * BLOCK, 1) == a[:1] and _keys("y", [1] * BLOCK, 1) != a[:1]
