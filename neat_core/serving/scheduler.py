"""The scheduler half of a `BatchEngine`: the inbox that request threads submit to, and the thread that runs the
model. An idle scheduler waits for a request, then `window_s` more for company (at most `max_batch`). Generation
requests are prefilled together and then decoded one step at a time for every running row
(neat_core.serving.generation): rows that finish leave at once, rows that arrive join at the next step (continuous
batching). Classification rows are gathered into passes (`_classify_batch`, neat_core.serving.classification) that
run on `lanes` threads. A failed pass fails the rows in it, never the engine. `close()` stops it now; `retire()`
once idle.

**Fairness across callers** (the organisation each request is for). Queued work waits in one queue per caller, and
every pass is filled round-robin over the callers with work waiting, one row each in turn, so while k callers wait
each gets at least floor(max_batch / k) rows of a pass (all of it when alone: nothing is held back when nobody
else waits), and a caller that was cut short by the pass filling up goes first in the next one. A caller may hold
at most `max_queued` rows waiting; past that its request is refused with `EngineBusy` before anything is queued,
so no tenant can fill the engine's memory with its backlog.

The guarantees:
- Generation: rows join the running batch as running rows finish, taken round-robin by caller in the same way,
  so a request waits for room in the batch, never behind another caller's backlog. No caller holds more than
  `max_batch - reserved_rows` running rows: while one caller fills the batch, another's request joins at the
  next step rather than after one of its long generations ends.
- Classification: a pass holds at most `pass_tokens` token positions (always at least one row), and each caller
  has at most one pass running. Up to `lanes` passes of different callers run at once, so a caller's request
  starts at once while fewer than `lanes` other callers have a pass running. Otherwise it starts when the first
  of their passes ends (one pass of at most `pass_tokens`), and it is done after ceil(n / max(1, floor(max_batch
  / k))) of its own passes. On CPU, passes running at once share the cores.
"""

from __future__ import annotations

import ctypes
import logging
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor

from neat_core.serving.locks import ModelLock

log = logging.getLogger("neat_core.serving")


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


# The torch threads of an engine's scheduler thread, once `engines_own_the_threads` has run; None: unmanaged.
_engine_threads: int | None = None


def engines_own_the_threads() -> None:
    """Run torch single-threaded on every thread of this process except the engines' scheduler threads, which keep
    torch's thread count as it is now. Called once, on the main thread, before anything else uses torch.

    Why: libgomp keeps one OpenMP team per thread that has run a parallel region (the thread that loaded a model,
    request threads that loaded adapters, the engine's own). Once it manages more threads than there are CPUs it
    stops spinning between parallel regions, and every matmul of a decode step then wakes its worker through the
    kernel: a SmolLM2 step at batch 1 took 48 ms on the scheduler thread against 24 ms in a process with one team
    (docs/benchmarks.md). Setting 1 on the main thread sets the default of every thread started later."""
    global _engine_threads
    _engine_threads = torch.get_num_threads()
    torch.set_num_threads(1)


def _take_engine_threads() -> None:
    """On a thread that runs an engine's passes: the process's torch threads, when the engines own them."""
    if _engine_threads is not None:
        torch.set_num_threads(_engine_threads)


class EngineBusy(RuntimeError):
    """The caller already has `max_queued` rows waiting in this engine: retry once some are done."""


class Scheduler:
    """Inbox, scheduler thread and forward accounting. Subclasses (`BatchEngine`) provide the model
    (`self.model`), `_classify_batch`, and generation's `_prefill`, `_decode`, `_prune`, `_finished` and `_end`,
    then call `_start()` once everything the loop uses exists."""

    def __init__(
        self,
        task: str,
        max_batch: int,
        window_s: float,
        max_queued: int = 8192,
        pass_tokens: int | None = None,
        lanes: int = 2,
        reserved_rows: int = 0,
    ) -> None:
        self.task = task
        self.max_batch = max_batch
        # Token positions one classification pass may hold (None: rows alone bound it). An encoder's pass costs in
        # proportion to its tokens, so this bounds how long a pass holds the model, whatever its rows are: 32
        # rows of 512 tokens took ~6 s on 2 CPU cores, and every other caller waited behind them.
        self.pass_tokens = pass_tokens
        self.window_s = window_s
        self.max_queued = max_queued  # rows one caller may have waiting
        # caller -> its items taken from the inbox, not yet in a pass; in turn order (the scheduler thread's only)
        self._waiting: OrderedDict[Any, deque] = OrderedDict()
        self._queued: Counter = Counter()  # caller -> items submitted and not yet in a pass (under _submit_lock)
        self._model_lock = ModelLock()  # shared by forwards; the cache changes slots only while none runs
        self.lanes = lanes  # classification passes of different callers that may run at once
        self.reserved_rows = reserved_rows  # generation rows no single caller may take: room for the others
        self._inbox: queue.Queue = queue.Queue()
        self._closed = threading.Event()
        self._retiring = False  # `retire()`: stop once idle
        self._submit_lock = threading.Lock()  # orders submissions against the scheduler's decision to stop
        self.batch_sizes: Counter[int] = Counter()  # rows per forward pass -> how many passes
        self.running = 0
        self._trimmed_at = 0.0  # when `_idle` last gave memory back

    def _start(self) -> None:
        loop = self._classify_loop if self.task == "classification" else self._loop

        def run() -> None:
            _take_engine_threads()
            loop()

        self._thread = threading.Thread(target=run, name=f"batch-engine-{self.task}", daemon=True)
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

    def _idle_and_retired(self, running: list | int) -> bool:
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
                held = Counter(r.caller for r in running)
                new = self._gather(block=not running, room=self.max_batch - len(running), held=held)
                new = [r for r in new if not self._finished(r)]  # cancelled while queued
                if new:
                    self.running = len(running) + len(new)  # counted from their prefill, before any token is out
                    joined, state = self._prefill(new, state)
                    running, new = running + joined, []
                    running, state = self._prune(running, state)
                    self.running = len(running)  # counted as they join, not a decode step later
                if running:
                    state = self._decode(running, state)
                    running, state = self._prune(running, state)
                self.running = len(running)
                if not running and not self._waiting:
                    self._idle()
            except Exception as e:  # a failed pass fails the rows in it, never the engine
                log.exception("batch failed")
                for r in running + new:
                    self._end(r, "stop", e)
                running, state, self.running = [], None, 0
        for r in running:
            self._end(r, "stop", RuntimeError("the serving engine shut down"))

    def _classify_loop(self) -> None:
        """Classification: passes run on `lanes` threads, at most one pass per caller at a time, so another
        caller's pass starts at once beside a long one (on CPU the two share the cores; a pass cannot be
        interrupted, and one of 512-token rows holds the model for ~0.2 s on two cores). Rows are still taken
        round-robin over the callers that have no pass running."""
        busy: Counter = Counter()  # caller -> its passes running (0 or 1)
        in_flight = 0
        with ThreadPoolExecutor(
            self.lanes, thread_name_prefix=f"batch-pass-{self.task}", initializer=_take_engine_threads
        ) as lanes:

            def run(items: list, callers: set) -> None:
                try:
                    self._classify_batch(items)
                finally:
                    self._inbox.put(_PassDone(callers))

            while not self._closed.is_set():
                if not in_flight and self._idle_and_retired(0):
                    break
                free = in_flight < self.lanes and any(c not in busy for c in self._waiting)
                entry = self._inbox.get() if not free else _NOTHING
                if not in_flight and not self._waiting and entry not in (None, _NOTHING):
                    if not isinstance(entry, _PassDone):  # idle: wait `window_s` for company, as `_gather` does
                        self._wait(entry)
                        entry = _NOTHING
                        deadline = time.monotonic() + self.window_s
                        while (left := deadline - time.monotonic()) > 0 and self._waiting_rows() < self.max_batch:
                            try:
                                item = self._inbox.get(timeout=left)
                            except queue.Empty:
                                break
                            if item is None or isinstance(item, _PassDone):
                                entry = item
                                break
                            self._wait(item)
                for item in [entry, *_drain(self._inbox)]:
                    if isinstance(item, _PassDone):
                        in_flight -= 1
                        busy.subtract(item.callers)
                        busy = +busy
                    elif item is not None and item is not _NOTHING:
                        self._wait(item)
                if not in_flight and not self._waiting:
                    self._idle()
                if in_flight < self.lanes and (items := self._take(self.max_batch, skip=set(busy))):
                    callers = {caller for caller, _ in items}
                    busy.update(callers)
                    in_flight += 1
                    lanes.submit(run, [item for _, item in items], callers)
        for rows in self._waiting.values():  # closed with work still waiting: its callers must not wait forever
            for row in rows:
                row.error = EngineClosed("the serving engine shut down")
                row.done.set()

    def _idle(self) -> None:
        """Nothing running or waiting: give freed heap memory back to the system, at most once a second. glibc
        keeps what a big pass freed (activations, a long prompt's tokens) in its arenas, so without this the
        process stays at its peak after a spike (measured: 487 -> 831 MB after one tenant's 16 Mi characters)."""
        if time.monotonic() - self._trimmed_at >= 1.0:
            _trim_heap()
            self._trimmed_at = time.monotonic()

    def _gather(self, *, block: bool, room: int, held: Counter | None = None) -> list:
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
        return self._take(room, held=held)

    def _wait(self, entry: tuple) -> None:
        caller, item = entry
        self._waiting.setdefault(caller, deque()).append(item)

    def _waiting_rows(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    def _take(self, room: int, skip: set | None = None, held: Counter | None = None) -> list:
        """Up to `room` waiting items (and, with `pass_tokens`, at most that many tokens, though always one item),
        one per caller in turn; a caller served goes to the back of the turn order, so one cut short by a full pass
        is first in the next. With `skip` (callers with a pass running): only the others' items, as (caller, item)
        pairs. With `held` (generation: each caller's running rows): no caller gets past `max_batch -
        reserved_rows` rows, so the rest of the batch stays free for the others."""
        items: list = []
        taken: Counter = Counter()
        budget = self.pass_tokens if self.pass_tokens is not None and self.task == "classification" else None
        cap = None if held is None else max(1, self.max_batch - self.reserved_rows)
        spent, full = 0, False

        def eligible(caller: Any) -> bool:
            return (skip is None or caller not in skip) and (cap is None or held[caller] + taken[caller] < cap)

        while not full and len(items) < room:
            turn = [c for c in self._waiting if eligible(c)]
            if not turn:
                break
            for caller in turn:
                if not eligible(caller):
                    continue
                waiting = self._waiting[caller]
                if budget is not None:
                    cost = _tokens(waiting[0])
                    if items and spent + cost > budget:  # the pass is full; this caller is first in the next
                        full = True
                        break
                    spent += cost
                items.append(waiting.popleft() if skip is None else (caller, waiting.popleft()))
                taken[caller] += 1
                if waiting:
                    self._waiting.move_to_end(caller)
                else:
                    del self._waiting[caller]
                if len(items) >= room:
                    break
        with self._submit_lock:
            self._queued.subtract(taken)
            self._queued = +self._queued  # drop callers with nothing left
        return items

    def _forward(self, adapter_ids: list[str | None], **inputs: Tensor) -> Any:
        self.batch_sizes[len(adapter_ids)] += 1
        with self._model_lock.shared(), torch.inference_mode():
            return self.model(adapter_ids=adapter_ids, **inputs)


class _PassDone:
    """Put in the inbox by a lane when its pass is over: its callers may have their next pass."""

    def __init__(self, callers: set) -> None:
        self.callers = callers


_NOTHING = object()  # "no inbox entry taken" in the classification loop


def _trim_heap() -> None:
    """glibc's malloc_trim(0), where the C library is glibc (elsewhere nothing). By hand: no library wraps it."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC: Any = None


def _drain(inbox: queue.Queue) -> list:
    entries = []
    while True:
        try:
            entries.append(inbox.get_nowait())
        except queue.Empty:
            return entries


def _tokens(item: Any) -> int:
    """A classification row's tokens (its text's length in characters / 4 before it is tokenized)."""
    ids = getattr(item, "ids", None)
    return len(ids) if ids is not None else max(1, len(getattr(item, "text", "")) // 4)
