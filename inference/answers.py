"""OpenAI's protocol on the host: a validated request started on a model, answered whole or as the payloads of a
server-sent event stream, in OpenAI's shapes. The server and the in-process backend both answer through here, so
an answer is the same whichever way it travels."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any

from control.ids import new_id, now
from control.protocol import ChatRequest, CompletionRequest, GenerationRequest
from inference.errors import PromptError, ServingError
from inference.host import ModelHost, ModelRef
from inference.text import Generation
from neat_core.data.chat import TOOL_CLOSE, TOOL_OPEN, parse_tool_calls, reply_grammar
from neat_core.serving import SamplingParams

log = logging.getLogger("inference.answers")


class Choices:
    """The generations of one request: `n` per prompt (a completion may send a list), all queued at once so they
    share the engine's passes as rows of their own; each becomes a choice, `index` in prompt order then n."""

    def __init__(self, generations: list[Generation], echoed: list[str], n: int):
        self.generations = generations  # prompt by prompt, n choices each (OpenAI's `index` order)
        self.echoed = echoed  # per choice: the prompt text put before its completion (`echo`), else ""
        self.n = n

    def cancel(self) -> None:
        for generation in self.generations:
            generation.cancel()


def start(host: ModelHost, ref: ModelRef, request: ChatRequest | CompletionRequest) -> Choices:
    """Start the generations `request` asks for. Raises PromptError (naming the prompt's field), UnknownModel or
    ServingError before anything is generated."""
    chat = isinstance(request, ChatRequest)
    prompts = [[m.model_dump(exclude_none=True) for m in request.messages]] if chat else request.prompts
    tools = [t.model_dump(exclude_none=True) for t in request.tools] if chat and request.tools else None
    top = request.top_logprobs_wanted
    sampling = SamplingParams(
        max_tokens=request.tokens_wanted,
        temperature=1.0 if request.temperature is None else request.temperature,  # OpenAI's default
        top_p=1.0 if request.top_p is None else request.top_p,
        seed=request.seed,
        logprobs=top is not None,
        top_logprobs=top or 0,
        ignore_eos=bool(request.ignore_eos),
        logit_bias=request.bias,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        grammar=_grammar(request) if chat else None,
    )
    n = request.n or 1
    generations: list[Generation] = []
    try:
        for prompt in prompts:
            for j in range(n):
                # Choice j of a seeded request samples with seed + j: reproducible, and choice 0 is the n=1 answer.
                own = (
                    sampling if j == 0 or request.seed is None else dataclasses.replace(sampling, seed=request.seed + j)
                )
                generations.append(host.generate(ref, prompt, own, request.stops, tools))
    except PromptError as e:
        if e.code == "invalid_schema":  # a schema the grammar cannot follow: the format's, else a tool's
            e.param = "response_format" if request.response_format and request.response_format.json_schema else "tools"
        e.param = e.param or ("messages" if chat else "prompt")
        raise
    finally:
        if len(generations) < len(prompts) * n:  # one failed to start: the others must not run on unread
            for generation in generations:
                generation.cancel()
    echo = not chat and request.echo
    echoed = [(p if isinstance(p, str) else host.decode(ref, p)) if echo else "" for p in prompts for _ in range(n)]
    return Choices(generations, echoed, n)


def answer(choices: Choices, request: GenerationRequest) -> dict:
    """The whole completion (runs the generations to their end)."""
    chat = isinstance(request, ChatRequest)
    out = []
    for i, (generation, echoed) in enumerate(zip(choices.generations, choices.echoed, strict=True)):
        text = generation.text()
        logprobs = _logprobs(generation, request, len(echoed))
        calls = parse_tool_calls(text) if chat and request.calls_tools else None
        if calls:
            message = {"role": "assistant", "content": None, "refusal": None,
                       "tool_calls": [_tool_call(name, arguments) for name, arguments in calls]}  # fmt: skip
            out.append({"index": i, "message": message, "finish_reason": _finish(generation, calls),
                        "logprobs": logprobs})  # fmt: skip
        elif chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            out.append({"index": i, "message": message, "finish_reason": generation.finish_reason,
                        "logprobs": logprobs})  # fmt: skip
        else:
            out.append({"index": i, "text": echoed + text, "finish_reason": generation.finish_reason,
                        "logprobs": logprobs})  # fmt: skip
    base = {"created": now(), "model": request.model, "system_fingerprint": None, "usage": _usage(choices)}
    if chat:
        return {"id": new_id("chatcmpl"), "object": "chat.completion", **base, "choices": out}
    return {"id": new_id("cmpl"), "object": "text_completion", **base, "choices": out}


def events(choices: Choices, request: GenerationRequest) -> Iterator[dict]:
    """The payloads of the event stream, without the closing `[DONE]` (the transport's). Choices stream one after
    another (all generate at once; a later one's tokens wait in its queue). A model that fails midway ends it with
    an error payload (the status line is gone; the SDK raises it)."""
    chat = isinstance(request, ChatRequest)
    base = {
        "id": new_id("chatcmpl" if chat else "cmpl"),
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": now(),
        "model": request.model,
        "system_fingerprint": None,
    }

    def chunk(index: int, text: str | None, logprobs: dict | None = None, finish_reason: str | None = None) -> dict:
        if chat:
            delta: dict[str, Any] = {} if text is None else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return {**base, "choices": [choice]}

    def calls_chunk(index: int, calls: list[dict]) -> dict:
        return {**base, "choices": [{"index": index, "delta": {"tool_calls": calls}, "logprobs": None,
                                     "finish_reason": None}]}  # fmt: skip

    try:
        for index, (generation, echoed) in enumerate(zip(choices.generations, choices.echoed, strict=True)):
            if chat:
                first = chunk(index, "")
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield first
            offset = len(echoed)
            if echoed:
                yield chunk(index, echoed)
            split = _CallSplitter() if chat and request.calls_tools else None
            for piece in generation:
                text, calls = split.feed(piece) if split else (piece, [])
                if text:
                    yield chunk(index, text, _logprobs(generation, request, offset))
                    offset += len(text)
                for call in calls:  # OpenAI's order: the call's id and name, then its arguments
                    yield calls_chunk(index, [{**call, "function": {**call["function"], "arguments": ""}}])
                    arguments = {"arguments": call["function"]["arguments"]}
                    yield calls_chunk(index, [{"index": call["index"], "function": arguments}])
            if split and (rest := split.rest()):
                yield chunk(index, rest)
            # What the last piece held back (a stop string's start that was not one) went out with it; the tokens
            # read after it (the stop string's own) are reported with the final chunk.
            finish = _finish(generation, split.sent) if split else generation.finish_reason
            yield chunk(index, None, _logprobs(generation, request, offset), finish)
    except ServingError as e:
        log.warning("stream failed: %s", e)
        yield error_body(e.status, e.message, e.code, None)
        return
    if request.include_usage:
        yield {**base, "choices": [], "usage": _usage(choices)}


def _grammar(request: ChatRequest) -> str | None:
    """The grammar the reply must follow (constrained decoding), or None for free text."""
    fmt = request.response_format
    return reply_grammar(
        tools=[t.model_dump(exclude_none=True) for t in request.tools or []],
        choice=request.choice,
        parallel=request.parallel_tool_calls is not False,
        json_reply=fmt is not None and fmt.type != "text",
        schema=fmt.json_schema.schema_ if fmt is not None and fmt.json_schema else None,
    )


def _tool_call(name: str, arguments: str, index: int | None = None) -> dict:
    call = {"id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def _finish(generation: Generation, calls: list) -> str | None:
    """OpenAI's finish reason for a reply: "tool_calls" when it ended after making calls."""
    return "tool_calls" if calls and generation.finish_reason == "stop" else generation.finish_reason


class _CallSplitter:
    """A reply that may be tool calls, as it streams: free text passes through once it cannot be the start of a
    call; a call is sent (as a streamed `tool_calls` entry) as soon as its block closes."""

    def __init__(self):
        self.buffer = ""  # text not yet sent
        self.mode: str | None = None  # None: undecided; "text"; "calls"
        self.sent: list[dict] = []

    def feed(self, piece: str) -> tuple[str, list[dict]]:
        """(text to send now, calls completed now)."""
        if self.mode == "text":
            return piece, []
        self.buffer += piece
        if self.mode is None:
            head = self.buffer.lstrip()
            if head.startswith(TOOL_OPEN):
                self.mode = "calls"
            elif TOOL_OPEN.startswith(head):  # whitespace, or a prefix of the tag: wait
                return "", []
            else:
                self.mode, text, self.buffer = "text", self.buffer, ""
                return text, []
        done = self.buffer.rfind(TOOL_CLOSE)
        parsed = parse_tool_calls(self.buffer[: done + len(TOOL_CLOSE)]) if done >= 0 else None
        new = [_tool_call(n, a, len(self.sent) + k) for k, (n, a) in enumerate((parsed or [])[len(self.sent) :])]
        self.sent += new
        return "", new

    def rest(self) -> str:
        """At the end: text still held (a reply that was only whitespace or the tag's start); none for calls
        (a block cut off by max_tokens is dropped; the finish reason says "length")."""
        return self.buffer if self.mode is None else ""


def _logprobs(generation: Generation, request: GenerationRequest, offset: int) -> dict | None:
    """The log-probabilities of the tokens read since the last call, in OpenAI's shape for the route: chat's
    `{"content": [{token, logprob, bytes, top_logprobs}], "refusal"}`, completions' `{tokens, token_logprobs,
    top_logprobs, text_offset}` (`offset`: where the first token's text starts in the choice's text)."""
    if request.top_logprobs_wanted is None:
        return None
    taken = generation.take_logprobs()
    if isinstance(request, ChatRequest):

        def entry(token: str, logprob: float) -> dict:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        content = [{**entry(t.token, t.logprob), "top_logprobs": [entry(a, lp) for a, lp in t.top]} for t in taken]
        return {"content": content, "refusal": None}
    offsets = []
    for t in taken:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in taken],
        "token_logprobs": [t.logprob for t in taken],
        "top_logprobs": [dict(t.top) for t in taken] if request.top_logprobs_wanted else None,
        "text_offset": offsets,
    }


def classification(results: list[dict], tokens: int, model: str) -> dict:
    return {
        "object": "list",
        "data": [{"index": i, "label": r["label"], "probabilities": r["probabilities"]} for i, r in enumerate(results)],
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


def error_body(status: int, message: str, code: str | None, param: str | None) -> dict:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _usage(choices: Choices) -> dict[str, Any]:
    firsts = choices.generations[:: choices.n]  # each prompt once, as OpenAI counts
    prompt = sum(g.prompt_tokens for g in firsts)
    completion = sum(g.completion_tokens for g in choices.generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(g.cached_tokens for g in firsts)}}  # fmt: skip


def stats(host: ModelHost, requests_served: int, adapters: list[str]) -> dict:
    """This server's figures: rows generating now, per engine its batch sizes and loaded adapters (with owners),
    the adapters registered by name, and how many requests reached a model."""
    return {"object": "inference.stats", "rows_running": host.running(), "requests_served": requests_served,
            "adapters_registered": adapters, **host.stats()}  # fmt: skip
