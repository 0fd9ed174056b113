"""The scheduler half of a `BatchEngine`: the inbox that request threads submit to, and the one thread that runs the
model. An idle scheduler waits for a request, then `window_s` more for company (at most `max_batch`); classification
items go to `_classify_batch` (neat_core.serving.classification), generation requests are prefilled together and
then decoded one step at a time for every running row (neat_core.serving.generation): rows that finish leave at
once, rows that arrive join at the next step (continuous batching). A failed pass fails the rows in it, never the
engine. `close()` stops it now; `retire()` once idle.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("neat_core.serving")


class EngineClosed(RuntimeError):
    """The engine has shut down (or retired) and takes no more requests."""


class Scheduler:
    """Inbox, scheduler thread and forward accounting. Subclasses (`BatchEngine`) provide the model
    (`self.model`), `_classify_batch`, and generation's `_prefill`, `_decode`, `_prune`, `_finished` and `_end`,
    then call `_start()` once everything the loop uses exists."""

    def __init__(self, task: str, max_batch: int, window_s: float) -> None:
        self.task = task
        self.max_batch = max_batch
        self.window_s = window_s
        self._model_lock = threading.Lock()  # held around every forward; the cache changes slots between them
        self._inbox: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._retiring = False  # `retire()`: stop once idle
        self._submit_lock = threading.Lock()  # orders submissions against the scheduler's decision to stop
        self.batch_sizes: Counter[int] = Counter()  # rows per forward pass -> how many passes
        self.running = 0

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"batch-engine-{self.task}", daemon=True)
        self._thread.start()

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
        running: list = []  # generation requests decoding together (generation._GenRequest)
        state = None  # their key/value cache (generation._DecodeState)
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
