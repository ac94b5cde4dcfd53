"""Claiming end to end: many concurrent claimers, long-polls that wake at once, and queue priority."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.conftest import TEXT_MODEL
from tests.e2e.client import create_session, echo_of, get_session, reply_of, send_message, wait_for_reply
from tests.e2e.processes import CLAIM_PARAMS, CLAIM_PATH

pytestmark = pytest.mark.slow

TASKS = 2000
CLAIMERS = 16


@pytest.mark.timeout(240)
def test_16_concurrent_claimers_claim_each_of_2000_tasks_exactly_once(api_server):
    server = api_server(lease_seconds=120)
    user = server.user
    runner = server.runner_headers

    started = time.monotonic()
    local = threading.local()

    def create(i: int) -> int:
        if not hasattr(local, "http"):
            local.http = requests.Session()
        return create_session(server, user, f"task {i}", http=local.http)["id"]

    with ThreadPoolExecutor(8) as pool:
        session_ids = list(pool.map(create, range(TASKS)))
    created_in = time.monotonic() - started
    assert len(set(session_ids)) == TASKS
    assert created_in < 60, f"creating {TASKS} sessions took {created_in:.1f}s"
    assert server.sql("SELECT count(*) FROM tasks WHERE status = 'queued'") == [(TASKS,)]

    claimed: list[tuple[int, int]] = []  # (claimer, task id)
    empty_polls = Counter()
    lock = threading.Lock()
    errors: list[str] = []
    go = threading.Barrier(CLAIMERS)
    deadline = time.monotonic() + 150

    def claimer(number: int) -> None:
        http = requests.Session()
        http.headers.update({**runner, "X-Helix-Runner": f"claimer-{number}"})
        go.wait()
        try:
            while time.monotonic() < deadline:
                response = http.get(f"{server.url}{CLAIM_PATH}", params=CLAIM_PARAMS, timeout=30)
                if response.status_code == 204:
                    with lock:
                        empty_polls[number] += 1
                        if len(claimed) >= TASKS:
                            return
                    # On PostgreSQL a claimer skips rows others are locking: 204 need not mean empty.
                    time.sleep(0.02)
                    continue
                assert response.status_code == 200, response.text
                body = response.json()
                task_id = body["task"]["id"]
                with lock:
                    claimed.append((number, task_id))
                done = http.post(f"{server.url}{CLAIM_PATH}/{task_id}/complete", timeout=30,
                                 json={"lease_token": body["lease"]["token"],
                                       "result": {"text": f"done by {number}"}})
                assert done.status_code == 200, done.text
        except Exception as exc:  # reported on the main thread
            errors.append(f"claimer {number}: {exc!r}")
        finally:
            http.close()

    started = time.monotonic()
    threads = [threading.Thread(target=claimer, args=(n,)) for n in range(CLAIMERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    claimed_in = time.monotonic() - started

    assert not errors, errors
    ids = Counter(task_id for _, task_id in claimed)
    duplicates = {task_id: n for task_id, n in ids.items() if n > 1}
    assert not duplicates, f"tasks claimed more than once: {duplicates}"
    assert len(ids) == TASKS
    assert len({number for number, _ in claimed}) == CLAIMERS, "every claimer should have won some tasks"
    rows = server.sql("SELECT status, count(*), min(attempt), max(attempt) FROM tasks GROUP BY status")
    assert rows == [("complete", TASKS, 1, 1)]
    print(f"created {TASKS} sessions in {created_in:.1f}s; claimed and completed them in {claimed_in:.1f}s "
          f"({sum(empty_polls.values())} empty polls)")


@pytest.mark.timeout(60)
def test_long_polling_runner_gets_a_new_task_at_once(api_server, runner_process):
    # Slow re-checks: only a wake-up, not the safety-net timer, can make the claim this fast.
    server = api_server(recheck_seconds=5)
    user = server.user

    box: dict = {}

    def long_poll() -> None:
        started = time.monotonic()
        box["response"] = requests.get(f"{server.url}{CLAIM_PATH}", params={**CLAIM_PARAMS, "wait": "10"},
                                       headers=server.runner_headers, timeout=20)
        box["waited"] = time.monotonic() - started
        box["returned_at"] = time.monotonic()

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(1.0)
    assert "response" not in box, "the long poll should still be waiting for work"
    created_at = time.monotonic()
    session = create_session(server, user, "wake up")
    poller.join(15)
    assert box["response"].status_code == 200, box["response"].text
    assert box["response"].json()["task"]["session_id"] == session["id"]
    assert box["waited"] > 0.9
    assert box["returned_at"] - created_at < 2, f"claimed {box['returned_at'] - created_at:.2f}s after queueing"

    # The same through a real runner long-polling with --wait 10: the API's own clock says how fast.
    real = runner_process(server, "long-poller", wait=10)
    real.wait_for_log("claiming mode=", 20, "the runner to start polling")
    time.sleep(1.0)
    second = create_session(server, user, "wake up again")
    assert wait_for_reply(server, user, second["id"], 20)["state"] == "complete"
    (delay,) = server.sql("SELECT claimed_at, queued_at FROM tasks WHERE session_id = :s", s=second["id"])
    claimed_at, queued_at = (_as_datetime(v) for v in delay)
    assert (claimed_at - queued_at).total_seconds() < 2


def _as_datetime(value):
    """SQLite hands timestamps back as text."""
    from datetime import datetime

    return datetime.fromisoformat(value) if isinstance(value, str) else value.replace(tzinfo=None)


@pytest.mark.timeout(60)
def test_follow_up_in_an_existing_session_is_claimed_before_a_new_session(api_server, runner_process):
    server = api_server()
    user = server.user
    existing = create_session(server, user, "first turn")
    assert runner_process(server, "warm-up", max_tasks=1).wait(30) == 0
    assert wait_for_reply(server, user, existing["id"], 10)["state"] == "complete"

    new = create_session(server, user, "a brand new session")
    follow_up = send_message(server, user, existing["id"], "second turn")
    new_task = reply_of(new)["task"]["id"]
    follow_up_task = reply_of(follow_up)["task"]["id"]
    assert new_task < follow_up_task  # first in, so only priority puts the follow-up ahead
    assert reply_of(follow_up)["queue_position"] == 1

    assert runner_process(server, "worker", max_tasks=2).wait(30) == 0
    order = [row[0] for row in server.sql(
        "SELECT id FROM tasks WHERE runner = 'worker' ORDER BY claimed_at, id")]
    assert order == [follow_up_task, new_task]
    continued = get_session(server, user, existing["id"])
    assert reply_of(continued)["output"] == echo_of("second turn")
    assert [i["creator"] for i in continued["interactions"]] == ["user", "assistant", "user", "assistant"]


def test_a_long_poll_whose_runner_hung_up_claims_nothing(api_server):
    server = api_server(lease_seconds=60, recheck_seconds=5)
    token = server.runner_token
    # A runner long-polls, then dies (its connection closes) while the API still holds the poll open.
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(f"GET {CLAIM_PATH}?mode=create&type=text&model_name={TEXT_MODEL}&wait=20 HTTP/1.1\r\n"
                     f"Host: 127.0.0.1\r\nAuthorization: Bearer {token}\r\nX-Helix-Runner: ghost\r\n\r\n".encode())
        time.sleep(0.5)
    session = create_session(server, server.user, "anyone there?")
    time.sleep(1.0)  # the ghost's poll wakes for this task and must let it be
    assert server.sql("SELECT status, attempt, runner FROM tasks WHERE session_id = :s", s=session["id"]) == [
        ("queued", 0, None)]
    claimed = requests.get(f"{server.url}{CLAIM_PATH}", params=CLAIM_PARAMS, headers=server.runner_headers,
                           timeout=10)
    assert claimed.status_code == 200 and claimed.json()["task"]["attempt"] == 1
