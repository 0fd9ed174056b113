"""The generation half of a `BatchEngine`: requests, token streams, prefill and decode steps over a left-padded
key/value cache, and per-row sampling.

The key/value cache is one left-padded tensor per layer, (B, kv_heads, T, head_dim); explicit position ids and
the attention mask make each row compute what it would compute alone. Sampling is per row with the request's own
generator, so a seeded request gives the same tokens whatever else is in its batch.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import CausalLMOutputWithPast

from neat_core.serving import grammar as constrained
from neat_core.serving.cache import AdapterRef
from neat_core.serving.prefix import BLOCK, stacked
from neat_core.serving.scheduler import EngineBusy, EngineClosed

_DONE = object()  # end-of-stream marker in a generation's token queue

# transformers 5.24 renamed the key/value cache, as a forward keyword and as an output field, from `past_key_values`
# to `cache`; the old names only warn until 5.40, then they go. The installed release decides which name we use.
KV_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool = False  # record each chosen token's log-probability (OpenAI's `logprobs`)
    top_logprobs: int = 0  # with logprobs: also the k most likely tokens at each step, and theirs
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks; vLLM's option of the same name)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    presence_penalty: float = 0.0  # subtracted from the logit of every token generated so far
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated so far
    grammar: str | None = None  # llguidance Lark grammar the text must follow (`neat_core.serving.grammar`)

    @property
    def shapes_logits(self) -> bool:
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty)


class TokenStream:
    """One generation's tokens, as the scheduler produces them. Iterate once; `cancel()` (or leaving the loop
    early) frees its row at the next step. Afterwards `finish_reason` is "stop" (EOS or cancelled) or "length"."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = 0  # of the prompt, taken from the prefix cache (OpenAI's usage.prompt_tokens_details)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.logprobs: list[float] = []  # per generated token, when asked for
        self.top_logprobs: list[list[tuple[int, float]]] = []  # per generated token: (token id, log-probability)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._cancelled = threading.Event()

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        try:
            while (item := self._queue.get()) is not _DONE:
                yield item
        finally:
            self.cancel()
        if self.error is not None:
            raise self.error

    # Called by the scheduler thread only.
    def _put(self, token: int) -> None:
        self.completion_tokens += 1
        self._queue.put(token)

    def _end(self, reason: str, error: BaseException | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self._queue.put(_DONE)


@dataclass
class _GenRequest:
    input_ids: list[int]
    adapter_id: str | None
    sampling: SamplingParams
    stream: TokenStream
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    caller: Any = None  # the organisation it is for: the scheduler caps each one's running rows
    matcher: Any = None  # the grammar's state (llguidance.LLMatcher), for a constrained row


class GenerationMixin:
    """`BatchEngine`'s generation: `generate` (any thread) and the steps the scheduler thread runs. Uses the
    engine's `task`, `device`, `tokenizer`, `cache`, `max_length`, `vocab_size`, `grammars`, `_eos`, `_submit`,
    `_forward` and `prefixes` (a `prefix.PrefixCache`)."""

    def generate(
        self, input_ids: list[int], adapter: AdapterRef | None, sampling: SamplingParams, caller: str | None = None
    ) -> TokenStream:
        """Queue a generation; its adapter is checked against `caller` and loaded before it joins a batch.
        Raises GrammarError (a ValueError) for a grammar that does not compile."""
        if self.task != "causal_lm":
            raise ValueError("this engine serves classification")
        if not input_ids:
            raise ValueError("empty prompt")
        outside = [t for t in [*input_ids, *(t for t, _ in sampling.logit_bias)] if not 0 <= t < self.vocab_size]
        if outside:  # checked here: an index past the logits would fail the whole batch's step
            raise ValueError(f"token ids outside the vocabulary (0..{self.vocab_size - 1}): {outside[:5]}")
        matcher = self.grammars.matcher(sampling.grammar) if sampling.grammar is not None else None
        if adapter is not None:
            self.cache.acquire(adapter, caller)  # raises before anything is queued
        stream = TokenStream(len(input_ids))
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed % 2**63 if sampling.seed is not None else torch.seed())
        adapter_id = adapter and adapter.adapter_id
        request = _GenRequest(list(input_ids), adapter_id, sampling, stream, generator, caller=caller, matcher=matcher)
        try:
            self._submit([request], caller)
        except (EngineClosed, EngineBusy):
            if adapter is not None:
                self.cache.release(adapter.adapter_id)
            raise
        return stream

    # ---- the scheduler thread ----

    def _prune(self, running: list[_GenRequest], state: _DecodeState) -> tuple[list[_GenRequest], _DecodeState | None]:
        """Finished rows leave the batch (and their cache rows with them)."""
        keep = [i for i, r in enumerate(running) if not self._finished(r)]
        if len(keep) == len(running):
            return running, state
        return [running[i] for i in keep], state.select(keep) if keep else None

    def _prefill(self, new: list[_GenRequest], state: _DecodeState | None) -> tuple[list[_GenRequest], _DecodeState]:
        """Run the new prompts, stream their first tokens and merge their cache rows in; returns the new requests in
        the order of their rows. Prompts that start with the same number of cached blocks (`prefix`) run together,
        each computing only what follows its cached part."""
        groups: dict[int, list[tuple[_GenRequest, list[Tensor]]]] = {}
        for r in new:
            blocks = self.prefixes.match(r.adapter_id, r.input_ids)
            r.stream.cached_tokens = BLOCK * len(blocks)
            groups.setdefault(len(blocks), []).append((r, blocks))
        joined: list[_GenRequest] = []
        for _, group in sorted(groups.items()):
            requests = [r for r, _ in group]
            fresh = self._prefill_group(requests, [blocks for _, blocks in group])
            joined += requests
            state = fresh if state is None else state.concat(fresh)
        assert state is not None
        return joined, state

    def _prefill_group(self, new: list[_GenRequest], blocks: list[list[Tensor]]) -> _DecodeState:
        """Prompts whose first P = BLOCK x len(blocks[i]) positions are cached (the same P for each): the rest of
        each, left-padded, runs after its cached keys and values. The cache rows are laid out [P cached | padding |
        the rest], the mask saying which positions are real."""
        cached = BLOCK * len(blocks[0])
        rest = [r.input_ids[cached:] for r in new]
        width = max(len(ids) for ids in rest)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rest], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rest], device=self.device)  # (B_new, T)
        positions = cached + (mask.cumsum(-1) - 1).clamp(min=0)
        cache: DynamicCache = DynamicCache()
        if cached:
            prefix = stacked(blocks).to(self.device)  # (B_new, n_layers, 2, kv_heads, P, head_dim)
            cache = _GrowingCache([_GrowingLayer.holding(prefix[:, i, 0], prefix[:, i, 1], width + 16)
                                   for i in range(prefix.shape[1])])  # fmt: skip
            mask = torch.cat([mask.new_ones(len(new), cached), mask], dim=1)  # (B_new, P + T)
        out = self._forward(
            [r.adapter_id for r in new],
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: (B, 1, V), not (B, T, V)
            **{KV_CACHE: cache},
        )
        self._emit(new, out.logits[:, -1])  # (B_new, V)
        fresh = _DecodeState.from_cache(getattr(out, KV_CACHE), mask)
        self._remember(new, fresh, cached)
        return fresh

    def _remember(self, new: list[_GenRequest], state: _DecodeState, cached: int) -> None:
        """Give the prefix cache each prompt's whole blocks that it did not have (positions `cached` on)."""
        if self.prefixes.budget_bytes <= 0 or len({layer.keys.shape[1:] for layer in state.layers}) != 1:
            return  # off, or layers of different shapes (one block tensor holds every layer)
        for i, r in enumerate(new):
            whole = len(r.input_ids) // BLOCK * BLOCK
            if whole <= cached:
                continue
            real = state.mask[i].nonzero().squeeze(1)[:whole]  # the prompt's positions in the cache row
            kv = torch.stack([torch.stack([layer.keys[i].index_select(1, real), layer.values[i].index_select(1, real)])
                              for layer in state.layers])  # fmt: skip
            self.prefixes.add(r.adapter_id, r.input_ids[:whole], kv, start=cached // BLOCK)

    def _decode(self, running: list[_GenRequest], state: _DecodeState) -> _DecodeState:
        """One step for every running row: feed each row's last token, get its next."""
        last = torch.tensor([[r.tokens[-1]] for r in running], device=self.device)  # (B, 1)
        mask = torch.cat([state.mask, state.mask.new_ones(len(running), 1)], dim=1)  # (B, T+1)
        out = self._forward(
            [r.adapter_id for r in running],
            input_ids=last,
            attention_mask=mask,
            position_ids=mask.sum(-1, keepdim=True) - 1,
            use_cache=True,
            **{KV_CACHE: state.cache()},
        )
        self._emit(running, out.logits[:, -1])
        return _DecodeState.from_cache(getattr(out, KV_CACHE), mask)

    def _emit(self, requests: list[_GenRequest], logits: Tensor) -> None:
        """Pick each row's next token (logits: (B, V)) and stream it; end the rows that are done."""
        logits = logits.float()
        greedy = logits.argmax(-1).tolist()  # (B,): one call for the whole batch
        for r, row, best in zip(requests, logits, greedy, strict=True):
            if self._finished(r):  # ended already (cancelled between steps); its row leaves after this step
                continue
            scores = self._shaped(row, r) if r.sampling.shapes_logits else row
            if r.matcher is not None:  # only tokens that keep the text inside the row's grammar
                scores = constrained.mask_(scores.clone() if scores is row else scores, r.matcher)
            if r.sampling.temperature > 0:
                token = self._sample(scores, r)
            else:
                token = best if scores is row else int(scores.argmax())
            if r.sampling.logprobs:  # the model's own distribution, before bias, penalties and grammar (as vLLM)
                logp = row.log_softmax(-1)
                r.stream.logprobs.append(float(logp[token]))
                if r.sampling.top_logprobs:
                    values, ids = logp.topk(r.sampling.top_logprobs)
                    r.stream.top_logprobs.append(list(zip(ids.tolist(), values.tolist(), strict=True)))
            r.tokens.append(token)
            r.stream._put(token)
            complete = r.matcher is not None and constrained.advance(r.matcher, token)
            if (token in self._eos and not r.sampling.ignore_eos) or complete:
                self._end(r, "stop")
            elif len(r.tokens) >= r.sampling.max_tokens or (
                self.max_length is not None and len(r.input_ids) + len(r.tokens) >= self.max_length
            ):
                self._end(r, "length")
            elif r.stream.cancelled:
                self._end(r, "stop")

    @staticmethod
    def _shaped(logits: Tensor, r: _GenRequest) -> Tensor:
        """logits: (V,). A copy with the row's logit_bias added and its presence/frequency penalties (OpenAI's
        definitions, over the tokens this row generated so far) subtracted: from the row's own state only, so
        its batch-mates never change its answer."""
        s, logits = r.sampling, logits.clone()
        if s.logit_bias:
            ids = torch.tensor([t for t, _ in s.logit_bias], device=logits.device)
            logits.index_add_(0, ids, torch.tensor([b for _, b in s.logit_bias], device=logits.device))
        if (s.presence_penalty or s.frequency_penalty) and r.tokens:
            ids, counts = torch.tensor(r.tokens, device=logits.device).unique(return_counts=True)
            logits.index_add_(0, ids, -(s.frequency_penalty * counts.float() + s.presence_penalty))
        return logits

    @staticmethod
    def _sample(logits: Tensor, r: _GenRequest) -> int:
        """logits: (V,); temperature > 0. Temperature and nucleus (top_p) sampling."""
        probs = (logits / r.sampling.temperature).softmax(-1)
        if r.sampling.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            outside = sorted_probs.cumsum(-1) - sorted_probs > r.sampling.top_p  # keep the smallest covering set
            probs = probs.scatter(0, order, sorted_probs.masked_fill(outside, 0))
        return int(torch.multinomial(probs, 1, generator=r.generator))

    def _finished(self, r: _GenRequest) -> bool:
        """Whether the row is done; a cancelled row is ended here (its consumer has gone)."""
        if r.stream.cancelled:
            self._end(r, "stop")
        return r.stream.finish_reason is not None

    def _end(self, r: _GenRequest, reason: str, error: BaseException | None = None) -> None:
        if r.stream.finish_reason is None:
            if r.adapter_id is not None:  # first, so a caller that sees the end sees the adapter unpinned
                self.cache.release(r.adapter_id)
            r.stream._end(reason, error)

    @staticmethod
    def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(tokenizer.eos_token_id)
        return {i for i in ids if i is not None}


class _GrowingLayer(DynamicLayer):
    """One layer's keys and values, (B, kv_heads, T, head_dim) each, as views of buffers with room for more
    positions. transformers' `DynamicLayer` concatenates at every step, copying the whole cache to add one position:
    at 32 rows of 200 tokens on SmolLM2 that is ~300 MB a step, more than the step's weights. Here a step writes its
    one position in place, and a buffer grows by a quarter (at least 16 positions) only when it is full, so the
    copying is amortised to a few positions a step. Positions past `length` are never read: the views stop there."""

    def __init__(self, keys: Tensor, values: Tensor, length: int | None = None):
        """keys, values: buffers (B, kv_heads, capacity, head_dim) whose first `length` positions (all of them
        by default) are the cache."""
        super().__init__()
        self.length = keys.shape[2] if length is None else length
        self._k, self._v = keys, values
        self.device = keys.device
        self.is_initialized = True
        self._view()

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor, room: int) -> _GrowingLayer:
        """A layer whose cache starts as keys, values (B, kv_heads, P, head_dim), with room for `room` more."""
        return cls(_with_room(keys, room), _with_room(values, room), keys.shape[2])

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        raise AssertionError("a _GrowingLayer is created with its keys and values")

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        end = self.length + key_states.shape[2]
        if end > self._k.shape[2]:
            room = max(16, self.length // 4)
            self._k, self._v = (
                _with_room(self.keys, end - self.length + room),
                _with_room(self.values, end - self.length + room),
            )
        self._k[:, :, self.length : end] = key_states
        self._v[:, :, self.length : end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    def _view(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]


def _with_room(t: Tensor, room: int) -> Tensor:
    """t (B, H, T, D) copied into a new buffer (B, H, T + room, D)."""
    buffer = t.new_empty(t.shape[0], t.shape[1], t.shape[2] + room, t.shape[3])
    buffer[:, :, : t.shape[2]] = t
    return buffer


class _GrowingCache(DynamicCache):
    """A `DynamicCache` over `_GrowingLayer`s (a DynamicCache, for models that check the type)."""

    def __init__(self, layers: list[_GrowingLayer]):
        Cache.__init__(self, layers=layers)


@dataclass
class _DecodeState:
    """The running rows' key/value cache, one `_GrowingLayer` per model layer: keys and values (B, kv_heads, T,
    head_dim) each, left-padded, and the attention mask (B, T) that says which positions are real. A decode step
    adds one position to every layer in place (`cache()` hands the model the same layers)."""

    layers: list[_GrowingLayer]
    mask: Tensor

    @classmethod
    def from_cache(cls, cache: DynamicCache, mask: Tensor) -> _DecodeState:
        layers = [
            layer if isinstance(layer, _GrowingLayer) else _GrowingLayer(layer.keys, layer.values)
            for layer in cache.layers
        ]
        return cls(layers, mask)

    def cache(self) -> DynamicCache:
        return _GrowingCache(self.layers)

    def concat(self, other: _DecodeState) -> _DecodeState:
        """Stack two groups of rows, the shorter one left-padded with masked zeros: each layer is copied once,
        straight into a buffer with room for the steps to come."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        room = max(16, width // 4)

        def stacked(a: Tensor, b: Tensor) -> Tensor:  # (Ba, H, Ta, D), (Bb, H, Tb, D) -> (Ba + Bb, H, width, D)
            out = a.new_empty(a.shape[0] + b.shape[0], a.shape[1], width + room, a.shape[3])
            for rows, t in ((slice(0, a.shape[0]), a), (slice(a.shape[0], None), b)):
                out[rows, :, : width - t.shape[2]] = 0
                out[rows, :, width - t.shape[2] : width] = t
            return out

        layers = [
            _GrowingLayer(stacked(la.keys, lb.keys), stacked(la.values, lb.values), width)
            for la, lb in zip(self.layers, other.layers, strict=True)
        ]
        return _DecodeState(layers, torch.cat([self._mask(width), other._mask(width)]))

    def select(self, rows: list[int]) -> _DecodeState:
        """Keep these rows, then drop the leading positions no remaining row uses."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first position some row still uses
        layers = [
            _GrowingLayer(
                layer.keys[:, :, start:].index_select(0, index), layer.values[:, :, start:].index_select(0, index)
            )
            for layer in self.layers
        ]
        return _DecodeState(layers, mask[:, start:])

    def _mask(self, width: int) -> Tensor:
        """The mask left-padded with zeros to `width` positions."""
        extra = width - self.mask.shape[1]
        return self.mask if extra == 0 else torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], 1)
