"""Streaming and durability end to end: SSE clients that reconnect, and an API that restarts."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from tests.e2e.client import (
    create_session,
    echo_of,
    get_session,
    reply_of,
    session_events,
    wait_for_reply,
    wait_for_session,
)

pytestmark = pytest.mark.slow

LONG_MESSAGE = " ".join(f"token{i:03d}" for i in range(80))


def _complete(events: list[dict[str, Any]]) -> bool:
    """Whether the last event says the reply is complete."""
    return events[-1]["event"] == "state" and events[-1]["data"]["state"] == "complete"


def _has_tokens(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    """Whether `count` tokens have come."""
    return lambda events: sum(e["event"] == "token" for e in events) >= count


def _tokens(events: list[dict[str, Any]]) -> str:
    """The reply's text as streamed: the tokens of its last attempt, in order."""
    tokens = [e["data"] for e in events if e["event"] == "token"]
    last = max((t["attempt"] for t in tokens), default=0)
    return "".join(t["text"] for t in tokens if t["attempt"] == last)


@pytest.mark.timeout(90)
def test_sse_client_that_reconnects_with_last_event_id_loses_no_text(api_server, runner_process):
    server = api_server()
    user = server.user
    session = create_session(server, user, LONG_MESSAGE, token_delay=0.03)
    runner_process(server, "streamer")

    first = session_events(server, user, session["id"], follow=True, until=_has_tokens(20))
    time.sleep(0.5)  # the runner streams on while nobody listens
    second = session_events(server, user, session["id"], after=first[-1]["id"], follow=True, until=_complete)

    ids = [e["id"] for e in first + second]
    assert ids == list(range(1, len(ids) + 1)), "event ids must run on without gaps or repeats"
    first_tokens = [e for e in first if e["event"] == "token"]
    second_tokens = [e for e in second if e["event"] == "token"]
    assert len(first_tokens) == 20 and second_tokens, "the client should have left halfway"
    reply = reply_of(get_session(server, user, session["id"]))
    assert reply["state"] == "complete"
    assert _tokens(first + second) == reply["output"] == echo_of(LONG_MESSAGE)
    assert len(first_tokens) + len(second_tokens) == len(LONG_MESSAGE.split())
    # What a late reader replays from the start is exactly what the live reader saw.
    assert [e["data"] for e in session_events(server, user, session["id"])] == [e["data"] for e in first + second]


@pytest.mark.timeout(120)
def test_api_restart_loses_nothing(api_server, runner_process):
    # A lease longer than the restart: the runner keeps its task through the API's absence.
    server = api_server(lease_seconds=15, heartbeat_seconds=1)
    user = server.user
    runner = runner_process(server, "steady")
    finished = create_session(server, user, "finished before the restart")
    assert wait_for_reply(server, user, finished["id"], 20)["state"] == "complete"
    long = create_session(server, user, LONG_MESSAGE, token_delay=0.05)
    wait_for_session(server, user, long["id"], lambda s: reply_of(s)["output"], 20, "the reply to stream")

    sessions = _session_ids(server, user)
    before = {sid: session_events(server, user, sid) for sid in sessions}
    mid_task = reply_of(get_session(server, user, long["id"]))
    assert mid_task["state"] == "running" and mid_task["output"] != echo_of(LONG_MESSAGE)
    assert server.stop(signal.SIGTERM) == 0
    server.start()

    reply = wait_for_reply(server, user, long["id"], 60)
    assert reply["state"] == "complete", reply
    assert reply["output"] == echo_of(LONG_MESSAGE)
    # The same runner carried on with the same lease: no second attempt was needed.
    assert reply["task"]["attempt"] == 1
    assert reply["result"]["runner_pid"] == runner.pid and runner.proc.poll() is None
    assert server.sql("SELECT status, attempt, runner FROM tasks ORDER BY id") == [
        ("complete", 1, "steady"), ("complete", 1, "steady")]
    assert _session_ids(server, user) == sessions
    for sid, events in before.items():
        after = session_events(server, user, sid)
        assert after[: len(events)] == events, f"session {sid} lost events in the restart"
        assert [e["id"] for e in after] == list(range(1, len(after) + 1))
    streamed = session_events(server, user, long["id"])
    assert _tokens(streamed) == reply["output"]
    tokens = [e["data"]["text"] for e in streamed if e["event"] == "token"]
    assert tokens == [w + " " for w in LONG_MESSAGE.split()[:-1]] + LONG_MESSAGE.split()[-1:]


def _session_ids(server, headers) -> list[int]:
    response = requests.get(f"{server.url}/api/v1/sessions", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return [s["id"] for s in response.json()["sessions"]]
