"""The scheduling rules never break exactly-once completion: a warm runner killed while chats wait for it, and two
API replicas on one PostgreSQL claiming for one fleet with every rule on.

Real `helix serve` and `helix-runner` processes (tests/e2e/test_scheduling.py has the rules one by one). What
happened is read from SQL (tasks, task_usage, task_events), never from the runners' own logs.
"""

from __future__ import annotations

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import pytest

from tests.conftest import TEXT_MODEL
from tests.e2e.client import echo_of
from tests.e2e.processes import ApiServer, wait_for
from tests.e2e.test_scheduling import BACKEND, BOTH_KINDS, LOADED, chat, fine_tunes

pytestmark = pytest.mark.slow

SLOW_BACKEND = "tests.e2e.text_doubles:SlowChatAndTuneBackend"
CREATE_ONLY = ("--kind", f"create:text:{TEXT_MODEL}")


def _json(value: Any) -> Any:
    """A JSON column's value: SQLite hands back text, PostgreSQL the object."""
    return json.loads(value) if isinstance(value, str) else value


def _utcnow() -> datetime:
    """Now as the API stores it (naive UTC)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _when(value: Any) -> datetime:
    """A timestamp column as a naive UTC datetime (SQLite may hand back text, PostgreSQL an aware one)."""
    when = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return when.astimezone(UTC).replace(tzinfo=None) if when.tzinfo else when


def _usage(server: ApiServer, task_ids: list[int]) -> dict[int, list[tuple[int, str]]]:
    """task id -> its task_usage rows (attempt, outcome), in order."""
    rows = server.sql("SELECT task_id, attempt, outcome FROM task_usage ORDER BY id")
    usage: dict[int, list[tuple[int, str]]] = {task_id: [] for task_id in task_ids}
    for task_id, attempt, outcome in rows:
        if task_id in usage:
            usage[task_id].append((attempt, str(outcome)))
    return usage


def _states(server: ApiServer, task_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    """task id -> its state events' data, in order."""
    rows = server.sql("SELECT task_id, data FROM task_events WHERE kind = 'state' ORDER BY id")
    states: dict[int, list[dict[str, Any]]] = {task_id: [] for task_id in task_ids}
    for task_id, data in rows:
        if task_id in states:
            states[task_id].append(_json(data))
    return states


# 1. kill -9 a warm runner while chats wait for it.

HELD_CHATS = 5


@pytest.mark.timeout(150)
def test_kill_9_of_the_warm_runner_while_chats_wait_for_it_completes_each_exactly_once_on_the_cold_one(
        api_server, runner_process):
    # Chats wait 2-4 s for the runner holding their adapter; its lease runs out 3 s after its last heartbeat.
    server = api_server(lease_seconds=3, heartbeat_seconds=1, warm_wait_seconds=2)
    warm = runner_process(server, "warm", backend=SLOW_BACKEND, extra=BOTH_KINDS,
                          env={"HELIX_TEST_CHAT_SECONDS": "2"})
    (model,) = fine_tunes(server, 1)
    assert chat(server, model, "warm up") == echo_of("warm up")  # W loads the adapter and reports it
    assert LOADED.search(warm.log_text())
    ((key,),) = server.sql("SELECT adapter FROM tasks WHERE mode = 'create' AND status = 'complete'")
    assert key

    def warm_reported() -> bool:
        rows = server.sql("SELECT adapters, slots_busy, slots_total FROM runners WHERE name = 'warm'")
        return bool(rows) and key in (_json(rows[0][0]) or []) and (rows[0][1] or 0) < (rows[0][2] or 1)

    wait_for(warm_reported, 15, "runner W to report the adapter it holds, with a free slot")
    cold = runner_process(server, "cold", backend=BACKEND, extra=CREATE_ONLY)
    wait_for(lambda: server.sql("SELECT count(*) FROM runners WHERE name = 'cold'")[0][0], 30,
             "runner C to poll")
    first_new = server.sql("SELECT max(id) FROM tasks")[0][0] + 1

    with ThreadPoolExecutor(HELD_CHATS) as pool:
        # Several sessions on one adapter: /v1 makes a session per request.
        replies = [pool.submit(chat, server, model, f"held chat {n}") for n in range(HELD_CHATS)]

        def w_holds_one() -> list[Any] | None:
            rows = server.sql("SELECT id, status, runner, warm_until, adapter FROM tasks WHERE id >= :first "
                              "ORDER BY id", first=first_new)
            held = [row for row in rows if str(row[1]) in ("claimed", "running") and row[2] == "warm"]
            return rows if len(rows) == HELD_CHATS and held else None

        rows = wait_for(w_holds_one, 30, "runner W to take one of the chats")
        time.sleep(0.5)  # W is inside the chat now (it takes 2 s)
        warm.signal(signal.SIGKILL)
        killed_at, killed = time.monotonic(), _utcnow()
        assert warm.wait(10) == -signal.SIGKILL
        snapshot = server.sql("SELECT id, status, runner, warm_until, adapter FROM tasks WHERE id >= :first "
                              "ORDER BY id", first=first_new)
        answers = [future.result(timeout=60) for future in replies]
        took = time.monotonic() - killed_at

    task_ids = [row[0] for row in rows]
    (in_flight,) = [row[0] for row in snapshot if str(row[1]) in ("claimed", "running")]
    # The premise: every chat carries W's adapter, and those W had not taken were held for it, none taken by C.
    assert all(row[4] == key for row in snapshot), snapshot
    assert all(row[2] != "cold" for row in snapshot), snapshot
    waiting = [row for row in snapshot if row[0] != in_flight]
    assert all(str(row[1]) == "queued" and row[3] is not None and _when(row[3]) > killed for row in waiting), (
        killed, snapshot)

    assert sorted(answers) == sorted(echo_of(f"held chat {n}") for n in range(HELD_CHATS))
    assert took < 20, f"the held chats took {took:.1f}s after the kill"
    # All of it served by C after the kill; the killed runner's chat on a second attempt, after its lease ran out.
    final = {task_id: (str(status), runner, attempt) for task_id, status, runner, attempt in
             server.sql("SELECT id, status, runner, attempt FROM tasks WHERE id >= :first", first=first_new)}
    assert final == {task_id: ("complete", "cold", 2 if task_id == in_flight else 1) for task_id in task_ids}
    usage = _usage(server, task_ids)
    assert usage == {task_id: ([(1, "retried"), (2, "complete")] if task_id == in_flight else [(1, "complete")])
                     for task_id in task_ids}
    states = _states(server, task_ids)
    for task_id in task_ids:
        assert [s["state"] for s in states[task_id]].count("complete") == 1, (task_id, states[task_id])
    requeued = [s for s in states[in_flight] if s["state"] == "queued" and s.get("reason")]
    assert len(requeued) == 1 and "lease expired" in requeued[0]["reason"] and "warm" in requeued[0]["reason"]
    replies_done = server.sql("SELECT i.state, count(*) FROM interactions i JOIN tasks t ON t.interaction_id = i.id "
                              "WHERE t.id >= :first GROUP BY i.state", first=first_new)
    assert [(str(state), n) for state, n in replies_done] == [("complete", HELD_CHATS)]
    assert cold.proc.poll() is None
