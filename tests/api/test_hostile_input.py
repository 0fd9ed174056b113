"""Hostile input the other API tests do not already cover (path traversal, invalid UTF-8, NUL bytes, deep nesting,
long lines, oversize files and bad job specs are in test_files.py / test_jobs.py): wrong content types, millions of
tiny lines, hostile file names. Each gets a clear 4xx in OpenAI's error shape and leaves nothing stored."""

from __future__ import annotations

import json
import socket

import pytest
from sqlalchemy import func, select

from control.orm import File
from tests.api import api_processes, assert_error, chat_rows, jsonl, sqlite_only


def nothing_stored(api) -> bool:
    with api.session() as session:
        rows = session.scalar(select(func.count()).select_from(File))
    return rows == 0 and not [p for p in api.artifact_root.rglob("*") if p.is_file()]


def test_json_body_where_a_multipart_upload_is_expected(api):
    r = api.post("/v1/files", json={"file": "x", "purpose": "fine-tune"})
    assert_error(r, 400)
    assert nothing_stored(api)


@pytest.mark.parametrize("content_type", ["text/plain", "application/xml", "application/x-www-form-urlencoded"])
def test_job_creation_with_a_body_that_is_not_json(api, content_type):
    r = api.post("/v1/fine_tuning/jobs", content=b"model=x&training_file=y", headers={"Content-Type": content_type})
    assert_error(r, 400)


def test_a_million_tiny_lines(make_api):
    api = make_api(max_upload_bytes=64 * 1024 * 1024)
    body = b"{}\n" * 1_000_000  # 3 MB of lines that are JSON but no format's rows
    error = assert_error(api.upload(body), 400, code="invalid_file", param="file")
    assert 1 <= len(error["errors"]) <= 20  # reported once each, up to a bound, not a million times
    assert nothing_stored(api)


@pytest.mark.parametrize("filename", ["\x00.jsonl", "a\x00b/../../c.jsonl", "../", "..", "/", "\\..\\..\\x", ""])
def test_hostile_file_names_are_stored_as_plain_names(api, filename):
    r = api.post("/v1/files", files={"file": (filename, jsonl(chat_rows()), "application/jsonl")},
                 data={"purpose": "fine-tune"})  # fmt: skip
    if r.status_code == 200:
        name = r.json()["filename"]
        assert name and "/" not in name and "\\" not in name and "\x00" not in name and name not in (".", "..")
        stored = [p for p in api.artifact_root.rglob("*") if p.is_file()]
        assert len(stored) == 1 and api.artifact_root.resolve() in stored[0].resolve().parents
    else:
        assert_error(r, r.status_code)
        assert 400 <= r.status_code < 500 and nothing_stored(api)


@pytest.mark.parametrize(
    "content_type, body",
    [
        ("multipart/form-data", b"no boundary at all"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nContent-Disposition: form-data\r\n\r\nno name\r\n--xyz--\r\n"),
        ("multipart/form-data; boundary=xyz", b"--xyz\r\nnot a header line\r\n\r\n"),
    ],
)
def test_broken_multipart_bodies_get_an_error_code(api, content_type, body):
    r = api.post("/v1/files", content=body, headers={"Content-Type": content_type})
    error = assert_error(r, 400)
    assert error["code"], error  # clients branch on the code: never null
    assert nothing_stored(api)


def test_a_huge_classification_input_is_refused_naming_the_limit(api):
    r = api.post("/v1/classifications", json={"model": "ft:whatever", "input": ["x"] * 100_000})
    error = assert_error(r, 400, code="invalid_request", param="input")
    assert "at most 2048 texts" in error["message"] and "valid string" not in error["message"], error


def _raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes no HTTP client would, and read the whole answer (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@sqlite_only
def test_a_nul_byte_in_a_header_gets_a_json_error_from_the_real_server(api, tmp_path):
    """uvicorn's parser refuses such a request before the app sees it; api.http answers it in OpenAI's shape."""
    auth = f"Authorization: Bearer {api.a.key}\r\n".encode()
    requests = [
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Evil: a\x00b\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-\x00x\r\n\r\n",
        b"GET /v1/mod\x00els HTTP/1.1\r\nHost: x\r\n" + auth + b"\r\n",
    ]
    with api_processes(api.settings, tmp_path / "api.log") as (port,):
        for request in requests:
            status, headers, body = _raw_request(port, request)
            assert (status, headers["content-type"]) == (400, "application/json"), (request, body)
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_http_request"
            assert error["type"] == "invalid_request_error" and "NUL" in error["message"]
        clean = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth + b"\r\n"
        assert _raw_request(port, clean)[0] == 200  # the same server, a well-formed request
