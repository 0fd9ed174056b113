"""Serving in this process: the batching engines, a fallback for models that cannot be batched, and the calls
that run them.

Every NEAT or LoRA adapter is served by the `BatchEngine` (neat_core.serving) of its base model: one frozen copy
of each base model per process, adapters kept as low-rank factors in a byte-bounded cache, and concurrent requests
for any mix of adapters and the bare base model batched together, token by token. An artifact the batched path
cannot express (another method, or LoRA options such as DoRA) is served on its own: a whole model per adapter in
a small LRU (`serving_max_models`), each with a `BatchEngine` of its own that runs the whole model as its "base":
concurrent requests for that one model batch together, generation step by step (each row's answer is its own:
static adapters, and Lily, which neat_core loads with its per-sample, padding-masked router).

The web tier imports this module without torch: torch, transformers and neat_core's loaders are imported inside the
functions that need them, on the first request served.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends

from api.deps import SettingsDep
from api.errors import APIError
from api.generation import (
    BatchedGeneration,
    Generation,
    LoadedModel,
    PromptError,
    Sampling,
    ServingError,
    SoloGeneration,
    UnknownModel,
    encode_prompt,
)
from control.jobs import JobStatus
from control.orm import Job
from control.settings import Settings
from control.storage import Storage
from neat_core.methods.specs import is_batched
from neat_core.models.catalog import CLASSIFICATION

__all__ = ["Generation", "ModelRef", "PromptError", "Sampling", "ServingEngine", "ServingError", "UnknownModel"]

log = logging.getLogger("api.serving")

CLASSIFY_BATCH = 32  # texts per forward pass: bounds memory for a long `input` list


@dataclass(frozen=True)
class ModelRef:
    """A model to serve, as the route resolved it (ownership already checked)."""

    name: str  # the public model id; also the cache key
    task: str  # causal_lm | classification
    base_model: str
    artifact_dir: Path | None = None  # a fine-tuned adapter; None serves the base model itself
    owner: str | None = None  # the organisation that owns the adapter (checked again before it is batched)
    method: str | None = None  # the adapter's method, as the job recorded it

    @classmethod
    def of_job(cls, job: Job, storage: Storage) -> ModelRef:
        """A succeeded job's fine-tuned model (its artifact, owner and method as the job recorded them)."""
        return cls(
            job.fine_tuned_model,
            job.task,
            job.model,
            storage.path(job.artifact_key),
            owner=job.organization_id,
            method=(job.adapter or {}).get("type"),
        )


def load_model(ref: ModelRef, *, cache_dir: Path | None, device: str) -> LoadedModel:
    """Load `ref` with neat_core; any failure becomes a ServingError (the cause is chained and logged)."""
    try:
        if ref.artifact_dir is None:
            from neat_core.devices import resolve_device
            from neat_core.models.loading import load_base

            model, tokenizer = load_base(ref.base_model, task=ref.task, cache_dir=cache_dir)
            model = model.to(resolve_device(device)).eval()
            trained_length = None
        else:
            from neat_core.artifacts import load_artifact

            loaded = load_artifact(ref.artifact_dir, cache_dir=cache_dir, device=device)
            if loaded.manifest.get("task") != ref.task:
                raise ValueError(f"the artifact is for {loaded.manifest.get('task')}, the job says {ref.task}")
            model, tokenizer = loaded.model, loaded.tokenizer
            trained_length = loaded.manifest.get("hyperparameters", {}).get("max_seq_len")
    except Exception as e:
        log.exception("cannot load model %s", ref.name)
        raise ServingError(f"The model '{ref.name}' could not be loaded.") from e
    if ref.task == CLASSIFICATION:
        return LoadedModel(model, tokenizer, ref.task, trained_length or 128)
    return LoadedModel(model, tokenizer, ref.task, getattr(model.config, "max_position_embeddings", None))


class ServingEngine:
    """One `BatchEngine` per base model (created on first use) for every NEAT/LoRA adapter and every base model,
    and an LRU of whole loaded models (capacity from settings) for what cannot be batched."""

    def __init__(
        self,
        capacity: int,
        loader: Callable[[ModelRef], LoadedModel],
        engine_factory: Callable[[str, str], Any] | None = None,
        solo_engine_factory: Callable[[LoadedModel], Any] | None = None,
    ):
        self.capacity = max(1, capacity)
        self._loader = loader
        self._engine_factory = engine_factory
        self._solo_engine_factory = solo_engine_factory
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._engines: dict[tuple[str, str], Any] = {}  # (base model, task) -> neat_core BatchEngine
        self._loading: dict[Any, threading.Lock] = {}  # per model / engine: concurrent first requests load once
        self._lock = threading.Lock()  # guards the dicts; never held while loading or running a model

    def batched(self, ref: ModelRef) -> bool:
        """Whether `ref` is served by a batching engine (else alone, on a whole model of its own)."""
        return self._engine_factory is not None and (ref.artifact_dir is None or is_batched(ref.method))

    def cached(self) -> list[str]:
        """Whole models loaded for solo serving, least recently used first."""
        with self._lock:
            return list(self._models)

    def model(self, ref: ModelRef) -> LoadedModel:
        def load() -> LoadedModel:
            loaded = self._loader(ref)
            if self._solo_engine_factory is not None:
                loaded.engine = self._solo_engine_factory(loaded)
            return loaded

        return self._once(self._models, ref.name, load, lru=True)

    def _solo(self, ref: ModelRef, run: Callable[[LoadedModel], Any]) -> Any:
        """run(the loaded model of `ref`); once more on a fresh load if its engine retired in between (evicted
        from the LRU while this request was on its way)."""
        from neat_core.serving import EngineClosed

        try:
            return run(self.model(ref))
        except EngineClosed:
            return run(self.model(ref))

    def engine(self, base_model: str, task: str) -> Any:
        """The batching engine of a base model, loading the base model on first use."""

        def create() -> Any:
            try:
                return self._engine_factory(base_model, task)
            except Exception as e:
                log.exception("cannot load base model %s", base_model)
                raise ServingError(f"The base model '{base_model}' could not be loaded.") from e

        return self._once(self._engines, (base_model, task), create, lru=False)

    def generate(
        self, ref: ModelRef, prompt: str | list[dict], sampling: Sampling, caller: str | None = None
    ) -> Generation:
        """Start generating: a chat (`messages`, rendered with the model's chat template) or a raw prompt.
        Raises PromptError, UnknownModel or ServingError at once; iterate the result for the text."""
        if not self.batched(ref):

            def start(loaded: LoadedModel) -> Generation:
                if loaded.engine is None:
                    return SoloGeneration(loaded, prompt, sampling)
                with loaded.engine.tokenizer_lock:
                    input_ids = encode_prompt(loaded.engine.tokenizer, prompt)
                return BatchedGeneration(loaded.engine, input_ids, None, sampling, caller)

            return self._solo(ref, start)
        engine = self.engine(ref.base_model, ref.task)
        with engine.tokenizer_lock:
            input_ids = encode_prompt(engine.tokenizer, prompt)
        with _adapter_errors(ref):
            return BatchedGeneration(engine, input_ids, _adapter(ref), sampling, caller)

    def classify(self, ref: ModelRef, texts: list[str], caller: str | None = None) -> tuple[list[dict], int]:
        """([{"label", "probabilities"}] per text, prompt tokens)."""
        if self.batched(ref):
            engine = self.engine(ref.base_model, ref.task)
            with _adapter_errors(ref):
                return engine.classify(texts, _adapter(ref), caller)

        from neat_core.serving import EngineClosed

        def run(loaded: LoadedModel) -> tuple[list[dict], int]:
            try:
                if loaded.engine is not None:
                    return loaded.engine.classify(texts, None)
                return _classify_alone(loaded, texts)
            except EngineClosed:
                raise
            except Exception as e:
                log.exception("classification failed on %s", ref.name)
                raise ServingError(f"The model '{ref.name}' failed to classify the input.") from e

        return self._solo(ref, run)

    def preload(self, ref: ModelRef) -> None:
        """Load `ref` now (at start-up), so its first request finds it warm."""
        if not self.batched(ref):
            self.model(ref)
            return
        engine = self.engine(ref.base_model, ref.task)
        if ref.artifact_dir is not None:
            with _adapter_errors(ref):
                engine.preload(_adapter(ref))

    def stats(self, caller: str | None) -> dict[str, Any]:
        """Engine figures; adapter ids only for the caller's own adapters (others' ids are not shown)."""
        with self._lock:
            engines = dict(self._engines)
            solo = len(self._models)
        data = []
        for (base_model, task), engine in engines.items():
            own = sorted(a.adapter_id for a in engine.cache.loaded() if a.owner == caller)
            data.append({"base_model": base_model, "task": task, **engine.stats(), "your_adapters": own})
        return {"object": "serving.stats", "engines": data, "solo_models_loaded": solo}

    def close(self) -> None:
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
            engines += [m.engine for m in self._models.values() if m.engine is not None]
        for engine in engines:
            engine.close()

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
                    if getattr(old, "engine", None) is not None:
                        old.engine.retire()  # its requests in flight finish; its thread then stops
                    log.info("evicted model %s", evicted)
            return value


def _classify_alone(loaded: LoadedModel, texts: list[str]) -> tuple[list[dict], int]:
    """Without a batching engine: the request's texts in passes of up to CLASSIFY_BATCH, the model to itself."""
    from neat_core.inference import classify

    results, tokens = [], 0
    with loaded.lock:
        for start in range(0, len(texts), CLASSIFY_BATCH):
            batch = texts[start : start + CLASSIFY_BATCH]
            results += classify(loaded.model, loaded.tokenizer, batch, max_length=loaded.max_length)
            encoded = loaded.tokenizer(batch, truncation=True, max_length=loaded.max_length)
            tokens += sum(len(ids) for ids in encoded["input_ids"])
    return results, tokens


def _adapter(ref: ModelRef) -> Any:
    from neat_core.serving import AdapterRef

    return None if ref.artifact_dir is None else AdapterRef(ref.name, ref.artifact_dir, ref.owner)


@contextmanager
def _adapter_errors(ref: ModelRef) -> Iterator[None]:
    """neat_core's adapter errors as the API's: another organisation's adapter is unknown, a broken one is ours."""
    from neat_core.errors import ArtifactError
    from neat_core.serving import AdapterAccessError

    try:
        yield
    except AdapterAccessError as e:
        raise UnknownModel(ref.name) from e
    except ArtifactError as e:
        log.exception("cannot load adapter %s", ref.name)
        raise ServingError(f"The model '{ref.name}' could not be loaded.") from e


def load_batch_engine(base_model: str, task: str, *, settings: Settings) -> Any:
    """A `BatchEngine` over a freshly loaded base model, sized by settings."""
    from neat_core.devices import resolve_device
    from neat_core.models.loading import load_base
    from neat_core.serving import BatchEngine

    # A classification base gets a placeholder head: every adapter brings its own, with its own labels.
    labels = ["label_0", "label_1"] if task == CLASSIFICATION else None
    model, tokenizer = load_base(base_model, task=task, labels=labels, cache_dir=settings.model_cache_dir)
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
    )


def solo_batch_engine(loaded: LoadedModel, *, settings: Settings) -> Any:
    """A batching engine over one whole loaded model (its adapter inside), for a model served on its own."""
    from neat_core.serving import BatchEngine

    return BatchEngine(
        loaded.model,
        loaded.tokenizer,
        loaded.task,
        cache_bytes=0,  # no adapters join: the model is the adapter
        max_batch=settings.serving_max_batch,
        window_s=settings.serving_batch_window_ms / 1000,
        max_length=loaded.max_length,
    )


def preload(settings: Settings) -> None:
    """Load the models named in `serving_preload` (an operator's list, so any organisation's); run at start-up in a
    background thread. A name that does not resolve or load is logged and skipped."""
    from sqlalchemy import select

    from control.db import session_scope
    from neat_core.models.catalog import CAUSAL_LM, entry

    engine = get_engine(settings)
    storage = Storage(settings.resolved_artifact_root)
    for name in filter(None, (n.strip() for n in settings.serving_preload.split(","))):
        if entry(name) is not None:
            ref = ModelRef(name, CAUSAL_LM, name)
        else:
            with session_scope(settings.resolved_database_url) as session:
                job = session.scalar(select(Job).where(Job.fine_tuned_model == name, Job.status == JobStatus.SUCCEEDED))
                if job is None or job.artifact_key is None:
                    log.warning("cannot preload %s: no such succeeded fine-tuned model", name)
                    continue
                ref = ModelRef.of_job(job, storage)
        try:
            engine.preload(ref)
            log.info("preloaded %s", name)
        except Exception:
            log.exception("cannot preload %s", name)


_engine: ServingEngine | None = None
_engine_lock = threading.Lock()


def get_engine(settings: SettingsDep) -> ServingEngine:
    """The process's engine, created on first use; 503 where this process does not serve."""
    global _engine
    if not settings.serving:
        raise APIError(
            503,
            "Inference is not served by this deployment right now; retry later.",
            code="serving_unavailable",
            headers={"Retry-After": "30"},
        )
    with _engine_lock:
        if _engine is None:
            loader = partial(load_model, cache_dir=settings.model_cache_dir, device=settings.device)
            _engine = ServingEngine(
                settings.serving_max_models,
                loader,
                partial(load_batch_engine, settings=settings),
                partial(solo_batch_engine, settings=settings),
            )
        return _engine


def shutdown() -> None:
    """Stop the process's batching engines (their scheduler threads), if any were started."""
    global _engine
    with _engine_lock:
        if _engine is not None:
            _engine.close()
            _engine = None


EngineDep = Annotated[ServingEngine, Depends(get_engine)]
