"""What views send besides JSON: Server-Sent Event streams and stored files."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from flask import Response, send_file, stream_with_context


def event_stream(body: Iterator[str], headers: Mapping[str, str] | None = None) -> Response:
    """`body` sent as Server-Sent Events while it is made, past proxies' caches and buffers."""
    return Response(stream_with_context(body), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})})


def stored_file(row: Any, handle: BinaryIO, *, attachment: bool) -> Response:
    """A stored file's bytes under its name and type, never cached; `attachment` makes it a download."""
    return send_file(handle, mimetype=row.content_type, download_name=row.name, as_attachment=attachment,
                     max_age=0)


def owner_file(row: Any, handle: BinaryIO) -> Response:
    """A file for its owner: images inline (a browser shows them), the rest as downloads."""
    return stored_file(row, handle, attachment=not row.content_type.startswith("image/"))
