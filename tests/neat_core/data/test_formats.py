from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from neat_core.data import DataFormat, FileReport, read_examples, validate_jsonl
from neat_core.errors import DataFormatError

CLASSIFICATION = {"text": "great product", "label": "positive"}
CHAT = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
}
PROMPT_COMPLETION = {"prompt": "2+2=", "completion": "4"}
TEXT = {"text": "Once upon a time."}


def jsonl(*rows: dict | str | bytes) -> bytes:
    """A JSONL file's bytes; dicts are dumped, str/bytes rows are written as they are."""
    lines = [
        row if isinstance(row, bytes) else (row if isinstance(row, str) else json.dumps(row)).encode() for row in rows
    ]
    return b"".join(line + b"\n" for line in lines)


def codes(report: FileReport) -> list[tuple[int, str]]:
    return [(error["line"], error["code"]) for error in report.errors]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (CLASSIFICATION, DataFormat.CLASSIFICATION),
        ({"text": "meh", "label": 3}, DataFormat.CLASSIFICATION),
        (CHAT, DataFormat.CHAT),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "weight": 1},
                ]
            },
            DataFormat.CHAT,
        ),
        (PROMPT_COMPLETION, DataFormat.PROMPT_COMPLETION),
        ({"prompt": "", "completion": "free text", "id": 7}, DataFormat.PROMPT_COMPLETION),
        (TEXT, DataFormat.TEXT),
        ({"text": "unknown keys are ignored", "source": "web"}, DataFormat.TEXT),
    ],
)
def test_every_format_is_accepted(tmp_path, row, fmt):
    path = tmp_path / "train.jsonl"
    path.write_bytes(jsonl(row, row))
    report = validate_jsonl(path)
    assert report == FileReport(format=fmt, num_examples=2, errors=[])
    assert report.ok
    assert read_examples(str(path)) == (fmt, [row, row])


def test_task_of_each_format():
    assert DataFormat.CLASSIFICATION.task == "classification"
    assert {DataFormat.CHAT.task, DataFormat.PROMPT_COMPLETION.task, DataFormat.TEXT.task} == {"causal_lm"}
    assert DataFormat("prompt_completion") is DataFormat.PROMPT_COMPLETION


def _chat(*messages: dict) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello"}
UNTRAINED = {**ASSISTANT, "weight": 0}


def _tool(**function) -> dict:
    return {"type": "function", "function": function}


WEATHER = _tool(
    name="get_weather",
    description="The weather in a city now.",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def _call(name: str = "get_weather", arguments: object = '{"city": "Paris"}', id: str = "call_1") -> dict:
    return {"id": id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _calling(*calls: object, content: object = None) -> dict:
    """An assistant message that calls tools (content null, as OpenAI writes it, unless given)."""
    return {"role": "assistant", "content": content, "tool_calls": list(calls)}


def _result(id: str = "call_1", content: object = "18C, sunny") -> dict:
    return {"role": "tool", "tool_call_id": id, "content": content}


def _tools(*messages: dict, tools: object = (WEATHER,)) -> dict:
    """A chat line with `tools` (a list unless something else is given)."""
    return {"tools": list(tools) if isinstance(tools, tuple) else tools, "messages": list(messages)}


@pytest.mark.parametrize(
    ("first", "bad", "code"),
    [
        (TEXT, b'{"text": "caf\xe9"}', "invalid_utf8"),
        (TEXT, b'{"text": "a\x00b"}', "nul_byte"),
        (TEXT, '{"text": "unterminated}', "invalid_json"),
        (TEXT, "[1, 2]", "not_an_object"),
        (TEXT, '"just a string"', "not_an_object"),
        (TEXT, {"txt": "typo"}, "unknown_format"),
        (TEXT, {"prompt": "no completion"}, "unknown_format"),
        (TEXT, PROMPT_COMPLETION, "mixed_formats"),
        (CHAT, CLASSIFICATION, "mixed_formats"),
        (TEXT, {"text": 5}, "invalid_field"),
        (TEXT, {"text": "  \n "}, "empty_content"),
        (CLASSIFICATION, {"text": "x", "label": True}, "invalid_field"),
        (CLASSIFICATION, {"text": "x", "label": 1.5}, "invalid_field"),
        (CLASSIFICATION, {"text": "x", "label": None}, "invalid_field"),
        (CLASSIFICATION, {"text": "x", "label": " "}, "invalid_field"),
        (CLASSIFICATION, {"text": "", "label": "a"}, "empty_content"),
        (PROMPT_COMPLETION, {"prompt": "p", "completion": ""}, "empty_content"),
        (PROMPT_COMPLETION, {"prompt": None, "completion": "c"}, "invalid_field"),
        (CHAT, {"messages": "hello"}, "invalid_field"),
        (CHAT, _chat("hello", ASSISTANT), "invalid_field"),
        (CHAT, _chat({"content": "Hi"}, ASSISTANT), "missing_field"),
        (CHAT, _chat(USER, {"role": "assistant"}), "missing_field"),
        (CHAT, _chat({"role": "function", "content": "x"}, ASSISTANT), "invalid_role"),  # OpenAI's retired role
        (CHAT, _chat({"role": ["user"], "content": "x"}, ASSISTANT), "invalid_role"),
        (CHAT, _chat(USER, {"role": "assistant", "content": 3}), "invalid_field"),
        (CHAT, _chat(USER, {"role": "assistant", "content": " "}), "empty_content"),
        (CHAT, _chat(USER, {"role": "assistant", "content": "x", "weight": 2}), "invalid_field"),
        (CHAT, _chat(USER, {"role": "assistant", "content": "x", "weight": True}), "invalid_field"),
        (CHAT, _chat(USER, {"role": "assistant", "content": "x", "weight": 1.0}), "invalid_field"),
        (CHAT, _chat(USER), "no_assistant_message"),
        (CHAT, _chat(), "no_assistant_message"),
        (CHAT, _chat(USER, UNTRAINED, USER, UNTRAINED), "no_trainable_message"),
        # tools: function tools only, each named once, parameters an object schema
        (CHAT, _tools(USER, ASSISTANT, tools={"get_weather": WEATHER}), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=["get_weather"]), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[{"type": "code_interpreter"}]), "unsupported_tool_type"),
        (CHAT, _tools(USER, ASSISTANT, tools=[{"function": WEATHER["function"]}]), "missing_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[{"type": "function"}]), "missing_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[{"type": "function", "function": "get_weather"}]), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[_tool(description="no name")]), "missing_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[_tool(name="get weather")]), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[_tool(name="f" * 65)]), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[WEATHER, WEATHER]), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[_tool(name="f", description=["d"])]), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[_tool(name="f", parameters=[])]), "invalid_field"),
        (CHAT, _tools(USER, ASSISTANT, tools=[_tool(name="f", parameters={"type": "string"})]), "invalid_field"),
        # assistant tool calls: OpenAI's shape, arguments a JSON object in a string, a function the line offers
        (CHAT, _tools(USER, {**ASSISTANT, "tool_calls": {"id": "call_1"}}), "invalid_field"),
        (CHAT, _tools(USER, _calling("not a call")), "invalid_field"),
        (CHAT, _tools(USER, _calling({**_call(), "type": "custom"})), "unsupported_tool_type"),
        (CHAT, _tools(USER, _calling({"type": "function", "function": _call()["function"]})), "missing_field"),
        (CHAT, _tools(USER, _calling({**_call(), "id": 7})), "invalid_field"),
        (
            CHAT,
            _tools(USER, _calling({"id": "c", "type": "function", "function": {"name": "get_weather"}})),
            "missing_field",
        ),
        (CHAT, _tools(USER, _calling(_call(arguments='{"city": "Paris"'))), "invalid_field"),
        (CHAT, _tools(USER, _calling(_call(arguments='["Paris"]'))), "invalid_field"),
        (CHAT, _tools(USER, _calling(_call(arguments={"city": "Paris"}))), "invalid_field"),  # must be a string
        (CHAT, _tools(USER, _calling(_call(name="get_time"))), "unknown_function"),
        (CHAT, _tools(USER, _calling(_call(), _call())), "invalid_field"),  # the same id twice
        (CHAT, _tools(USER, _calling(_call()), _result(), _calling(_call()), _result(), ASSISTANT), "invalid_field"),
        (CHAT, _tools(USER, _calling(_call(), content=7)), "invalid_field"),
        (CHAT, _tools(USER, {"role": "assistant", "content": None}), "invalid_field"),  # no calls: content needed
        (CHAT, _tools(USER, {**ASSISTANT, "tool_calls": []}, {"role": "assistant", "tool_calls": []}), "missing_field"),
        (CHAT, _tools({**USER, "tool_calls": [_call()]}, ASSISTANT), "invalid_field"),
        # tool results: string content answering an earlier call, once
        (CHAT, _tools(USER, _calling(_call()), {"role": "tool", "content": "18C"}, ASSISTANT), "missing_field"),
        (CHAT, _tools(USER, _calling(_call()), _result(id="call_2"), ASSISTANT), "unknown_tool_call"),
        (CHAT, _tools(USER, _result(), _calling(_call()), ASSISTANT), "unknown_tool_call"),  # answered before asked
        (CHAT, _tools(USER, _calling(_call()), _result(), _result(), ASSISTANT), "invalid_field"),
        (CHAT, _tools(USER, _calling(_call()), _result(content={"temp": 18}), ASSISTANT), "invalid_field"),
        (CHAT, _tools(USER, _calling(_call()), _result(content=""), ASSISTANT), "empty_content"),
        (CHAT, _tools(USER, _calling(_call()), {"role": "tool", "tool_call_id": "call_1"}, ASSISTANT), "missing_field"),
        (CHAT, _tools(USER, {**ASSISTANT, "tool_call_id": "call_1"}), "invalid_field"),
        (CHAT, _tools(USER, {**_calling(_call()), "weight": 0}, _result(), UNTRAINED), "no_trainable_message"),
    ],
)
def test_each_error_code_names_its_line(first, bad, code):
    # Line 1 sets the format, line 2 is blank (skipped, but still counted as a line), line 3 is bad.
    report = validate_jsonl([jsonl(first, "", bad, first)])
    assert codes(report) == [(3, code)]
    assert report.format is validate_jsonl([jsonl(first)]).format
    assert report.num_examples == 2
    assert not report.ok
    assert all(error["message"] for error in report.errors)


# OpenAI's full chat fine-tuning format: a call (content null or absent), its result, text, and an untrained turn.
TOOL_CHAT = _tools(
    {"role": "developer", "content": "Answer with the tools."},
    {"role": "user", "content": "Weather in Paris?"},
    _calling(_call()),
    _result(),
    {"role": "assistant", "content": "18C and sunny.", "weight": 0},
    {"role": "user", "content": "And in Rome and Oslo?"},
    {
        "role": "assistant",
        "content": "Both, at once:",
        "tool_calls": [
            _call(arguments='{"city": "Rome"}', id="call_2"),
            _call(arguments='{"city": "Oslo"}', id="call_3"),
        ],
    },
    _result(id="call_3", content="2C"),
    _result(id="call_2", content="25C"),
    {"role": "assistant", "content": "Rome 25C, Oslo 2C."},
)


@pytest.mark.parametrize(
    "row",
    [
        TOOL_CHAT,
        # The issue's finding: an assistant message with tool_calls and no content at all.
        _chat(USER, {"role": "assistant", "tool_calls": [_call()]}),
        _chat(USER, _calling(_call(name="anything", arguments="{}"), content="")),  # no tools: any function
        _tools(USER, _calling(_call())),  # the only trained message is a call
        _tools(USER, ASSISTANT, tools=[_tool(name="ping"), _tool(name="no-params_2", description="")]),
        _tools(USER, ASSISTANT, tools=[]),
        _tools(USER, _calling(_call(name="any_function")), tools=None),  # null: no tools given, any call goes
        _chat(USER, {**ASSISTANT, "tool_calls": []}),
        _chat({**USER, "tool_calls": None, "tool_call_id": None}, {**ASSISTANT, "tool_calls": None}),  # null: none
        _tools(USER, ASSISTANT, tools=[_tool(name="f", parameters={"properties": {}}, strict=True)]),
        _tools(USER, ASSISTANT, tools=[_tool(name="f", description=None, parameters=None, strict=None)]),
    ],
)
def test_openai_chat_lines_with_tools_are_accepted(tmp_path, row):
    path = tmp_path / "tools.jsonl"
    path.write_bytes(jsonl(CHAT, row))
    assert validate_jsonl(path) == FileReport(format=DataFormat.CHAT, num_examples=2, errors=[])
    assert read_examples(path) == (DataFormat.CHAT, [CHAT, row])  # kept whole: the encoder renders the tools


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (_tools(USER, {"role": "assistant"}), ["messages[1].'content' is missing"]),
        (_tools(USER, _calling(_call(name="get_time"))), ["messages[1].tool_calls[0]", "'get_time'", "get_weather"]),
        (_tools(USER, _calling(_call(arguments="{oops"))), ["messages[1].tool_calls[0].function.arguments", "JSON"]),
        (_tools(USER, _calling(_call()), _result(id="call_9")), ["messages[2].tool_call_id", "'call_9'"]),
        (_tools(USER, ASSISTANT, tools=[WEATHER, {"type": "file_search"}]), ["tools[1].type", "'file_search'"]),
        (_tools(USER, _calling({**_call(), "type": "custom"})), ["messages[1].tool_calls[0].type", "'custom'"]),
        (_tools(USER, ASSISTANT, tools=[_tool(name="f", parameters={"type": "array"})]), ["tools[0]", "'array'"]),
    ],
)
def test_tool_errors_say_where(bad, words):
    [error] = validate_jsonl([jsonl(CHAT, bad)]).errors
    assert error["line"] == 2 and all(word in error["message"] for word in words), error


def test_the_readmes_example_chat_line_is_valid():
    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    [line] = [block for block in re.findall(r"```json\n\s*(.*?)\n\s*```", readme, re.S) if '"tool_calls"' in block]
    assert validate_jsonl([line.encode()]) == FileReport(format=DataFormat.CHAT, num_examples=1, errors=[])


def test_format_comes_from_the_first_recognisable_line_and_is_enforced():
    report = validate_jsonl([jsonl("not json", CHAT, TEXT, CHAT, PROMPT_COMPLETION)])
    assert report.format is DataFormat.CHAT
    assert codes(report) == [(1, "invalid_json"), (3, "mixed_formats"), (5, "mixed_formats")]
    assert "from line 2" in report.errors[1]["message"]
    assert report.num_examples == 2


def test_blank_lines_are_skipped_and_crlf_and_bom_are_fine():
    data = b"\xef\xbb\xbf" + jsonl(TEXT).replace(b"\n", b"\r\n") + b"\n   \t\r\n\n" + jsonl(TEXT, "", "{}")
    report = validate_jsonl([data])
    assert codes(report) == [(7, "unknown_format")]
    assert report.num_examples == 2


def test_errors_are_capped_but_examples_still_counted():
    report = validate_jsonl([jsonl(*([TEXT] + ["{oops"] * 30 + [TEXT] * 5))])
    assert codes(report) == [(line, "invalid_json") for line in range(2, 22)]
    assert report.num_examples == 6
    assert len(validate_jsonl([jsonl(*["{oops"] * 30)], max_errors=3).errors) == 3


def test_min_examples():
    two = jsonl(TEXT, TEXT)
    assert validate_jsonl([two], min_examples=2).ok
    report = validate_jsonl([two], min_examples=3)
    assert codes(report) == [(0, "too_few_examples")]
    assert report.num_examples == 2
    assert codes(validate_jsonl([b""])) == [(0, "too_few_examples")]
    assert codes(validate_jsonl([b"\n\n  \n"])) == [(0, "too_few_examples")]
    # Invalid lines are not examples.
    assert codes(validate_jsonl([jsonl(TEXT, {"text": ""})], min_examples=2)) == [
        (2, "empty_content"),
        (0, "too_few_examples"),
    ]


def test_a_stream_of_arbitrary_chunks_gives_the_same_report_as_the_file(tmp_path):
    data = jsonl(CHAT, CHAT, "[]", CHAT, {"messages": []}) + json.dumps(CHAT).encode()  # no final newline
    path = tmp_path / "chat.jsonl"
    path.write_bytes(data)
    from_file = validate_jsonl(path)
    assert codes(from_file) == [(3, "not_an_object"), (5, "no_assistant_message")]
    assert from_file.num_examples == 4
    for size in (1, 7, 64, len(data)):
        assert validate_jsonl(data[i : i + size] for i in range(0, len(data), size)) == from_file
    assert validate_jsonl(data.splitlines(keepends=True)) == from_file
    assert validate_jsonl(data) == from_file  # whole bytes, not iterated as ints


def test_invalid_utf8_is_reported_per_line():
    report = validate_jsonl([b'{"text": "ok"}\n', b'{"text": "\xc3\x28"}\n', b'{"text": "\xe2\x82\xac"}\n'])
    assert codes(report) == [(2, "invalid_utf8")]
    assert report.num_examples == 2


def test_overlong_lines_are_skipped_without_being_buffered():
    long_row = json.dumps({"text": "x" * 500}).encode()
    chunks = [jsonl(TEXT), long_row[:100], long_row[100:], b"\n", jsonl(TEXT)]
    report = validate_jsonl(chunks, max_line_bytes=200)
    assert codes(report) == [(2, "line_too_long")]
    assert report.num_examples == 2
    exactly = jsonl({"text": "x" * 100})
    assert validate_jsonl([exactly], max_line_bytes=len(exactly) - 1).ok


def _nested(depth: int) -> str:
    """An object whose deepest bracket is at `depth` (the object itself is depth 1)."""
    return '{"text": "t", "x": ' + "[" * (depth - 1) + "]" * (depth - 1) + "}"


def test_deep_nesting_is_rejected_without_recursion():
    hostile = "[" * 100_000 + "]" * 100_000
    report = validate_jsonl([jsonl(TEXT, hostile, "{" * 100_000, TEXT)])
    assert codes(report) == [(2, "too_deeply_nested"), (3, "too_deeply_nested")]
    assert codes(validate_jsonl([jsonl(_nested(32), _nested(33))])) == [(2, "too_deeply_nested")]
    # Brackets inside strings (escaped quotes included) are text, not nesting.
    assert validate_jsonl([jsonl({"text": '\\"[' * 1000 + "{" * 1000})]).ok


def test_huge_integers_are_invalid_json_not_a_crash():
    report = validate_jsonl([jsonl(CLASSIFICATION, '{"text": "x", "label": ' + "9" * 5000 + "}")])
    assert codes(report) == [(2, "invalid_json")]


def test_read_examples_raises_with_the_error_rows(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(jsonl(CLASSIFICATION, {"text": "x", "label": False}))
    with pytest.raises(DataFormatError) as info:
        read_examples(path)
    assert [(error["line"], error["code"]) for error in info.value.errors] == [(2, "invalid_field")]
    assert "line 2" in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"\n")
    with pytest.raises(DataFormatError, match="valid examples"):
        read_examples(empty)


def test_importing_the_package_does_not_load_torch():
    # The web tier imports neat_core.data to validate uploads and has no torch to spare.
    code = "import sys, neat_core.data; sys.exit(bool({'torch', 'transformers'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --- OpenAI's preference (DPO) format ---------------------------------------------------------------------------

PREFERENCE = {
    "input": {"messages": [{"role": "user", "content": "Is 'great product!' positive or negative?"}]},
    "preferred_output": [{"role": "assistant", "content": "positive"}],
    "non_preferred_output": [{"role": "assistant", "content": "negative"}],
}


def _pair(**changes) -> dict:
    return {**json.loads(json.dumps(PREFERENCE)), **changes}


def test_preference_lines_are_their_own_format():
    with_tools = _pair(
        input={
            "messages": [{"role": "user", "content": "Weather in Oslo?"}],
            "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        },
        preferred_output=[
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}
                ],
            }
        ],
    )
    report = validate_jsonl(jsonl(PREFERENCE, with_tools))
    assert report.ok, report.errors
    assert report.format is DataFormat.PREFERENCE and report.num_examples == 2
    assert report.format.task == "causal_lm" and report.format.objective == "dpo"
    assert DataFormat.CHAT.objective == "supervised"


@pytest.mark.parametrize(
    ("row", "code", "where"),
    [
        (_pair(input="hello"), "invalid_field", "'input' must be an object"),
        (_pair(input={"messages": []}), "invalid_field", "input.messages must be a non-empty array"),
        (_pair(input={"messages": [{"role": "user", "content": " "}]}), "empty_content", "input.messages[0]"),
        (_pair(input={"messages": [{"role": "robot", "content": "x"}]}), "invalid_role", "input.messages[0]"),
        (_pair(preferred_output={"role": "assistant", "content": "x"}), "invalid_field", "exactly one"),
        (_pair(preferred_output=[]), "invalid_field", "exactly one"),
        (_pair(non_preferred_output=[{"role": "user", "content": "x"}]), "invalid_field", "non_preferred_output[0]"),
        (_pair(preferred_output=[{"role": "assistant", "content": ""}]), "empty_content", "preferred_output[0]"),
        (_pair(preferred_output=[{"role": "assistant", "content": "x", "weight": 1}]), "invalid_field", "weight"),
        (_pair(preferred_output=[{"role": "assistant", "content": "negative"}]), "identical_outputs", "the same"),
        (
            _pair(
                preferred_output=[
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                    }
                ],
                input={"messages": [{"role": "user", "content": "x"}], "tools": []},
            ),
            "unknown_function",
            "preferred_output[0].tool_calls[0]",
        ),
    ],
)
def test_bad_preference_lines_name_the_field_and_line(row, code, where):
    missing = {k: v for k, v in PREFERENCE.items() if k != "non_preferred_output"}
    report = validate_jsonl(jsonl(PREFERENCE, row, missing))
    assert codes(report) == [(2, code), (3, "missing_field")]
    assert where in report.errors[0]["message"]
    assert "'non_preferred_output' is missing" in report.errors[1]["message"]


def test_a_preference_file_cannot_mix_in_chat_lines():
    report = validate_jsonl(jsonl(PREFERENCE, CHAT))
    assert codes(report) == [(2, "mixed_formats")]
