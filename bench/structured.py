"""The cost of constrained decoding per decode step, as a ratio to an unconstrained step, on the real SmolLM2.

At each batch size B (1, 8, 32) two runs take turns for `--rounds` rounds, so machine noise hits both alike:

  constrained    B identical rows (one seed: the same sampled tokens) asking for a JSON schema (`response_format`
                 json_schema) or forced to call a tool (`tool_choice: required`); identical rows end at the same
                 step N (the schemas bound their strings, so a run always ends)
  unconstrained  B identical rows of the same prompt, exactly N tokens each (ignore_eos)

Both runs do B rows x N steps of the same shapes; the constrained one adds each row's grammar mask (computed by
llguidance, applied to the logits) and its parser step. Printed per B and grammar: the median time per decode step
of each and their ratio, and the grammar's own time per step (masks and parser steps, timed around the engine's
calls into `neat_core.serving.grammar`) with its share of an unconstrained step. The prefill is left out of the
step times: the first token's time is subtracted from each run.

    python bench/structured.py                  # the recorded configuration
    python bench/structured.py --rounds 1 --batches 1 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
SHORT = {"type": "string", "maxLength": 40}
PERSON = {
    "type": "object",
    "properties": {
        "name": SHORT,
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": SHORT,
        "languages": {"type": "array", "items": SHORT, "maxItems": 3},
    },
    "required": ["name", "age", "city", "languages"],
    "additionalProperties": False,
}
WEATHER = {"type": "object", "properties": {"city": SHORT, "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}  # fmt: skip
CLOCK = {"type": "object", "properties": {"timezone": SHORT}, "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]  # fmt: skip


class MaskClock:
    """Seconds spent in the grammar's work (computing and applying masks, advancing the parsers), wrapped around
    the engine's two calls into `neat_core.serving.grammar`: the part of a step the ratio is about, measured
    directly, so it can be read against the whole step even where machine noise blurs the ratio."""

    def __init__(self):
        from neat_core.serving import generation

        self.seconds, self._module = 0.0, generation.constrained
        for name in ("mask_", "advance"):
            setattr(self._module, name, self._timed(getattr(self._module, name)))

    def _timed(self, fn):
        def wrapper(*args):
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                self.seconds += time.perf_counter() - start

        return wrapper


def timed(engine, ids: list[int], rows: int, sampling) -> tuple[float, int]:
    """(seconds per decode step after the first token, steps) for `rows` copies of one request."""
    streams = [engine.generate(ids, None, sampling) for _ in range(rows)]
    iterators = [iter(s) for s in streams]
    for it in iterators:
        next(it)  # the first token: prefill, not a decode step
    start = time.perf_counter()
    counts = [sum(1 for _ in it) for it in iterators]
    elapsed = time.perf_counter() - start
    assert len(set(counts)) == 1, f"identical rows should end together: {counts}"
    return elapsed / max(counts[0], 1), counts[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import dataclasses

    import torch

    from neat_core.data.chat import reply_grammar
    from neat_core.models.loading import load_base
    from neat_core.serving import BatchEngine, SamplingParams

    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_base(SMOLLM2, task="causal_lm")
    engine = BatchEngine(model, tokenizer, "causal_lm", window_s=0.2, max_batch=max(args.batches))
    cases = {
        "json_schema": ("Invent a person: name, age, city and languages, in JSON.", None,
                        reply_grammar(json_reply=True, schema=PERSON)),
        "tools required": ("What is the weather in Paris?", TOOLS, reply_grammar(tools=TOOLS, choice="required",
                                                                                 parallel=False)),
    }  # fmt: skip
    print(f"torch threads {torch.get_num_threads()}, rounds {args.rounds}")
    clock = MaskClock()
    print(f"{'grammar':<15} {'B':>3} {'steps':>5} {'free ms/step':>13} {'constrained ms/step':>20} {'ratio':>6} "
          f"{'mask ms/step':>13} {'mask share':>10}")  # fmt: skip
    try:
        for name, (question, tools, grammar) in cases.items():
            ids = engine.encode(engine.chat_prompt([{"role": "user", "content": question}], tools),
                                add_special_tokens=False)  # fmt: skip
            constrained = SamplingParams(max_tokens=200, temperature=0.7, seed=1, grammar=grammar)
            for rows in args.batches:
                free_times, constrained_times, mask_times = [], [], []
                for _ in range(args.rounds):
                    clock.seconds = 0.0
                    per_step, steps = timed(engine, ids, rows, constrained)
                    constrained_times.append(per_step)
                    mask_times.append(clock.seconds / (steps + 1))  # every step, the first token's included
                    free = dataclasses.replace(constrained, grammar=None, max_tokens=steps + 1, ignore_eos=True)
                    free_times.append(timed(engine, ids, rows, free)[0])
                a, b, m = (statistics.median(t) for t in (free_times, constrained_times, mask_times))
                print(f"{name:<15} {rows:>3} {steps:>5} {1e3 * a:>13.1f} {1e3 * b:>20.1f} {b / a:>6.3f} "
                      f"{1e3 * m:>13.2f} {m / a:>10.3f}", flush=True)  # fmt: skip
    finally:
        engine.close()


if __name__ == "__main__":
    main()
