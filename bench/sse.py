"""A Server-Sent Events client over a bare socket, lean enough to read tens of thousands of events a second.

`http.client` hands a chunked body back one chunk per `read1()` call, with several Python calls per
chunk, and a thread per stream pays a GIL hand-over per event. Here the caller reads the socket
(one thread waits on many streams with a selector), each `recv()` takes whatever arrived, chunk
framing is stripped in one pass, and the events come out as the raw blocks between blank lines.
"""

from __future__ import annotations

import socket


class Refused(RuntimeError):
    """The server answered the stream's request with something other than 200."""


class Dechunker:
    """Strips HTTP/1.1 chunked framing from a body that arrives in arbitrary pieces."""

    def __init__(self) -> None:
        self.raw = b""
        self.left = 0  # bytes of the current chunk still to come, its closing CRLF included
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The payload bytes `data` completes (framing removed); keeps a partial size line for later."""
        raw, pos, out = self.raw + data if self.raw else data, 0, []
        while not self.done:
            if self.left == 0:
                end = raw.find(b"\r\n", pos)
                if end < 0:
                    break
                size = int(raw[pos:end].split(b";", 1)[0], 16)
                pos = end + 2
                if size == 0:
                    self.done = True
                    break
                self.left = size + 2
            take = min(self.left, len(raw) - pos)
            if take == 0:
                break
            payload = min(take, max(self.left - 2, 0))
            if payload:
                out.append(raw[pos:pos + payload])
            pos += take
            self.left -= take
        self.raw = raw[pos:]
        return b"".join(out)


class Stream:
    """One `GET` of an event stream: `open()` it (blocking), then `feed()` it what its socket reads.

    The caller owns the reading, so one thread can wait on many streams with a selector.
    """

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str], timeout: float) -> None:
        self.host, self.port, self.path, self.headers, self.timeout = host, port, path, headers, timeout
        self.sock: socket.socket | None = None
        self.status = 0
        self._body = b""
        self._buf = b""
        self._dechunk: Dechunker | None = None

    def open(self) -> None:
        """Connect, send the request and read the answer's head; Refused unless it is a 200."""
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        lines = [f"GET {self.path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 *(f"{k}: {v}" for k, v in self.headers.items()), "", ""]
        sock.sendall("\r\n".join(lines).encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                raise Refused(f"the server closed the connection before answering {self.path}")
            head += data
        head, self._body = head.split(b"\r\n\r\n", 1)
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        self.status = int(status_line.split()[1])
        fields = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        if "chunked" in fields.get("transfer-encoding", "").lower():
            self._dechunk = Dechunker()
        if self.status != 200:
            raise Refused(f"GET {self.path} answered {self.status}: {self._body[:300]!r}")

    def feed(self, data: bytes) -> list[bytes]:
        """The event blocks (fields, without the blank line) that `data`, the next bytes read, completes."""
        if self._dechunk is not None:
            data = self._dechunk.feed(data)
        if not data:
            return []
        self._buf += data.replace(b"\r\n", b"\n") if b"\r" in data else data
        *blocks, self._buf = self._buf.split(b"\n\n")
        return blocks

    def pending(self) -> list[bytes]:
        """The event blocks that arrived with the answer's head."""
        data, self._body = self._body, b""
        return self.feed(data) if data else []

    @property
    def ended(self) -> bool:
        """Whether the body's last chunk came (a body that is not chunked ends when the socket closes)."""
        return self._dechunk is not None and self._dechunk.done

    def close(self) -> None:
        """Hang up."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def fields(block: bytes) -> tuple[bytes | None, bytes | None, bytes | None]:
    """(id, event, data) of one event block; a comment block (`: keepalive`) gives three Nones."""
    event_id = event = data = None
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]  # one space after the colon is not data
            data = value if data is None else data + b"\n" + value
        elif line.startswith(b"id:"):
            event_id = line[3:].strip()
        elif line.startswith(b"event:"):
            event = line[6:].strip()
    return event_id, event, data
