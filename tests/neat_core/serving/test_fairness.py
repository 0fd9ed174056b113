"""Fairness across callers in the batching engine: one caller's big classification is interleaved with another's
small ones (round-robin by caller), and a caller's backlog is capped."""

from __future__ import annotations

import threading
import time

import pytest

from neat_core.serving import EngineBusy, SamplingParams
from tests.neat_core.serving.test_engine import make_engine, prompt, refs

LONG = "the quick brown fox jumps over the lazy dog " * 20  # past the engine's max_length: truncated to it


def _until(condition, seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def _passes(engine) -> int:
    return sum(engine.batch_sizes.values())


def test_a_small_request_waits_a_few_passes_whatever_another_caller_queued(tiny_models, saved):
    engine = make_engine("bert", tiny_models, max_batch=8, window_s=0.0, max_length=64)
    adapters = refs(saved, "bert", owner="org-a")
    big: dict = {}
    try:
        a = threading.Thread(target=lambda: big.update(out=engine.classify([LONG] * 400, adapters["neat-a"], "org-a")))
        a.start()
        _until(lambda: _passes(engine) >= 1)  # A's 400 rows are queued and being served
        before = _passes(engine)
        rows, _ = engine.classify(["good day"], None, "org-b")
        waited = _passes(engine) - before
        a.join()
    finally:
        engine.close()
    # A needs 50 gathered batches of 8. B's one row joins the next batch gathered after it arrived (a short pass
    # of its own beside A's seven long rows, by length bucket): the pass running, perhaps one gathered just
    # before B arrived, then at most two forwards. Served in arrival order it would have waited for all 50.
    assert waited <= 4, f"the small request waited {waited} passes behind another caller's work"
    assert _passes(engine) >= 50
    assert len(big["out"][0]) == 400 and len(rows) == 1


def test_rows_are_taken_round_robin_by_caller(tiny_models, saved):
    """Three callers' work queued at once: every gathered batch holds each caller's rows in turn (one lane, so
    every pass waits for the one before)."""
    engine = make_engine("bert", tiny_models, max_batch=6, window_s=0.0, max_length=32, lanes=1)
    try:
        done: list[str] = []

        def call(caller: str, n: int) -> None:
            engine.classify(["x y z"] * n, None, caller)
            done.append(caller)

        threads = {c: threading.Thread(target=call, args=(c, n)) for c, n in (("a", 30), ("b", 4), ("c", 2))}
        with engine._model_lock:  # holds the first pass, so the three callers' work waits together
            threads["a"].start()  # first, so a queue served in arrival order would serve all of a first
            _until(lambda: engine.queue_depth() >= 24)
            threads["b"].start()
            threads["c"].start()
            _until(lambda: engine.queue_depth() >= 30)
        for t in threads.values():
            t.join()
        order = list(done)
    finally:
        engine.close()
    # b (4 rows) and c (2 rows) each finish within two batches of six, long before a's 30 rows
    assert order[-1] == "a", order


def test_another_callers_pass_runs_beside_a_long_one(tiny_models, saved):
    """A's pass is held inside the model; B's request is still answered, on the second lane. With one lane (or
    passes run one after another) B would wait for A's pass, which waits for B: the test would time out."""
    engine = make_engine("bert", tiny_models, max_batch=4, window_s=0.0, max_length=64)
    release, inside = threading.Event(), threading.Event()
    run_pass = engine._classify_pass
    held_out: list[bool] = []  # per held pass: whether B was served while it was held

    def held(rows, ids):  # A's passes wait inside, as a long forward would
        if any(row.text == LONG for row in rows):
            inside.set()
            held_out.append(release.wait(10))
        run_pass(rows, ids)

    engine._classify_pass = held
    try:
        a = threading.Thread(target=lambda: engine.classify([LONG] * 8, None, "org-a"))
        a.start()
        assert inside.wait(30)
        rows, _ = engine.classify(["good day"], None, "org-b")  # while A's pass is held
        release.set()
        a.join(30)
        assert not a.is_alive() and len(rows) == 1
        assert held_out and all(held_out), "B waited for A's held pass"
    finally:
        release.set()
        engine.close()


def test_a_pass_holds_at_most_pass_tokens(tiny_models, saved):
    """Rows of 64 tokens with a 128-token budget: passes of two rows, not of `max_batch`."""
    engine = make_engine("bert", tiny_models, max_batch=16, window_s=0.05, max_length=64, pass_tokens=128)
    try:
        engine.classify([LONG] * 16, None, "org-a")
    finally:
        engine.close()
    assert engine.batch_sizes == {2: 8}


def test_one_caller_cannot_fill_a_generation_batch(tiny_models, saved):
    """A holds long generations enough to fill the batch; B's request still joins at once (one row of four is
    reserved from any one caller), so B's answer is done while all of A's are still generating."""
    engine = make_engine("llama", tiny_models, max_batch=4, window_s=0.0, reserved_rows=1)
    try:
        a = [engine.generate(prompt(i, 4), None, SamplingParams(max_tokens=2000), "org-a") for i in range(6)]
        _until(lambda: engine.running == 3)  # A's share: three rows of four; its other three wait
        b = list(engine.generate(prompt(9, 4), None, SamplingParams(max_tokens=8), "org-b"))
        assert len(b) == 8
        assert engine.running >= 3 and not any(s.finish_reason for s in a), "B waited for A's generations"
    finally:
        for stream in a:
            stream.cancel()
        engine.close()


def test_a_callers_backlog_is_capped_and_others_are_still_served(tiny_models, saved):
    engine = make_engine("bert", tiny_models, max_batch=4, window_s=0.0, max_length=32, max_queued=10)
    try:
        with pytest.raises(EngineBusy):
            engine.classify(["x"] * 11, None, "org-a")  # refused before anything is queued
        assert engine.queue_depth() == 0
        assert len(engine.classify(["x"] * 10, None, "org-a")[0]) == 10
        assert len(engine.classify(["x"] * 10, None, "org-b")[0]) == 10
    finally:
        engine.close()
