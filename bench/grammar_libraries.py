"""Grammar libraries for constrained decoding, side by side on SmolLM2's tokenizer: llguidance (the one the
service uses), xgrammar and outlines-core, whichever are importable.

For one JSON schema, each library: the one-off cost of reading the tokenizer's vocabulary, the cost of compiling
the schema, and then, over the tokens of a valid answer, the time to compute each next-token mask (and for the
bitmask libraries, to apply it to a (1, V) logits row). Only llguidance is in the lock; to compare, install the
others into a scratch virtual environment that sees this one's packages:

    python -m venv --system-site-packages /tmp/grammars && /tmp/grammars/bin/pip install xgrammar outlines-core
    PYTHONPATH=$PWD /tmp/grammars/bin/python bench/grammar_libraries.py
"""

from __future__ import annotations

import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}, "ok": {"type": "boolean"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}  # fmt: skip
ANSWER = {"name": "Alice Smith", "age": 42, "ok": True, "tags": ["a", "bb", "ccc"]}  # in the schema's order


def report(name: str, vocab_s: float, compile_s: float, masks: list[float], applies: list[float]) -> None:
    apply = f"{1e6 * statistics.median(applies):8.1f}" if applies else "     n/a"
    print(f"{name:<14} {vocab_s:8.3f} {1e3 * compile_s:10.1f} {1e6 * statistics.median(masks):12.1f} "
          f"{1e6 * max(masks):10.1f} {apply}")  # fmt: skip


def main() -> None:
    import torch
    from transformers import AutoTokenizer

    from neat_core.models.loading import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("HuggingFaceTB/SmolLM2-135M-Instruct"))
    vocab = 49152
    # The libraries' default JSON grammars allow compact separators; every one of them accepts this text.
    ids = tokenizer.encode(json.dumps(ANSWER, separators=(",", ":")), add_special_tokens=False)
    print(f"{'library':<14} {'vocab s':>8} {'compile ms':>10} {'mask med us':>12} {'mask max us':>10} {'apply us':>8}")
    try:
        import llguidance
        import llguidance.hf
        import llguidance.torch as lt

        t0 = time.perf_counter()
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
        t1 = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, llguidance.LLMatcher.grammar_from_json_schema(json.dumps(SCHEMA)))
        t2 = time.perf_counter()
        bitmask, logits, masks, applies = lt.allocate_token_bitmask(1, vocab), torch.randn(1, vocab), [], []
        for token in ids:
            s = time.perf_counter()
            lt.fill_next_token_bitmask(matcher, bitmask, 0)
            masks.append(time.perf_counter() - s)
            s = time.perf_counter()
            lt.apply_token_bitmask_inplace(logits, bitmask)
            applies.append(time.perf_counter() - s)
            assert matcher.consume_token(token), matcher.get_error()
        report("llguidance", t1 - t0, t2 - t1, masks, applies)
    except ImportError:
        print("llguidance     not installed")
    try:
        import xgrammar

        t0 = time.perf_counter()
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        t1 = time.perf_counter()
        compiled = xgrammar.GrammarCompiler(info).compile_json_schema(json.dumps(SCHEMA))
        t2 = time.perf_counter()
        matcher = xgrammar.GrammarMatcher(compiled)
        bitmask, logits, masks, applies = xgrammar.allocate_token_bitmask(1, vocab), torch.randn(1, vocab), [], []
        for token in ids:
            s = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            masks.append(time.perf_counter() - s)
            s = time.perf_counter()
            xgrammar.apply_token_bitmask_inplace(logits, bitmask)
            applies.append(time.perf_counter() - s)
            assert matcher.accept_token(token)
        report("xgrammar", t1 - t0, t2 - t1, masks, applies)
    except ImportError:
        print("xgrammar       not installed")
    try:
        from outlines_core import Guide, Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema

        t0 = time.perf_counter()
        tokens: dict[str, list[int]] = {}
        for text, i in tokenizer.get_vocab().items():
            if text != tokenizer.eos_token:
                tokens.setdefault(text, []).append(i)
        vocabulary = Vocabulary(tokenizer.eos_token_id, tokens)
        t1 = time.perf_counter()
        index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
        t2 = time.perf_counter()
        guide, masks = Guide(index), []
        for token in ids:
            s = time.perf_counter()
            guide.get_tokens()  # a list of allowed ids; turning it into a mask is extra work not counted here
            masks.append(time.perf_counter() - s)
            guide.advance(token)
        report("outlines-core", t1 - t0, t2 - t1, masks, [])
    except ImportError:
        print("outlines-core  not installed")


if __name__ == "__main__":
    main()
