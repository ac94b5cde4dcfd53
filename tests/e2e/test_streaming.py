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


def _has_words(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    """Whether the text streamed so far holds `count` words."""
    return lambda events: len(_tokens(events).split()) >= count


def _cursor(event: dict[str, Any]) -> tuple[int, int]:
    """An event id `N` or `N.K` as (rows seen, text offset): ids only ever grow."""
    seq, _, offset = event["id"].partition(".")
    return int(seq), int(offset or 0)


def _rows(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The stored events (not live text, nor a queued reply's estimates), as clients see them."""
    return [e for e in events if e["event"] not in ("token", "estimate")]


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

    first = session_events(server, user, session["id"], follow=True, until=_has_words(20))
    time.sleep(0.5)  # the runner streams on while nobody listens
    second = session_events(server, user, session["id"], after=first[-1]["id"], follow=True, until=_complete)

    cursors = [_cursor(e) for e in first + second if "id" in e]  # an estimate is no step: it has no id
    assert cursors == sorted(set(cursors)), "event ids must only grow: nothing repeats"
    assert [_cursor(e)[0] for e in _rows(first + second)] == list(range(1, len(_rows(first + second)) + 1))
    assert _tokens(second), "the client should have left halfway"
    reply = reply_of(get_session(server, user, session["id"]))
    assert reply["state"] == "complete"
    assert _tokens(first + second) == reply["output"] == echo_of(LONG_MESSAGE)
    # A late reader replays the same rows and the same text, perhaps cut into other pieces.
    late = session_events(server, user, session["id"])
    assert [e["data"] for e in _rows(late)] == [e["data"] for e in _rows(first + second)]
    assert _tokens(late) == reply["output"]


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
        assert _rows(after)[: len(_rows(events))] == _rows(events), f"session {sid} lost events in the restart"
        assert reply_of(get_session(server, user, sid))["output"].startswith(_tokens(events))
        assert [_cursor(e)[0] for e in _rows(after)] == list(range(1, len(_rows(after)) + 1))
    assert _tokens(session_events(server, user, long["id"])) == reply["output"]


@pytest.mark.timeout(120)
def test_a_resume_after_tokens_only_in_memory_when_the_api_was_killed(api_server, runner_process):
    # Text reaches SQL only at the end here: what a follower sees mid-reply is in the API's memory alone.
    # One process: with several, a post that lands on another one makes it store what it has.
    server = api_server(lease_seconds=15, heartbeat_seconds=1, flush_seconds=60, workers=1)
    user = server.user
    runner = runner_process(server, "steady")
    session = create_session(server, user, LONG_MESSAGE, token_delay=0.05, token_progress=0)
    first = session_events(server, user, session["id"], follow=True, until=_has_words(20))
    seen = _tokens(first)
    (stored,) = server.sql("SELECT i.output FROM interactions i JOIN tasks t ON t.interaction_id = i.id "
                           "WHERE t.session_id = :s", s=session["id"])
    assert len(stored[0]) < len(seen), "the follower should have text that only the API's memory held"

    assert server.kill() == -signal.SIGKILL
    server.start()
    # The runner resends what the API had not stored; the follower picks up at its offset.
    rest = session_events(server, user, session["id"], after=first[-1]["id"], follow=True, until=_complete)
    reply = wait_for_reply(server, user, session["id"], 60)
    assert reply["state"] == "complete" and reply["task"]["attempt"] == 1
    assert reply["output"] == echo_of(LONG_MESSAGE) and runner.proc.poll() is None
    assert seen + _tokens(rest) == reply["output"]
    assert _tokens(session_events(server, user, session["id"])) == reply["output"]


def _session_ids(server, headers) -> list[int]:
    response = requests.get(f"{server.url}/api/v1/sessions", headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return [s["id"] for s in response.json()["sessions"]]
