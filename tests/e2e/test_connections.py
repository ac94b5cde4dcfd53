"""`helix serve` answers every request on a keep-alive connection, refused bodies too (helix_api/ops/unread_body.py)."""

from __future__ import annotations

import json
import socket

import pytest

from tests.e2e.processes import SQLITE_ONLY

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120), SQLITE_ONLY]


def _request(path: str, body: bytes, key: str) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """One response read off the socket: its status and body; (0, b"") when the server closed instead."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return 0, b""
        if not chunk:
            return 0, b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(65536)
    return int(head.split(b" ", 2)[1]), body


def test_a_body_refused_unread_still_leaves_the_connection_answering(api_server):
    server = api_server()
    too_big = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 1_200_000}]}).encode()
    refused = json.dumps({"model": 5, "messages": "x"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        # Over MAX_CONTENT_LENGTH: a 413 before the body is read. gunicorn alone drains 64 KiB of what is
        # left and then closes the connection it has just answered as keep-alive.
        sock.sendall(_request("/v1/chat/completions", too_big, server.api_key))
        status, _ = _response(sock)
        assert status == 413
        # The same connection, as a keep-alive client reuses it: answered, not closed.
        for path in ("/v1/chat/completions", "/v1/images/generations"):
            sock.sendall(_request(path, refused, server.api_key))
            status, body = _response(sock)
            assert status == 400, (path, status, body[:300])
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
