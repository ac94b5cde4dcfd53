"""A user's client of a remote Helix API (HELIX_API_URL, HELIX_API_KEY): JSON calls, files, the event stream.

What the user CLI (user_cli.py) talks through. Every failure is a `RemoteError` whose message is one
line a person can act on; the event stream resumes after a dropped connection with `Last-Event-ID`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 10.0
# An event stream sends a keepalive every 15 s: a read this long without one means the line is dead.
READ_TIMEOUT = 60.0
RECONNECTS = 8


class RemoteError(Exception):
    """A call to the API failed; the message says why in one line."""


@dataclass(frozen=True)
class Event:
    """One server-sent event: its id (`N` or `N.K`), its name and its JSON data."""

    id: str | None
    event: str
    data: dict[str, Any]


class Remote:
    """One user's session with the API at `url`, authenticated by an API key."""

    def __init__(self, url: str, key: str) -> None:
        self.url = url.rstrip("/")
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        self.http.headers["User-Agent"] = "helix-cli"

    def close(self) -> None:
        """Close the connections."""
        self.http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON answer of `method path`; a RemoteError for anything but a 2xx."""
        response = self._send(method, path, **kwargs)
        return response.json() if response.content else None

    def download(self, path: str, dest: Path) -> Path:
        """Write the bytes at `path` to `dest`."""
        with self._send("GET", path, stream=True) as response:
            dest.parent.mkdir(parents=True, exist_ok=True)
            with dest.open("wb") as out:
                for chunk in response.iter_content(1024 * 1024):
                    out.write(chunk)
        return dest

    def events(self, session_id: int, after: str | None = None) -> Iterator[Event]:
        """A session's events after event id `after`, live; reconnects resume from the last id seen."""
        last, failures = after, 0
        while True:
            headers = {"Last-Event-ID": last} if last else {}
            try:
                with self._send("GET", f"/api/v1/sessions/{session_id}/events", headers=headers,
                                stream=True) as response:
                    for event in _parse(response.iter_lines(decode_unicode=True)):
                        failures = 0
                        if event.id:
                            last = event.id
                        yield event
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    RemoteError) as exc:
                if isinstance(exc, RemoteError) and "cannot reach" not in str(exc):
                    raise
                failures += 1
                if failures > RECONNECTS:
                    raise RemoteError(f"the event stream of session {session_id} keeps dropping: {exc}") from None
                logger.info("event stream dropped (%s); resuming after %s", exc, last)
                time.sleep(min(0.5 * 2 ** failures, 10.0))

    def _send(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        kwargs.setdefault("timeout", (CONNECT_TIMEOUT, READ_TIMEOUT))
        try:
            response = self.http.request(method, self.url + path, **kwargs)
        except requests.ConnectionError as exc:
            raise RemoteError(f"cannot reach the Helix API at {self.url}: {_reason(exc)}") from None
        except requests.Timeout:
            raise RemoteError(f"the Helix API at {self.url} did not answer in time") from None
        if response.status_code >= 400:
            raise RemoteError(_error_line(response))
        return response


def _reason(exc: Exception) -> str:
    """What went wrong with a connection, without urllib3's wrapping ("Connection refused")."""
    found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(exc))
    return found.group(1).strip() if found else "the connection failed"


def _error_line(response: requests.Response) -> str:
    """An error answer as one line: the API's message and code, else the status."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):  # the OpenAI shape (/v1)
        body = {"error": body["error"].get("code") or body["error"].get("type"),
                "message": body["error"].get("message")}
    if isinstance(body, dict) and body.get("message"):
        message = " ".join(str(body["message"]).split())
        return f"{message} ({response.status_code} {body.get('error', 'error')})"
    return f"the API answered {response.status_code} {response.reason}"


def _parse(lines: Iterator[str]) -> Iterator[Event]:
    """Server-sent events from the stream's lines (comments, such as keepalives, skipped)."""
    event_id, name, data = None, "message", []
    for line in lines:
        if line == "":
            if data:
                try:
                    payload = json.loads("\n".join(data))
                except ValueError:
                    payload = {"raw": "\n".join(data)}
                yield Event(event_id, name, payload if isinstance(payload, dict) else {"value": payload})
            event_id, name, data = None, "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "id":
            event_id = value
        elif field == "event":
            name = value
        elif field == "data":
            data.append(value)
