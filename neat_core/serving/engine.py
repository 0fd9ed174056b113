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
- **Classification.** Texts are tokenized on the request's own thread (never the scheduler's), then gathered
  from concurrent requests the same way, sorted by length and run in as few padded passes as pays
  (`length_buckets`): an encoder's forward is compute-bound here, so padding a 7-token tweet to 59 costs what it
  pays for.

Work is taken round-robin by caller (the organisation a request is for), so one tenant's big request is interleaved
with everyone else's: the guarantee is stated in `neat_core.serving.scheduler`.

Sampling is per row with the request's own generator, so a seeded request gives the same tokens whatever else is
in its batch. Written by hand because transformers' `generate` runs one fixed batch to its end (no joining rows),
and no maintained CPU-capable library batches per-row low-rank adapters (vLLM, LoRAX and S-LoRA need GPUs).

The engine is three parts: `scheduler` (inbox, the thread, gathering), `generation` (streams, prefill/decode,
sampling, the cache state) and `classification` (length buckets, padded passes); this module puts them together
with the request-side helpers.
"""

from __future__ import annotations

import threading
from typing import Any

from transformers import PreTrainedTokenizerBase

from neat_core.data import chat
from neat_core.serving.batched import MultiAdapterModel
from neat_core.serving.cache import AdapterCache, AdapterRef
from neat_core.serving.classification import ClassificationMixin, _ClassifyRow
from neat_core.serving.generation import KV_CACHE, GenerationMixin, SamplingParams, TokenStream, _GenRequest
from neat_core.serving.grammar import Grammars
from neat_core.serving.layout import pack_linears
from neat_core.serving.prefix import PrefixCache
from neat_core.serving.scheduler import EngineBusy, EngineClosed, Scheduler, length_buckets

__all__ = [
    "KV_CACHE",
    "BatchEngine",
    "EngineBusy",
    "EngineClosed",
    "SamplingParams",
    "TokenStream",
    "_ClassifyRow",  # bench/serving.py drives the passes directly
    "_GenRequest",
    "length_buckets",
]


class BatchEngine(Scheduler, GenerationMixin, ClassificationMixin):
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
        max_queued: int = 8192,
        pass_tokens: int | None = None,
        lanes: int = 2,
        reserved_rows: int = 0,
        prefix_bytes: int = 64 * 2**20,
    ):
        Scheduler.__init__(self, task, max_batch, window_s, max_queued, pass_tokens, lanes, reserved_rows)
        self.tokenizer = tokenizer
        self.max_length = max_length or (128 if task == "classification" else None)
        self.pass_overhead = pass_overhead
        self.device = next(model.parameters()).device
        if task == "causal_lm":
            pack_linears(model)  # on a CPU, oneDNN's packed weights: a decode step 1.5-2x faster
        self.model = MultiAdapterModel(model.eval())
        self.vocab_size = int(model.get_output_embeddings().out_features) if task != "classification" else 0
        self.prefixes = PrefixCache(prefix_bytes if task == "causal_lm" else 0)
        self.cache = AdapterCache(self.model, cache_bytes, self._model_lock, on_drop=self.prefixes.drop)
        self.tokenizer_lock = threading.Lock()  # fast tokenizers are not safe to call from several threads
        self.grammars = Grammars(tokenizer, self.vocab_size)
        self._eos = self._eos_ids(model, tokenizer)
        self._start()

    # ---- the request side (any thread) ----

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        with self.tokenizer_lock:
            return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        with self.tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_text(self, token: int) -> str:
        """One token's own text, special tokens included (as log-probabilities name them)."""
        with self.tokenizer_lock:
            return self.tokenizer.decode([token])

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> str:
        """OpenAI messages (and tools) through the model's chat template, ready for the assistant's turn."""
        with self.tokenizer_lock:
            return chat.render(self.tokenizer, messages, tools, add_generation_prompt=True)

    def preload(self, adapter: AdapterRef) -> None:
        self.cache.acquire(adapter, adapter.owner)
        self.cache.release(adapter.adapter_id)

    def stats(self) -> dict[str, Any]:
        passes = sum(self.batch_sizes.values())
        rows = sum(size * n for size, n in self.batch_sizes.items())
        return {
            **self.cache.stats(),
            **self.prefixes.stats(),
            "queue_depth": self.queue_depth(),
            "rows_running": self.running,
            "forward_passes": passes,
            "mean_batch_size": round(rows / passes, 2) if passes else 0.0,
            "max_batch_size": max(self.batch_sizes, default=0),
            "batch_sizes": dict(sorted(self.batch_sizes.items())),
        }
