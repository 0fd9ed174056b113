"""/v1/files: uploads in every format, every validation rule (400 invalid_file, nothing stored), size limit, file
names that try to leave the storage root, list/retrieve/content/delete."""

from __future__ import annotations

import hashlib
import json

import pytest
from sqlalchemy import func, select

from control.orm import File
from tests.api import (
    MIN_EXAMPLES,
    ROWS,
    assert_error,
    chat_rows,
    classification_rows,
    jsonl,
    sqlite_only,
    text_rows,
)
from tests.conftest import WEATHER_TOOL, tool_chat_rows


def stored_files(api) -> list:
    """Regular files under the artifact root (empty directories don't count)."""
    return [p for p in api.artifact_root.rglob("*") if p.is_file()]


def assert_nothing_stored(api) -> None:
    with api.session() as session:
        assert session.scalar(select(func.count()).select_from(File)) == 0
    assert stored_files(api) == []


@pytest.mark.parametrize("fmt", sorted(ROWS))
def test_upload_each_format(api, fmt):
    content = jsonl(ROWS[fmt](12))
    body = api.upload_ok(content, filename=f"{fmt}.jsonl")

    assert body["id"].startswith("file-")
    assert body["object"] == "file"
    assert body["bytes"] == len(content)
    assert body["sha256"] == hashlib.sha256(content).hexdigest()
    assert body["format"] == fmt
    assert body["num_examples"] == 12
    assert body["status"] == "processed"
    assert body["purpose"] == "fine-tune"
    assert body["filename"] == f"{fmt}.jsonl"
    assert isinstance(body["created_at"], int) and body["created_at"] > 1_600_000_000
    assert api.get(f"/v1/files/{body['id']}").json() == body
    assert len(stored_files(api)) == 1
    assert stored_files(api)[0].read_bytes() == content


@sqlite_only
def test_upload_openai_chat_with_tools_calls_results_and_weights(api):
    """The issue's finding: OpenAI-format training data (assistant `tool_calls` with content null, `tools`, `role:
    tool`, `weight`) was refused with "messages[2].'content' is missing"."""
    content = jsonl(tool_chat_rows(12))
    body = api.upload_ok(content, filename="weather.jsonl")
    assert (body["format"], body["num_examples"]) == ("chat", 12)
    assert api.get(f"/v1/files/{body['id']}/content").content == content  # stored as sent, tools and all


@sqlite_only
def test_blank_lines_and_bom_are_accepted(api):
    content = "\ufeff".encode() + jsonl(text_rows(5)) + b"\n   \n" + jsonl(text_rows(5))
    body = api.upload_ok(content)
    assert (body["format"], body["num_examples"]) == ("text", 10)


def _with_bad_line(bad: bytes, good: list[dict] | None = None, at: int = 3) -> bytes:
    """MIN_EXAMPLES valid lines with `bad` as line `at` (1-based)."""
    lines = jsonl(good or chat_rows()).splitlines(keepends=True)
    lines.insert(at - 1, bad + b"\n")
    return b"".join(lines)


def _message(role="assistant", content="hi", **extra) -> dict:
    return {"role": role, "content": content, **extra}


def _chat(*messages) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


def _calling(name: str, call_id: str = "call_1") -> dict:
    """An assistant message that calls `name`, content null as OpenAI writes it."""
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": '{"city": "Oslo"}'}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def _with_tools(*messages, type: str = "function") -> bytes:
    return json.dumps({"tools": [{**WEATHER_TOOL, "type": type}], "messages": list(messages)}).encode()


INVALID = {
    # code: file content whose line 3 breaks exactly that rule
    "invalid_utf8": _with_bad_line(b'{"messages": "\xff\xfe"}'),
    "nul_byte": _with_bad_line(b'{"text": "a\x00b"}', text_rows()),
    "invalid_json": _with_bad_line(b'{"text": "unterminated'),
    "not_an_object": _with_bad_line(b'["text", "a list"]', text_rows()),
    "too_deeply_nested": _with_bad_line(b'{"text": "x", "extra": ' + b"[" * 40 + b"]" * 40 + b"}", text_rows()),
    "unknown_format": _with_bad_line(b'{"question": "q", "answer": "a"}'),
    "mixed_formats": _with_bad_line(b'{"prompt": "p", "completion": "c"}'),
    "missing_field": _with_bad_line(_chat({"content": "no role"}, _message())),
    "invalid_field": _with_bad_line(b'{"text": "t", "label": 1.5}', classification_rows()),
    "invalid_role": _with_bad_line(_chat(_message(role="robot"), _message())),
    "empty_content": _with_bad_line(_chat(_message(role="user", content="  "), _message())),
    "no_assistant_message": _with_bad_line(_chat(_message(role="user"))),
    "no_trainable_message": _with_bad_line(_chat(_message(role="user"), _message(weight=0))),
    "unsupported_tool_type": _with_bad_line(_with_tools(_message(role="user"), _message(), type="code_interpreter")),
    "unknown_function": _with_bad_line(_with_tools(_message(role="user"), _calling("get_time"))),
    "unknown_tool_call": _with_bad_line(
        _with_tools(_message(role="user"), _calling("get_weather"), _message(role="tool", tool_call_id="call_9"))
    ),
}


@sqlite_only
@pytest.mark.parametrize("code", sorted(INVALID))
def test_invalid_line_is_rejected_and_nothing_stored(api, code):
    error = assert_error(api.upload(INVALID[code]), 400, code="invalid_file", param="file")
    assert [(e["line"], e["code"]) for e in error["errors"]] == [(3, code)]
    assert error["errors"][0]["message"] in error["message"]
    assert_nothing_stored(api)


@sqlite_only
@pytest.mark.parametrize(
    "fmt, bad_line, words",
    [
        ("text", b'{"text": 5}', ("'text'", "string")),
        ("prompt_completion", b'{"prompt": "p", "completion": ""}', ("'completion'", "empty")),
        ("chat", b'{"messages": {"role": "user"}}', ("'messages'", "array")),
        ("classification", b'{"text": "t", "label": true}', ("'label'", "boolean")),
        ("chat", _chat(_message(weight=2)), ("'weight'", "0 or 1")),
        (
            "chat",
            _with_tools(_message(role="user"), {**_calling("get_weather"), "tool_calls": {}}),
            ("messages[1].'tool_calls'", "array"),
        ),
        (
            "chat",
            _with_tools(_message(role="user"), _calling("get_weather"), _message(role="tool")),
            ("messages[2].'tool_call_id'", "missing"),
        ),
        # a preference line names the side and message as the user wrote them
        (
            "preference",
            b'{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": '
            b'[{"role": "assistant", "content": "a"}]}',
            ("'non_preferred_output'", "missing"),
        ),
        (
            "preference",
            b'{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": '
            b'[{"role": "user", "content": "a"}], "non_preferred_output": [{"role": "assistant", '
            b'"content": "b"}]}',
            ("preferred_output[0]", "assistant"),
        ),
        (
            "preference",
            b'{"input": {"messages": [{"role": "user", "content": "q"}]}, "preferred_output": '
            b'[{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", '
            b'"content": "a"}]}',
            ("preferred_output", "same"),
        ),
    ],
)
def test_error_messages_name_the_field(api, fmt, bad_line, words):
    error = assert_error(api.upload(_with_bad_line(bad_line, ROWS[fmt]())), 400, code="invalid_file")
    [row] = error["errors"]
    assert row["line"] == 3 and all(word in row["message"] for word in words), row


@sqlite_only
def test_too_few_examples(api):
    error = assert_error(api.upload(chat_rows(MIN_EXAMPLES - 1)), 400, code="invalid_file", param="file")
    assert [(e["line"], e["code"]) for e in error["errors"]] == [(0, "too_few_examples")]
    assert_nothing_stored(api)


@sqlite_only
def test_empty_file(api):
    error = assert_error(api.upload(b""), 400, code="invalid_file")
    assert [e["code"] for e in error["errors"]] == ["too_few_examples"]
    assert_nothing_stored(api)


@sqlite_only
def test_line_too_long(make_api):
    api = make_api(max_line_bytes=200)
    content = _with_bad_line(json.dumps({"text": "x" * 300}).encode(), text_rows())
    error = assert_error(api.upload(content), 400, code="invalid_file")
    assert [(e["line"], e["code"]) for e in error["errors"]] == [(3, "line_too_long")]
    assert_nothing_stored(api)


@sqlite_only
def test_at_most_20_errors_are_reported(api):
    content = jsonl(chat_rows()) + b"not json\n" * 30
    error = assert_error(api.upload(content), 400, code="invalid_file")
    assert len(error["errors"]) == 20
    assert [e["line"] for e in error["errors"]] == list(range(MIN_EXAMPLES + 1, MIN_EXAMPLES + 21))
    assert {e["code"] for e in error["errors"]} == {"invalid_json"}
    assert all(set(e) == {"line", "code", "message"} for e in error["errors"])


@sqlite_only
def test_purpose_must_be_fine_tune(api):
    assert_error(api.upload(chat_rows(), purpose="assistants"), 400, code="invalid_purpose", param="purpose")
    assert_nothing_stored(api)


@sqlite_only
@pytest.mark.parametrize("missing", ["file", "purpose"])
def test_missing_multipart_field(api, missing):
    files = {"file": ("train.jsonl", jsonl(chat_rows()), "application/jsonl")}
    data = {"purpose": "fine-tune"}
    kwargs = {"data": data} if missing == "file" else {"files": files}
    assert_error(api.post("/v1/files", **kwargs), 400, param=missing)
    assert_nothing_stored(api)


def test_too_large_is_413_and_nothing_stored(make_api):
    content = jsonl(text_rows(40))
    api = make_api(max_upload_bytes=len(content) - 1)
    assert_error(api.upload(content), 413, code="file_too_large")
    assert_nothing_stored(api)

    at_limit = make_api(max_upload_bytes=len(content))
    assert at_limit.upload_ok(content)["bytes"] == len(content)


@pytest.mark.parametrize("filename, stored_as", [("../../etc/passwd.jsonl", "passwd.jsonl"),
                                                 ("..\\..\\windows\\evil.jsonl", "evil.jsonl"),
                                                 ("/abs/path/data.jsonl", "data.jsonl")])  # fmt: skip
def test_path_traversal_filename_is_a_plain_basename(api, filename, stored_as):
    body = api.upload_ok(chat_rows(), filename=filename)
    assert body["filename"] == stored_as
    [blob] = stored_files(api)
    assert blob.resolve().is_relative_to(api.artifact_root)
    assert stored_as not in str(blob)  # the storage key comes from ids, never from the client's name
    assert api.get(f"/v1/files/{body['id']}/content").content == jsonl(chat_rows())


def test_list_newest_first_with_pagination(api):
    ids = [api.upload_ok(chat_rows(), filename=f"{i}.jsonl")["id"] for i in range(3)]
    newest_first = ids[::-1]

    body = api.get("/v1/files").json()
    assert body["object"] == "list" and body["has_more"] is False
    assert [f["id"] for f in body["data"]] == newest_first
    assert all(f["object"] == "file" for f in body["data"])

    first = api.get("/v1/files", params={"limit": 2}).json()
    assert [f["id"] for f in first["data"]] == newest_first[:2] and first["has_more"] is True
    rest = api.get("/v1/files", params={"limit": 2, "after": first["data"][-1]["id"]}).json()
    assert [f["id"] for f in rest["data"]] == newest_first[2:] and rest["has_more"] is False

    assert [f["id"] for f in api.get("/v1/files", params={"purpose": "fine-tune"}).json()["data"]] == newest_first
    assert api.get("/v1/files", params={"purpose": "batch"}).json()["data"] == []


@sqlite_only
@pytest.mark.parametrize(
    "params, code, param",
    [
        ({"limit": 0}, "invalid_limit", "limit"),
        ({"limit": 101}, "invalid_limit", "limit"),
        ({"limit": "many"}, None, "limit"),
        ({"after": "file-doesnotexist"}, "invalid_cursor", "after"),
    ],
)
def test_list_bad_pagination(api, params, code, param):
    assert_error(api.get("/v1/files", params=params), 400, code=code, param=param)


def test_retrieve_content_delete(api):
    content = jsonl(classification_rows(11))
    file_id = api.upload_ok(content, filename="reviews.jsonl")["id"]

    got = api.get(f"/v1/files/{file_id}/content")
    assert got.status_code == 200
    assert got.content == content
    assert got.headers["content-type"].startswith("application/jsonl")
    assert "reviews.jsonl" in got.headers["content-disposition"]

    [blob] = stored_files(api)
    deleted = api.delete(f"/v1/files/{file_id}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert not blob.exists()
    assert stored_files(api) == []
    for response in (api.get(f"/v1/files/{file_id}"), api.get(f"/v1/files/{file_id}/content"),
                     api.delete(f"/v1/files/{file_id}")):  # fmt: skip
        assert_error(response, 404, code="file_not_found")
    assert api.get("/v1/files").json()["data"] == []


@sqlite_only
@pytest.mark.parametrize("method, suffix", [("GET", ""), ("GET", "/content"), ("DELETE", "")])
def test_unknown_file_is_404(api, method, suffix):
    error = assert_error(api.request(method, f"/v1/files/file-missing{suffix}"), 404, code="file_not_found")
    assert "file-missing" in error["message"]


def test_a_file_in_use_by_an_unfinished_job_cannot_be_deleted(api):
    training, validation = api.upload_ok(chat_rows())["id"], api.upload_ok(chat_rows())["id"]
    job_id = api.create_job_ok(training, validation_file=validation)["id"]
    blobs = stored_files(api)

    for file_id in (training, validation):
        error = assert_error(api.delete(f"/v1/files/{file_id}"), 409, code="file_in_use", param="file_id")
        assert job_id in error["message"] and file_id in error["message"]
        assert api.get(f"/v1/files/{file_id}").status_code == 200  # nothing deleted: row and blob kept
    assert stored_files(api) == blobs

    api.set_job(job_id, status="running")  # a worker has it: still in use
    assert_error(api.delete(f"/v1/files/{training}"), 409, code="file_in_use")
    api.set_job(job_id, status="cancelled")  # finished: the files are free to go
    for file_id in (training, validation):
        assert api.delete(f"/v1/files/{file_id}").json()["deleted"] is True
    assert stored_files(api) == []
