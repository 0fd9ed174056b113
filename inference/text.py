"""One generation, as the protocol sees it: text deltas with nothing past a stop string, then the finish reason and
token counts; and the text work around it (chat templates, prompt encoding, detokenising).

Every generation runs in a `BatchEngine` (neat_core.serving): the base model's engine for a batched adapter, a
solo model's own engine otherwise. The engine streams token ids; they are decoded here as they come.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator

from inference import metrics
from inference.errors import PromptError, ServingError
from neat_core.data.chat import content_text
from neat_core.serving import AdapterRef, BatchEngine, GrammarError, SamplingParams

log = logging.getLogger("inference.text")


class Generation:
    """One running generation, to iterate once. Iterating yields text deltas as the model produces them, with
    nothing past a stop string (a tail that may begin one is held back until it cannot); afterwards
    `finish_reason`, `prompt_tokens` and `completion_tokens` are set. Stopping iterating early (a stop string, a
    client gone) or `cancel()` (from any thread) frees the row at the engine's next step."""

    def __init__(
        self,
        engine: BatchEngine,
        input_ids: list[int],
        adapter: AdapterRef | None,
        sampling: SamplingParams,
        stop: tuple[str, ...] = (),
        caller: str | None = None,
    ):
        self.prompt_tokens = len(input_ids)
        self.max_new_tokens = context_budget(self.prompt_tokens, sampling.max_tokens, engine.max_length)
        self.stop = stop
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self._stopped_by_string = False
        self._engine = engine
        self.token_ids: list[int] = []  # the tokens read from the engine so far
        self._logprobs_taken = 0
        self._started, self._first_token_at = time.monotonic(), None  # for the time to first token, tokens/s
        outside = [t for t, _ in sampling.logit_bias if not 0 <= t < engine.vocab_size]
        if outside:
            raise PromptError(f"logit_bias names token ids outside this model's vocabulary (0..{engine.vocab_size - 1})"
                              f": {outside[:5]}", param="logit_bias")  # fmt: skip
        sampling = dataclasses.replace(sampling, max_tokens=self.max_new_tokens)
        try:
            self._stream = engine.generate(input_ids, adapter, sampling, caller)
        except GrammarError as e:  # a JSON schema (response_format, a tool's parameters) it cannot follow
            raise PromptError(f"The output format cannot be compiled: {e}", code="invalid_schema") from e

    def cancel(self) -> None:
        self._stream.cancel()

    @property
    def cached_tokens(self) -> int:
        """How many of the prompt's tokens came from the engine's prefix cache (known once the first token is)."""
        return self._stream.cached_tokens

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
            self._stream.cancel()  # no-op when the generation is over; otherwise it stops at the next step
        if len(text) > sent:
            yield text[sent:]
        self.completion_tokens = self._stream.completion_tokens
        self.finish_reason = "stop" if self._stopped_by_string else (self._stream.finish_reason or "stop")
        self._observe_speed()

    def text(self) -> str:
        """The whole completion (for non-streaming answers)."""
        return "".join(self)

    def take_logprobs(self) -> list[TokenLogprob]:
        """The log-probabilities (when asked for) of the tokens read since the last call: a streamed chunk carries
        those of the tokens its text came from. They cover every token generated, the one that completed a stop
        string included."""
        stream, start = self._stream, self._logprobs_taken
        end = min(len(self.token_ids), len(stream.logprobs))
        self._logprobs_taken = end
        text = self._engine.token_text
        taken = []
        for i in range(start, end):
            top = stream.top_logprobs[i] if stream.top_logprobs else []
            taken.append(TokenLogprob(text(self.token_ids[i]), stream.logprobs[i], [(text(a), lp) for a, lp in top]))
        return taken

    def _observe_speed(self) -> None:
        """Count the tokens generated, and the decode speed after the first token (the prefill is in the time to
        first token, not here)."""
        metrics.GENERATED_TOKENS.inc(self.completion_tokens)
        if self._first_token_at is not None and self.completion_tokens > 1:
            seconds = time.monotonic() - self._first_token_at
            if seconds > 0:
                metrics.TOKENS_PER_SECOND.observe((self.completion_tokens - 1) / seconds)

    def _pieces(self) -> Iterator[str]:
        def read() -> Iterator[int]:
            for token in self._stream:
                if self._first_token_at is None:
                    self._first_token_at = time.monotonic()
                    metrics.TIME_TO_FIRST_TOKEN.observe(self._first_token_at - self._started)
                self.token_ids.append(token)
                yield token

        try:
            yield from _decoded(read(), self._engine.decode)
        except Exception as e:
            raise ServingError("The model failed while generating.") from e


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: str  # the token's own text
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at its step (top_logprobs), with theirs


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


# A token is rarely more than a few characters of real text; 16 is generous (a run of spaces, a long number), so a
# prompt past context x 16 characters cannot fit the context, and is refused before it is tokenized.
CHARS_PER_TOKEN = 16


def check_prompt_chars(chars: int, context: int | None) -> None:
    """PromptError when a prompt of `chars` characters cannot fit `context` tokens, whatever it tokenizes to."""
    if context is not None and chars > context * CHARS_PER_TOKEN:
        raise PromptError(
            f"The prompt is {chars:,} characters; this model's context of {context} tokens takes at most "
            f"{context * CHARS_PER_TOKEN:,} characters ({CHARS_PER_TOKEN} per token).",
            code="context_length_exceeded",
        )


def encode_prompt(
    engine: BatchEngine, prompt: str | list[int] | list[dict], tools: list[dict] | None = None
) -> list[int]:
    """A raw prompt, token ids, or a chat (OpenAI `messages` and `tools`) rendered with the model's chat template,
    as token ids.
    Refused by its length in characters before any tokenizing (`check_prompt_chars`), then by its tokens
    (`context_budget`)."""
    if prompt and isinstance(prompt, list) and isinstance(prompt[0], int):
        if outside := [t for t in prompt if not 0 <= t < engine.vocab_size]:
            raise PromptError(f"The prompt has token ids outside this model's vocabulary "
                              f"(0..{engine.vocab_size - 1}): {outside[:5]}")  # fmt: skip
        return list(prompt)
    chars = len(prompt) if isinstance(prompt, str) else sum(len(content_text(m.get("content"))) for m in prompt)
    check_prompt_chars(chars, engine.max_length)
    if isinstance(prompt, str):
        ids = engine.encode(prompt)
    else:
        from jinja2 import TemplateError

        try:
            text = engine.chat_prompt(prompt, tools)
        except (ValueError, TemplateError) as e:  # no chat template, or one that rejects this conversation
            raise PromptError(f"The model's chat template cannot render these messages: {e}") from e
        ids = engine.encode(text, add_special_tokens=False)  # the template wrote the special tokens
    if not ids:
        raise PromptError("The prompt is empty.")
    return ids


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


def _first_stop(text: str, stops: tuple[str, ...], start: int) -> int | None:
    found = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(found, default=None)


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest tail of `text` that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:k])), default=0)
