"""The scheduler half of a `BatchEngine`: the inbox that request threads submit to, and the one thread that runs the
model. An idle scheduler waits for a request, then `window_s` more for company (at most `max_batch`); classification
items go to `_classify_batch` (neat_core.serving.classification), generation requests are prefilled together and
then decoded one step at a time for every running row (neat_core.serving.generation): rows that finish leave at
once, rows that arrive join at the next step (continuous batching). A failed pass fails the rows in it, never the
engine. `close()` stops it now; `retire()` once idle.

**Fairness across callers** (the organisation each request is for). Queued work waits in one queue per caller, and
every pass is filled round-robin over the callers with work waiting, one row each in turn, so while k callers wait
each gets at least floor(max_batch / k) rows of a pass (all of it when alone: nothing is held back when nobody
else waits), and a caller that was cut short by the pass filling up goes first in the next one. The guarantee: a
request of n rows whose caller is one of k waiting starts within the pass running now, and is done after at most
ceil(n / max(1, floor(max_batch / k))) more passes, whatever the other callers queued. (A classification pass is
one gathered batch, run as one or a few length-bucketed forwards; for generation, a pass admits rows into the
running batch as rows finish.) A caller may hold at most `max_queued` rows waiting; past that its request is
refused with `EngineBusy` before anything is queued, so no tenant can fill the engine's memory with its backlog.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from typing import Any

import torch
from torch import Tensor

log = logging.getLogger("neat_core.serving")


class EngineClosed(RuntimeError):
    """The engine has shut down (or retired) and takes no more requests."""


class EngineBusy(RuntimeError):
    """The caller already has `max_queued` rows waiting in this engine: retry once some are done."""


class Scheduler:
    """Inbox, scheduler thread and forward accounting. Subclasses (`BatchEngine`) provide the model
    (`self.model`), `_classify_batch`, and generation's `_prefill`, `_decode`, `_prune`, `_finished` and `_end`,
    then call `_start()` once everything the loop uses exists."""

    def __init__(self, task: str, max_batch: int, window_s: float, max_queued: int = 8192) -> None:
        self.task = task
        self.max_batch = max_batch
        self.window_s = window_s
        self.max_queued = max_queued  # rows one caller may have waiting
        # caller -> its items taken from the inbox, not yet in a pass; in turn order (the scheduler thread's only)
        self._waiting: OrderedDict[Any, deque] = OrderedDict()
        self._queued: Counter = Counter()  # caller -> items submitted and not yet in a pass (under _submit_lock)
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

    def _submit(self, items: list, caller: Any = None) -> None:
        with self._submit_lock:
            if self._closed.is_set():
                raise EngineClosed("this engine has shut down")
            if self._queued[caller] + len(items) > self.max_queued:
                raise EngineBusy(f"{self._queued[caller]} rows of this caller are already waiting; at most "
                                 f"{self.max_queued} may wait at once")  # fmt: skip
            self._queued[caller] += len(items)
            for item in items:
                self._inbox.put((caller, item))

    def queue_depth(self) -> int:
        with self._submit_lock:
            return sum(self._queued.values())

    def _idle_and_retired(self, running: list) -> bool:
        if running or self._waiting or not self._retiring:
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
                    self.running = len(running)  # counted as they join, not a decode step later
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
        """Up to `room` queued items, taken round-robin over their callers. Idle: wait for one, then `window_s`
        more for company."""
        if block and not self._waiting:
            first = self._inbox.get()
            if first is None:
                return []
            self._wait(first)
            deadline = time.monotonic() + self.window_s
            while self._waiting_rows() < room and (left := deadline - time.monotonic()) > 0:
                try:
                    item = self._inbox.get(timeout=left)
                except queue.Empty:
                    break
                if item is None:
                    break
                self._wait(item)
        while True:  # everything submitted so far joins its caller's queue, so every caller is seen
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._wait(item)
        return self._take(room)

    def _wait(self, entry: tuple) -> None:
        caller, item = entry
        self._waiting.setdefault(caller, deque()).append(item)

    def _waiting_rows(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def _take(self, room: int) -> list:
        """Up to `room` waiting items, one per caller in turn; a caller served goes to the back of the turn order,
        so one cut short by a full pass is first in the next."""
        items: list = []
        taken: Counter = Counter()
        while len(items) < room and self._waiting:
            for caller in list(self._waiting):
                if len(items) >= room:
                    break
                waiting = self._waiting[caller]
                items.append(waiting.popleft())
                taken[caller] += 1
                if waiting:
                    self._waiting.move_to_end(caller)
                else:
                    del self._waiting[caller]
        with self._submit_lock:
            self._queued.subtract(taken)
            self._queued = +self._queued  # drop callers with nothing left
        return items

    def _forward(self, adapter_ids: list[str | None], **inputs: Tensor) -> Any:
        self.batch_sizes[len(adapter_ids)] += 1
        with self._model_lock, torch.inference_mode():
            return self.model(adapter_ids=adapter_ids, **inputs)
