from __future__ import annotations

import copy
import json

import pytest
import torch

from neat_core.data import DataFormat, chat
from neat_core.data.encode import IGNORE_INDEX, Collator, encode_examples, label_vocabulary
from neat_core.errors import DataFormatError

END = "<|im_end|>"


def trained_runs(row: dict, tokenizer) -> list[str]:
    """The decoded text of each maximal run of trained (label != -100) tokens."""
    runs: list[list[int]] = []
    previous = IGNORE_INDEX
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != IGNORE_INDEX:
            assert label == token  # causal-LM labels are the inputs; the model shifts them itself
            if previous == IGNORE_INDEX:
                runs.append([])
            runs[-1].append(token)
        previous = label
    return [tokenizer.decode(run) for run in runs]


def encode_one(example: dict, fmt: DataFormat, tokenizer, max_length: int = 512) -> dict:
    [row] = encode_examples([example], fmt, tokenizer, max_length=max_length)
    return row


# --- classification ---------------------------------------------------------------------------------


def test_label_vocabulary():
    assert label_vocabulary([{"label": 10}, {"label": 2}, {"label": 1}, {"label": 2}]) == ["1", "2", "10"]
    assert label_vocabulary([{"label": "b"}, {"label": "a"}, {"label": "b"}]) == ["a", "b"]
    assert label_vocabulary([{"label": 10}, {"label": "2"}, {"label": "10"}]) == ["10", "2"]


def test_classification_ids_and_truncation(minilm_tokenizer):
    examples = [{"text": "good film", "label": 1}, {"text": "one two three four five six", "label": 10}]
    rows = encode_examples(examples, DataFormat.CLASSIFICATION, minilm_tokenizer, max_length=5)
    cls, sep = minilm_tokenizer.cls_token_id, minilm_tokenizer.sep_token_id
    assert [row["label"] for row in rows] == [0, 1]  # vocabulary ["1", "10"]
    assert rows[0]["input_ids"] == [cls, *minilm_tokenizer.encode("good film", add_special_tokens=False), sep]
    assert len(rows[1]["input_ids"]) == 5  # truncated, still closed by [SEP]
    assert rows[1]["input_ids"][0] == cls and rows[1]["input_ids"][-1] == sep

    given = encode_examples(
        examples, DataFormat.CLASSIFICATION, minilm_tokenizer, max_length=5, label2id={"10": 0, "1": 1}
    )
    assert [row["label"] for row in given] == [1, 0]
    with pytest.raises(DataFormatError, match="'7'"):
        encode_examples(
            [{"text": "x", "label": 7}],
            DataFormat.CLASSIFICATION,
            minilm_tokenizer,
            max_length=5,
            label2id={"1": 0},
        )


# --- chat -------------------------------------------------------------------------------------------


def test_chat_trains_on_assistant_content_and_end_marker_only(smollm_tokenizer):
    messages = [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris"},
    ]
    row = encode_one({"messages": messages}, DataFormat.CHAT, smollm_tokenizer)
    assert len(row["input_ids"]) == len(row["labels"])
    assert trained_runs(row, smollm_tokenizer) == ["Paris" + END]
    # The inputs are exactly the template's rendering: nothing added, nothing lost.
    rendered = smollm_tokenizer.apply_chat_template(messages, tokenize=False)
    assert smollm_tokenizer.decode(row["input_ids"]) == rendered
    # The trailing newline after the last <|im_end|> is input but not a target.
    assert rendered.endswith(END + "\n") and row["labels"][-1] == IGNORE_INDEX


def test_chat_multi_turn_with_weights_and_injected_system_prompt(smollm_tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
        {"role": "assistant", "content": "A bad one, skipped.", "weight": 0},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Why did the chicken cross the road?\nTo get to the other side."},
    ]
    row = encode_one({"messages": messages}, DataFormat.CHAT, smollm_tokenizer)
    # No system message given: SmolLM2's template injects its default one, which must stay masked too.
    assert "You are a helpful AI assistant named SmolLM" in smollm_tokenizer.decode(row["input_ids"])
    assert trained_runs(row, smollm_tokenizer) == [
        "Hello! How can I help?" + END,
        "Why did the chicken cross the road?\nTo get to the other side." + END,
    ]


def test_chat_may_open_with_the_assistant(smollm_tokenizer):
    messages = [{"role": "assistant", "content": "Welcome back!"}, {"role": "user", "content": "Thanks"}]
    row = encode_one({"messages": messages}, DataFormat.CHAT, smollm_tokenizer)
    assert trained_runs(row, smollm_tokenizer) == ["Welcome back!" + END]


def test_chat_truncation(smollm_tokenizer):
    example = {"messages": [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1 2 3 4 5"}]}
    full = encode_one(example, DataFormat.CHAT, smollm_tokenizer)
    cut = encode_one(example, DataFormat.CHAT, smollm_tokenizer, max_length=len(full["input_ids"]) - 4)
    assert cut == {key: values[: len(full["input_ids"]) - 4] for key, values in full.items()}
    assert trained_runs(cut, smollm_tokenizer)[0].startswith("1 2")


def test_chat_needs_a_stable_chat_template(smollm_tokenizer, minilm_tokenizer):
    example = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(DataFormatError, match="chat template"):
        encode_examples([example], DataFormat.CHAT, minilm_tokenizer, max_length=64)

    refusing = copy.deepcopy(smollm_tokenizer)
    refusing.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataFormatError, match="roles must alternate"):
        encode_examples([example], DataFormat.CHAT, refusing, max_length=64)

    # Marks the final turn differently, so an earlier turn's rendering is not a prefix of the whole.
    unstable = copy.deepcopy(smollm_tokenizer)
    unstable.chat_template = (
        "{% for m in messages %}{{ m['content'] }}{% if loop.last %}<|im_end|>{% endif %}{% endfor %}"
    )
    two_turns = {"messages": example["messages"] * 2}
    with pytest.raises(DataFormatError, match="assistant message 1"):
        encode_examples([two_turns], DataFormat.CHAT, unstable, max_length=64)


# --- chat with tools (OpenAI's full format) ----------------------------------------------------------

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _call(city: str, id: str) -> dict:
    return {"id": id, "type": "function", "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


TOOL_CHAT = {
    "tools": [WEATHER],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("Paris", "call_1")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
        {"role": "assistant", "content": "It is 18C and sunny in Paris.", "weight": 0},
        {"role": "user", "content": "And in Rome and Oslo?"},
        {
            "role": "assistant",
            "content": "Checking both.",
            "tool_calls": [_call("Rome", "call_2"), _call("Oslo", "c3")],
        },
        {"role": "tool", "tool_call_id": "call_2", "content": "25C, clear"},
        {"role": "tool", "tool_call_id": "c3", "content": "2C, snow"},
        {"role": "assistant", "content": "Rome: 25C and clear. Oslo: 2C and snowing."},
    ],
}


def block(city: str) -> str:
    """A call as SmolLM2 (whose template knows no tools) is trained to write it: Hermes' block, spelled out here
    so that a change to the form fails this test rather than following along."""
    return f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>'


def test_chat_with_tools_trains_on_calls_and_answers_not_on_tools_or_results(smollm_tokenizer):
    row = encode_one(TOOL_CHAT, DataFormat.CHAT, smollm_tokenizer)
    assert not chat.speaks_tools(smollm_tokenizer)
    # Trained: the call alone (content null), text then both calls, the final answer; each with its end marker.
    # Not the weight-0 answer, the tools' description, the user turns or the tool results.
    assert trained_runs(row, smollm_tokenizer) == [
        block("Paris") + END,
        "Checking both.\n" + block("Rome") + "\n" + block("Oslo") + END,
        "Rome: 25C and clear. Oslo: 2C and snowing." + END,
    ]
    # The inputs are the conversation as chat.render writes it (what inference renders too), tools and results in.
    rendered = smollm_tokenizer.decode(row["input_ids"])
    assert rendered == chat.render(smollm_tokenizer, TOOL_CHAT["messages"], TOOL_CHAT["tools"])
    assert "<tools>" in rendered and '"description": "The weather in a city now."' in rendered
    for result in ("18C, sunny", "25C, clear", "2C, snow"):
        assert f"<tool_response>\n{result}\n</tool_response>" in rendered
    assert "It is 18C and sunny in Paris." in rendered


def test_a_tool_call_with_weight_0_is_context_only(smollm_tokenizer):
    messages = [dict(m) for m in TOOL_CHAT["messages"]]
    messages[1]["weight"], messages[3]["weight"] = 0, 1
    row = encode_one({**TOOL_CHAT, "messages": messages}, DataFormat.CHAT, smollm_tokenizer)
    assert trained_runs(row, smollm_tokenizer)[0] == "It is 18C and sunny in Paris." + END
    assert block("Paris") in smollm_tokenizer.decode(row["input_ids"])
    assert not any(block("Paris") in run for run in trained_runs(row, smollm_tokenizer))


def test_unset_tool_fields_are_left_out_of_the_prompt(smollm_tokenizer):
    bare = {"type": "function", "function": {"name": "ping", "description": None, "parameters": None, "strict": None}}
    row = encode_one({**TOOL_CHAT, "tools": [WEATHER, bare]}, DataFormat.CHAT, smollm_tokenizer)
    rendered = smollm_tokenizer.decode(row["input_ids"])
    assert '\n{"name": "ping"}\n</tools>' in rendered and "null" not in rendered


# A template that renders tools and calls itself (as Qwen's and Llama's do), in a form of its own.
NATIVE_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for message in messages %}{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.role == 'tool' %}(result of {{ message.tool_call_id }}) {% endif %}{{ message.content }}"
    "{%- for call in message.tool_calls or [] %}[call {{ call.function.name }} {{ call.function.arguments | tojson }}]"
    "{%- endfor %}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_with_tools_through_a_template_that_speaks_tools(smollm_tokenizer):
    native = copy.deepcopy(smollm_tokenizer)
    native.chat_template = NATIVE_TEMPLATE
    assert chat.speaks_tools(native)
    row = encode_one(TOOL_CHAT, DataFormat.CHAT, native)
    rendered = native.decode(row["input_ids"])
    # The template got the tools and the structured calls and results, not our text form of them.
    assert rendered.startswith("<|im_start|>system\nTools: get_weather<|im_end|>\n")
    assert "<|im_start|>tool\n(result of c3) 2C, snow<|im_end|>" in rendered
    assert chat.TOOL_OPEN not in rendered
    assert trained_runs(row, native) == [
        '[call get_weather {"city": "Paris"}]' + END,
        'Checking both.[call get_weather {"city": "Rome"}][call get_weather {"city": "Oslo"}]' + END,
        "Rome: 25C and clear. Oslo: 2C and snowing." + END,
    ]


# --- prompt/completion and text ---------------------------------------------------------------------


def test_prompt_completion_masks_the_prompt(smollm_tokenizer):
    example = {"prompt": "Q: What is 2+2?\nA:", "completion": " 4, of course."}
    row = encode_one(example, DataFormat.PROMPT_COMPLETION, smollm_tokenizer)
    assert smollm_tokenizer.decode(row["input_ids"]) == example["prompt"] + example["completion"] + END
    assert trained_runs(row, smollm_tokenizer) == [" 4, of course." + END]
    assert row["input_ids"][-1] == smollm_tokenizer.eos_token_id
    # The prompt's tokens are the ones inference sees for it alone, even where joint tokenisation would
    # merge across the boundary ("a" + "b" is one token "ab").
    row = encode_one({"prompt": "a", "completion": "b"}, DataFormat.PROMPT_COMPLETION, smollm_tokenizer)
    assert smollm_tokenizer.encode("ab") != smollm_tokenizer.encode("a") + smollm_tokenizer.encode("b")
    assert row["input_ids"] == smollm_tokenizer.encode("a") + smollm_tokenizer.encode("b") + [
        smollm_tokenizer.eos_token_id
    ]
    assert trained_runs(row, smollm_tokenizer) == ["b" + END]


def test_text_trains_on_everything(smollm_tokenizer):
    row = encode_one({"text": "The quick brown fox."}, DataFormat.TEXT, smollm_tokenizer)
    assert row["labels"] == row["input_ids"]
    assert smollm_tokenizer.decode(row["input_ids"]) == "The quick brown fox." + END
    cut = encode_one({"text": "The quick brown fox."}, DataFormat.TEXT, smollm_tokenizer, max_length=3)
    assert cut["input_ids"] == row["input_ids"][:3] == cut["labels"]


def test_rows_with_nothing_to_train_on_are_dropped(smollm_tokenizer):
    long_prompt = {"prompt": "word " * 50, "completion": "end"}
    short = {"prompt": "a", "completion": "b"}
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        rows = encode_examples([long_prompt, short], DataFormat.PROMPT_COMPLETION, smollm_tokenizer, max_length=8)
    assert len(rows) == 1 and trained_runs(rows[0], smollm_tokenizer) == ["b" + END]
    with pytest.raises(DataFormatError, match="max_length=8"):
        encode_examples([long_prompt], DataFormat.PROMPT_COMPLETION, smollm_tokenizer, max_length=8)


# --- batching ---------------------------------------------------------------------------------------


def test_collator_pads_causal_lm_rows():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = Collator(pad_token_id=2)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(tensor.dtype == torch.long and tensor.shape == (2, 3) for tensor in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_collator_pads_classification_rows(minilm_tokenizer):
    examples = [{"text": "short", "label": "b"}, {"text": "a somewhat longer sentence", "label": "a"}]
    rows = encode_examples(examples, DataFormat.CLASSIFICATION, minilm_tokenizer, max_length=32)
    batch = Collator(pad_token_id=minilm_tokenizer.pad_token_id)(rows)
    width = max(len(row["input_ids"]) for row in rows)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, width)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == [len(row["input_ids"]) for row in rows]
    assert batch["input_ids"][0, len(rows[0]["input_ids"]) :].eq(minilm_tokenizer.pad_token_id).all()
    with pytest.raises(ValueError, match="mixes"):
        Collator(pad_token_id=0)([rows[0], {"input_ids": [1], "labels": [1]}])


def test_preference_pairs_train_on_the_replies_only(smollm_tokenizer):
    pair = {
        "input": {
            "messages": [
                {"role": "user", "content": "Sentiment of 'so good'?"},
                {"role": "assistant", "content": "Earlier turn, context only."},
                {"role": "user", "content": "One word, please."},
            ]
        },
        "preferred_output": [{"role": "assistant", "content": "positive"}],
        "non_preferred_output": [{"role": "assistant", "content": "negative, surely"}],
    }
    (row,) = encode_examples([pair], DataFormat.PREFERENCE, smollm_tokenizer, max_length=512)
    for side, reply in (("chosen", "positive"), ("rejected", "negative, surely")):
        trained = [t for t, label in zip(row[side]["input_ids"], row[side]["labels"], strict=True) if label != -100]
        assert smollm_tokenizer.decode(trained) == reply + "<|im_end|>"
    # both sides share the context, token for token, up to the reply
    context = smollm_tokenizer.apply_chat_template(
        pair["input"]["messages"], tokenize=False, add_generation_prompt=True
    )
    n = len(smollm_tokenizer(context, add_special_tokens=False)["input_ids"])
    assert row["chosen"]["input_ids"][:n] == row["rejected"]["input_ids"][:n]

    batch = Collator(smollm_tokenizer.pad_token_id)([row, row])  # 2 pairs -> 4 rows: chosen, chosen, rejected, ...
    assert batch["input_ids"].shape[0] == 4
    assert batch["input_ids"][0].tolist()[: len(row["chosen"]["input_ids"])] == row["chosen"]["input_ids"]
    assert batch["input_ids"][2].tolist()[: len(row["rejected"]["input_ids"])] == row["rejected"]["input_ids"]


def test_a_pair_with_a_side_truncated_away_is_dropped(smollm_tokenizer):
    long = {"role": "user", "content": "word " * 300}
    pair = {
        "input": {"messages": [long]},
        "preferred_output": [{"role": "assistant", "content": "a"}],
        "non_preferred_output": [{"role": "assistant", "content": "b"}],
    }
    short = {**pair, "input": {"messages": [{"role": "user", "content": "hi"}]}}
    with pytest.warns(UserWarning, match="dropped 1 of 2"):
        rows = encode_examples([pair, short], DataFormat.PREFERENCE, smollm_tokenizer, max_length=64)
    assert len(rows) == 1
