"""The host (engines per base model, solo models in an LRU) and one generation's streaming and cancelling, on the
tiny models."""

from __future__ import annotations

import threading
import time

from inference.host import ModelHost, ModelRef
from inference.text import Generation, encode_prompt
from neat_core.serving import BatchEngine, SamplingParams


def _ref(name: str) -> ModelRef:
    return ModelRef(name, "causal_lm", "base")


class _FakeEngine:
    retired = False

    def retire(self) -> None:
        self.retired = True


def test_host_loads_a_model_once_under_concurrent_first_requests():
    calls = []

    def slow_loader(ref):
        calls.append(ref.name)
        time.sleep(0.2)
        return _FakeEngine()

    host = ModelHost(2, slow_loader)
    got = []
    threads = [threading.Thread(target=lambda: got.append(host.solo(_ref("m")))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == ["m"] and len(got) == 4 and all(g is got[0] for g in got)


def test_host_evicts_the_least_recently_used_model_and_retires_its_engine():
    host = ModelHost(2, lambda ref: _FakeEngine())
    a = host.solo(_ref("a"))
    b = host.solo(_ref("b"))
    assert host.solo(_ref("a")) is a  # a hit, and now the most recent
    host.solo(_ref("c"))
    assert host.cached() == ["a", "c"]
    assert b.retired and not a.retired  # its requests in flight finish, then its thread stops


def test_stream_yields_text_before_the_generation_ends_and_closing_it_frees_the_row(tiny_models):
    from neat_core.models import load_base

    model, tokenizer = load_base(str(tiny_models["llama"]), task="causal_lm")
    gate, passes = threading.Semaphore(0), []

    def one_pass_at_a_time(module, args, kwargs):  # every forward pass waits for the test's permission
        gate.acquire()
        passes.append(1)

    model.register_forward_pre_hook(one_pass_at_a_time, with_kwargs=True)
    engine = BatchEngine(model.eval(), tokenizer, "causal_lm", window_s=0)
    try:
        generation = Generation(engine, encode_prompt(engine, "Count:"), None,
                                SamplingParams(max_tokens=64, ignore_eos=True))  # fmt: skip
        stream = iter(generation)
        first: list[str] = []
        reader = threading.Thread(target=lambda: first.append(next(stream)))
        reader.start()
        while reader.is_alive() and len(passes) < 64:
            gate.release()  # one more step
            reader.join(timeout=0.2)
        assert first and first[0], "a first piece of text"
        assert len(passes) < 64, "the first text came out while the rest was still to be generated"
        assert not generation._stream.cancelled and generation._stream.finish_reason is None  # still running

        stream.close()  # the client went away: the row leaves the batch at the next step
        at_close = len(passes)
        deadline = time.monotonic() + 10
        while (engine.running or generation._stream.finish_reason is None) and time.monotonic() < deadline:
            gate.release()
            time.sleep(0.05)
        assert engine.running == 0 and len(passes) - at_close <= 3
        assert generation._stream.cancelled and generation._stream.completion_tokens < 64
    finally:
        for _ in range(100):
            gate.release()
        engine.close()
