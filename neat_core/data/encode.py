"""Tokenise validated examples into training rows, and pad rows into batches.

A row is a dict of plain lists, one per example:
- causal LM (chat, prompt_completion, text): `{"input_ids": [T], "labels": [T]}`, labels -100 where no loss;
- classification: `{"input_ids": [T], "label": int}`;
- preference (DPO): `{"chosen": causal-LM row, "rejected": causal-LM row}`, each the input conversation plus one reply,
  trained on the reply alone.
The eos is appended as an id rather than as text, so it is there even for a tokenizer that would split
its spelling.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from neat_core.data import chat
from neat_core.data.formats import DataFormat
from neat_core.errors import DataFormatError

IGNORE_INDEX = -100  # what torch's cross-entropy (and transformers' losses) skip
Span = tuple[int, int]  # [start, end) character offsets into a rendered conversation

# Stands in for an assistant message's content to find where the template puts it. Private-use
# characters: no template rewrites them and no real message is expected to contain them.
_CONTENT_PLACEHOLDER = "\ue000neat-assistant-content\ue000"


def label_vocabulary(examples: Iterable[dict]) -> list[str]:
    """The sorted distinct labels, as strings; numeric order when every label is an int (so "2" < "10")."""
    labels = {example["label"] for example in examples}
    if all(isinstance(label, int) for label in labels):
        return [str(label) for label in sorted(labels)]
    return sorted({str(label) for label in labels})


def encode_examples(
    examples: Sequence[dict],
    fmt: DataFormat,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    label2id: dict[str, int] | None = None,
) -> list[dict]:
    """Tokenise examples of one format, truncating to `max_length` tokens.

    Classification uses `label2id` (default: `label_vocabulary(examples)` in order). Causal-LM examples
    left with no trained token after truncation (their prompt fills `max_length`) are dropped with a
    warning: a batch of only such rows has no target token, and its mean loss would be 0/0 = NaN.
    """
    if fmt is DataFormat.CLASSIFICATION:
        if label2id is None:
            label2id = {label: i for i, label in enumerate(label_vocabulary(examples))}
        return [_encode_classification(example, tokenizer, max_length, label2id) for example in examples]

    encode_one = {
        DataFormat.CHAT: _encode_chat,
        DataFormat.PROMPT_COMPLETION: _encode_prompt_completion,
        DataFormat.TEXT: _encode_text,
        DataFormat.PREFERENCE: _encode_preference,
    }[fmt]
    rows = [encode_one(example, tokenizer, max_length) for example in examples]
    kept = [row for row in rows if all(_has_target(part) for part in _sequences(row))]
    if rows and not kept:
        raise DataFormatError(f"no example has a token to train on within max_length={max_length} tokens")
    if len(kept) < len(rows):
        warnings.warn(
            f"dropped {len(rows) - len(kept)} of {len(rows)} examples: nothing to train on within "
            f"max_length={max_length} tokens",
            stacklevel=2,
        )
    return kept


def _sequences(row: dict) -> tuple[dict, ...]:
    """A causal-LM row's token sequences: itself, or a preference pair's two."""
    return (row["chosen"], row["rejected"]) if "chosen" in row else (row,)


def _has_target(row: dict) -> bool:
    return any(label != IGNORE_INDEX for label in row["labels"])


@dataclass
class Collator:
    """Right-pads rows to the longest in the batch. Returns long tensors: `input_ids` and `attention_mask`
    [B, T]; `labels` [B, T] with -100 on padding for causal-LM rows, or [B] class ids for classification.
    B preference pairs collate as 2B causal-LM rows: the B chosen sequences, then the B rejected ones (so one
    forward pass scores both, and `.chunk(2)` of any per-row result splits them)."""

    pad_token_id: int

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if "chosen" in rows[0]:
            rows = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
        classification = "label" in rows[0]
        if any(("label" in row) != classification for row in rows):
            raise ValueError("a batch mixes classification and causal-LM rows")
        width = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        if classification:
            labels = torch.tensor([row["label"] for row in rows], dtype=torch.long)
        else:
            labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            input_ids[i, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
            attention_mask[i, :n] = 1
            if not classification:
                labels[i, :n] = torch.tensor(row["labels"], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _encode_classification(
    example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, label2id: dict[str, int]
) -> dict:
    label = str(example["label"])
    if label not in label2id:
        raise DataFormatError(f"label {label!r} is not one of the model's labels: {', '.join(label2id)}")
    input_ids = tokenizer(example["text"], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": input_ids, "label": label2id[label]}


def _encode_text(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    input_ids = [*tokenizer(example["text"])["input_ids"], _eos_id(tokenizer)][:max_length]
    return {"input_ids": input_ids, "labels": list(input_ids)}


def _encode_prompt_completion(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    # Prompt and completion are tokenised apart, as at inference, where the prompt is tokenised alone and
    # the model goes on from there; tokenising them together could merge the boundary ("a" + "b" -> "ab").
    prompt = tokenizer(example["prompt"])["input_ids"]
    completion = [
        *tokenizer(example["completion"], add_special_tokens=False)["input_ids"],
        _eos_id(tokenizer),
    ]
    input_ids = [*prompt, *completion][:max_length]
    labels = [*[IGNORE_INDEX] * len(prompt), *completion][:max_length]
    return {"input_ids": input_ids, "labels": labels}


def _encode_chat(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    text, spans = _assistant_spans(example["messages"], tokenizer, example.get("tools"))
    row = _tokenize_spans(text, spans, tokenizer)
    return {"input_ids": row["input_ids"][:max_length], "labels": row["labels"][:max_length]}


def _encode_preference(example: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    # Each side is the chat row of the input conversation plus its reply, trained on the reply alone: earlier
    # assistant turns in the input are context (weight 0), as in OpenAI's preference format.
    given = example["input"]
    context = [{**message, "weight": 0} for message in given["messages"]]
    rows = {}
    for key, side in (("chosen", "preferred_output"), ("rejected", "non_preferred_output")):
        conversation = {"messages": [*context, example[side][0]], "tools": given.get("tools")}
        rows[key] = _encode_chat(conversation, tokenizer, max_length)
    return rows


def _assistant_spans(
    messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None = None
) -> tuple[str, list[Span]]:
    """The conversation as `chat.render` writes it (tools included) and the character spans to train on: each
    weight-1 assistant message's content and its tool calls as the template writes them (`<tool_call>` blocks, or
    the template's own form), plus the end-of-turn marker after them (e.g. `<|im_end|>`); not the header before
    them (e.g. `<|im_start|>assistant\\n`), nor whitespace after the marker, nor any other turn: system prompts,
    the tools' descriptions, user turns and tool results are context only."""
    full = _render(messages, tokenizer, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        # Everything up to where message i starts: the earlier turns (with any system prompt the template injects)
        # and the assistant header. A placeholder also works for a first message, where rendering messages[:i]
        # with a generation prompt would be an empty conversation. The placeholder is plain content even when
        # message i calls tools: whatever the template writes for the calls after the header (a block, or a
        # marker such as `[TOOL_CALLS]`) is what the model must learn to write, so it belongs to the span.
        probe = _render([*messages[:i], {"role": "assistant", "content": _CONTENT_PLACEHOLDER}], tokenizer, tools)
        start = probe.rfind(_CONTENT_PLACEHOLDER)
        through = _render(messages[: i + 1], tokenizer, tools).rstrip()
        stable = start >= 0 and full.startswith(probe[:start]) and full.startswith(through)
        if not stable or len(through) <= start:  # e.g. a template that renders the last turn differently
            raise DataFormatError(f"the model's chat template does not render assistant message {i} stably")
        spans.append((start, len(through)))
    return full, spans


def _render(messages: list[dict], tokenizer: PreTrainedTokenizerBase, tools: list[dict] | None) -> str:
    try:
        return chat.render(tokenizer, messages, tools)
    except (ValueError, TemplateError) as exc:  # no chat template; or the template rejects the role order
        raise DataFormatError(f"the model's chat template cannot render the conversation: {exc}") from exc


def _tokenize_spans(text: str, spans: list[Span], tokenizer: PreTrainedTokenizerBase) -> dict:
    """Tokenise a rendered conversation; a token is trained on iff its characters overlap a span, so one
    that straddles a span's edge (the tokenizer merged header and content) still counts as content."""
    if not tokenizer.is_fast:
        raise TypeError("chat loss masking needs a fast tokenizer (offset mapping)")
    # The template writes its own special tokens (bos, turn markers), so none are added on top.
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        token if any(lo < span_end and hi > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (lo, hi) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True)
    ]
    return {"input_ids": encoding["input_ids"], "labels": labels}


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    if tokenizer.eos_token_id is None:
        raise TypeError("causal-LM training needs a tokenizer with an eos token")
    return tokenizer.eos_token_id
