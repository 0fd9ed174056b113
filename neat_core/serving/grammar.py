"""Constrained decoding: a row whose request gives a grammar (a JSON schema for `response_format`, the tool-call
form for `tools`) may only pick tokens that keep its text inside the grammar.

llguidance does the work (chosen by measurement, docs/benchmarks.md "Grammar library"): it has no dependencies,
runs on CPU and GPU alike (the mask is a bitmask applied to the logits with torch), compiles a grammar lazily in
milliseconds, and computes a row's mask in tens of microseconds. A grammar is llguidance's Lark dialect, where
`%json {schema}` is a rule; `neat_core.data.chat.reply_grammar` writes a chat reply's grammar.

Each row owns its matcher, and its mask depends on its own tokens only, so a constrained row never changes what
its batch-mates pick, nor they its.
"""

from __future__ import annotations

import threading

import llguidance
import llguidance.hf
import llguidance.torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase


class GrammarError(ValueError):
    """The grammar (or the JSON schema in it) cannot be compiled; the message says why."""


class Grammars:
    """One engine's grammar compiler: the tokenizer as llguidance sees it (built on first use, about 0.5 s for a
    49k vocabulary) and a matcher per constrained row."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int):
        self._hf, self._vocab_size = tokenizer, vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start. Raises GrammarError."""
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.hf.from_tokenizer(self._hf, n_vocab=self._vocab_size)
        matcher = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error())
        return matcher


def mask_(scores: Tensor, matcher: llguidance.LLMatcher) -> Tensor:
    """scores: (V,) float, masked in place: -inf for every token the grammar does not allow next."""
    bitmask = llguidance.torch.allocate_token_bitmask(1, scores.shape[-1])  # (1, ceil(V / 32)) int32
    llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
    llguidance.torch.apply_token_bitmask_inplace(scores.unsqueeze(0), bitmask.to(scores.device))
    return scores


def advance(matcher: llguidance.LLMatcher, token: int) -> bool:
    """Feed the picked token; True when the grammar is complete (nothing more may follow)."""
    if not matcher.consume_token(token):  # cannot happen with the mask applied; a bug if it does
        raise RuntimeError(f"token {token} is outside the grammar: {matcher.get_error()}")
    return matcher.is_stopped()
