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
from neat_core.serving.scheduler import EngineBusy, EngineClosed, length_buckets

_DONE = object()  # end-of-stream marker in a generation's token queue

# transformers 5.24 renamed the key/value cache, as a forward keyword and as an output field, from `past_key_values`
# to `cache`; the old names only warn until 5.40, then they go. The installed release decides which name we use.
KV_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

# New prompts are prefilled in passes of similar lengths (`length_buckets`): a pass's fixed cost, in prompt token
# positions. On a CPU a prefill pass is compute-bound: on SmolLM2 over 2 cores, ~1 ms a token position in a pass of
# 16 prompts, and ~25 ms fixed (the weights read once, the per-op overhead), so about 24 positions. Prompts of
# bench/vs_llamacpp.py (41 to 128 tokens), 16 at a time, padded into one pass compute 1.41x their own tokens; in
# buckets 1.05x, and they prefill 1.17x faster (bench/prefill_passes.py). On a GPU a token position costs next to
# nothing and a pass's launches dominate: one pass almost always.
PREFILL_PASS_OVERHEAD = {"cpu": 24, "cuda": 1024}


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
        """Finished rows leave the batch (and their cache rows with them); the rows may change order."""
        keep = [i for i, r in enumerate(running) if not self._finished(r)]
        if len(keep) == len(running):
            return running, state
        if not keep:
            return [], None
        state, order = state.select(keep)
        return [running[i] for i in order], state

    def _prefill(self, new: list[_GenRequest], state: _DecodeState | None) -> tuple[list[_GenRequest], _DecodeState]:
        """Run the new prompts, stream their first tokens and merge their cache rows in; returns the new requests in
        the order of their rows. Prompts that start with the same number of cached blocks (`prefix`) run together,
        each computing only what follows its cached part, in passes of similar lengths (PREFILL_PASS_OVERHEAD)."""
        groups: dict[int, list[tuple[_GenRequest, list[Tensor]]]] = {}
        for r in new:
            blocks = self.prefixes.match(r.adapter_id, r.input_ids)
            r.stream.cached_tokens = BLOCK * len(blocks)
            groups.setdefault(len(blocks), []).append((r, blocks))
        overhead = PREFILL_PASS_OVERHEAD.get(self.device.type, PREFILL_PASS_OVERHEAD["cuda"])
        joined: list[_GenRequest] = []
        states: list[_DecodeState] = []
        for _, group in sorted(groups.items()):
            rest = [len(r.input_ids) - r.stream.cached_tokens for r, _ in group]  # what each row computes
            for chunk in length_buckets(rest, overhead):
                requests = [group[i][0] for i in chunk]
                states.append(self._prefill_group(requests, [group[i][1] for i in chunk]))
                joined += requests
        if state is None:
            return joined, _DecodeState.stack(states, self.max_batch)
        return joined, state.join(states, self.max_batch)

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
    """One layer's keys and values, (B, kv_heads, T, head_dim) each, as views of buffers with room for more rows and
    positions. transformers' `DynamicLayer` concatenates at every step, copying the whole cache to add one position:
    at 32 rows of 200 tokens on SmolLM2 that is ~300 MB a step, more than the step's weights. Here a step writes its
    one position in place, and a buffer grows by a quarter (at least 16 positions) only when it is full, so the
    copying is amortised to a few positions a step. Rows join into the spare rows and leave by moving the last rows
    into their places (`add_rows`, `move_rows`): only the rows that join or move are copied. Positions past
    `length` and rows past `rows` are never read: the views stop there."""

    def __init__(self, keys: Tensor, values: Tensor, length: int | None = None, rows: int | None = None):
        """keys, values: buffers (capacity rows, kv_heads, capacity positions, head_dim) whose first `rows` rows and
        `length` positions (all of them by default) are the cache."""
        super().__init__()
        self.length = keys.shape[2] if length is None else length
        self.rows = keys.shape[0] if rows is None else rows
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
            self._copy(start=0, room=end - self.length + max(16, self.length // 4))
        self._k[: self.rows, :, self.length : end] = key_states
        self._v[: self.rows, :, self.length : end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values

    @torch.inference_mode()  # the buffers are inference tensors (made in the forward); joins happen outside it
    def add_rows(self, keys: Tensor, values: Tensor) -> None:
        """New rows (k, kv_heads, T, head_dim), T <= length, right-aligned with the others (their last position is
        everyone's), the positions before masked zeros; needs k spare rows."""
        new, t = slice(self.rows, self.rows + keys.shape[0]), keys.shape[2]
        for buffer, rows in ((self._k, keys), (self._v, values)):
            buffer[new, :, : self.length - t] = 0
            buffer[new, :, self.length - t : self.length] = rows
        self.rows += keys.shape[0]
        self._view()

    @torch.inference_mode()
    def move_rows(self, to: Tensor | None, source: Tensor | None, rows: int) -> None:
        """Copy rows `source` into rows `to` (index tensors, or None for no move), then keep the first `rows` rows."""
        if to is not None:
            for buffer in (self._k, self._v):
                buffer[to, :, : self.length] = buffer[source, :, : self.length]
        self.rows = rows
        self._view()

    def drop_front(self, start: int) -> None:
        """Forget the first `start` positions (no row uses them): every row is copied once."""
        self._copy(start=start, room=self._k.shape[2] - self.length)

    def _copy(self, start: int, room: int) -> None:
        """New buffers holding positions start..length of the rows, with `room` more; as many spare rows."""
        self._k, self._v = (_with_room(t[:, :, start:], room, self._k.shape[0]) for t in (self.keys, self.values))
        self.length -= start
        self._view()

    def _view(self) -> None:
        self.keys, self.values = self._k[: self.rows, :, : self.length], self._v[: self.rows, :, : self.length]


def _with_room(t: Tensor, room: int, rows: int = 0) -> Tensor:
    """t (B, H, T, D) copied into a new buffer (max(B, rows), H, T + room, D). Spare rows are left unwritten: on a
    CPU their pages are never touched until a row joins there."""
    buffer = t.new_empty(max(t.shape[0], rows), t.shape[1], t.shape[2] + room, t.shape[3])
    buffer[: t.shape[0], :, : t.shape[2]] = t
    return buffer


class _GrowingCache(DynamicCache):
    """A `DynamicCache` over `_GrowingLayer`s (a DynamicCache, for models that check the type)."""

    def __init__(self, layers: list[_GrowingLayer]):
        Cache.__init__(self, layers=layers)


@dataclass
class _DecodeState:
    """The running rows' key/value cache, one `_GrowingLayer` per model layer: keys and values (B, kv_heads, T,
    head_dim) each, left-padded, and the attention mask (B, T) that says which positions are real. A decode step
    adds one position to every layer in place (`cache()` hands the model the same layers).

    Rows join and leave without copying the others where they can (at 32 streams a request joins and one leaves
    about every other step, and copying every row's cache each time cost a fifth of the time): new rows go into the
    buffers' spare rows (`join`), and a leaving row's place is taken by the last row (`select`)."""

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

    def join(self, fresh: list[_DecodeState], max_rows: int) -> _DecodeState:
        """These rows and the fresh groups' after them. In place when the buffers have the spare rows and no fresh
        row is wider than the running ones (it fits left of their last position); else one `stack`."""
        width, spare = self.mask.shape[1], self.layers[0]._k.shape[0] - self.layers[0].rows
        if sum(f.mask.shape[0] for f in fresh) > spare or any(f.mask.shape[1] > width for f in fresh):
            return _DecodeState.stack([self, *fresh], max_rows)
        for group in fresh:
            for mine, theirs in zip(self.layers, group.layers, strict=True):
                mine.add_rows(theirs.keys, theirs.values)
        return _DecodeState(self.layers, torch.cat([self.mask, *(f._mask(width) for f in fresh)]))

    @staticmethod
    def stack(states: list[_DecodeState], max_rows: int = 0) -> _DecodeState:
        """Stack groups of rows, each left-padded with masked zeros to the widest: each layer is copied once (not
        once per group), straight into a buffer with room for the steps to come and for rows to join (twice the
        rows, up to `max_rows`). One group is returned as is."""
        if len(states) == 1:
            return states[0]
        width = max(s.mask.shape[1] for s in states)
        room = max(16, width // 4)
        total = sum(s.mask.shape[0] for s in states)
        capacity = max(total, min(max_rows, 2 * total))

        layers = []
        for group in zip(*(s.layers for s in states), strict=True):
            k = group[0].keys  # (B_0, kv_heads, T_0, head_dim)
            shape = (capacity, k.shape[1], width + room, k.shape[3])
            layer = _GrowingLayer(k.new_empty(shape), k.new_empty(shape), length=width, rows=0)
            for part in group:  # the same left-padded write as a join into spare rows
                layer.add_rows(part.keys, part.values)
            layers.append(layer)
        return _DecodeState(layers, torch.cat([s._mask(width) for s in states]))

    def select(self, keep: list[int]) -> tuple[_DecodeState, list[int]]:
        """Keep these rows (ascending indices): the kept rows past the new row count move into the places of the
        rows that leave, so only they are copied. Returns the state and, per new row, its old index. Leading
        positions no remaining row uses are dropped once they are an eighth of the width (every row copied once: a
        wider cache costs every step's attention)."""
        n, kept = len(keep), set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, mover in zip(holes, movers, strict=True):
            order[hole] = mover
        device = self.mask.device
        mask = self.mask.index_select(0, torch.tensor(order, device=device))
        to = source = None
        if holes:
            to, source = torch.tensor(holes, device=device), torch.tensor(movers, device=device)
        for layer in self.layers:  # the index tensors are built once, not once per layer
            layer.move_rows(to, source, n)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first position some row still uses
        if start >= max(16, mask.shape[1] // 8):
            for layer in self.layers:
                layer.drop_front(start)
            mask = mask[:, start:]
        return _DecodeState(self.layers, mask), order

    def _mask(self, width: int) -> Tensor:
        """The mask left-padded with zeros to `width` positions."""
        extra = width - self.mask.shape[1]
        return self.mask if extra == 0 else torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], 1)
