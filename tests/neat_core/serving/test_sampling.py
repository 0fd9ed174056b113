"""Per-row sampling options in the batching engine: logit_bias, presence/frequency penalties and top log-
probabilities. Each changes its own row only: a row using them, in a batch with rows that don't (and with rows
using other settings), gets exactly what a reference loop over peft's model gives it alone."""

from __future__ import annotations

import pytest
import torch

from neat_core.serving import SamplingParams
from tests.neat_core.serving.adapters import reference
from tests.neat_core.serving.test_engine import make_engine, prompt, refs

STEPS = 8


def expected(tiny_models, saved, adapter_id, ids: list[int], s: SamplingParams) -> tuple[list[int], list, list]:
    """Greedy tokens, their log-probabilities and top-k, from the reference model alone, with the options applied
    by hand (OpenAI's definitions) on full forwards: nothing shared with the engine's code path."""
    model = reference("llama", tiny_models, saved, adapter_id)
    tokens: list[int] = []
    logprobs, tops = [], []
    with torch.no_grad():
        for _ in range(s.max_tokens):
            logits = model(input_ids=torch.tensor([ids + tokens])).logits[0, -1].float()
            logp = logits.log_softmax(-1)
            scores = logits.clone()
            for t, b in s.logit_bias:
                scores[t] += b
            for t in set(tokens):
                scores[t] -= s.presence_penalty + s.frequency_penalty * tokens.count(t)
            token = int(scores.argmax())
            tokens.append(token)
            logprobs.append(float(logp[token]))
            values, order = logp.topk(s.top_logprobs) if s.top_logprobs else (torch.empty(0), torch.empty(0))
            tops.append(list(zip(order.tolist(), values.tolist(), strict=True)))
    return tokens, logprobs, tops


# (adapter, prompt seed, sampling): options on some rows, none on their neighbours, over different adapters.
ROWS = [
    ("neat-a", 1, SamplingParams(max_tokens=STEPS, logprobs=True)),
    ("neat-a", 1, SamplingParams(max_tokens=STEPS, logprobs=True, frequency_penalty=-2.0)),  # rewards repeats
    (None, 2, SamplingParams(max_tokens=STEPS, logprobs=True, top_logprobs=5, presence_penalty=1.5)),
    ("lora-c", 3, SamplingParams(max_tokens=STEPS, logprobs=True, logit_bias=((17, 100.0),))),
    (
        "neat-b",
        4,
        SamplingParams(
            max_tokens=STEPS,
            logprobs=True,
            logit_bias=((9, 3.0), (40, -100.0)),
            frequency_penalty=0.5,
            presence_penalty=-0.5,
        ),
    ),  # fmt: skip
    (None, 2, SamplingParams(max_tokens=STEPS, logprobs=True, top_logprobs=3)),
]


def test_sampling_options_apply_per_row_and_rows_equal_their_answers_alone(tiny_models, saved):
    engine = make_engine("llama", tiny_models, window_s=0.1, max_batch=16)
    engine._eos = set()  # fixed lengths
    adapters = refs(saved, "llama")
    try:
        streams = [engine.generate(prompt(i, 6), adapters[a], s) for a, i, s in ROWS]
        got = [list(s) for s in streams]
        stats = engine.stats()
    finally:
        engine.close()
    assert stats["max_batch_size"] == len(ROWS), "the rows should have shared their passes"

    for (a, i, s), tokens, stream in zip(ROWS, got, streams, strict=True):
        want, want_logprobs, want_tops = expected(tiny_models, saved, a, prompt(i, 6), s)
        assert tokens == want, f"{a} {s}"
        assert max(abs(x - y) for x, y in zip(stream.logprobs, want_logprobs, strict=True)) <= 1e-4
        if s.top_logprobs:
            assert [[t for t, _ in step] for step in stream.top_logprobs] == [
                [t for t, _ in step] for step in want_tops
            ]
            flat = [v for step in stream.top_logprobs for _, v in step]
            assert max(abs(x - y) for x, y in zip(flat, [v for st in want_tops for _, v in st], strict=True)) <= 1e-4
        else:
            assert stream.top_logprobs == []

    # The options changed what they should (else the equality above proves nothing about them).
    plain, penalised = got[0], got[1]
    assert len(set(plain)) == len(plain) and len(set(penalised)) < len(penalised)  # a random model repeats rarely
    assert got[3] == [17] * STEPS  # +100 on token 17 wins every step
    assert 40 not in got[4]


def test_token_ids_outside_the_vocabulary_are_refused_before_they_join_a_batch(tiny_models, saved):
    engine = make_engine("llama", tiny_models)
    try:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.generate([1, 2, engine.vocab_size], None, SamplingParams(max_tokens=2))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            engine.generate([1, 2], None, SamplingParams(max_tokens=2, logit_bias=((engine.vocab_size, 1.0),)))
        assert engine.stats()["forward_passes"] == 0
    finally:
        engine.close()
