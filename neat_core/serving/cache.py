"""The adapters one serving base model holds: a least-recently-used cache bounded by bytes.

An adapter is loaded by id on first use (read from its artifact directory and turned into low-rank factors once,
`factors.load_factors`), then served from the `MultiAdapterModel`'s slot tables until it is evicted. Concurrent
first requests for one adapter load it once. A request *pins* its adapter while it runs, so an adapter in use is
never evicted under it; when everything is pinned the cache runs over its budget rather than stall (by at most
one batch's adapters) and shrinks back as requests finish.

Each adapter records the organisation that owns it, and `acquire` refuses a caller from any other organisation
before the adapter is loaded or joins a batch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from neat_core.serving.batched import MultiAdapterModel
from neat_core.serving.factors import load_factors
from neat_core.serving.locks import ModelLock

log = logging.getLogger("neat_core.serving")


class AdapterAccessError(LookupError):
    """The caller's organisation does not own this adapter. Callers answer it like a missing adapter."""


@dataclass(frozen=True)
class AdapterRef:
    """An adapter to serve: its public id, its artifact directory and the organisation that owns it."""

    adapter_id: str
    path: Path
    owner: str | None = None  # None: anyone may use it (tests, benchmarks, a single-tenant deployment)


@dataclass
class _Traffic:
    """One organisation's cache traffic (its adapters' hits, misses and evictions), for its own stats."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    load_seconds: float = 0.0


@dataclass
class _Entry:
    ref: AdapterRef
    nbytes: int
    pins: int = 0
    loaded_at: float = field(default_factory=time.monotonic)


class AdapterCache:
    """Adapters loaded into one `MultiAdapterModel`, at most `budget_bytes` of factors while nothing is pinned.

    `model_lock` is the lock the serving loop holds around every forward pass: slot tables change only between
    passes. Loading (disk reads, NEAT's hidden matrices) happens outside it, in the requesting thread.
    """

    def __init__(
        self,
        model: MultiAdapterModel,
        budget_bytes: int,
        model_lock: ModelLock,
        on_drop: Callable[[str], None] | None = None,
    ):
        self.model = model
        self.on_drop = on_drop  # told each adapter id evicted (the engine drops what it computed)
        self.budget_bytes = budget_bytes
        self._model_lock = model_lock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # least recently used first
        self._loading: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()  # guards the dicts and counters; never held while loading
        self.hits = self.misses = self.evictions = 0
        self.load_seconds_total = 0.0
        self._traffic: dict[str, _Traffic] = {}  # per owning organisation (adapters without an owner: no one's)

    def acquire(self, ref: AdapterRef, caller: str | None) -> None:
        """Make `ref` servable and pin it until `release`. Raises AdapterAccessError for another organisation's
        adapter (nothing loaded, nothing counted) and ArtifactError for an artifact that cannot be served."""
        self._check_owner(ref, caller)
        with self._lock:
            if self._pin_if_loaded(ref):
                self._hit(ref)
                return
            key_lock = self._loading.setdefault(ref.adapter_id, threading.Lock())
        with key_lock:  # concurrent first requests: one loads, the others wait and then hit
            with self._lock:
                if self._pin_if_loaded(ref):
                    self._hit(ref)
                    return
            try:
                start = time.perf_counter()
                factors = load_factors(ref.path, self.model.model, adapter_id=ref.adapter_id)
                with self._lock:
                    self._make_room(factors.nbytes)
                with self._model_lock:
                    self.model.add(factors)
                with self._lock:
                    self._entries[ref.adapter_id] = _Entry(ref, factors.nbytes, pins=1)
                    seconds = time.perf_counter() - start
                    self.misses += 1
                    self.load_seconds_total += seconds
                    if (traffic := self._traffic_of(ref.owner)) is not None:
                        traffic.misses += 1
                        traffic.load_seconds += seconds
                log.info("loaded adapter %s (%d bytes)", ref.adapter_id, factors.nbytes)
            finally:
                with self._lock:
                    self._loading.pop(ref.adapter_id, None)

    def release(self, adapter_id: str) -> None:
        """Unpin once per `acquire`; the adapter stays cached and becomes evictable when no request holds it."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is not None and entry.pins > 0:
                entry.pins -= 1
            self._make_room(0)  # give back what was over budget while everything was pinned

    def evict(self, adapter_id: str) -> bool:
        """Drop an unpinned adapter now (an operator's action, and tests); False if it is absent or in use."""
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None or entry.pins:
                return False
            self._drop(adapter_id)
            return True

    def loaded(self) -> list[AdapterRef]:
        with self._lock:
            return [e.ref for e in self._entries.values()]

    def bytes_used(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def stats(self) -> dict[str, float | int]:
        with self._lock:
            return {
                "adapters_loaded": len(self._entries),
                "adapters_pinned": sum(1 for e in self._entries.values() if e.pins),
                "bytes_used": sum(e.nbytes for e in self._entries.values()),
                "bytes_budget": self.budget_bytes,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
                "mean_load_ms": round(1000 * self.load_seconds_total / self.misses, 2) if self.misses else 0.0,
            }

    def owner_stats(self) -> dict[str, dict[str, float | int]]:
        """`stats`' adapter and traffic figures per owning organisation: what may be shown to that organisation,
        which must see nothing of another's (adapters without an owner are no one's)."""
        with self._lock:
            out = {owner: {"adapters_loaded": 0, "adapters_pinned": 0, "bytes_used": 0, "hits": t.hits,
                           "misses": t.misses, "evictions": t.evictions,
                           "mean_load_ms": round(1000 * t.load_seconds / t.misses, 2) if t.misses else 0.0}
                   for owner, t in self._traffic.items()}  # fmt: skip
            for entry in self._entries.values():
                if (mine := out.get(entry.ref.owner)) is not None:
                    mine["adapters_loaded"] += 1
                    mine["adapters_pinned"] += 1 if entry.pins else 0
                    mine["bytes_used"] += entry.nbytes
            return out

    def _traffic_of(self, owner: str | None) -> _Traffic | None:
        """The owner's traffic counters (created on first use); None for an adapter without an owner. Holds
        self._lock."""
        return None if owner is None else self._traffic.setdefault(owner, _Traffic())

    def _hit(self, ref: AdapterRef) -> None:
        self.hits += 1
        if (traffic := self._traffic_of(ref.owner)) is not None:
            traffic.hits += 1

    def _check_owner(self, ref: AdapterRef, caller: str | None) -> None:
        with self._lock:
            cached = self._entries.get(ref.adapter_id)
        owner = cached.ref.owner if cached is not None else ref.owner  # the owner recorded at load time wins
        if owner is not None and (owner != caller or ref.owner != owner):
            raise AdapterAccessError(f"adapter {ref.adapter_id!r} does not exist")

    def _pin_if_loaded(self, ref: AdapterRef) -> bool:
        entry = self._entries.get(ref.adapter_id)
        if entry is None:
            return False
        entry.pins += 1
        self._entries.move_to_end(ref.adapter_id)
        return True

    def _make_room(self, incoming: int) -> None:
        """Evict unpinned adapters, least recently used first, until `incoming` more bytes fit. Holds self._lock."""
        used = sum(e.nbytes for e in self._entries.values())
        for adapter_id in [a for a, e in self._entries.items() if not e.pins]:
            if used + incoming <= self.budget_bytes:
                break
            used -= self._entries[adapter_id].nbytes
            self._drop(adapter_id)

    def _drop(self, adapter_id: str) -> None:
        entry = self._entries.pop(adapter_id)
        with self._model_lock:
            self.model.remove(adapter_id)
        if self.on_drop is not None:
            self.on_drop(adapter_id)
        self.evictions += 1
        if (traffic := self._traffic_of(entry.ref.owner)) is not None:
            traffic.evictions += 1
        log.info("evicted adapter %s", adapter_id)
