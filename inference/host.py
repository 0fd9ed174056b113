"""The models this process serves: one `BatchEngine` per base model, and a small LRU of models served alone.

Every NEAT or LoRA adapter (and every base model) is served by the `BatchEngine` (neat_core.serving) of its base
model: one frozen copy of each base model per process, adapters kept as low-rank factors in a byte-bounded cache,
and concurrent requests for any mix of adapters and the bare base model batched together, token by token. An
artifact the batched path cannot express (another method, or LoRA options such as DoRA) is served alone: a whole
model per adapter in a small LRU (`serving_max_models`), each with a `BatchEngine` of its own that runs the whole
model as its "base": concurrent requests for that one model batch together, generation step by step (each row's
answer is its own: static adapters, and Lily, which neat_core loads with its per-sample, padding-masked router).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control.settings import Settings
from inference.errors import Overloaded, ServingError, UnknownModel
from inference.text import Generation, encode_prompt
from neat_core.errors import ArtifactError
from neat_core.methods.specs import is_batched
from neat_core.models.catalog import CLASSIFICATION
from neat_core.serving import AdapterAccessError, AdapterRef, BatchEngine, EngineBusy, EngineClosed, SamplingParams

log = logging.getLogger("inference.host")


@dataclass(frozen=True)
class ModelRef:
    """A model to serve: a base model, or an adapter of one (its artifact on shared storage)."""

    name: str  # the public model id; also the adapter's cache key
    task: str  # causal_lm | classification
    base_model: str
    artifact_dir: Path | None = None  # a fine-tuned adapter; None serves the base model itself
    owner: str | None = None  # the organisation that owns the adapter, as the API's records say
    method: str | None = None  # the adapter's method, as its manifest records it
    caller: str | None = None  # the organisation asking (fair shares in the engine); None: the adapter's owner
    base_dir: Path | None = None  # a registered base model's directory (the API's records say where)

    @property
    def fair_key(self) -> str | None:
        """Whose share of the engine a request takes: the asking organisation (for an adapter, its owner: the API
        lets no one else use it)."""
        return self.caller or self.owner


class ModelHost:
    """One `BatchEngine` per (base model, task), created on first use, for every batched adapter and every base
    model; and an LRU of whole models (`capacity`), each with an engine of its own, for what cannot be batched.
    Without `engine_factory` every adapter is served alone (the reference the batched path is compared with)."""

    def __init__(
        self,
        capacity: int,
        solo_loader: Callable[[ModelRef], BatchEngine],
        engine_factory: Callable[[str, str, Path | None], BatchEngine] | None = None,
    ):
        self.capacity = max(1, capacity)
        self._solo_loader = solo_loader
        self._engine_factory = engine_factory
        self._solo: OrderedDict[str, BatchEngine] = OrderedDict()  # model name -> its own engine, LRU order
        self._solo_owners: dict[str, str | None] = {}  # model name -> its owner (for the stats), while loaded
        self._engines: dict[tuple[str, str], BatchEngine] = {}  # (base model, task) -> shared engine
        self._loading: dict[Any, threading.Lock] = {}  # per model / engine: concurrent first requests load once
        self._lock = threading.Lock()  # guards the dicts; never held while loading or running a model

    def batched(self, ref: ModelRef) -> bool:
        """Whether `ref` is served by its base model's engine (else alone, on a whole model of its own)."""
        return self._engine_factory is not None and (ref.artifact_dir is None or is_batched(ref.method))

    def cached(self) -> list[str]:
        """Models loaded to be served alone, least recently used first."""
        with self._lock:
            return list(self._solo)

    def solo(self, ref: ModelRef) -> BatchEngine:
        """The engine of a model served alone, loading it on first use (and evicting the least recently used)."""
        engine = self._once(self._solo, ref.name, lambda: self._solo_loader(ref), lru=True)
        with self._lock:
            self._solo_owners = {n: o for n, o in self._solo_owners.items() if n in self._solo}  # evicted: gone
            self._solo_owners[ref.name] = ref.owner
        return engine

    def engine(self, base_model: str, task: str, base_dir: Path | None = None) -> BatchEngine:
        """The batching engine of a base model, loading the base model (from `base_dir`, a registered one's
        directory) on first use."""

        def create() -> BatchEngine:
            try:
                return self._engine_factory(base_model, task, base_dir)
            except Exception as e:
                log.exception("cannot load base model %s", base_model)
                raise ServingError(f"The base model '{base_model}' could not be loaded.") from e

        return self._once(self._engines, (base_model, task), create, lru=False)

    def generate(
        self,
        ref: ModelRef,
        prompt: str | list[int] | list[dict],
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        tools: list[dict] | None = None,
    ) -> Generation:
        """Start generating: a chat (OpenAI `messages` and `tools`, rendered with the model's chat template) or a
        raw prompt. Raises PromptError, UnknownModel or ServingError at once; iterate the result for the text."""

        def start(engine: BatchEngine, adapter: AdapterRef | None) -> Generation:
            return Generation(engine, encode_prompt(engine, prompt, tools), adapter, sampling, stop, ref.fair_key)

        return self._run(ref, start)

    def decode(self, ref: ModelRef, ids: list[int]) -> str:
        """Token ids as text, by the tokenizer of the model that serves `ref` (a token-id prompt, echoed)."""
        return self._run(ref, lambda engine, _: engine.decode(ids))

    def classify(self, ref: ModelRef, texts: list[str]) -> tuple[list[dict], int]:
        """([{"label", "probabilities"}] per text, prompt tokens)."""

        def run(engine: BatchEngine, adapter: AdapterRef | None) -> tuple[list[dict], int]:
            try:
                return engine.classify(texts, adapter, ref.fair_key)
            except (EngineClosed, EngineBusy, AdapterAccessError, ArtifactError):
                raise
            except Exception as e:
                log.exception("classification failed on %s", ref.name)
                raise ServingError(f"The model '{ref.name}' failed to classify the input.") from e

        return self._run(ref, run)

    def preload(self, ref: ModelRef) -> None:
        """Load `ref` now, so its first request finds it warm."""
        if not self.batched(ref):
            self.solo(ref)
            return
        engine = self.engine(ref.base_model, ref.task, ref.base_dir)
        if ref.artifact_dir is not None:
            with _adapter_errors(ref):
                engine.preload(_adapter(ref))

    def evict(self, name: str) -> None:
        """Drop a model's adapter factors (or its solo model) now, where nothing is using them."""
        with self._lock:
            engines = list(self._engines.values())
            solo = self._solo.pop(name, None)
        if solo is not None:
            solo.retire()
        for engine in engines:
            engine.cache.evict(name)

    def stats(self) -> dict[str, Any]:
        """Per engine: its figures, the adapters loaded in it (with their owners) and its cache figures per owner
        (`owners`, what the API may show each organisation); the models served alone, and their owners. The
        operator's view: the API shows a caller only its own part (api.routes.inference.serving_stats)."""
        with self._lock:
            engines = dict(self._engines)
            solo = dict(self._solo)
            solo_owners = {name: self._solo_owners.get(name) for name in solo}
        data = []
        for (base_model, task), engine in engines.items():
            adapters = [{"id": a.adapter_id, "owner": a.owner} for a in engine.cache.loaded()]
            data.append({"base_model": base_model, "task": task, **engine.stats(), "adapters": adapters,
                         "owners": engine.cache.owner_stats()})  # fmt: skip
        solo_running = sum(engine.running for engine in solo.values())
        return {"engines": data, "solo_models": sorted(solo), "solo_owners": solo_owners, "solo_running": solo_running}

    def running(self) -> int:
        """Rows in generation right now, over every engine."""
        with self._lock:
            engines = [*self._engines.values(), *self._solo.values()]
        return sum(engine.running for engine in engines)

    def close(self) -> None:
        with self._lock:
            engines = [*self._engines.values(), *self._solo.values()]
            self._engines, self._solo = {}, OrderedDict()
        for engine in engines:
            engine.close()

    def _run(self, ref: ModelRef, run: Callable[[BatchEngine, AdapterRef | None], Any]) -> Any:
        """run(the engine that serves `ref`, the adapter to apply in it), with neat_core's adapter errors as ours.
        A solo model's engine may retire between lookup and use (evicted from the LRU while this request was on
        its way): then once more, on a fresh load. A caller with its share of the engine's queue already waiting
        gets Overloaded (429)."""
        try:
            return self._run_once(ref, run)
        except EngineBusy as e:
            raise Overloaded(f"Too much of your work is already waiting for '{ref.name}': {e}. Retry shortly.") from e

    def _run_once(self, ref: ModelRef, run: Callable[[BatchEngine, AdapterRef | None], Any]) -> Any:
        if self.batched(ref):
            with _adapter_errors(ref):
                return run(self.engine(ref.base_model, ref.task, ref.base_dir), _adapter(ref))
        try:
            return run(self.solo(ref), None)
        except EngineClosed:
            return run(self.solo(ref), None)

    def _once(self, table: dict, key: Any, create: Callable[[], Any], *, lru: bool) -> Any:
        """table[key], created by `create` exactly once however many requests ask at the same moment."""
        with self._lock:
            if key in table:
                if lru:
                    table.move_to_end(key)
                return table[key]
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:  # another request may have created it while we waited
                if key in table:
                    if lru:
                        table.move_to_end(key)
                    return table[key]
            try:
                value = create()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                table[key] = value
                while lru and len(table) > self.capacity:  # an evicted model still in use lives until it is done
                    evicted, old = table.popitem(last=False)
                    old.retire()  # its requests in flight finish; its thread then stops
                    log.info("evicted model %s", evicted)
            return value


def _adapter(ref: ModelRef) -> AdapterRef | None:
    return None if ref.artifact_dir is None else AdapterRef(ref.name, ref.artifact_dir, ref.owner)


@contextmanager
def _adapter_errors(ref: ModelRef) -> Iterator[None]:
    """neat_core's adapter errors as ours: an adapter recorded for another owner is unknown, a broken one is ours."""
    try:
        yield
    except AdapterAccessError as e:
        raise UnknownModel(ref.name) from e
    except ArtifactError as e:
        log.exception("cannot load adapter %s", ref.name)
        raise ServingError(f"The model '{ref.name}' could not be loaded.") from e


# ---- the factories a serving process uses (tests pass their own) ----


def load_whole(ref: ModelRef, *, cache_dir: Path | None, device: str) -> tuple[Any, Any, int | None]:
    """(model, tokenizer, max length): `ref` loaded whole with neat_core, its adapter inside; the max length is
    the context window (causal LM) or the length it was trained on (classification). Any failure becomes a
    ServingError (the cause is chained and logged)."""
    from neat_core.artifacts import load_artifact
    from neat_core.devices import resolve_device
    from neat_core.models.loading import load_base

    try:
        if ref.artifact_dir is None:
            model, tokenizer = load_base(ref.base_model, task=ref.task, cache_dir=cache_dir, model_dir=ref.base_dir)
            model = model.to(resolve_device(device)).eval()
            trained_length = None
        else:
            loaded = load_artifact(ref.artifact_dir, cache_dir=cache_dir, device=device, base_model_dir=ref.base_dir)
            if loaded.manifest.get("task") != ref.task:
                raise ValueError(f"the artifact is for {loaded.manifest.get('task')}, the request says {ref.task}")
            model, tokenizer = loaded.model, loaded.tokenizer
            trained_length = loaded.manifest.get("hyperparameters", {}).get("max_seq_len")
    except Exception as e:
        log.exception("cannot load model %s", ref.name)
        raise ServingError(f"The model '{ref.name}' could not be loaded.") from e
    if ref.task == CLASSIFICATION:
        return model, tokenizer, trained_length or 128
    return model, tokenizer, getattr(model.config, "max_position_embeddings", None)


def load_solo_engine(ref: ModelRef, *, settings: Settings) -> BatchEngine:
    """A batching engine over `ref` loaded whole, for a model served on its own."""
    model, tokenizer, max_length = load_whole(ref, cache_dir=settings.model_cache_dir, device=settings.device)
    return BatchEngine(
        model,
        tokenizer,
        ref.task,
        cache_bytes=0,  # no adapters join: the model is the adapter
        max_batch=settings.serving_max_batch,
        window_s=settings.serving_batch_window_ms / 1000,
        max_length=max_length,
        max_queued=settings.serving_max_queued_per_org,
        pass_tokens=settings.serving_pass_tokens,
        lanes=settings.serving_lanes,
        reserved_rows=settings.serving_reserved_rows,
        prefix_bytes=settings.serving_prefix_cache_mb * 2**20,
    )


def load_batch_engine(base_model: str, task: str, base_dir: Path | None = None, *, settings: Settings) -> BatchEngine:
    """A `BatchEngine` over a freshly loaded base model (from `base_dir`, a registered one's), sized by settings."""
    from neat_core.devices import resolve_device
    from neat_core.models.loading import load_base

    # A classification base gets a placeholder head: every adapter brings its own, with its own labels.
    labels = ["label_0", "label_1"] if task == CLASSIFICATION else None
    model, tokenizer = load_base(base_model, task=task, labels=labels, cache_dir=settings.model_cache_dir,
                                 model_dir=base_dir)  # fmt: skip
    model = model.to(resolve_device(settings.device)).eval()
    context = getattr(model.config, "max_position_embeddings", None) or 512
    return BatchEngine(
        model,
        tokenizer,
        task,
        cache_bytes=settings.serving_cache_mb * 2**20,
        max_batch=settings.serving_max_batch,
        window_s=settings.serving_batch_window_ms / 1000,
        max_length=min(context, 512) if task == CLASSIFICATION else context,
        max_queued=settings.serving_max_queued_per_org,
        pass_tokens=settings.serving_pass_tokens,
        lanes=settings.serving_lanes,
        reserved_rows=settings.serving_reserved_rows,
        prefix_bytes=settings.serving_prefix_cache_mb * 2**20,
    )


def host_for(settings: Settings) -> ModelHost:
    """The host a serving process runs, sized by settings."""
    from functools import partial

    return ModelHost(
        settings.serving_max_models,
        partial(load_solo_engine, settings=settings),
        partial(load_batch_engine, settings=settings),
    )
