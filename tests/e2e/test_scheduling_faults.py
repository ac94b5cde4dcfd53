"""The scheduling rules never break exactly-once completion: a warm runner killed while chats wait for it, and two
API replicas on one PostgreSQL claiming for one fleet with every rule on.

Real `helix serve` and `helix-runner` processes (tests/e2e/test_scheduling.py has the rules one by one). What
happened is read from SQL (tasks, task_usage, task_events), never from the runners' own logs.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from tests.conftest import TEXT_MODEL
from tests.e2e.client import create_finetune, create_session, echo_of, wait_for_reply
from tests.e2e.conftest import LOGS
from tests.e2e.processes import ApiServer, wait_for
from tests.e2e.test_scheduling import BACKEND, BOTH_KINDS, LOADED, chat, chats, fine_tunes

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


# 2. Two API replicas on one PostgreSQL claiming for one fleet, every rule on.

BACKLOG = 100  # alice's chats, 0.6 s each: the fleet's 11 chat slots are busy for seconds
ADAPTER_CHATS = 6  # alice's chats on her fine-tune's adapter, through /v1
BOB_CHATS = 6  # without his limit, fair shares would run 5 or so of them at once
BOB_LIMIT = 1
REPLICAS = 2


def _replica_of(first: ApiServer, tmp_path: Path, request: pytest.FixtureRequest) -> ApiServer:
    """Another `helix serve` on the first one's database and data directory (a shared volume), with the same
    settings, user and runner token; its log shown with the test's."""
    replica = ApiServer(first.database_url, tmp_path / "data", tmp_path, {}, None,
                        lambda path: request.node.stash.setdefault(LOGS, []).append(path))
    replica.env = dict(first.env)
    replica.starts = 1  # the user and the runner token are the first replica's: make none
    replica.start()
    replica.api_key, replica.user, replica.runner_token = first.api_key, first.user, first.runner_token
    return replica


def _most_at_once(spans: list[tuple[datetime, datetime]]) -> int:
    """The most of `spans` ([claimed, finished)) that overlap at any instant."""
    edges = sorted([(end, -1) for _, end in spans] + [(start, 1) for start, _ in spans])  # ends first on a tie
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.parametrize("e2e_database", ["postgres"], indirect=True)
def test_two_replicas_claiming_for_one_fleet_with_the_rules_on_complete_every_task_exactly_once(
        api_server, runner_process, tmp_path, request):
    first = api_server(lease_seconds=10, heartbeat_seconds=2, warm_wait_seconds=1)
    second = _replica_of(first, tmp_path, request)
    replicas = (first, second)
    bob = {"Authorization": f"Bearer {first.create_user('bob')}"}
    with first.engine.begin() as conn:
        conn.execute(text("UPDATE users SET max_running = :n WHERE name = 'bob'"), {"n": BOB_LIMIT})
        conn.execute(text("INSERT INTO reservations (model_name, runners, updated_at) VALUES (:m, 1, :now)"),
                     {"m": TEXT_MODEL, "now": _utcnow()})
    # On each replica: a runner of both kinds (the model's pool: one of the two stays free for fine-tunes)
    # holding adapters, and an echo runner of chats alone with five slots. 11 chat slots in all.
    for n, server in enumerate(replicas, 1):
        runner_process(server, f"pool-{n}", backend=BACKEND, extra=BOTH_KINDS)
        runner_process(server, f"echo-{n}", backend="tests.doubles:EchoBackend",
                       extra=(*CREATE_ONLY, "--max-parallel", "5"))
    (model,) = fine_tunes(first, 1)
    first_new = first.sql("SELECT max(id) FROM tasks")[0][0] + 1

    alice_sessions = [create_session(replicas[n % 2], first.user, f"alice {n}", sleep=0.6)["id"]
                      for n in range(BACKLOG)]
    with ThreadPoolExecutor(ADAPTER_CHATS) as pool:
        adapter_replies = [pool.submit(chat, replicas[n % 2], model, f"adapter chat {n}")
                           for n in range(ADAPTER_CHATS)]
        wait_for(lambda: first.sql("SELECT count(*) FROM tasks WHERE id >= :f AND status = 'complete'",
                                   f=first_new)[0][0] >= 4, 60, "alice's backlog to flow")
        alice_queued_then = first.sql("SELECT count(*) FROM tasks WHERE id >= :f AND status = 'queued'",
                                      f=first_new)[0][0]
        bob_sessions = [create_session(second, bob, f"bob {n}", sleep=0.3)["id"] for n in range(BOB_CHATS)]
        tune = create_finetune(second, TEXT_MODEL, chats())
        assert sorted(f.result(timeout=120) for f in adapter_replies) == sorted(
            echo_of(f"adapter chat {n}") for n in range(ADAPTER_CHATS))
    for n, session_id in enumerate(bob_sessions):
        assert wait_for_reply(second, bob, session_id, 120)["output"] == echo_of(f"bob {n}")
    for n, session_id in enumerate(alice_sessions):
        assert wait_for_reply(replicas[(n + 1) % 2], first.user, session_id, 120)["output"] == echo_of(f"alice {n}")
    assert wait_for_reply(first, first.user, tune["id"], 60)["state"] == "complete"

    # Exactly once: every task of the run complete, one `complete` usage row and one complete state event each.
    tasks = first.sql("SELECT t.id, t.status, t.session_id, u.name, t.claimed_at, t.finished_at, t.queued_at, "
                      "t.mode, t.runner FROM tasks t JOIN users u ON u.id = t.user_id WHERE t.id >= :f", f=first_new)
    task_ids = [row[0] for row in tasks]
    assert len(tasks) == BACKLOG + ADAPTER_CHATS + BOB_CHATS + 1
    assert first.sql("SELECT count(*) FROM tasks WHERE id >= :f AND adapter IS NOT NULL", f=first_new) == [
        (ADAPTER_CHATS,)]
    assert {str(row[1]) for row in tasks} == {"complete"}, Counter(str(row[1]) for row in tasks)
    completions = Counter(task_id for task_id, outcome in
                          first.sql("SELECT task_id, outcome FROM task_usage WHERE task_id >= :f", f=first_new)
                          if str(outcome) == "complete")
    assert completions == Counter(task_ids), {t: n for t, n in completions.items() if n != 1}
    states = _states(first, task_ids)
    twice = {t: s for t, s in states.items() if [e["state"] for e in s].count("complete") != 1}
    assert not twice, twice
    # Both replicas claimed: runners of each one served chats.
    served_by = Counter(row[8] for row in tasks)
    assert served_by["echo-1"] and served_by["echo-2"], served_by

    # bob's running limit (1): soft under concurrency (claims in flight together may each see him below it),
    # so exceeded by at most one claim per replica. Without it he had 5 running at once in this run.
    bob_spans = [(_when(row[4]), _when(row[5])) for row in tasks if row[3] == "bob"]
    assert _most_at_once(bob_spans) <= BOB_LIMIT + REPLICAS, sorted(bob_spans)
    # Fair shares: bob's chats did not wait behind alice's backlog: his last one was done while alice's
    # chats were still being claimed.
    alice_claims = sorted(_when(row[4]) for row in tasks if row[3] == "alice" and row[7] == "create")
    assert alice_queued_then >= BACKLOG // 2, alice_queued_then
    assert max(end for _, end in bob_spans) < alice_claims[-1], (bob_spans, alice_claims[-5:])
    # The reservation: a pool runner stayed free, so the fine-tune started at once despite alice's backlog.
    ((queued_at, claimed_at),) = [(row[6], row[4]) for row in tasks if row[2] == tune["id"]]
    assert (_when(claimed_at) - _when(queued_at)).total_seconds() < 5, (queued_at, claimed_at)
