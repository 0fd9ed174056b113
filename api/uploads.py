"""Reading a `multipart/form-data` upload as it arrives, so that the size limit holds while the body streams in.

FastAPI's `UploadFile` would have spooled the whole body to a temporary file before the route ran (a 600 MB upload
took 1.1 GB of disk before its 413: the spool, then our copy). Here python-multipart's streaming parser hands us
each piece as it comes: the `file` part goes straight into a storage temporary file, hashed and counted, and the
first byte past the limit ends the request with a 413 naming it; a body that stalls for `upload_idle_seconds` is
cut off with a 408; a full disk is a 507. Small fields (`purpose`) are kept in memory, up to a few hundred bytes.
Whatever goes wrong, the temporary file is removed before the error leaves.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.from_thread
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from api.errors import APIError
from control.storage import DiskFull, Storage, TempFile, TooLarge

FILE_FIELD = "file"
MAX_FIELD_BYTES = 1024  # a form field other than the file (purpose): more is not a real client
MAX_PARTS = 16
# Multipart framing around the file (boundaries, part headers, the small fields): a declared Content-Length
# above the file limit plus this much cannot fit, and is refused before a byte is read.
FRAMING_SLACK = 64 * 1024
OPENAPI = {  # the body FastAPI would have documented for `file: UploadFile, purpose: Form()`
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "purpose"],
                    "properties": {"file": {"type": "string", "format": "binary"}, "purpose": {"type": "string"}},
                }
            }
        },
    }
}


@dataclass
class Upload:
    """What a multipart upload carried: the file (in a temporary file), its client-side name, and the fields."""

    temp: Path
    size: int
    sha256: str
    filename: str | None
    fields: dict[str, str] = field(default_factory=dict)


def disk_full() -> APIError:
    return APIError(507, "The service's storage is full; nothing was stored. Retry later.", code="storage_full",
                    param="file", headers={"Retry-After": "60"})  # fmt: skip


def too_large(limit: int) -> APIError:
    return APIError(413, f"File is larger than the limit of {limit:,} bytes.", code="file_too_large", param="file")


def receive_upload(request: Request, storage: Storage, limit: int, idle_seconds: float) -> Upload:
    """Parse the request body (from a sync route's worker thread) into an `Upload`; the caller removes `temp`."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise APIError(400, "Upload the file as multipart/form-data with the fields 'file' and 'purpose'.",
                       code="invalid_request", param=FILE_FIELD)  # fmt: skip
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit + FRAMING_SLACK:
        raise too_large(limit)  # refused before a byte of it is read
    reader = _Reader(storage, limit)
    try:
        parser = MultipartParser(boundary, reader.callbacks())  # a boundary too long is a FormParserError too
        for chunk in _body(request, idle_seconds):
            parser.write(chunk)
        parser.finalize()
        return reader.result()
    except FormParserError as e:
        raise APIError(400, f"Malformed multipart body: {e}.", code="invalid_request", param=FILE_FIELD) from e
    except TooLarge as e:
        raise too_large(limit) from e
    except DiskFull as e:
        raise disk_full() from e
    finally:
        reader.close()  # a finished upload was handed over; anything else is removed here


def _body(request: Request, idle_seconds: float) -> Iterator[bytes]:
    """The request body chunk by chunk, pulled from the event loop into this worker thread as it arrives."""
    stream = request.stream()

    async def next_chunk() -> bytes | None:
        try:
            with anyio.fail_after(idle_seconds):
                return await stream.__anext__()
        except StopAsyncIteration:
            return None

    while True:
        try:
            chunk = anyio.from_thread.run(next_chunk)
        except TimeoutError as e:
            raise APIError(408, f"The upload sent nothing for {idle_seconds:g} seconds; it was cut off.",
                           code="upload_timeout", param=FILE_FIELD) from e  # fmt: skip
        except ClientDisconnect as e:  # nobody reads this answer; `receive_upload` removes the bytes meanwhile
            raise APIError(400, "The client disconnected before the upload ended.", code="client_disconnected",
                           param=FILE_FIELD) from e  # fmt: skip
        if chunk is None:
            return
        if chunk:
            yield chunk


class _Reader:
    """The parser's callbacks: one part at a time, the file into storage, small fields into memory."""

    def __init__(self, storage: Storage, limit: int):
        self.storage, self.limit = storage, limit
        self.fields: dict[str, str] = {}
        self.file: TempFile | None = None
        self.filename: str | None = None
        self.finished: tuple[Path, int, str] | None = None
        self.ended, self.parts = False, 0
        self._header_name, self._header_value, self._headers = b"", b"", {}
        self._name: str | None = None
        self._field = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda data, start, end: self._grow("_header_name", data[start:end]),
            "on_header_value": lambda data, start, end: self._grow("_header_value", data[start:end]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _grow(self, attr: str, data: bytes) -> None:
        setattr(self, attr, getattr(self, attr) + data)

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_PARTS:
            raise APIError(400, f"The upload has more than {MAX_PARTS} parts.", code="invalid_request")
        self._headers, self._name, self._field = {}, None, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_name.strip().lower()] = self._header_value.strip()
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name")
        if name is None:
            raise APIError(400, "A multipart part has no field name.", code="invalid_request")
        self._name = name.decode("utf-8", "replace")
        if self._name == FILE_FIELD:
            if self.file is not None or self.finished is not None:
                raise APIError(400, "Send one file per upload.", code="invalid_request", param=FILE_FIELD)
            raw = options.get(b"filename")
            self.filename = raw.decode("utf-8", "replace") if raw is not None else None
            self.file = self.storage.temp_file(self.limit)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._name == FILE_FIELD:
            self.file.write(data[start:end])
        else:
            self._field += data[start:end]
            if len(self._field) > MAX_FIELD_BYTES:
                raise APIError(400, f"The field '{self._name}' is longer than {MAX_FIELD_BYTES} bytes.",
                               code="invalid_request", param=self._name)  # fmt: skip

    def _part_end(self) -> None:
        if self._name == FILE_FIELD:
            self.finished, self.file = self.file.finish(), None
        elif self._name is not None:
            self.fields[self._name] = self._field.decode("utf-8", "replace")

    def _end(self) -> None:
        self.ended = True

    def result(self) -> Upload:
        if not self.ended:
            raise APIError(400, "The multipart body ended early (no closing boundary).", code="invalid_request",
                           param=FILE_FIELD)  # fmt: skip
        if self.finished is None:
            raise APIError(400, "The upload has no 'file' field.", code="invalid_request", param=FILE_FIELD)
        temp, size, sha256 = self.finished
        upload = Upload(temp, size, sha256, self.filename, self.fields)
        self.finished = None  # handed over: the route removes it
        return upload

    def close(self) -> None:
        if self.file is not None:
            self.file.discard()
        if self.finished is not None:
            self.finished[0].unlink(missing_ok=True)
