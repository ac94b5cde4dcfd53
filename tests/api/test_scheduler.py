"""Scheduling rules: priority, FIFO, reaping expired leases, death, concurrency, long-poll wake-ups."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from helix_api.models import Mode, SessionType, Task, TaskStatus, utcnow
from helix_api.services import services
from helix_api.tasks.claims import ClaimRule
from helix_api.tasks.scheduler import Scheduler
from tests.conftest import TEXT_MODEL, claim

FILTER = ClaimRule.one(Mode.CREATE, SessionType.TEXT, TEXT_MODEL)


@pytest.fixture
def sched(app) -> Scheduler:
    """The app's scheduler."""
    with app.app_context():
        return services().scheduler


def _expire(db, task_id: int) -> None:
    with db.orm_write() as s:
        s.execute(update(Task).where(Task.id == task_id)
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def _complete(client, runner, claimed: dict) -> None:
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"}})


def test_first_come_first_served(client, runner, task_factory):
    sessions = [task_factory(message=f"m{i}") for i in range(3)]
    claimed = [claim(client, runner).json["task"]["session_id"] for _ in sessions]
    assert claimed == [s["id"] for s in sessions]


def test_continuing_a_chat_goes_before_new_sessions(client, user, runner, task_factory):
    chat = task_factory(message="hi")
    _complete(client, runner, claim(client, runner).json)
    newcomer = task_factory(message="I just arrived")
    client.post(f"/api/v1/sessions/{chat['id']}/messages", headers=user, json={"message": "and then?"})
    order = [claim(client, runner).json["task"]["session_id"] for _ in range(2)]
    assert order == [chat["id"], newcomer["id"]]
    follow_up = client.get(f"/api/v1/sessions/{chat['id']}", headers=user).json["interactions"][-1]
    assert follow_up["state"] == "running"


def test_queue_position_puts_continuations_first(client, user, runner, task_factory):
    chat = task_factory(message="hi")
    _complete(client, runner, claim(client, runner).json)
    newcomer = task_factory(message="new")
    client.post(f"/api/v1/sessions/{chat['id']}/messages", headers=user, json={"message": "more"})
    position = {s: client.get(f"/api/v1/sessions/{s}", headers=user).json["interactions"][-1]["queue_position"]
                for s in (chat["id"], newcomer["id"])}
    assert position == {chat["id"]: 1, newcomer["id"]: 2}


def test_expired_lease_goes_back_to_the_queue(client, runner, task_factory, db, sched):
    task_factory()
    first = claim(client, runner).json
    _expire(db, first["task"]["id"])
    assert sched.reap() == 1
    with db.orm_read() as s:
        row = s.get(Task, first["task"]["id"])
    assert row.status == TaskStatus.QUEUED and "stopped heartbeating" in row.error
    again = claim(client, runner).json
    assert again["task"]["id"] == first["task"]["id"] and again["task"]["attempt"] == 2


def test_task_is_dead_after_max_attempts_of_expired_leases(client, runner, task_factory, db, user, sched):
    session = task_factory()
    for attempt in range(1, 4):
        claimed = claim(client, runner).json
        assert claimed["task"]["attempt"] == attempt
        _expire(db, claimed["task"]["id"])
        sched.reap()
    assert claim(client, runner).status_code == 204
    with db.orm_read() as s:
        row = s.scalar(select(Task).where(Task.session_id == session["id"]))
    assert row.status == TaskStatus.DEAD and row.attempt == 3
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "error" and "heartbeating" in reply["error"]


def test_max_attempts_is_configurable(settings, request):
    settings["MAX_ATTEMPTS"] = 1
    client, runner = request.getfixturevalue("client"), request.getfixturevalue("runner")
    task_factory = request.getfixturevalue("task_factory")
    task_factory()
    claimed = claim(client, runner).json
    response = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/fail", headers=runner,
                           json={"lease_token": claimed["lease"]["token"], "error": "x", "retry": True})
    assert response.json["status"] == "dead"


def test_reap_leaves_live_leases_alone(client, runner, task_factory, db, sched):
    task_factory()
    claimed = claim(client, runner).json
    assert sched.reap() == 0
    with db.orm_read() as s:
        assert s.get(Task, claimed["task"]["id"]).status == TaskStatus.CLAIMED


def test_each_app_keeps_its_own_reap_clock(settings, request, make_client):
    settings["REAP_SECONDS"] = 3600.0
    client, runner, db, sched = (request.getfixturevalue(name) for name in ("client", "runner", "db", "sched"))
    request.getfixturevalue("task_factory")()
    sched.reap_if_due()  # its first sweep starts the clock
    claimed = claim(client, runner).json
    _expire(db, claimed["task"]["id"])
    sched.reap_if_due()  # not due for an hour
    with db.orm_read() as s:
        assert s.get(Task, claimed["task"]["id"]).status == TaskStatus.CLAIMED
    other = make_client().application
    with other.app_context():
        services().scheduler.reap_if_due()  # another app's clock has not started
    with db.orm_read() as s:
        assert s.get(Task, claimed["task"]["id"]).status == TaskStatus.QUEUED


def test_concurrent_claimers_never_share_a_task(task_factory, db, sched):
    for i in range(120):
        task_factory(message=f"m{i}")

    def drain(n: int) -> list[int]:
        got = []
        while (claimed := sched.claim(FILTER, runner=f"r{n}", runner_token_id=None)) is not None:
            got.append(claimed[0].id)
        return got

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(drain, range(8)))
    ids = [task_id for batch in results for task_id in batch]
    assert len(ids) == 120 and len(set(ids)) == 120
    with db.orm_read() as s:
        assert set(s.scalars(select(Task.attempt))) == {1}


def test_long_poll_returns_when_work_arrives(client, runner, task_factory):
    result: dict = {}

    def wait_for_work() -> None:
        started = time.monotonic()
        result["response"] = claim(client, runner, wait="10")
        result["waited"] = time.monotonic() - started

    thread = threading.Thread(target=wait_for_work)
    thread.start()
    time.sleep(0.3)
    session = task_factory()
    thread.join(15)
    assert result["response"].status_code == 200
    assert result["response"].json["task"]["session_id"] == session["id"]
    assert result["waited"] < 5  # woken by the enqueue, not by the 10 s timeout


def test_long_poll_times_out_with_204(client, runner):
    started = time.monotonic()
    response = claim(client, runner, wait="0.5")
    assert response.status_code == 204 and time.monotonic() - started >= 0.5


@pytest.mark.parametrize("wait", ["-1", "31", "soon"])
def test_wait_out_of_range_is_400(client, runner, wait):
    assert claim(client, runner, wait=wait).status_code == 400
