"""The five JSONL dataset formats: detection and line-by-line validation.

Pure stdlib on purpose (with `neat_core.data.chat`, the chat format's one home, stdlib too): the web tier
validates uploads with this module and must not load torch (an import-linter contract enforces it). Files are
streamed: at most one line is held in memory, and a line longer than `max_line_bytes` is skipped without ever
being held whole.
"""

from __future__ import annotations

import enum
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from neat_core.data.chat import ROLES
from neat_core.errors import DataFormatError

# Deeper JSON than this is rejected before parsing, so a hostile line cannot reach the recursion limit.
MAX_NESTING_DEPTH = 32
# OpenAI's rule for a function's name; the name is also written into the training text as the model calls it.
_FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

_READ_CHUNK_BYTES = 1 << 16
# A JSON string literal, escapes included; removed before counting brackets so "[" inside text is ignored.
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


class DataFormat(enum.StrEnum):
    CLASSIFICATION = "classification"
    CHAT = "chat"
    PROMPT_COMPLETION = "prompt_completion"
    TEXT = "text"
    PREFERENCE = "preference"  # OpenAI's preference (DPO) format: a conversation and two candidate replies

    @property
    def task(self) -> str:
        """The training task: a sequence classifier for CLASSIFICATION, a causal LM for everything else."""
        return "classification" if self is DataFormat.CLASSIFICATION else "causal_lm"

    @property
    def objective(self) -> str:
        """The training objective the format is for: "dpo" for preference pairs, "supervised" otherwise."""
        return "dpo" if self is DataFormat.PREFERENCE else "supervised"


@dataclass
class FileReport:
    """What validation found. `errors` rows: `{"line": int (1-based; 0 = whole file), "code", "message"}`."""

    format: DataFormat | None
    num_examples: int
    errors: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


class _Invalid(Exception):
    """One line's first problem; raised by the checks below and turned into an error row."""

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


def validate_jsonl(
    source: str | os.PathLike | Iterable[bytes],
    *,
    min_examples: int = 1,
    max_errors: int = 20,
    max_line_bytes: int = 1_000_000,
) -> FileReport:
    """Validate every line of a JSONL dataset. `source` is a path or an iterable of bytes chunks (lines or
    arbitrary pieces, e.g. an upload stream). `max_line_bytes` counts a line's bytes without its newline.
    Never raises for bad content: the report says what is wrong."""
    return _scan(source, min_examples, max_errors, max_line_bytes, keep=None)


def read_examples(path: str | os.PathLike) -> tuple[DataFormat, list[dict]]:
    """Validate and parse a dataset file; the examples are the parsed JSON objects, in file order."""
    examples: list[dict] = []
    report = _scan(path, min_examples=1, max_errors=20, max_line_bytes=1_000_000, keep=examples)
    if not report.ok:
        first = report.errors[0]
        message = f"{os.fspath(path)} is not a valid dataset (line {first['line']}: {first['message']})"
        raise DataFormatError(message, report.errors)
    assert report.format is not None  # ok implies at least one valid example, hence a format
    return report.format, examples


def _scan(
    source: str | os.PathLike | Iterable[bytes],
    min_examples: int,
    max_errors: int,
    max_line_bytes: int,
    keep: list[dict] | None,
) -> FileReport:
    report = FileReport(format=None, num_examples=0)
    format_line = 0  # where the file's format was detected, for the mixed_formats message

    def add_error(line: int, code: str, message: str) -> None:
        if len(report.errors) < max_errors:
            report.errors.append({"line": line, "code": code, "message": message})

    for line_no, raw in enumerate(_lines(source, max_line_bytes), start=1):
        try:
            if raw is None:
                raise _Invalid("line_too_long", f"line is longer than {max_line_bytes} bytes")
            obj = _parse(raw, first_line=line_no == 1)
            if obj is None:  # blank line
                continue
            fmt = _detect(obj)
            if report.format is None:
                report.format, format_line = fmt, line_no
            elif fmt is not report.format:
                message = f"line is {fmt} but the file is {report.format} (from line {format_line})"
                raise _Invalid("mixed_formats", message)
            _CHECKS[fmt](obj)
        except _Invalid as exc:
            add_error(line_no, exc.code, exc.message)
            continue
        report.num_examples += 1
        if keep is not None:
            keep.append(obj)

    if report.num_examples < min_examples:
        message = f"{report.num_examples} valid examples; at least {min_examples} needed"
        add_error(0, "too_few_examples", message)
    return report


def _lines(source: str | os.PathLike | Iterable[bytes], max_line_bytes: int) -> Iterator[bytes | None]:
    """The lines of a file or of a chunk stream, without newlines; None for a line over the limit."""
    if isinstance(source, str | os.PathLike):
        with Path(source).open("rb") as f:
            yield from _split(iter(partial(f.read, _READ_CHUNK_BYTES), b""), max_line_bytes)
    elif isinstance(source, bytes | bytearray):  # a whole file's bytes; iterating it would give ints
        yield from _split([bytes(source)], max_line_bytes)
    else:
        yield from _split(source, max_line_bytes)


def _split(chunks: Iterable[bytes], max_line_bytes: int) -> Iterator[bytes | None]:
    line = bytearray()
    too_long = False  # once set, the rest of this line is dropped rather than buffered
    for chunk in chunks:
        start = 0
        while True:
            end = chunk.find(b"\n", start)
            if not too_long:
                line += chunk[start:] if end < 0 else chunk[start:end]
                if len(line) > max_line_bytes:
                    too_long = True
                    line.clear()
            if end < 0:
                break
            yield None if too_long else bytes(line)
            line.clear()
            too_long = False
            start = end + 1
    if line or too_long:  # the last line had no newline
        yield None if too_long else bytes(line)


def _parse(raw: bytes, *, first_line: bool) -> dict | None:
    """One line's JSON object, or None for a blank line."""
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise _Invalid("nul_byte", f"line contains a NUL byte (byte {nul + 1})")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Invalid("invalid_utf8", f"line is not valid UTF-8 (byte {exc.start + 1})") from None
    if first_line:
        text = text.removeprefix("\ufeff")  # editors on Windows like to start files with a BOM
    if not text.strip():
        return None
    _check_depth(text)
    try:
        obj = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and also ints over Python's digit limit
        raise _Invalid("invalid_json", f"line is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise _Invalid("not_an_object", f"line is a JSON {type(obj).__name__}, not an object")
    return obj


def _check_depth(text: str) -> None:
    """Count bracket depth outside string literals, stopping as soon as it passes the limit."""
    if text.count("[") + text.count("{") <= MAX_NESTING_DEPTH:  # the usual line: too few brackets to matter
        return
    depth = 0
    for bracket in _BRACKETS.finditer(_JSON_STRING.sub("", text)):
        depth += 1 if bracket.group() in "[{" else -1
        if depth > MAX_NESTING_DEPTH:
            raise _Invalid("too_deeply_nested", f"JSON is nested deeper than {MAX_NESTING_DEPTH} levels")


def _detect(obj: dict) -> DataFormat:
    if "input" in obj and ("preferred_output" in obj or "non_preferred_output" in obj):
        return DataFormat.PREFERENCE
    if "messages" in obj:
        return DataFormat.CHAT
    if "prompt" in obj and "completion" in obj:
        return DataFormat.PROMPT_COMPLETION
    if "text" in obj and "label" in obj:
        return DataFormat.CLASSIFICATION
    if "text" in obj:
        return DataFormat.TEXT
    keys = ", ".join(sorted(obj)[:5]) or "none"
    raise _Invalid(
        "unknown_format",
        f"cannot tell the format from the keys ({keys}); expected messages, "
        "prompt+completion, text+label, text, or input+preferred_output+non_preferred_output",
    )


def _string(obj: dict, key: str, *, where: str = "", non_empty: bool = True) -> str:
    if key not in obj:
        raise _Invalid("missing_field", f"{where}{key!r} is missing")
    value = obj[key]
    if not isinstance(value, str):
        raise _Invalid("invalid_field", f"{where}{key!r} must be a string, not {_json_type(value)}")
    if non_empty and not value.strip():
        raise _Invalid("empty_content", f"{where}{key!r} is empty")
    return value


def _json_type(value: object) -> str:
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}
    return "null" if value is None else names.get(type(value), "an object")


def _check_classification(obj: dict) -> None:
    _string(obj, "text")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, str | int):  # bool is an int in Python, not here
        raise _Invalid("invalid_field", f"'label' must be a string or an integer, not {_json_type(label)}")
    if isinstance(label, str) and not label.strip():
        raise _Invalid("invalid_field", "'label' is an empty string")


def _check_chat(obj: dict) -> None:
    """OpenAI's chat fine-tuning line: `messages`, and optionally `tools`. Assistant messages may call tools
    (`tool_calls`, content then optional), `role: tool` messages answer an earlier call by id, and `weight` (0 or 1)
    says whether an assistant message is trained on. Unknown message fields are accepted, as they always were."""
    messages = obj["messages"]
    if not isinstance(messages, list):
        raise _Invalid("invalid_field", f"'messages' must be an array, not {_json_type(messages)}")
    functions = None if obj.get("tools") is None else _check_tools(obj["tools"])
    calls: set[str] = set()  # the ids of the calls made so far
    answered: set[str] = set()  # ... and of those a tool message answered
    assistants = trainable = 0
    for i, message in enumerate(messages):
        where = f"messages[{i}]."
        if not isinstance(message, dict):
            raise _Invalid("invalid_field", f"messages[{i}] must be an object, not {_json_type(message)}")
        if "role" not in message:
            raise _Invalid("missing_field", f"{where}'role' is missing")
        role = message["role"]
        if role not in ROLES:  # a non-string role is just as invalid; `in` on a tuple never raises
            raise _Invalid("invalid_role", f"{where}role is {role!r}; allowed: {', '.join(ROLES)}")
        for key, owner in (("tool_calls", "assistant"), ("tool_call_id", "tool")):
            # Known fields, refused where they would mean nothing; null is absent (SDK dumps write it).
            if message.get(key) is not None and role != owner:
                raise _Invalid("invalid_field", f"{where}{key!r} is only allowed on {owner} messages")
        tool_calls = message.get("tool_calls")
        made = [] if tool_calls is None else _check_tool_calls(tool_calls, functions, where)
        for j, call_id in enumerate(made):
            if call_id in calls:
                raise _Invalid("invalid_field", f"{where}tool_calls[{j}].id {call_id!r} is used twice")
            calls.add(call_id)
        if made:
            if message.get("content") is not None:  # text before the calls; may be empty
                _string(message, "content", where=where, non_empty=False)
        else:
            _string(message, "content", where=where)
        if role == "tool":
            call_id = _string(message, "tool_call_id", where=where)
            if call_id not in calls:
                problem = f"{where}tool_call_id {call_id!r} names no tool call of an earlier assistant message"
                raise _Invalid("unknown_tool_call", problem)
            if call_id in answered:
                raise _Invalid("invalid_field", f"{where}tool_call_id {call_id!r} was already answered")
            answered.add(call_id)
        weight = message.get("weight", 1)
        if type(weight) is not int or weight not in (0, 1):  # exact int: true and 1.0 are not weights
            raise _Invalid("invalid_field", f"{where}'weight' must be 0 or 1, not {weight!r}")
        if role == "assistant":
            assistants += 1
            trainable += weight
    if not assistants:
        raise _Invalid("no_assistant_message", "the conversation has no assistant message")
    if not trainable:
        raise _Invalid("no_trainable_message", "every assistant message has weight 0: nothing to train on")


def _check_tools(tools: object) -> set[str]:
    """A line's `tools`: function tools only. Returns the functions' names."""
    if not isinstance(tools, list):
        raise _Invalid("invalid_field", f"'tools' must be an array, not {_json_type(tools)}")
    names: set[str] = set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]."
        function = _function_of(tool, f"tools[{i}]")
        name = _function_name(function, where)
        if name in names:
            raise _Invalid("invalid_field", f"{where}function.name {name!r} is defined twice")
        names.add(name)
        # null is absent here too: the SDK's FunctionDefinition dumps its unset fields as null.
        if function.get("description") is not None:
            _string(function, "description", where=f"{where}function.", non_empty=False)
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            message = f"{where}function.parameters must be a JSON schema object, not {_json_type(parameters)}"
            raise _Invalid("invalid_field", message)
        if parameters is not None and parameters.get("type", "object") != "object":
            # A call's arguments are a JSON object, so the schema that describes them must be one too.
            message = f"{where}function.parameters must describe an object, not type {parameters['type']!r}"
            raise _Invalid("invalid_field", message)
    return names


def _check_tool_calls(tool_calls: object, functions: set[str] | None, where: str) -> list[str]:
    """An assistant message's `tool_calls` (`functions`: the line's tool names, None when it has no `tools`).
    Returns the calls' ids, in order."""
    if not isinstance(tool_calls, list):
        raise _Invalid("invalid_field", f"{where}'tool_calls' must be an array, not {_json_type(tool_calls)}")
    ids = []
    for j, call in enumerate(tool_calls):
        at = f"{where}tool_calls[{j}]"
        function = _function_of(call, at)
        ids.append(_string(call, "id", where=f"{at}."))
        name = _function_name(function, f"{at}.")
        if functions is not None and name not in functions:
            offered = ", ".join(sorted(functions)) or "none"
            raise _Invalid("unknown_function", f"{at} calls {name!r}, which is not in the line's tools ({offered})")
        arguments = _string(function, "arguments", where=f"{at}.function.", non_empty=False)
        try:
            parsed = json.loads(arguments)
        except ValueError:
            raise _Invalid("invalid_field", f"{at}.function.arguments is not valid JSON: {arguments[:80]!r}") from None
        if not isinstance(parsed, dict):
            message = f"{at}.function.arguments must be a JSON object, not {_json_type(parsed)}"
            raise _Invalid("invalid_field", message)
    return ids


def _function_of(item: object, at: str) -> dict:
    """`{"type": "function", "function": {...}}` (a tool, or a call) -> its `function` object."""
    if not isinstance(item, dict):
        raise _Invalid("invalid_field", f"{at} must be an object, not {_json_type(item)}")
    kind = _string(item, "type", where=f"{at}.")
    if kind != "function":
        raise _Invalid("unsupported_tool_type", f"{at}.type is {kind!r}; only 'function' tools are supported")
    if "function" not in item:
        raise _Invalid("missing_field", f"{at}.'function' is missing")
    function = item["function"]
    if not isinstance(function, dict):
        raise _Invalid("invalid_field", f"{at}.function must be an object, not {_json_type(function)}")
    return function


def _function_name(function: dict, where: str) -> str:
    name = _string(function, "name", where=f"{where}function.")
    if not _FUNCTION_NAME.fullmatch(name):
        message = f"{where}function.name {name!r} must be 1 to 64 letters, digits, underscores or dashes"
        raise _Invalid("invalid_field", message)
    return name


def _check_prompt_completion(obj: dict) -> None:
    _string(obj, "prompt", non_empty=False)
    _string(obj, "completion")


def _check_text(obj: dict) -> None:
    _string(obj, "text")


def _check_preference(obj: dict) -> None:
    """OpenAI's preference line: `input` (`messages`, optionally `tools`) and two one-message lists,
    `preferred_output` and `non_preferred_output`, each an assistant reply to the input. Each side is checked as the
    chat line it makes (input messages + the reply), so tool calls in a reply must name the input's tools; errors
    name the field as the user wrote it (`input.messages[2]`, `preferred_output[0]`)."""
    given = obj["input"]
    if not isinstance(given, dict):
        raise _Invalid("invalid_field", f"'input' must be an object, not {_json_type(given)}")
    if "messages" not in given:
        raise _Invalid("missing_field", "input.'messages' is missing")
    messages = given["messages"]
    if not isinstance(messages, list) or not messages:
        raise _Invalid("invalid_field", "input.messages must be a non-empty array")
    replies = []
    for side in ("preferred_output", "non_preferred_output"):
        if side not in obj:
            raise _Invalid("missing_field", f"{side!r} is missing")
        reply = obj[side]
        if not isinstance(reply, list) or len(reply) != 1:
            raise _Invalid("invalid_field", f"{side} must be an array of exactly one assistant message")
        if not isinstance(reply[0], dict) or reply[0].get("role") != "assistant":
            raise _Invalid("invalid_field", f"{side}[0] must be an assistant message")
        if "weight" in reply[0]:  # what a reply is trained on is the objective's business, not a weight's
            raise _Invalid("invalid_field", f"{side}[0].'weight' is not allowed in a preference line")
        conversation = [*(m if not isinstance(m, dict) else {**m, "weight": 0} for m in messages), reply[0]]
        try:
            _check_chat({"messages": conversation, "tools": given.get("tools")})
        except _Invalid as exc:  # messages[i] of the checked conversation -> the field as the user wrote it
            rename = partial(_preference_field, n_input=len(messages), side=side)
            raise _Invalid(exc.code, re.sub(r"messages\[(\d+)\]", rename, exc.message)) from None
        replies.append(json.dumps(reply[0], sort_keys=True))
    if replies[0] == replies[1]:  # the loss would be 0 with no gradient: a pair that teaches nothing
        raise _Invalid("identical_outputs", "preferred_output and non_preferred_output are the same message")


def _preference_field(match: re.Match, n_input: int, side: str) -> str:
    i = int(match.group(1))
    return f"{side}[0]" if i == n_input else f"input.messages[{i}]"


_CHECKS = {
    DataFormat.CLASSIFICATION: _check_classification,
    DataFormat.CHAT: _check_chat,
    DataFormat.PROMPT_COMPLETION: _check_prompt_completion,
    DataFormat.TEXT: _check_text,
    DataFormat.PREFERENCE: _check_preference,
}
