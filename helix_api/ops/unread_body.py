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
from collections.abc import Callable, Iterable
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
        if not _has_body(environ):
            return self.app(environ, start_response)

        def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            self._drain(environ)
            return start_response(status, headers, exc_info)

        return self.app(environ, start)

    def _drain(self, environ: dict[str, Any]) -> None:
        stream = environ.get("wsgi.input")
        if stream is None:
            return
        drained = 0
        try:
            while drained <= self.limit:
                chunk = stream.read(_CHUNK)
                if not chunk:
                    return
                drained += len(chunk)
        except (OSError, ValueError):  # the client went away, or the stream was closed: nothing to keep
            return
        logger.warning("%s %s: over %d bytes of its body left unread; the connection will close",
                       environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"), self.limit)


def _has_body(environ: dict[str, Any]) -> bool:
    """Whether the request says it carries a body (a length above 0, or chunks)."""
    if "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower():
        return True
    try:
        return int(environ.get("CONTENT_LENGTH") or 0) > 0
    except ValueError:
        return False
