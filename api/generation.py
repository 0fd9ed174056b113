"""One generation, as the routes see it: text deltas with nothing past a stop string, then the finish reason and
token counts. Two kinds share that behaviour (`Generation`): a request inside a batching engine's running batch
(`BatchedGeneration`, the normal case) and a request that runs alone on a whole model (`SoloGeneration`, for
adapters the batched path cannot express). Imports torch only inside the functions that run a model.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("api.serving")


class ServingError(Exception):
    """A model could not be loaded or run: the server's fault, whatever the low-level cause (chained)."""


class UnknownModel(LookupError):
    """No such model for this caller (another organisation's adapter reads the same). The routes answer 404."""


class PromptError(ValueError):
    """The request cannot be run on this model (the caller's fault). `code` is the API error code."""

    def __init__(self, message: str, code: str = "invalid_prompt"):
        super().__init__(message)
        self.code = code


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel or a peft PeftModel, in eval mode
    tokenizer: Any
    task: str
    max_length: int | None  # causal LM: the context window; classification: the length it was trained on
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward pass or generation at a time
    # A BatchEngine running this whole model as its "base" (api.serving): concurrent requests for this model
    # batch together. None where the serving process has no batching engines (then requests take turns on `lock`).
    engine: Any = None


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


class Generation:
    """One running generation, to iterate once. Iterating yields text deltas as the model produces them, with
    nothing past a stop string (a tail that may begin one is held back until it cannot); afterwards
    `finish_reason`, `prompt_tokens` and `completion_tokens` are set. Stopping iterating early (a stop string, a
    client gone) cancels the generation. Subclasses provide the text pieces and the bookkeeping."""

    prompt_tokens: int
    max_new_tokens: int
    stop: tuple[str, ...]
    finish_reason: str | None = None
    completion_tokens: int = 0
    _stopped_by_string: bool = False

    def _pieces(self) -> Iterator[str]:
        raise NotImplementedError

    def _cancel_and_wait(self) -> None:
        raise NotImplementedError

    def _finish(self) -> None:
        raise NotImplementedError

    def __iter__(self) -> Iterator[str]:
        text, sent = "", 0  # everything decoded so far; how much of it has been yielded
        longest = max((len(s) for s in self.stop), default=0)
        try:
            for piece in self._pieces():
                searched_from = max(0, len(text) - longest + 1)
                text += piece
                cut = _first_stop(text, self.stop, searched_from)
                if cut is not None:
                    text, self._stopped_by_string = text[:cut], True
                    break
                ready = len(text) - _held_back(text, self.stop)
                if ready > sent:
                    yield text[sent:ready]
                    sent = ready
        finally:
            self._cancel_and_wait()  # no-op when the generation is over; otherwise it stops at the next token
        if len(text) > sent:
            yield text[sent:]
        self._finish()

    def text(self) -> str:
        """The whole completion (for non-streaming answers)."""
        return "".join(self)


def context_budget(prompt_tokens: int, max_tokens: int, context: int | None) -> int:
    """How many tokens may be generated; PromptError when the prompt alone fills the context window."""
    if context is None:
        return max_tokens
    if prompt_tokens >= context:
        raise PromptError(
            f"The prompt is {prompt_tokens} tokens; this model's context is {context}.",
            code="context_length_exceeded",
        )
    return min(max_tokens, context - prompt_tokens)


class BatchedGeneration(Generation):
    """A request in a `BatchEngine`'s running batch: the engine streams token ids, decoded here as they come."""

    def __init__(self, engine: Any, input_ids: list[int], adapter: Any, sampling: Sampling, caller: str | None):
        from neat_core.serving import SamplingParams

        self.prompt_tokens = len(input_ids)
        self.max_new_tokens = context_budget(self.prompt_tokens, sampling.max_tokens, engine.max_length)
        self.stop = sampling.stop
        self._engine = engine
        params = SamplingParams(
            max_tokens=self.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
        )
        self._stream = engine.generate(input_ids, adapter, params, caller)

    def _pieces(self) -> Iterator[str]:
        try:
            yield from _decoded(self._stream, self._engine.decode)
        except Exception as e:
            raise ServingError("The model failed while generating.") from e

    def _cancel_and_wait(self) -> None:
        self._stream.cancel()

    def _finish(self) -> None:
        self.completion_tokens = self._stream.completion_tokens
        self.finish_reason = "stop" if self._stopped_by_string else (self._stream.finish_reason or "stop")


class SoloGeneration(Generation):
    """A request alone on a whole model: `model.generate` runs in a thread and streams its token ids, decoded here
    exactly as `BatchedGeneration` decodes them, so the first words reach the caller before the generation ends.
    Cancelling works through a stopping criterion."""

    def __init__(self, loaded: LoadedModel, prompt: str | list[dict], sampling: Sampling):
        import torch
        from transformers import StoppingCriteriaList

        tokenizer = loaded.tokenizer
        input_ids = encode_prompt(tokenizer, prompt)
        self.prompt_tokens = len(input_ids)
        self.max_new_tokens = context_budget(self.prompt_tokens, sampling.max_tokens, loaded.max_length)
        self.stop = sampling.stop
        self._eos = _eos_ids(loaded)
        self._cancel = threading.Event()
        self._output = None  # (1, prompt + completion) token ids, once generate returns
        self._error: BaseException | None = None

        self._tokenizer = tokenizer
        self._streamer = _TokenQueue()
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

    def _pieces(self) -> Iterator[str]:
        yield from _decoded(self._streamer, lambda ids: self._tokenizer.decode(ids, skip_special_tokens=True))
        self._thread.join()
        if self._error is not None:
            raise ServingError("The model failed while generating.") from self._error

    def _cancel_and_wait(self) -> None:
        self._cancel.set()
        self._thread.join()

    def _finish(self) -> None:
        new = self._output[0, self.prompt_tokens :].tolist() if self._output is not None else []
        self.completion_tokens = len(new)
        hit_eos = bool(new) and new[-1] in self._eos
        ran_out = self.completion_tokens >= self.max_new_tokens
        self.finish_reason = "length" if ran_out and not hit_eos and not self._stopped_by_string else "stop"


class _TokenQueue:
    """`generate`'s streamer (its put/end protocol): hands on the new token ids as they are produced. Ours rather
    than transformers' TextIteratorStreamer, whose choice of when to release text changed between releases (5.24
    releases letters at once, earlier ones whole words): decoding is `_decoded`'s, one policy for every path."""

    def __init__(self) -> None:
        self._queue: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: Any) -> None:  # first the prompt (1, T), which is skipped; then each step's token (1,)
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._queue.put(token)

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[int]:
        while (token := self._queue.get()) is not None:
            yield token


def _decoded(tokens: Iterable[int], decode: Callable[[list[int]], str]) -> Iterator[str]:
    """Text pieces as the token ids come: each piece as soon as it is decoded, the text so far re-decoded whole so
    that tokens which merge (a multi-byte character split over two) come out right."""
    ids: list[int] = []
    sent = ""
    for token in tokens:
        ids.append(token)
        text = decode(ids)
        # Wait while the text ends inside a multi-byte character, or re-reads an earlier piece differently.
        if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
            yield text[len(sent) :]
            sent = text
    text = decode(ids)
    if text.startswith(sent) and len(text) > len(sent):
        yield text[len(sent) :]


def encode_prompt(tokenizer: Any, prompt: str | list[dict]) -> list[int]:
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
