"""Reading what a refused request sent, so that its answer arrives and its connection stays usable.

A request refused before its body is read (a 413 for a JSON body over MAX_CONTENT_LENGTH, a 401, a 404)
leaves that body on the socket. gunicorn's gthread worker drains at most 64 KiB of it after answering
(`_DRAIN_MAX_BYTES` in gunicorn.http.parser) and otherwise closes the connection, though the answer
went out as keep-alive: the client reuses the connection and its next request finds it closed, with no
answer at all; and a socket closed with unread bytes sends a reset that can destroy the answer already
sent. Measured on `helix serve` with 8 keep-alive clients (December 2026): refused JSON bodies of 29
bytes got 6,597 answers out of 6,597; bodies of 1.2-2 MB (413) lost 24 answers in 1,949; mixed, 189 of
4,432 requests (most of them small ones sent after a 413 on the same connection) got none.

So the body is read and dropped here, before the answer starts, up to DRAIN_LIMIT; beyond that the
client is sending far more than any request may carry and the connection is lost as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

DRAIN_LIMIT = 64 * 1024 * 1024  # the most of an unread body read to keep its connection answering
_CHUNK = 64 * 1024


class DrainUnreadBody:
    """WSGI middleware: whatever of the request body the app left unread is read before the answer starts."""

    def __init__(self, app: Callable[..., Iterable[bytes]], limit: int = DRAIN_LIMIT) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = _length(environ)
        terminated = bool(environ.get("wsgi.input_terminated"))
        if not (length or terminated) or environ.get("wsgi.input") is None:
            return self.app(environ, start_response)
        # Counted, so that no read goes past the body: a server may hand over the socket itself.
        body = environ["wsgi.input"] = _Counted(environ["wsgi.input"])

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self._drain(environ, body, length)
            return start_response(status, headers, exc_info)

        return self.app(environ, start)

    def _drain(self, environ: dict[str, Any], body: _Counted, length: int | None) -> None:
        left = self.limit + 1 if length is None else length - body.count  # None: read to the end it marks
        try:
            while left > 0 and body.count <= self.limit:
                chunk = body.read(min(_CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
        except (OSError, ValueError):  # the client went away, or the stream was closed: nothing to keep
            return
        if left > 0:
            logger.warning("%s %s: over %d bytes of its body left unread; the connection will close",
                           environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), self.limit)


class _Counted:
    """A request's input stream that counts the bytes read from it."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.count = 0

    def read(self, *args: Any) -> bytes:
        data = self._stream.read(*args)
        self.count += len(data)
        return data

    def read1(self, *args: Any) -> bytes:
        data = getattr(self._stream, "read1", self._stream.read)(*args)
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        # Not every server's stream has it (gunicorn's has not); a reader may expect it of a file.
        inner = getattr(self._stream, "readinto", None)
        if inner is not None:
            size = inner(buffer) or 0
        else:
            data = self._stream.read(len(buffer))
            size = len(data)
            buffer[:size] = data
        self.count += size
        return size

    def readline(self, *args: Any) -> bytes:
        data = self._stream.readline(*args)
        self.count += len(data)
        return data

    def readlines(self, *args: Any) -> list[bytes]:
        lines = self._stream.readlines(*args)
        self.count += sum(len(line) for line in lines)
        return lines

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _length(environ: dict[str, Any]) -> int | None:
    """The body's declared length, when above 0."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return None
    return length if length > 0 else None
