"""The classification half of a `BatchEngine`: texts from concurrent requests are gathered together, sorted by
length and run in as few padded passes as pays (`length_buckets`): an encoder's forward is compute-bound here, so
padding a 7-token tweet to 59 costs what it pays for.

Texts are tokenized by the request's thread, a slice at a time (so a big request's tokenizing never holds the
tokenizer from other requests for long, nor the scheduler thread at all), each text first cut to what its
`max_length` tokens can cover (`CHARS_PER_TOKEN` characters a token: the rest would be truncated away anyway).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import torch

from neat_core.serving.cache import AdapterRef
from neat_core.serving.scheduler import length_buckets

log = logging.getLogger("neat_core.serving")
# A token covers rarely more than a few characters of text; past max_length x 16 characters a text is certainly
# past max_length tokens, so what follows is never read and is cut before tokenizing.
CHARS_PER_TOKEN = 16
TOKENIZE_SLICE = 16  # texts tokenized per hold of the tokenizer lock: another request waits for one slice at most


@dataclass
class _ClassifyRow:
    text: str
    adapter_id: str | None
    ids: list[int] | None = None  # tokenized by the request's thread; None: by the scheduler's (bench/serving.py)
    done: threading.Event = field(default_factory=threading.Event)
    result: dict | None = None
    tokens: int = 0
    error: BaseException | None = None


class ClassificationMixin:
    """`BatchEngine`'s classification: `classify` (any thread) and the passes the scheduler thread runs. Uses the
    engine's `task`, `tokenizer`, `tokenizer_lock`, `cache`, `model`, `max_length`, `pass_overhead`, `batch_sizes`,
    `_model_lock` and `_submit`."""

    def classify(
        self, texts: list[str], adapter: AdapterRef | None, caller: str | None = None
    ) -> tuple[list[dict], int]:
        """([{"label", "probabilities"}] per text, prompt tokens), the texts batched with other requests'."""
        if self.task != "classification":
            raise ValueError("this engine serves generation")
        if adapter is not None:
            self.cache.acquire(adapter, caller)
        try:
            rows = [_ClassifyRow(text, adapter and adapter.adapter_id, ids) for text, ids in zip(texts,
                    self._tokenized(texts), strict=True)]  # fmt: skip
            self._submit(rows, caller)
            for row in rows:
                row.done.wait()
                if row.error is not None:
                    raise row.error
        finally:
            if adapter is not None:
                self.cache.release(adapter.adapter_id)
        return [row.result for row in rows], sum(row.tokens for row in rows)

    def _tokenized(self, texts: list[str]) -> list[list[int]]:
        cut = self.max_length * CHARS_PER_TOKEN
        ids: list[list[int]] = []
        for start in range(0, len(texts), TOKENIZE_SLICE):
            chunk = [t[:cut] for t in texts[start : start + TOKENIZE_SLICE]]
            with self.tokenizer_lock:
                ids += self.tokenizer(chunk, truncation=True, max_length=self.max_length)["input_ids"]
        return ids

    # ---- the scheduler thread ----

    def _classify_batch(self, rows: list[_ClassifyRow]) -> None:
        rows = [r for r in rows if r is not None]
        if not rows:
            return
        try:
            if any(r.ids is None for r in rows):
                for r, ids in zip(rows, self._tokenized([r.text for r in rows]), strict=True):
                    r.ids = r.ids if r.ids is not None else ids
            ids = [r.ids for r in rows]
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
        with self._model_lock.shared(), torch.inference_mode():
            logits = self.model.classify(input_ids.to(self.device), mask.to(self.device), adapter_ids)
            labels = [self.model.labels(a) for a in adapter_ids]
        for r, row_logits, names, row_ids in zip(rows, logits, labels, ids, strict=True):
            probs = row_logits.float().softmax(-1)
            r.result = {
                "label": names[int(probs.argmax())],
                "probabilities": {name: float(p) for name, p in zip(names, probs, strict=True)},
            }
            r.tokens = len(row_ids)
