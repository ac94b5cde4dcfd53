"""Honest waits and the shop's size: estimates of a queued reply's start, `no_runner`, and runners wanted."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import insert, select

from helix_api.accounts.auth import create_user
from helix_api.cli import user as user_cli
from helix_api.models import Task, TaskStatus, TaskUsage, User, utcnow
from helix_api.tasks import estimates
from helix_api.vocabulary import AttemptEnd, Mode, SessionType
from tests.conftest import TEXT_MODEL, bearer, claim

RUNNER = "gpu-1"
METRICS_TOKEN = "metrics-secret"


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A scraper's token, and a target wait easy to reckon with."""
    return {**settings, "METRICS_TOKEN": METRICS_TOKEN, "TARGET_WAIT_SECONDS": 1.0}


def served_in(db, seconds: float, count: int = 5) -> None:
    """`count` attempts of the text model completed just now, each `seconds` long on its runner."""
    with db.transaction() as conn:
        user_id = conn.execute(select(User.id).limit(1)).scalar_one()
        conn.execute(insert(TaskUsage.__table__), [
            {"user_id": user_id, "mode": Mode.CREATE, "type": SessionType.TEXT, "model_name": TEXT_MODEL,
             "attempt": 1, "outcome": AttemptEnd.COMPLETE, "billed": True, "runner_seconds": seconds,
             "finished_at": utcnow()} for _ in range(count)])


def report(client, runner, *, total: int, busy: int, model: str = TEXT_MODEL) -> None:
    cpu = {"model": "test", "cores": 2, "memory_total": 2**30, "memory_available": 2**29}
    body = {"hardware": {"gpus": [], "cpu": cpu}, "backend": "echo",
            "kinds": [{"mode": "create", "type": "text", "model_name": model}],
            "slots": {"total": total, "busy": busy}, "adapters": [], "version": "0.1.0"}
    response = client.post("/api/v1/worker/runners", json=body, headers={**runner, "X-Helix-Runner": RUNNER})
    assert response.status_code in (200, 204), response.data


def reply(client, user, session: dict[str, Any]) -> dict[str, Any]:
    return client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]


def first_estimate(client, user, session_id: int) -> dict[str, Any]:
    """The first `estimate` event of a followed session's stream."""
    response = client.get(f"/api/v1/sessions/{session_id}/events", headers=user, buffered=False)
    assert response.status_code == 200
    data = b""
    try:
        for piece in response.response:
            data += piece
            for block in data.decode().split("\n\n"):
                if block.startswith("event: estimate\n"):  # no id: an estimate is no step to resume from
                    return json.loads(block.split("\ndata: ", 1)[1])
    finally:
        response.close()
    raise AssertionError(f"no estimate event in {data!r}")


# Estimates.


def test_a_queued_reply_estimates_its_start_from_service_times_slots_and_the_line(client, user, runner, db,
                                                                                 task_factory):
    served_in(db, 2.0)
    report(client, runner, total=1, busy=1)
    sessions = [task_factory(message=f"m{i}") for i in range(5)]
    assert claim(client, {**runner, "X-Helix-Runner": RUNNER}).status_code == 200  # the one slot is busy

    replies = [reply(client, user, s) for s in sessions[1:]]
    assert [r["phase"] for r in replies] == ["queued"] * 4
    assert [r["queue_position"] for r in replies] == [1, 2, 3, 4]
    waits = [r["estimated_wait_seconds"] for r in replies]
    assert waits == sorted(waits) and len(set(waits)) == 4  # each place further back waits one service longer
    assert all(abs(b - a - 2.0) <= 0.2 for a, b in zip(waits, waits[1:], strict=False))
    start = datetime.fromisoformat(replies[-1]["estimated_start_at"])
    assert abs((start - utcnow()).total_seconds() - waits[-1]) < 2


def test_the_estimate_is_about_right_in_a_steady_state(client, user, runner, db, task_factory):
    # One runner with one slot, replies of 2 s, one running and three ahead: the fourth in line starts in 6-8 s.
    served_in(db, 2.0, count=20)
    report(client, runner, total=1, busy=1)
    sessions = [task_factory(message=f"m{i}") for i in range(5)]
    assert claim(client, {**runner, "X-Helix-Runner": RUNNER}).status_code == 200
    mine = reply(client, user, sessions[-1])
    assert mine["queue_position"] == 4
    assert 6.0 <= mine["estimated_wait_seconds"] <= 8.5


def test_a_free_slot_means_no_wait_and_the_model_estimates_by_its_formula():
    shop = estimates.Shop(("create", "text", "m"), runners=1, slots=2, reported_free=2, service_seconds=4.0)
    assert shop.wait_seconds(1) == shop.wait_seconds(2) == 0.0
    assert shop.wait_seconds(3) == 2.0  # nothing running: half a service, then a slot frees
    busy = estimates.Shop(("create", "text", "m"), runners=1, slots=2, reported_free=0, running=2,
                          longest_running_seconds=1.0, service_seconds=4.0)
    assert busy.wait_seconds(1) == 3.0 and busy.wait_seconds(3) == 7.0  # 3 s left, then 4 s / 2 slots each
    assert estimates.Shop(("create", "text", "m")).wait_seconds(1) is None  # no runner: no estimate


def test_the_stream_of_a_queued_reply_carries_its_estimate(client, user, runner, db, task_factory):
    served_in(db, 2.0)
    report(client, runner, total=1, busy=0)
    task_factory(message="ahead")
    session = task_factory(message="mine")
    event = first_estimate(client, user, session["id"])
    assert event["kind"] == "estimate" and event["phase"] == "queued" and event["queue_position"] == 2
    assert event["estimated_wait_seconds"] is not None and event["estimated_start_at"]


# No runner.


def test_a_reply_no_live_runner_serves_says_so_after_the_grace(make_client, user, task_factory):
    session = task_factory()
    patient = make_client(NO_RUNNER_GRACE_SECONDS=600)
    assert reply(patient, user, session)["phase"] == "queued"  # within the grace: a runner may be starting
    hasty = make_client(NO_RUNNER_GRACE_SECONDS=0)
    shown = reply(hasty, user, session)
    assert shown["phase"] == "no_runner" and shown["phase_detail"] == "no runner serves this model"
    assert shown["estimated_wait_seconds"] is None and shown["estimated_start_at"] is None
    event = first_estimate(hasty, user, session["id"])
    assert event["phase"] == "no_runner" and event["phase_detail"] == "no runner serves this model"


def test_a_runner_of_another_model_does_not_count(make_client, runner, user, task_factory):
    client = make_client(NO_RUNNER_GRACE_SECONDS=0)
    report(client, runner, total=4, busy=0, model="someone/else")
    assert reply(client, user, task_factory())["phase"] == "no_runner"


def _only_status(db) -> TaskStatus:
    with db.connect() as conn:
        return conn.execute(select(Task.status)).scalar_one()


def test_a_v1_chat_no_runner_serves_fails_fast_and_its_task_is_cancelled(make_client, user, db):
    client = make_client(NO_RUNNER_GRACE_SECONDS=0.3)
    began = time.monotonic()
    response = client.post("/v1/chat/completions", headers=user,
                           json={"model": TEXT_MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert time.monotonic() - began < 5
    assert response.status_code == 503, response.json
    error = response.json["error"]
    assert error["code"] == "no_runner" and error["type"] == "server_error" and TEXT_MODEL in error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert _only_status(db) == TaskStatus.CANCELLED


def test_a_streamed_v1_chat_no_runner_serves_ends_with_a_no_runner_error(make_client, user, db):
    client = make_client(NO_RUNNER_GRACE_SECONDS=0.3)
    response = client.post("/v1/chat/completions", headers=user,
                           json={"model": TEXT_MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                 "stream": True})
    assert response.status_code == 200
    payloads = [json.loads(line[6:]) for line in response.get_data(as_text=True).splitlines()
                if line.startswith("data: ") and line != "data: [DONE]"]
    assert payloads[-1]["error"]["code"] == "no_runner" and TEXT_MODEL in payloads[-1]["error"]["message"]
    assert _only_status(db) == TaskStatus.CANCELLED


def test_a_v1_chat_a_runner_serves_waits_past_the_grace(make_client, user, runner, db):
    client = make_client(NO_RUNNER_GRACE_SECONDS=0.0, OPENAI_WAIT_SECONDS=1)
    report(client, runner, total=1, busy=1)
    response = client.post("/v1/chat/completions", headers=user,
                           json={"model": TEXT_MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 504 and response.json["error"]["code"] == "timeout"  # served: it waited


# Capacity.


def _admin(db) -> dict[str, str]:
    with db.orm_write() as s:
        _, key = create_user(s, "root", is_admin=True)
    return bearer(key)


def test_capacity_shows_each_kind_and_the_runners_it_wants(client, user, runner, db, task_factory):
    served_in(db, 2.0)
    report(client, runner, total=2, busy=0)
    for i in range(5):
        task_factory(message=f"m{i}")
    response = client.get("/api/v1/admin/capacity", headers=_admin(db))
    assert response.status_code == 200, response.json
    [kind] = response.json["kinds"]
    assert response.json["target_wait_seconds"] == 1.0
    # 5 queued of 2 s each within 1 s: ceil(5 * 2 / (2 + 1)) = 4 slots, in runners of 2 slots: 2.
    assert kind == {"mode": "create", "type": "text", "model_name": TEXT_MODEL, "queued": 5, "running": 0,
                    "runners_live": 1, "slots": 2, "free_slots": 2, "service_seconds": 2.0, "service_samples": 5,
                    "runners_wanted": 2, "target_wait_seconds": 1.0}


def test_capacity_is_for_admins_only(client, user):
    assert client.get("/api/v1/admin/capacity").status_code == 401
    response = client.get("/api/v1/admin/capacity", headers=user)
    assert response.status_code == 403 and response.json["error"] == "forbidden"


def test_runners_wanted_and_live_are_metrics(client, user, runner, db, task_factory):
    served_in(db, 2.0)
    report(client, runner, total=2, busy=0)
    for i in range(5):
        task_factory(message=f"m{i}")
    text = client.get("/metrics", headers=bearer(METRICS_TOKEN)).get_data(as_text=True)
    samples = {(s.name, s.labels.get("model")): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples[("helix_runners_wanted", TEXT_MODEL)] == 2
    assert samples[("helix_runners_live", TEXT_MODEL)] == 1


def test_runners_wanted_is_zero_for_an_idle_kind_and_keeps_the_running():
    idle = estimates.Shop(("create", "text", "m"), runners=3, slots=3, reported_free=3, service_seconds=2.0)
    assert idle.runners_wanted(30.0) == 0
    busy = estimates.Shop(("create", "text", "m"), runners=3, slots=3, running=3, service_seconds=2.0)
    assert busy.runners_wanted(30.0) == 3  # running work keeps its runners
    cold = estimates.Shop(("create", "text", "m"), queued=1, service_seconds=2.0)
    assert cold.runners_wanted(30.0) == 1  # queued work no runner serves wants one


# The user CLI.


def test_helix_chat_says_the_wait_in_words():
    assert user_cli.waiting_line({"phase": "queued", "queue_position": 2, "estimated_wait_seconds": 40.2}) == \
        "queued, 2 in line, starts in about 40 s"
    assert user_cli.waiting_line({"phase": "queued", "queue_position": 1, "estimated_wait_seconds": None}) == \
        "queued, 1 in line"
    assert user_cli.waiting_line({"phase": "no_runner", "phase_detail": "no runner serves this model"}) == \
        "queued: no runner serves this model"
    assert user_cli.waiting_line({"phase": "generating"}) is None


class _Event:
    def __init__(self, event: str, data: dict[str, Any]) -> None:
        self.event, self.data, self.id = event, data, None


class _Remote:
    """The API as `helix chat` sees it, with a queued reply's events scripted."""

    def __init__(self, events: list[_Event]) -> None:
        self.scripted = events

    def events(self, session_id: int, after: str | None = None):
        yield from self.scripted


def test_helix_chat_prints_the_estimate_while_waiting(capsys):
    outlook = {"interaction_id": 2, "phase": "queued", "queue_position": 2, "estimated_wait_seconds": 40.0}
    remote = _Remote([_Event("estimate", outlook), _Event("estimate", outlook),
                      _Event("estimate", {**outlook, "queue_position": 1, "estimated_wait_seconds": 20.0}),
                      _Event("state", {"interaction_id": 2, "state": "running"}),
                      _Event("token", {"interaction_id": 2, "text": "Hello"}),
                      _Event("state", {"interaction_id": 2, "state": "complete"})])
    session = {"id": 1, "last_event_seq": 1, "interactions": [{"id": 2, "creator": "assistant"}]}
    user_cli._stream_reply(remote, session)  # type: ignore[arg-type]
    out, err = capsys.readouterr()
    assert out == "Hello\n"
    assert err.splitlines() == ["[queued, 2 in line, starts in about 40 s]",
                                "[queued, 1 in line, starts in about 20 s]"]


def test_estimates_read_sql_and_write_nothing(client, user, runner, db, task_factory):
    from sqlalchemy import event

    served_in(db, 2.0)
    report(client, runner, total=1, busy=0)
    session = task_factory()
    seen: list[str] = []

    def before(conn, cursor, statement, *args: Any) -> None:
        seen.append(statement.split()[0].upper())

    event.listen(db.engine, "before_cursor_execute", before)
    try:
        assert reply(client, user, session)["estimated_wait_seconds"] is not None
    finally:
        event.remove(db.engine, "before_cursor_execute", before)
    assert set(seen) <= {"SELECT", "BEGIN", "COMMIT", "ROLLBACK"}, seen
