"""One base model serving many adapters to concurrent requests: batching with a gathering window, continuous
batching for generation, and token streaming.

A `BatchEngine` owns one frozen base model wrapped in a `MultiAdapterModel` and one scheduler thread, the only
thread that runs the model. Requests from any thread go into an inbox:

- **Generation** (causal LM). An idle engine waits up to `window_s` for more requests (at most `max_batch`), then
  prefills them together and streams each row's first token. From then on it runs one decode step at a time for
  every running row at once, each row through its own adapter's factors; a row that finishes (EOS, its token
  budget, or a cancelled stream) leaves the batch at once, and requests that arrived meanwhile are prefilled and
  join the running batch at the next step (continuous batching). The key/value cache is one left-padded tensor
  per layer, (B, kv_heads, T, head_dim); explicit position ids and the attention mask make each row compute what
  it would compute alone.
- **Classification.** Texts from concurrent requests are gathered the same way, sorted by length and run in as
  few padded passes as pays (`length_buckets`): an encoder's forward is compute-bound here, so padding a 7-token
  tweet to 59 costs what it pays for.

Sampling is per row with the request's own generator, so a seeded request gives the same tokens whatever else is
in its batch. Written by hand because transformers' `generate` runs one fixed batch to its end (no joining rows),
and no maintained CPU-capable library batches per-row low-rank adapters (vLLM, LoRAX and S-LoRA need GPUs).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from neat_core.serving.batched import MultiAdapterModel
from neat_core.serving.cache import AdapterCache, AdapterRef

log = logging.getLogger("neat_core.serving")

_DONE = object()  # end-of-stream marker in a generation's token queue

# transformers 5.24 renamed the key/value cache, as a forward keyword and as an output field, from `past_key_values`
# to `cache`; the old names only warn until 5.40, then they go. The installed release decides which name we use.
KV_CACHE = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def length_buckets(lengths: list[int], pass_overhead: int) -> list[list[int]]:
    """Split rows into padded passes: indices sorted by length, cut where the padding saved outweighs one more
    pass. A pass of rows with lengths l_i costs n * max(l_i) + `pass_overhead` token positions (the overhead: a
    pass's fixed cost in the same units); an exact dynamic program over the sorted order (n <= max_batch, so O(n^2)
    is nothing)."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n = len(order)
    best = [0.0] + [float("inf")] * n  # best[j]: cost of the first j sorted rows
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        longest = lengths[order[j - 1]]  # the j-th shortest row sets the padding of any pass ending at it
        for i in range(j):
            cost = best[i] + (j - i) * longest + pass_overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    chunks, j = [], n
    while j:
        chunks.append(order[cut[j] : j])
        j = cut[j]
    return chunks[::-1]


class EngineClosed(RuntimeError):
    """The engine has shut down (or retired) and takes no more requests."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    logprobs: bool = False  # record each chosen token's log-probability (OpenAI's `logprobs`)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks; vLLM's option of the same name)


class TokenStream:
    """One generation's tokens, as the scheduler produces them. Iterate once; `cancel()` (or leaving the loop
    early) frees its row at the next step. Afterwards `finish_reason` is "stop" (EOS or cancelled) or "length"."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.logprobs: list[float] = []  # per generated token, when asked for
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


@dataclass
class _ClassifyRow:
    text: str
    adapter_id: str | None
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    tokens: int = 0
    error: BaseException | None = None


class BatchEngine:
    """Serves one base model (`task` "causal_lm" or "classification") with every adapter in its cache."""

    def __init__(
        self,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        task: str,
        *,
        cache_bytes: int = 256 * 2**20,
        max_batch: int = 32,
        window_s: float = 0.005,
        max_length: int | None = None,
        pass_overhead: int = 48,
    ):
        self.task = task
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_length = max_length or (128 if task == "classification" else None)
        self.pass_overhead = pass_overhead
        self.device = next(model.parameters()).device
        self.model = MultiAdapterModel(model.eval())
        self._model_lock = threading.Lock()  # held around every forward; the cache changes slots between them
        self.cache = AdapterCache(self.model, cache_bytes, self._model_lock)
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from several threads
        self._eos = self._eos_ids(model, tokenizer)
        self._inbox: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._retiring = False  # `retire()`: stop once idle
        self._submit_lock = threading.Lock()  # orders submissions against the scheduler's decision to stop
        self.batch_sizes: Counter[int] = Counter()  # rows per forward pass -> how many passes
        self.running = 0
        self._thread = threading.Thread(target=self._loop, name=f"batch-engine-{task}", daemon=True)
        self._thread.start()

    # ---- the request side (any thread) ----

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat_prompt(self, messages: list[dict]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def preload(self, adapter: AdapterRef) -> None:
        self.cache.acquire(adapter, adapter.owner)
        self.cache.release(adapter.adapter_id)

    def generate(
        self, input_ids: list[int], adapter: AdapterRef | None, sampling: SamplingParams, caller: str | None = None
    ) -> TokenStream:
        """Queue a generation; its adapter is checked against `caller` and loaded before it joins a batch."""
        if self.task != "causal_lm":
            raise ValueError("this engine serves classification")
        if not input_ids:
            raise ValueError("empty prompt")
        if adapter is not None:
            self.cache.acquire(adapter, caller)  # raises before anything is queued
        stream = TokenStream(len(input_ids))
        generator = None
        if sampling.temperature > 0:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(sampling.seed % 2**63 if sampling.seed is not None else torch.seed())
        request = _GenRequest(list(input_ids), adapter and adapter.adapter_id, sampling, stream, generator)
        try:
            self._submit([request])
        except EngineClosed:
            if adapter is not None:
                self.cache.release(adapter.adapter_id)
            raise
        return stream

    def classify(
        self, texts: list[str], adapter: AdapterRef | None, caller: str | None = None
    ) -> tuple[list[dict], int]:
        """([{"label", "probabilities"}] per text, prompt tokens), the texts batched with other requests'."""
        if self.task != "classification":
            raise ValueError("this engine serves generation")
        if adapter is not None:
            self.cache.acquire(adapter, caller)
        try:
            rows = [_ClassifyRow(text, adapter and adapter.adapter_id) for text in texts]
            self._submit(rows)
            for row in rows:
                row.done.wait()
                if row.error is not None:
                    raise row.error
        finally:
            if adapter is not None:
                self.cache.release(adapter.adapter_id)
        return [row.result for row in rows], sum(row.tokens for row in rows)

    def stats(self) -> dict[str, Any]:
        passes = sum(self.batch_sizes.values())
        rows = sum(size * n for size, n in self.batch_sizes.items())
        return {
            **self.cache.stats(),
            "queue_depth": self._inbox.qsize(),
            "running": self.running,
            "forward_passes": passes,
            "mean_batch_size": round(rows / passes, 2) if passes else 0.0,
            "max_batch_size": max(self.batch_sizes, default=0),
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
        }

    def close(self) -> None:
        self._closed.set()
        self._inbox.put(None)
        self._thread.join(timeout=30)

    def retire(self) -> None:
        """Stop once idle: requests already queued or running finish, later ones get `EngineClosed` (the caller
        loads a fresh engine). For an engine dropped from a cache while requests may still be using it."""
        with self._submit_lock:
            self._retiring = True
        self._inbox.put(None)  # wakes an idle scheduler to notice

    def _submit(self, items: list) -> None:
        with self._submit_lock:
            if self._closed.is_set():
                raise EngineClosed("this engine has shut down")
            for item in items:
                self._inbox.put(item)

    def _idle_and_retired(self, running: list) -> bool:
        if running or not self._retiring:
            return False
        with self._submit_lock:  # nothing can be queued between this look and the stop
            if self._inbox.qsize() == 0 or all(item is None for item in list(self._inbox.queue)):
                self._closed.set()
                return True
        return False

    # ---- the scheduler thread ----

    def _loop(self) -> None:
        running: list[_GenRequest] = []
        state: _DecodeState | None = None
        while not self._closed.is_set():
            if self._idle_and_retired(running):
                break
            new: list = []
            try:
                new = self._gather(block=not running, room=self.max_batch - len(running))
                if self.task == "classification":
                    self._classify_batch(new)
                    continue
                new = [r for r in new if not self._finished(r)]  # cancelled while queued
                if new:
                    state = self._prefill(new, state)
                    running, new = running + new, []
                    running, state = self._prune(running, state)
                if running:
                    state = self._decode(running, state)
                    running, state = self._prune(running, state)
                self.running = len(running)
            except Exception as e:  # a failed pass fails the rows in it, never the engine
                log.exception("batch failed")
                for r in running + new:
                    self._end(r, "stop", e)
                running, state, self.running = [], None, 0
        for r in running:
            self._end(r, "stop", RuntimeError("the serving engine shut down"))

    def _prune(self, running: list[_GenRequest], state: _DecodeState) -> tuple[list[_GenRequest], _DecodeState | None]:
        """Finished rows leave the batch (and their cache rows with them)."""
        keep = [i for i, r in enumerate(running) if not self._finished(r)]
        if len(keep) == len(running):
            return running, state
        return [running[i] for i in keep], state.select(keep) if keep else None

    def _gather(self, *, block: bool, room: int) -> list:
        """Up to `room` queued items. Idle: wait for one, then `window_s` more for company."""
        items: list = []
        if block:
            first = self._inbox.get()
            if first is None:
                return items
            items.append(first)
            deadline = time.monotonic() + self.window_s
            while len(items) < room and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._inbox.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    break
                items.append(item)
        while len(items) < room:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                items.append(item)
        return items

    def _forward(self, adapter_ids: list[str | None], **inputs: Tensor) -> Any:
        self.batch_sizes[len(adapter_ids)] += 1
        with self._model_lock, torch.inference_mode():
            return self.model(adapter_ids=adapter_ids, **inputs)

    def _prefill(self, new: list[_GenRequest], state: _DecodeState | None) -> _DecodeState:
        """Run the new prompts together (left-padded), stream their first tokens, merge their cache rows in."""
        width = max(len(r.input_ids) for r in new)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.input_ids)) + r.input_ids for r in new], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(r.input_ids)) + [1] * len(r.input_ids) for r in new], device=self.device
        )  # (B_new, T)
        out = self._forward(
            [r.adapter_id for r in new],
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            use_cache=True,
            logits_to_keep=1,  # only the last position's logits: (B, 1, V), not (B, T, V)
            **{KV_CACHE: DynamicCache()},
        )
        self._emit(new, out.logits[:, -1])  # (B_new, V)
        fresh = _DecodeState.from_cache(getattr(out, KV_CACHE), mask)
        return fresh if state is None else state.concat(fresh)

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
            token = best if r.sampling.temperature <= 0 else self._sample(row, r)
            if r.sampling.logprobs:
                r.stream.logprobs.append(float(row.log_softmax(-1)[token]))
            r.tokens.append(token)
            r.stream._put(token)
            if token in self._eos and not r.sampling.ignore_eos:
                self._end(r, "stop")
            elif len(r.tokens) >= r.sampling.max_tokens or (
                self.max_length is not None and len(r.input_ids) + len(r.tokens) >= self.max_length
            ):
                self._end(r, "length")
            elif r.stream.cancelled:
                self._end(r, "stop")

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

    def _classify_batch(self, rows: list[_ClassifyRow]) -> None:
        rows = [r for r in rows if r is not None]
        if not rows:
            return
        try:
            with self.tokenizer_lock:
                ids = self.tokenizer([r.text for r in rows], truncation=True, max_length=self.max_length)["input_ids"]
            for chunk in length_buckets([len(i) for i in ids], self.pass_overhead):
                self._classify_pass([rows[i] for i in chunk], [ids[i] for i in chunk])
        except Exception as e:
            log.exception("classification batch failed")
            for r in rows:
                r.error = e
        finally:
            for r in rows:
                r.done.set()

    def _classify_pass(self, rows: list[_ClassifyRow], ids: list[list[int]]) -> None:
        width = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id or 0
        left = self.tokenizer.padding_side == "left"
        input_ids = torch.full((len(ids), width), pad, dtype=torch.long)  # (B, L_max)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, i in enumerate(ids):
            span = slice(width - len(i), width) if left else slice(0, len(i))
            input_ids[row, span] = torch.tensor(i)
            mask[row, span] = 1
        adapter_ids = [r.adapter_id for r in rows]
        self.batch_sizes[len(rows)] += 1
        with self._model_lock, torch.inference_mode():
            logits = self.model.classify(input_ids.to(self.device), mask.to(self.device), adapter_ids)
            labels = [self.model.labels(a) for a in adapter_ids]
        for r, row_logits, names, row_ids in zip(rows, logits, labels, ids, strict=True):
            probs = row_logits.float().softmax(-1)
            r.result = {
                "label": names[int(probs.argmax())],
                "probabilities": {name: float(p) for name, p in zip(names, probs, strict=True)},
            }
            r.tokens = len(row_ids)

    @staticmethod
    def _eos_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> set[int]:
        configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        ids = set(configured if isinstance(configured, list) else [configured])
        ids.add(tokenizer.eos_token_id)
        return {i for i in ids if i is not None}


@dataclass
class _DecodeState:
    """The running rows' key/value cache: per layer (keys, values), each (B, kv_heads, T, head_dim), left-padded,
    and the attention mask (B, T) that says which positions are real."""

    layers: list[tuple[Tensor, Tensor]]
    mask: Tensor

    @classmethod
    def from_cache(cls, cache: DynamicCache, mask: Tensor) -> _DecodeState:
        return cls([(layer.keys, layer.values) for layer in cache.layers], mask)

    def cache(self) -> DynamicCache:
        return DynamicCache(ddp_cache_data=self.layers)

    def concat(self, other: _DecodeState) -> _DecodeState:
        """Stack two groups of rows, left-padding the shorter one with masked zeros."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        a, b = self._padded(width), other._padded(width)
        layers = [
            (torch.cat([ka, kb]), torch.cat([va, vb])) for (ka, va), (kb, vb) in zip(a.layers, b.layers, strict=True)
        ]
        return _DecodeState(layers, torch.cat([a.mask, b.mask]))

    def select(self, rows: list[int]) -> _DecodeState:
        """Keep these rows, then drop the leading positions no remaining row uses."""
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0])  # first position some row still uses
        layers = [
            (k.index_select(0, index)[:, :, start:], v.index_select(0, index)[:, :, start:]) for k, v in self.layers
        ]
        return _DecodeState(layers, mask[:, start:])

    def _padded(self, width: int) -> _DecodeState:
        extra = width - self.mask.shape[1]
        if extra == 0:
            return self

        def pad(t: Tensor) -> Tensor:  # (B, H, T, D) -> (B, H, width, D)
            return torch.cat([t.new_zeros(*t.shape[:2], extra, t.shape[3]), t], dim=2)

        return _DecodeState(
            [(pad(k), pad(v)) for k, v in self.layers],
            torch.cat([self.mask.new_zeros(self.mask.shape[0], extra), self.mask], dim=1),
        )
