"""uvicorn's HTTP protocol, answering the requests its parser refuses in OpenAI's error shape.

A request uvicorn cannot parse (a NUL or another control byte in a header, a malformed request line) never reaches
the app: uvicorn answers `400 Invalid HTTP request received.` in plain text and closes the connection. The parser is
right to refuse it (a header with a NUL is how request smuggling starts), so it stays; only that answer is ours, as
JSON in OpenAI's shape with a code, like every other error of the API. Run the API with it:

    uvicorn api.main:app --http api.http:OpenAIErrorsHTTP

(the launcher, the images and docker-compose do). The same parser answers, whichever uvicorn picked: httptools
where it is installed, else h11.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol

from api.errors import error_body

MESSAGE = ("Invalid HTTP request: the request line or a header is malformed (for instance a NUL or another control "
           "character in a header).")  # fmt: skip


class OpenAIErrorsHTTP(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
    def send_400_response(self, msg: str) -> None:
        body = json.dumps(error_body(400, MESSAGE, "invalid_http_request", None)).encode()
        head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))  # fmt: skip
        self.transport.write(head + body)
        self.transport.close()
