"""Task state changes: one module writes them all, each in few statements, counted on both databases."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, update

from helix_api.models import Task, utcnow
from helix_api.services import services
from tests.conftest import claim

TRANSITIONS = "helix_api/tasks/transitions.py"
# A statement that writes tasks.status: an insert of a task, or an update that sets its status.
_WRITES_STATUS = re.compile(
    r"^\s*(INSERT INTO tasks\b|UPDATE tasks SET .*\bstatus=|WITH .*UPDATE tasks SET .*\bstatus=)", re.S | re.I)


@contextmanager
def statements(db) -> Iterator[list[tuple[str, str]]]:
    """Every statement `db` runs meanwhile, each with the helix_api module that ran it."""
    seen: list[tuple[str, str]] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        frame = sys._getframe(1)
        caller = "?"
        while frame is not None:  # the innermost frame of our own code
            name = frame.f_code.co_filename
            if "/helix_api/" in name and "/helix_api/db.py" not in name:
                caller = "helix_api/" + name.split("/helix_api/", 1)[1]
                break
            frame = frame.f_back
        seen.append((" ".join(statement.split()), caller))

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        yield seen
    finally:
        event.remove(db.engine, "before_cursor_execute", before)


def _cycle(client, user, runner, *, claim_next: bool = False) -> None:
    created = client.post("/api/v1/sessions", headers=user, json={
        "mode": "create", "type": "text", "model_name": "mistralai/Mistral-7B-Instruct-v0.1", "message": "hi"})
    assert created.status_code == 201, created.json
    claimed = claim(client, runner).json
    done = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                       json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"},
                             **({"claim_next": True} if claim_next else {})})
    assert done.status_code == 200, done.json


def _counts(client, user, runner, db) -> dict[str, int]:
    with client.application.app_context():
        services().scheduler.reap_every = float("inf")  # the sweep of expired leases, once a second, not counted
    _cycle(client, user, runner)  # warm: the caller's key, the runner's first sighting, statement caches
    counted = {}
    with statements(db) as seen:
        client.post("/api/v1/sessions", headers=user, json={
            "mode": "create", "type": "text", "model_name": "mistralai/Mistral-7B-Instruct-v0.1", "message": "hi"})
    counted["create"] = len(seen)
    with statements(db) as seen:
        claimed = claim(client, runner).json
    counted["claim"] = len(seen)
    with statements(db) as seen:
        client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                    json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"}})
    counted["complete"] = len(seen)
    return counted


# The statements of one create, one claim and one complete. A change that adds one fails here and
# must say why in review; BEGIN and COMMIT count where the driver sends them as statements (SQLite).
EXPECTED = {
    # create: BEGIN, the session, two interactions, the task, its event (the seq, the row), its place in line.
    # claim: the look at the queue (autocommit: no BEGIN); BEGIN, the claim, the reply, the user's turn (fair
    # shares), the event (seq, row).
    # complete: BEGIN, the lease, the task, the reply, the runner files, the event (two), the usage row.
    "sqlite": {"create": 8, "claim": 7, "complete": 8},
    # create: the session, two interactions, one statement for the task and its event, its place in
    # line, and the NOTIFY that wakes runners on every replica.
    # claim: the look, one statement for the claim, its reply, its event and the user's turn, and the NOTIFY.
    # complete: the lease, one statement for everything else, the NOTIFY.
    "postgresql": {"create": 6, "claim": 3, "complete": 3},
}


def test_one_cycle_runs_a_known_number_of_statements(client, user, runner, db):
    counted = _counts(client, user, runner, db)
    assert counted == EXPECTED[db.dialect]


def test_a_transition_on_postgresql_is_one_statement(client, user, runner, db):
    if db.dialect != "postgresql":
        pytest.skip("SQLite has no data-modifying CTEs: there a transition is a few statements")
    _cycle(client, user, runner)
    with statements(db) as seen:
        _cycle(client, user, runner)
    writes = [(sql, where) for sql, where in seen if where == TRANSITIONS]
    # enqueue, the claim, the completion: each one statement, with its event (and usage) rows.
    assert [sql.split(" ", 1)[0] for sql, _ in writes] == ["WITH", "WITH", "WITH"], writes


def test_no_module_but_transitions_writes_a_task_status(client, user, runner, db, task_factory):
    """Every way a task changes state, watched statement by statement: each status write comes from
    transitions.py."""
    with statements(db) as seen:
        _cycle(client, user, runner, claim_next=True)
        # heartbeat, events (a flush), fail with a retry, release, reap, and cancel.
        task_factory(message="two")
        held = claim(client, runner).json
        tid, token = held["task"]["id"], held["lease"]["token"]
        assert client.post(f"/api/v1/worker/task/{tid}/heartbeat", headers=runner,
                           json={"lease_token": token}).status_code == 200
        assert client.post(f"/api/v1/worker/task/{tid}/events", headers=runner, json={
            "lease_token": token, "events": [{"seq": 1, "kind": "token", "text": "a"},
                                             {"seq": 2, "kind": "progress", "step": 1, "total": 2}]}).status_code == 200
        assert client.post(f"/api/v1/worker/task/{tid}/fail", headers=runner,
                           json={"lease_token": token, "error": "boom", "retry": True}).status_code == 200
        held = claim(client, runner).json
        assert client.post(f"/api/v1/worker/task/{held['task']['id']}/release", headers=runner,
                           json={"lease_token": held["lease"]["token"]}).status_code == 200
        held = claim(client, runner).json
        with db.transaction() as conn:
            conn.execute(update(Task).where(Task.id == held["task"]["id"])
                         .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        with client.application.app_context():
            assert services().scheduler.reap() == 1
        assert client.post(f"/api/v1/sessions/{held['task']['session_id']}/cancel",
                           headers=user).status_code == 200
    writers = {where for sql, where in seen if _WRITES_STATUS.match(sql)}
    assert writers == {TRANSITIONS}, writers
    assert len([sql for sql, _ in seen if _WRITES_STATUS.match(sql)]) >= 8


def test_no_source_but_transitions_names_a_status_it_writes():
    """The same rule read from the source: a status value given to a write appears in transitions.py only."""
    root = Path(__file__).resolve().parents[2] / "helix_api"
    pattern = re.compile(r"""(status\s*=\s*TaskStatus\.|["']status["']\s*:\s*TaskStatus\.)""")
    offenders = [str(path.relative_to(root.parent)) for path in root.rglob("*.py")
                 if pattern.search(path.read_text()) and path.relative_to(root.parent).as_posix() != TRANSITIONS]
    assert offenders == []
