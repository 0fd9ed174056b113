"""A HEAT artifact is a plain LoRA, so the serving tier batches it in the base model's engine (its spec: batched),
and what the engine answers equals what the same artifact answers served alone on a whole peft model."""

from __future__ import annotations

from functools import partial

import pytest

from control.settings import Settings
from inference.host import ModelHost, ModelRef, load_batch_engine, load_solo_engine
from neat_core.serving import SamplingParams
from neat_core.train import TrainSpec, train

OWNER = "org-heat"


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_heat_adapter_is_batched_and_answers_like_the_solo_path(kind, tiny_models, datasets, tmp_path):
    result = train(
        TrainSpec(
            base_model=str(tiny_models[kind]),
            training_file=datasets[kind],
            output_dir=tmp_path / "run",
            method="heat",
            adapter={"r": 4, "score_batches": 2},
            batch_size=4,
            max_steps=4,
            learning_rate_multiplier=20.0,  # a visible adapter in four steps
            seed=0,
            device="cpu",
        )
    )
    task = "classification" if kind == "bert" else "causal_lm"
    ref = ModelRef("ft:heat", task, str(tiny_models[kind]), result.adapter_dir, owner=OWNER, method="heat")
    base = ModelRef("base", task, str(tiny_models[kind]))
    settings = Settings(device="cpu", data_dir=tmp_path)
    load = partial(load_solo_engine, settings=settings)
    batched = ModelHost(2, load, partial(load_batch_engine, settings=settings))
    solo = ModelHost(2, load)  # every adapter alone, on a whole peft model with an engine of its own
    assert batched.batched(ref) and not solo.batched(ref)
    try:
        if kind == "bert":
            texts = ["love it", "awful support", "very happy with this, superb quality"]
            got, tokens = batched.classify(ref, texts)
            want, want_tokens = solo.classify(ref, texts)
            assert tokens == want_tokens and [g["label"] for g in got] == [w["label"] for w in want]
            for g, w in zip(got, want, strict=True):
                assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-5)
        else:
            chat = [{"role": "user", "content": "What colour is item 3?"}]
            greedy = SamplingParams(max_tokens=8, temperature=0.0)
            got = "".join(batched.generate(ref, chat, greedy))
            assert got == "".join(solo.generate(ref, chat, greedy))
            assert got != "".join(batched.generate(base, chat, greedy))  # the adapter is not a no-op
        engines = batched.stats()["engines"]
        # served from the engine's adapter cache, recorded with its owner
        assert [e["adapters"] for e in engines] == [[{"id": "ft:heat", "owner": OWNER}]]
    finally:
        batched.close()
        solo.close()
