"""Leases end to end: runners that die, hang or crash never lose a task nor finish one twice."""

from __future__ import annotations

import re
import signal
import time

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
from tests.e2e.processes import CLAIM_PARAMS, CLAIM_PATH

pytestmark = pytest.mark.slow

MESSAGE = " ".join(f"word{i:02d}" for i in range(30))
# Tokens, progress and logs: what runners post (state events are the API's own).
RUNNER_EVENTS_OF_ATTEMPT_1 = "SELECT count(*) FROM task_events WHERE attempt = 1 AND kind <> 'state'"


def _streaming(server, headers, session_id: int, attempt: int = 1) -> dict:
    """Wait until the reply streams output on `attempt`; the reply as it was then."""
    def streaming(session: dict) -> bool:
        reply = reply_of(session)
        return reply["state"] == "running" and reply["task"]["attempt"] == attempt and bool(reply["output"])
    return reply_of(wait_for_session(server, headers, session_id, streaming, 30, f"to stream on attempt {attempt}"))


def _state_events(server, headers, session_id: int) -> list[dict]:
    return [e["data"] for e in session_events(server, headers, session_id) if e["event"] == "state"]


@pytest.mark.timeout(120)
def test_kill_9_mid_task_completes_exactly_once_on_the_other_runner(api_server, runner_process):
    server = api_server(lease_seconds=3, heartbeat_seconds=1)
    user = server.user
    session = create_session(server, user, MESSAGE, token_delay=0.05)
    runner_a = runner_process(server, "runner-a")
    partial = _streaming(server, user, session["id"])["output"]

    runner_a.signal(signal.SIGKILL)
    assert runner_a.wait(10) == -signal.SIGKILL
    runner_b = runner_process(server, "runner-b")

    reply = wait_for_reply(server, user, session["id"], 60)
    assert reply["state"] == "complete", reply
    assert reply["output"] == echo_of(MESSAGE)
    assert echo_of(MESSAGE).startswith(partial) and partial != echo_of(MESSAGE)
    assert reply["task"]["attempt"] == 2
    assert reply["result"]["runner_pid"] == runner_b.pid
    assert server.sql("SELECT status, attempt, runner FROM tasks") == [("complete", 2, "runner-b")]
    states = _state_events(server, user, session["id"])
    assert [s["state"] for s in states].count("complete") == 1
    assert [s["state"] for s in states] == ["queued", "running", "queued", "running", "complete"]
    assert "lease expired" in states[2]["reason"] and "runner-a" in states[2]["reason"]


@pytest.mark.timeout(120)
def test_sigstopped_runner_gets_409_when_it_resumes_and_its_late_work_is_not_stored(
        api_server, runner_process):
    server = api_server(lease_seconds=3, heartbeat_seconds=1)
    user = server.user
    session = create_session(server, user, MESSAGE, token_delay=0.1)
    # DEBUG makes urllib3 log each request with its status, so the 409 itself is in the log.
    runner_a = runner_process(server, "runner-a", log_level="DEBUG")
    _streaming(server, user, session["id"])
    runner_a.signal(signal.SIGSTOP)
    time.sleep(0.3)  # a post A sent just before it froze is stored by now
    attempt_1_events = server.sql(RUNNER_EVENTS_OF_ATTEMPT_1)[0][0]

    runner_b = runner_process(server, "runner-b")
    _streaming(server, user, session["id"], attempt=2)
    # A wakes up while B is streaming the same task: A's calls must bounce off B's lease.
    runner_a.signal(signal.SIGCONT)
    runner_a.wait_for_log("lease lost; dropped", 30, "runner A to notice its lost lease")

    reply = wait_for_reply(server, user, session["id"], 60)
    assert reply["state"] == "complete", reply
    assert reply["output"] == echo_of(MESSAGE)
    assert reply["result"]["runner_pid"] == runner_b.pid
    assert reply["task"]["attempt"] == 2
    assert server.sql("SELECT status, attempt, runner FROM tasks") == [("complete", 2, "runner-b")]
    task_id = reply["task"]["id"]
    log = runner_a.log_text()
    assert re.search(rf'"POST {CLAIM_PATH}/{task_id}/(heartbeat|events) HTTP/1\.1" 409', log), log[-3000:]
    assert not re.search(rf'"POST {CLAIM_PATH}/{task_id}/complete HTTP/1\.1" 200', log)
    # B got the task only once A's lease ran out, and nothing A sent after that was stored.
    states = _state_events(server, user, session["id"])
    assert [s["state"] for s in states] == ["queued", "running", "queued", "running", "complete"]
    assert "lease expired" in states[2]["reason"] and "runner-a" in states[2]["reason"]
    assert server.sql(RUNNER_EVENTS_OF_ATTEMPT_1)[0][0] == attempt_1_events
    assert runner_a.proc.poll() is None  # and A lives on, ready for the next task


@pytest.mark.timeout(60)
def test_late_runner_gets_409_lease_lost_and_its_result_is_not_stored(api_server):
    server = api_server(lease_seconds=1, heartbeat_seconds=0.5)
    user = server.user
    runner = server.runner_headers
    session = create_session(server, user, "hello there")
    worker = f"{server.url}{CLAIM_PATH}"

    first = requests.get(worker, params=CLAIM_PARAMS, headers={**runner, "X-Helix-Runner": "late"}, timeout=10)
    assert first.status_code == 200, first.text
    task_id, late_lease = first.json()["task"]["id"], first.json()["lease"]["token"]
    time.sleep(1.5)
    # Nobody took the task over yet: an expired lease alone is enough to refuse the result.
    refused = requests.post(f"{worker}/{task_id}/complete", headers=runner, timeout=10,
                            json={"lease_token": late_lease, "result": {"text": "late"}})
    assert refused.status_code == 409 and refused.json()["error"] == "lease_lost"
    assert reply_of(get_session(server, user, session["id"]))["output"] == ""

    second = requests.get(worker, params=CLAIM_PARAMS, headers={**runner, "X-Helix-Runner": "fresh"},
                          timeout=10)
    assert second.status_code == 200, second.text
    assert second.json()["task"]["id"] == task_id and second.json()["task"]["attempt"] == 2
    fresh_lease = second.json()["lease"]["token"]
    for action, body in (("heartbeat", {}), ("events", {"events": [{"seq": 1, "kind": "token", "text": "x"}]}),
                         ("complete", {"result": {"text": "late"}})):
        response = requests.post(f"{worker}/{task_id}/{action}", headers=runner, timeout=10,
                                 json={"lease_token": late_lease, **body})
        assert response.status_code == 409 and response.json()["error"] == "lease_lost", (action, response.text)
    done = requests.post(f"{worker}/{task_id}/complete", headers=runner, timeout=10,
                         json={"lease_token": fresh_lease, "result": {"text": "fresh"}})
    assert done.status_code == 200, done.text
    late_again = requests.post(f"{worker}/{task_id}/complete", headers=runner, timeout=10,
                               json={"lease_token": late_lease, "result": {"text": "late"}})
    assert late_again.status_code == 409

    reply = reply_of(get_session(server, user, session["id"]))
    assert (reply["state"], reply["output"], reply["result"]) == ("complete", "fresh", {"text": "fresh"})
    assert server.sql("SELECT status, attempt, runner FROM tasks") == [("complete", 2, "fresh")]


@pytest.mark.timeout(60)
def test_task_that_always_crashes_the_backend_ends_dead_after_exactly_3_attempts(api_server, runner_process):
    server = api_server(max_attempts=3)
    user = server.user
    session = create_session(server, user, "crash please")
    runner_process(server, "crasher", backend="tests.doubles:CrashBackend")

    reply = wait_for_reply(server, user, session["id"], 40)
    assert reply["state"] == "error"
    assert "boom" in reply["error"]
    assert reply["task"]["attempt"] == 3
    assert server.sql("SELECT status, attempt, runner FROM tasks") == [("dead", 3, "crasher")]
    time.sleep(0.5)  # a dead task stays dead: no fourth attempt comes along
    assert server.sql("SELECT status, attempt FROM tasks") == [("dead", 3)]
    states = [s["state"] for s in _state_events(server, user, session["id"])]
    assert states == ["queued", "running", "queued", "running", "queued", "running", "error"]
