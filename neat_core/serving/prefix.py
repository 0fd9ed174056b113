"""Prompt prefixes already computed: their keys and values, per adapter, so a prompt that starts like an earlier one
prefills only the rest.

Chat prompts share long beginnings: the chat template's system prompt, a tenant's own instructions, few-shot
examples. A prefill costs ~1 ms per token on two CPU cores (SmolLM2), and with many streams a request's prefill is
a third of its time; llama.cpp reuses each slot's previous prompt the same way, and vLLM keeps every block.

The cache holds blocks of `BLOCK` (8) tokens. A block is keyed by the adapter that computed it (None: the base model)
and a digest of every token from the prompt's start to the block's end, so a key names one whole prefix, never just
a block's own tokens. Its value is the keys and values of those `BLOCK` positions for every layer, one tensor
(n_layers, 2, kv_heads, BLOCK, head_dim). Causal attention makes a position's keys and values depend on the tokens
up to it alone, so a hit is what the prefill would have computed (up to the fp32 rounding of another batch shape,
the same freedom batching takes: tests check the tokens). Least recently used blocks go first once the cache holds
`budget_bytes`; an adapter's blocks go when it is evicted (`drop`).

Written by hand: transformers' caches are per generation, and the serving libraries that share prefixes (vLLM's
block manager, SGLang's radix tree) own the whole memory layout of a GPU engine.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict

import torch
from torch import Tensor

BLOCK = 8  # tokens per cached block: shorter blocks share more (a chat template's ~30 tokens: 24 of them), longer ones
# cost fewer lookups and copies


class PrefixCache:
    """Blocks of prompt keys and values, least recently used first, at most `budget_bytes` (0: off)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._blocks: OrderedDict[tuple[str | None, bytes], Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # the scheduler thread reads and writes; an adapter eviction drops
        self.hit_tokens = self.prompt_tokens = 0

    def match(self, adapter_id: str | None, tokens: list[int]) -> list[Tensor]:
        """The cached blocks that start `tokens`, longest run first to last, leaving at least one token to compute
        (its logits pick the first new token). Each block: (n_layers, 2, kv_heads, BLOCK, head_dim)."""
        found: list[Tensor] = []
        with self._lock:
            self.prompt_tokens += len(tokens)
            if self.budget_bytes <= 0:
                return found
            for key in _keys(adapter_id, tokens, (len(tokens) - 1) // BLOCK):
                block = self._blocks.get(key)
                if block is None:
                    break
                self._blocks.move_to_end(key)
                found.append(block)
            self.hit_tokens += BLOCK * len(found)
        return found

    def add(self, adapter_id: str | None, tokens: list[int], kv: Tensor, start: int = 0) -> None:
        """Keep the whole blocks of a computed prompt from block `start` on. kv: (n_layers, 2, kv_heads, T,
        head_dim), the prompt's keys and values at its positions 0..T-1 (T = len(tokens))."""
        if self.budget_bytes <= 0:
            return
        keys = _keys(adapter_id, tokens, len(tokens) // BLOCK)
        with self._lock:
            for j in range(start, len(keys)):
                if keys[j] in self._blocks:
                    self._blocks.move_to_end(keys[j])
                    continue
                block = kv[:, :, :, j * BLOCK : (j + 1) * BLOCK].clone()  # its own memory: the prompt's can go
                if block.numel() * block.element_size() > self.budget_bytes:
                    return
                self._blocks[keys[j]] = block
                self._bytes += block.numel() * block.element_size()
                while self._bytes > self.budget_bytes:
                    _, old = self._blocks.popitem(last=False)
                    self._bytes -= old.numel() * old.element_size()

    def drop(self, adapter_id: str | None) -> None:
        """Forget every block an adapter computed (it was evicted: the same id may come back with other weights)."""
        with self._lock:
            for key in [k for k in self._blocks if k[0] == adapter_id]:
                old = self._blocks.pop(key)
                self._bytes -= old.numel() * old.element_size()

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "prefix_blocks": len(self._blocks),
                "prefix_bytes": self._bytes,
                "prefix_bytes_budget": self.budget_bytes,
                "prefix_hit_tokens": self.hit_tokens,
                "prefix_prompt_tokens": self.prompt_tokens,
            }


def _keys(adapter_id: str | None, tokens: list[int], n_blocks: int) -> list[tuple[str | None, bytes]]:
    """The keys of the first `n_blocks` blocks: a running BLAKE2 digest of the token ids (a 128-bit digest, so two
    different prefixes never share a key in practice, which Python's 64-bit `hash` of a tuple could not promise)."""
    digest = hashlib.blake2b(digest_size=16)
    keys = []
    for j in range(n_blocks):
        digest.update(array("q", tokens[j * BLOCK : (j + 1) * BLOCK]).tobytes())
        keys.append((adapter_id, digest.copy().digest()))
    return keys


def stacked(blocks: list[list[Tensor]]) -> Tensor:
    """Rows' runs of blocks, all of one length, as (B, n_layers, 2, kv_heads, P, head_dim)."""
    return torch.stack([torch.cat(row, dim=3) for row in blocks])
