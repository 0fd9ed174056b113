"""Serving in this process: loaded models kept in an LRU cache, and generation and classification on them.

One `ServingEngine` per process. A model is a catalog base model, or a fine-tuned adapter on top of its base (each
loaded model holds its own copy of the base weights, hence the small capacity). Concurrent first requests for a
model load it once; requests on one model run one at a time, on different models side by side.

The web tier imports this module without torch: torch, transformers and neat_core's loaders are imported inside the
functions that need them, on the first request served. (Batching requests together is a later step.)
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends

from api.deps import SettingsDep
from api.errors import APIError
from neat_core.models.catalog import CLASSIFICATION

log = logging.getLogger("api.serving")

CLASSIFY_BATCH = 32  # texts per forward pass: bounds memory for a long `input` list


class ServingError(Exception):
    """A model could not be loaded or run: the server's fault, whatever the low-level cause (chained)."""


class PromptError(ValueError):
    """The request cannot be run on this model (the caller's fault). `code` is the API error code."""

    def __init__(self, message: str, code: str = "invalid_prompt"):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ModelRef:
    """A model to serve, as the route resolved it (ownership already checked)."""

    name: str  # the public model id; also the cache key
    task: str  # causal_lm | classification
    base_model: str
    artifact_dir: Path | None = None  # a fine-tuned adapter; None serves the base model itself


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel or a peft PeftModel, in eval mode
    tokenizer: Any
    task: str
    max_length: int | None  # causal LM: the context window; classification: the length it was trained on
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward pass or generation at a time


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
    """An LRU cache of loaded models (capacity from settings), and the calls that run them."""

    def __init__(self, capacity: int, loader: Callable[[ModelRef], LoadedModel]):
        self.capacity = max(1, capacity)
        self._loader = loader
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._loading: dict[str, threading.Lock] = {}  # per model: concurrent first requests load it once
        self._lock = threading.Lock()  # guards the two dicts; never held while loading or running a model

    def cached(self) -> list[str]:
        """Model names, least recently used first."""
        with self._lock:
            return list(self._models)

    def model(self, ref: ModelRef) -> LoadedModel:
        with self._lock:
            if ref.name in self._models:
                self._models.move_to_end(ref.name)
                return self._models[ref.name]
            key_lock = self._loading.setdefault(ref.name, threading.Lock())
        with key_lock:
            with self._lock:  # another request may have loaded it while we waited
                if ref.name in self._models:
                    self._models.move_to_end(ref.name)
                    return self._models[ref.name]
            try:
                loaded = self._loader(ref)
            finally:
                with self._lock:
                    self._loading.pop(ref.name, None)
            with self._lock:
                self._models[ref.name] = loaded
                while len(self._models) > self.capacity:  # an evicted model still in use lives until it is done
                    evicted, _ = self._models.popitem(last=False)
                    log.info("evicted model %s", evicted)
            return loaded

    def generate(self, ref: ModelRef, prompt: str | list[dict], sampling: Sampling) -> Generation:
        """Start generating: a chat (`messages`, rendered with the model's chat template) or a raw prompt.
        Raises PromptError or ServingError at once; iterate the result for the text."""
        return Generation(self.model(ref), prompt, sampling)

    def classify(self, ref: ModelRef, texts: list[str]) -> tuple[list[dict], int]:
        """([{"label", "probabilities"}] per text, prompt tokens)."""
        loaded = self.model(ref)
        from neat_core.inference import classify

        results, tokens = [], 0
        try:
            with loaded.lock:
                for start in range(0, len(texts), CLASSIFY_BATCH):
                    batch = texts[start : start + CLASSIFY_BATCH]
                    results += classify(loaded.model, loaded.tokenizer, batch, max_length=loaded.max_length)
                    encoded = loaded.tokenizer(batch, truncation=True, max_length=loaded.max_length)
                    tokens += sum(len(ids) for ids in encoded["input_ids"])
        except Exception as e:
            log.exception("classification failed on %s", ref.name)
            raise ServingError(f"The model '{ref.name}' failed to classify the input.") from e
        return results, tokens


class Generation:
    """One running generation, to iterate once. Iterating yields text deltas as the model produces them, with
    nothing past a stop string; afterwards `finish_reason`, `prompt_tokens` and `completion_tokens` are set.

    `model.generate` runs in a thread and feeds a TextIteratorStreamer, so the first words reach the caller before
    the generation ends; non-streaming callers just join the deltas. Stopping iterating early (a stop string, a
    client gone) cancels the generation through a stopping criterion.
    """

    def __init__(self, loaded: LoadedModel, prompt: str | list[dict], sampling: Sampling):
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        tokenizer = loaded.tokenizer
        input_ids = _encode_prompt(tokenizer, prompt)
        self.prompt_tokens = len(input_ids)
        self.max_new_tokens = sampling.max_tokens
        if loaded.max_length is not None:
            if self.prompt_tokens >= loaded.max_length:
                raise PromptError(
                    f"The prompt is {self.prompt_tokens} tokens; this model's context is {loaded.max_length}.",
                    code="context_length_exceeded",
                )
            self.max_new_tokens = min(self.max_new_tokens, loaded.max_length - self.prompt_tokens)
        self.stop = sampling.stop
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._eos = _eos_ids(loaded)
        self._cancel = threading.Event()
        self._output = None  # (1, prompt + completion) token ids, once generate returns
        self._error: BaseException | None = None
        self._stopped_by_string = False

        self._streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        device = next(loaded.model.parameters()).device
        ids = torch.tensor([input_ids], device=device)  # (1, T)

        def cancelled(input_ids, scores, **_):  # a stopping criterion: (B,) bools
            return torch.full((input_ids.shape[0],), self._cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        if sampling.temperature > 0:
            # top_k=0: OpenAI's sampling is temperature and top_p only (transformers would default top_k to 50).
            mode = {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}
        else:
            mode = {"do_sample": False}
        kwargs = dict(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=self.max_new_tokens,
            streamer=self._streamer,
            stopping_criteria=StoppingCriteriaList([cancelled]),
            pad_token_id=tokenizer.pad_token_id,
            **mode,
        )
        seed = sampling.seed if sampling.temperature > 0 else None
        self._thread = threading.Thread(target=self._run, args=(loaded, kwargs, seed), daemon=True)
        self._thread.start()

    def _run(self, loaded: LoadedModel, kwargs: dict, seed: int | None) -> None:
        import torch

        try:
            with loaded.lock:
                if self._cancel.is_set():  # the caller left while we queued for the model
                    self._streamer.end()
                    return
                if seed is not None:
                    # The global generator: reproducible while no other model samples at the same moment.
                    torch.manual_seed(seed)
                self._output = loaded.model.generate(**kwargs)
        except BaseException as e:  # handed to the consumer, which re-raises it as a ServingError
            log.exception("generation failed")
            self._error = e
            self._streamer.end()

    def __iter__(self) -> Iterator[str]:
        text, sent = "", 0  # everything decoded so far; how much of it has been yielded
        longest = max((len(s) for s in self.stop), default=0)
        try:
            for piece in self._streamer:
                searched_from = max(0, len(text) - longest + 1)
                text += piece
                cut = _first_stop(text, self.stop, searched_from)
                if cut is not None:
                    text, self._stopped_by_string = text[:cut], True
                    break
                ready = len(text) - _held_back(text, self.stop)  # a tail that may begin a stop string waits
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
        finally:
            self._cancel.set()  # no-op when the generation is over; otherwise it stops at the next token
            self._thread.join()
        if self._error is not None:
            raise ServingError("The model failed while generating.") from self._error
        if len(text) > sent:
            yield text[sent:]
        self._finish()

    def text(self) -> str:
        """The whole completion (for non-streaming answers)."""
        return "".join(self)

    def _finish(self) -> None:
        new = self._output[0, self.prompt_tokens :].tolist() if self._output is not None else []
        self.completion_tokens = len(new)
        hit_eos = bool(new) and new[-1] in self._eos
        ran_out = self.completion_tokens >= self.max_new_tokens
        self.finish_reason = "length" if ran_out and not hit_eos and not self._stopped_by_string else "stop"


def _encode_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
    if isinstance(prompt, str):
        ids = tokenizer(prompt)["input_ids"]
    else:
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        except (ValueError, TemplateError) as e:  # no chat template, or one that rejects this conversation
            raise PromptError(f"The model's chat template cannot render these messages: {e}") from e
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
    if not ids:
        raise PromptError("The prompt is empty.")
    return list(ids)


def _eos_ids(loaded: LoadedModel) -> set[int]:
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured])
    ids.add(loaded.tokenizer.eos_token_id)
    return {i for i in ids if i is not None}


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(found, default=None)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)


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
            _engine = ServingEngine(settings.serving_max_models, loader)
        return _engine


EngineDep = Annotated[ServingEngine, Depends(get_engine)]
