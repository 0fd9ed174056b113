"""OpenAI's chat format (messages, tools, assistant tool calls, tool results) rendered through a model's chat
template, for training data and inference alike; and the text a model writes for a tool call.

A tool call is written as Hermes' block, the form Qwen, Hermes and SmolLM3 were trained on:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, separated by a newline. Inference constrains the model to exactly this form
(`reply_grammar`) and parses it back (`parse_tool_calls`); training data renders an assistant's `tool_calls`
the same way, so a model is trained on what it is later asked to write.

A template that knows tools (its source uses `tools`) is given the tools and the structured messages, and writes
them its own way. A template that does not (SmolLM2's) gets them as text: the tools as a system message that
says how to call them, calls as blocks in the assistant's content, and results as a user turn wrapped in
`<tool_response>`. Torch-free: the API's upload validator imports this module's names.
"""

from __future__ import annotations

import json
import re
from typing import Any

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
ROLES = ("system", "developer", "user", "assistant", "tool")  # `developer`: OpenAI's newer name for system


def content_text(content: Any) -> str:
    """A message's content as one string: a string, a list of text parts (joined by newlines), or None (an
    assistant message that only calls tools)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def call_block(name: str, arguments: str | dict) -> str:
    """One tool call as the model writes it. `arguments`: OpenAI's JSON string, or an object."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    return f"{TOOL_OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{TOOL_CLOSE}"


def speaks_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template renders `tools` itself (it reads the variable)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and re.search(r"\btools\b", template) is not None


def template_messages(
    messages: list[dict], tools: list[dict] | None, native: bool
) -> tuple[list[dict], list[dict] | None]:
    """OpenAI `messages` (validated) and `tools` -> (the messages a template takes, the tools to hand it)."""
    turns: list[dict] = []
    for m in messages:
        role, text = m["role"], content_text(m.get("content"))
        calls = m.get("tool_calls") or []
        if role == "developer":
            role = "system"
        if role == "tool" and not native:  # Hermes' convention for a result, in a role every template takes
            turns.append({"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"})
        elif role == "tool":
            turns.append({"role": "tool", "content": text, "tool_call_id": m.get("tool_call_id")})
        elif calls and native:
            structured = [
                {"id": c.get("id"), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}}
                for c in calls
            ]  # fmt: skip
            turns.append({"role": "assistant", "content": text, "tool_calls": structured})
        elif calls:
            blocks = "\n".join(call_block(c["function"]["name"], c["function"]["arguments"]) for c in calls)
            turns.append({"role": "assistant", "content": f"{text}\n{blocks}" if text else blocks})
        else:
            turns.append({"role": role, "content": text})
    if not tools:
        return turns, None
    if native:
        return turns, tools
    if turns and turns[0]["role"] == "system":
        return [{"role": "system", "content": f"{turns[0]['content']}\n\n{tools_prompt(tools)}"}, *turns[1:]], None
    return [{"role": "system", "content": tools_prompt(tools)}, *turns], None


def render(tokenizer: Any, messages: list[dict], tools: list[dict] | None = None, **kwargs: Any) -> str:
    """The conversation as the model's chat template writes it (kwargs: `add_generation_prompt`, ...). Raises
    ValueError (no template) or jinja2's TemplateError (one that rejects the conversation)."""
    native = speaks_tools(tokenizer)
    turns, handed = template_messages(messages, tools, native)
    if handed is not None:
        kwargs["tools"] = handed
    return tokenizer.apply_chat_template(turns, tokenize=False, **kwargs)


def tools_prompt(tools: list[dict]) -> str:
    """The tools, described in a system message for a template that does not render them itself."""
    # Unset fields (null, as SDK dumps write them) say nothing to the model: left out.
    listed = "\n".join(
        json.dumps({k: v for k, v in t["function"].items() if v is not None}, ensure_ascii=False) for t in tools
    )
    return (
        "You may call one or more functions to answer. The functions, as JSON schemas:\n"
        f"<tools>\n{listed}\n</tools>\n"
        "To call a function, reply with a block like this for each call:\n"
        f'{TOOL_OPEN}\n{{"name": <function name>, "arguments": <arguments as a JSON object>}}\n{TOOL_CLOSE}'
    )


def _arguments(arguments: str | dict) -> Any:
    """Templates index the arguments as an object (e.g. Qwen's `arguments | tojson`)."""
    return json.loads(arguments) if isinstance(arguments, str) else arguments


# ---- what the model writes: the grammar that constrains it, and parsing it back ----


# One space after ':' and ',' and no other whitespace: a small model given free whitespace can spend its whole
# budget on newlines.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def reply_grammar(
    *, tools: list[dict] | None = None, choice: str | None = None, parallel: bool = True, json_reply: bool = False,
    schema: dict | None = None,
) -> str | None:  # fmt: skip
    """The llguidance Lark grammar a chat reply must follow; None when it is free text.
      - `json_reply`: the text is a JSON object following `schema` (any object when None): `response_format`.
      - `tools` with `choice` "auto" (or None): that text, or well-formed tool calls (free text may not start with
        one); "required": calls only; a function's name: one call of that function; "none": the text alone
        (the tools are still in the prompt, as OpenAI does).
    Each call's arguments follow its function's `parameters` schema; several calls unless `parallel` is false."""
    text = f"%json {json.dumps({**(schema or {'type': 'object'}), 'x-guidance': _COMPACT})}" if json_reply else None
    if not tools or choice == "none":
        return f"start: {text}" if text else None
    offered = [t["function"] for t in tools if choice in (None, "auto", "required") or t["function"]["name"] == choice]
    one_of = [_call_schema(f) for f in offered]
    calls = 'call ("\\n" call)*' if parallel and choice in (None, "auto", "required") else "call"
    rules = [
        f"calls: {calls}",
        f'call: "{TOOL_OPEN}\\n" body "\\n{TOOL_CLOSE}"',
        f"body: %json {json.dumps({'anyOf': one_of, 'x-guidance': _COMPACT})}",  # read at the schema's root only
    ]
    if choice not in (None, "auto"):
        return "\n".join(["start: calls", *rules])
    text = text or f"TEXT\nTEXT: /(?s:.*)/ & ~/{TOOL_OPEN}(?s:.*)/"
    return "\n".join(["start: text | calls", f"text: {text}", *rules])


def _call_schema(function: dict) -> dict:
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


_BLOCK = re.compile(re.escape(TOOL_OPEN) + r"\s*(.*?)\s*" + re.escape(TOOL_CLOSE), re.S)


def parse_tool_calls(text: str) -> list[tuple[str, str]] | None:
    """[(name, arguments as a JSON string)] when `text` is tool calls (it starts with a block), else None."""
    if not text.lstrip().startswith(TOOL_OPEN):
        return None
    calls = []
    for body in _BLOCK.findall(text):
        try:
            call = json.loads(body)
            calls.append((str(call["name"]), json.dumps(call.get("arguments", {}), ensure_ascii=False)))
        except (ValueError, KeyError, TypeError):
            return None
    return calls or None
