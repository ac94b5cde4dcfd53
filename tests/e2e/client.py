"""The user API as a client calls it, against a running `helix serve`: sessions, messages, files, events."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import requests

from helix_api.vocabulary import FINAL_INTERACTION_STATES
from tests.conftest import TEXT_MODEL
from tests.e2e.processes import ApiServer, wait_for


def create_session(server: ApiServer, headers: dict[str, str], message: str, *, model: Path | str = TEXT_MODEL,
                   type_: str = "text", http: requests.Session | None = None, **params: Any) -> dict[str, Any]:
    """POST /api/v1/sessions (a chat, or an image with `type_="image"`); the new session."""
    response = (http or requests).post(f"{server.url}/api/v1/sessions", headers=headers, timeout=30,
                                       json={"mode": "create", "type": type_, "model_name": str(model),
                                             "message": message, "params": params})
    assert response.status_code == 201, response.text
    return response.json()


def create_finetune(server: ApiServer, model: Path | str, files: list[tuple[str, tuple[str, bytes, str]]], *,
                    type_: str = "text", **params: Any) -> dict[str, Any]:
    """POST a fine-tune as alice: `files` are the multipart parts, `params` (if any) go as JSON; the new session."""
    data = {"mode": "finetune", "type": type_, "model_name": str(model)}
    if params:
        data["params"] = json.dumps(params)
    response = requests.post(f"{server.url}/api/v1/sessions", headers=server.user, timeout=60, data=data,
                             files=files)
    assert response.status_code == 201, response.text
    return response.json()


def send_message(server: ApiServer, headers: dict[str, str], session_id: int, message: str,
                 **params: Any) -> dict[str, Any]:
    """POST the session's next message; the session."""
    response = requests.post(f"{server.url}/api/v1/sessions/{session_id}/messages", headers=headers, timeout=30,
                             json={"message": message, "params": params})
    assert response.status_code == 201, response.text
    return response.json()


def cancel_session(server: ApiServer, headers: dict[str, str], session_id: int) -> None:
    """POST the session's cancel."""
    response = requests.post(f"{server.url}/api/v1/sessions/{session_id}/cancel", headers=headers, timeout=30)
    assert response.status_code == 200, response.text


def fetch(server: ApiServer, headers: dict[str, str], path: str) -> requests.Response:
    """GET a path of the API (a file's `url`, say) as whoever `headers` authenticate."""
    return requests.get(f"{server.url}{path}", headers=headers, timeout=30)


def openai_client(server: ApiServer, key: str | None = None) -> Any:
    """The official `openai` client on the server's /v1, as alice unless given another key."""
    import openai

    # No retries: each call must succeed or fail on its own.
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or server.api_key, max_retries=0, timeout=120)


def get_session(server: ApiServer, headers: dict[str, str], session_id: int) -> dict[str, Any]:
    """GET one session."""
    response = requests.get(f"{server.url}/api/v1/sessions/{session_id}", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def reply_of(session: dict[str, Any]) -> dict[str, Any]:
    """The session's last interaction (the reply)."""
    return session["interactions"][-1]


def wait_for_session(server: ApiServer, headers: dict[str, str], session_id: int,
                     check: Callable[[dict[str, Any]], Any], timeout: float, what: str) -> dict[str, Any]:
    """Poll a session until `check(session)` is truthy; the session then. `what` names the wait in a failure."""
    def ready() -> dict[str, Any] | None:
        session = get_session(server, headers, session_id)
        return session if check(session) else None
    return wait_for(ready, timeout, f"session {session_id}: {what}", interval=0.1)


def wait_for_reply(server: ApiServer, headers: dict[str, str], session_id: int, timeout: float,
                   states: Collection[str] = FINAL_INTERACTION_STATES) -> dict[str, Any]:
    """The last reply of a session once it reaches one of `states` (by default, once it has ended)."""
    session = wait_for_session(server, headers, session_id, lambda s: reply_of(s)["state"] in states, timeout,
                               f"its reply to reach {sorted(map(str, states))}")
    return reply_of(session)


def echo_of(message: str) -> str:
    """What EchoBackend answers to `message`."""
    return " ".join(message.split())


def session_events(server: ApiServer, headers: dict[str, str], session_id: int, *, after: str | None = None,
                   follow: bool = False, until: Callable[[list[dict[str, Any]]], bool] | None = None,
                   timeout: float = 30) -> list[dict[str, Any]]:
    """A session's Server-Sent Events: those stored so far, or with `follow=True` live until `until(events)`.

    `after` is sent as Last-Event-ID, as a reconnecting client does; `timeout` is the longest wait for a byte.
    """
    resume = {"Last-Event-ID": str(after)} if after is not None else {}
    events: list[dict[str, Any]] = []
    with requests.get(f"{server.url}/api/v1/sessions/{session_id}/events", headers={**headers, **resume},
                      params={"follow": "1" if follow else "0"}, stream=True, timeout=(5, timeout)) as response:
        assert response.status_code == 200, response.text
        assert response.headers["Content-Type"].startswith("text/event-stream")
        for event in read_sse(response):
            events.append(event)
            if until is not None and until(events):
                break
    return events


def read_sse(response: requests.Response) -> Iterator[dict[str, Any]]:
    """Parse a Server-Sent Events stream into {"id", "event", "data"} dicts as they arrive."""
    event: dict[str, Any] = {}
    for raw in response.iter_lines(chunk_size=None, decode_unicode=True):
        line = raw.rstrip("\r") if raw is not None else ""
        if not line:
            if "data" in event:
                event["data"] = json.loads(event["data"])
                yield event
            event = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "data" and "data" in event:
            event["data"] += "\n" + value
        elif key in ("id", "event", "data"):
            event[key] = value
