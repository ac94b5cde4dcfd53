"""The fleet's scheduling rules in the claim statement: several kinds, warm routing, fair shares, running
limits, ageing and the fine-tune reservation, on SQLite and PostgreSQL through the worker API."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import func, insert, select, update

from helix_api.models import Interaction, Reservation, Runner, Session, Task, TaskStatus, User, utcnow
from tests.api.test_finetune import _finish_training, chats, start_finetune
from tests.api.test_runner_reports import report
from tests.conftest import TEXT_MODEL, claim

KEY_A, KEY_B = "a" * 64, "b" * 64


def _as(runner: dict[str, str], name: str) -> dict[str, str]:
    return {**runner, "X-Helix-Runner": name}


def _poll(client, runner: dict[str, str], *kinds: str, warm: tuple[str, ...] = (), **query: Any):
    """A poll naming queues as kind=MODE:TYPE:MODEL (default: inference of the test model)."""
    params: list[tuple[str, Any]] = [("kind", kind) for kind in (kinds or (f"create:text:{TEXT_MODEL}",))]
    params += [("warm", key) for key in warm] + list(query.items())
    return client.get("/api/v1/worker/task", query_string=params, headers=runner)


def _set_task(db, task_id: int, **values: Any) -> None:
    with db.orm_write() as s:
        s.execute(update(Task).where(Task.id == task_id).values(**values))


def _task_of(db, session_id: int) -> Task:
    with db.orm_read() as s:
        return s.scalars(select(Task).where(Task.session_id == session_id).order_by(Task.id.desc())).first()


def _session_task(client, user, **body: Any) -> int:
    made = client.post("/api/v1/sessions", headers=user,
                       json={"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "hi", **body})
    assert made.status_code == 201, made.json
    return made.json["id"]


# --- several kinds -------------------------------------------------------------------------------------

def test_one_poll_takes_work_of_any_kind_it_names(client, user, runner, task_factory):
    created = start_finetune(client, user, [("data.jsonl", chats(12))], params={"max_steps": 1})
    assert created.status_code == 201, created.json
    chat = task_factory(message="hello")
    both = (f"create:text:{TEXT_MODEL}", f"finetune:text:{TEXT_MODEL}")
    got = {_poll(client, runner, *both).json["task"]["session_id"] for _ in range(2)}
    assert got == {created.json["id"], chat["id"]}
    assert _poll(client, runner, *both).status_code == 204


def test_the_seed_url_and_a_kinds_poll_are_not_mixed(client, runner):
    response = client.get("/api/v1/worker/task", headers=runner,
                          query_string=[("model_name", TEXT_MODEL), ("kind", f"create:text:{TEXT_MODEL}")])
    assert response.status_code == 400 and response.json["field"] == "kind"


@pytest.mark.parametrize("kind, field", [("create:text:", "kind[0]"), ("nonsense:text:m", "kind[0].mode"),
                                         ("create:video:m", "kind[0].type"), ("create", "kind[0]")])
def test_a_kind_that_is_nonsense_is_refused_by_name(client, runner, kind, field):
    response = _poll(client, runner, kind)
    assert response.status_code == 400 and response.json["field"] == field


def test_a_warm_key_that_is_not_a_checksum_is_refused(client, runner):
    response = _poll(client, runner, warm=("a%b",))
    assert response.status_code == 400 and response.json["field"] == "warm[0]"
    too_many = _poll(client, runner, warm=tuple(f"{i:064x}" for i in range(65)))
    assert too_many.status_code == 400 and too_many.json["field"] == "warm"


def test_a_runner_of_several_kinds_wakes_for_any_of_them(app, client, user, runner):
    import threading

    both = (f"create:text:{TEXT_MODEL}", f"finetune:text:{TEXT_MODEL}")
    answers: list[Any] = []
    waiter = threading.Thread(target=lambda: answers.append(_poll(app.test_client(), runner, *both, wait=10)))
    waiter.start()
    import time
    time.sleep(0.5)
    started = time.monotonic()
    created = start_finetune(client, user, [("data.jsonl", chats(12))], params={"max_steps": 1})
    waiter.join(15)
    assert answers and answers[0].status_code == 200
    assert answers[0].json["task"]["session_id"] == created.json["id"]
    assert time.monotonic() - started < 5  # woken by the fine-tune's topic, not by the end of its wait


# --- warm routing ---------------------------------------------------------------------------------------

def test_a_task_waiting_for_a_warm_runner_goes_to_it_first(client, user, runner, db):
    cold, warm = _session_task(client, user), _session_task(client, user)
    task = _task_of(db, warm)
    _set_task(db, task.id, adapter=KEY_A, warm_until=utcnow() + timedelta(seconds=30))
    # A cold runner gets the other task, never the one held for the warm runner.
    assert _poll(client, _as(runner, "cold")).json["task"]["session_id"] == cold
    assert _poll(client, _as(runner, "cold")).status_code == 204
    assert _poll(client, _as(runner, "warm"), warm=(KEY_A,)).json["task"]["session_id"] == warm


def test_a_warm_runner_takes_its_own_adapters_work_before_older_work(client, user, runner, db):
    older, mine = _session_task(client, user), _session_task(client, user)
    _set_task(db, _task_of(db, mine).id, adapter=KEY_B)
    assert _poll(client, runner, warm=(KEY_B,)).json["task"]["session_id"] == mine
    assert _poll(client, runner, warm=(KEY_B,)).json["task"]["session_id"] == older


def test_the_warm_wait_ends_and_any_runner_takes_the_task(client, user, runner, db):
    held = _session_task(client, user)
    _set_task(db, _task_of(db, held).id, adapter=KEY_A, warm_until=utcnow() - timedelta(milliseconds=1))
    assert _poll(client, _as(runner, "cold")).json["task"]["session_id"] == held


def _adapter_session(client, user, runner) -> tuple[int, dict[str, Any]]:
    """A session whose fine-tune finished: its chats run with the adapter it made."""
    created = start_finetune(client, user, [("data.jsonl", chats(12))], params={"max_steps": 1})
    ref = _finish_training(client, runner, claim(client, runner, mode="finetune").json)
    return created.json["id"], ref


def test_a_task_waits_for_a_warm_runner_only_while_one_with_a_free_slot_is_alive(client, user, runner, db):
    session, ref = _adapter_session(client, user, runner)
    asked = client.post(f"/api/v1/sessions/{session}/messages", headers=user, json={"message": "hi"})
    assert asked.status_code == 201
    task = _task_of(db, session)
    assert task.adapter == ref["sha256"] and task.warm_until is None  # no runner holds it: nobody to wait for
    claimed = _poll(client, runner).json
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"}})

    client.post("/api/v1/worker/runners", headers=_as(runner, "gpu-warm"),
                json=report(adapters=[ref["sha256"]], slots={"total": 2, "busy": 0}))
    client.post(f"/api/v1/sessions/{session}/messages", headers=user, json={"message": "again"})
    task = _task_of(db, session)
    assert task.warm_until is not None
    assert 0.9 <= (task.warm_until - task.queued_at).total_seconds() <= 2.1  # WARM_WAIT_SECONDS, jittered

    claimed = _poll(client, _as(runner, "gpu-warm"), warm=(ref["sha256"],)).json
    assert claimed["task"]["session_id"] == session
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"}})
    # A runner that holds it but has no free slot is nobody to wait for either.
    client.post("/api/v1/worker/runners", headers=_as(runner, "gpu-warm"),
                json=report(adapters=[ref["sha256"]], slots={"total": 2, "busy": 2}))
    client.post(f"/api/v1/sessions/{session}/messages", headers=user, json={"message": "once more"})
    assert _task_of(db, session).warm_until is None


def test_a_runner_gone_is_nobody_to_wait_for(client, user, runner, db):
    session, ref = _adapter_session(client, user, runner)
    client.post("/api/v1/worker/runners", headers=_as(runner, "gpu-gone"),
                json=report(adapters=[ref["sha256"]], slots={"total": 2, "busy": 0}))
    with db.orm_write() as s:
        s.execute(update(Runner).where(Runner.name == "gpu-gone")
                  .values(last_seen_at=utcnow() - timedelta(minutes=5)))
    client.post(f"/api/v1/sessions/{session}/messages", headers=user, json={"message": "hi"})
    assert _task_of(db, session).warm_until is None


@pytest.mark.parametrize("settings_changes", [{"WARM_WAIT_SECONDS": 0}])
def test_warm_routing_off_waits_for_nobody(make_client, user, runner, db, settings_changes):
    client = make_client(**settings_changes)
    session, ref = _adapter_session(client, user, runner)
    client.post("/api/v1/worker/runners", headers=_as(runner, "gpu-warm"),
                json=report(adapters=[ref["sha256"]], slots={"total": 2, "busy": 0}))
    client.post(f"/api/v1/sessions/{session}/messages", headers=user, json={"message": "hi"})
    assert _task_of(db, session).warm_until is None


# --- fair shares, limits, ageing ------------------------------------------------------------------------

def test_the_user_with_fewest_tasks_running_goes_next(client, make_user, runner):
    big, small = make_user("big"), make_user("small")
    big_sessions = [_session_task(client, big) for _ in range(4)]
    small_session = _session_task(client, small)
    first = _poll(client, runner).json["task"]["session_id"]
    second = _poll(client, runner).json["task"]["session_id"]
    assert first == big_sessions[0]  # nobody runs anything: first come
    assert second == small_session  # big has one running, small none


def test_fifo_when_fair_share_is_off(make_client, make_user, runner):
    client = make_client(FAIR_SHARE=False)
    big, small = make_user("big"), make_user("small")
    big_sessions = [_session_task(client, big) for _ in range(3)]
    _session_task(client, small)
    assert [_poll(client, runner).json["task"]["session_id"] for _ in range(2)] == big_sessions[:2]


def test_a_user_at_their_running_limit_gets_nothing_more(client, make_user, runner, db):
    limited, other = make_user("limited"), make_user("other")
    with db.orm_write() as s:
        s.execute(update(User).where(User.name == "limited").values(max_running=1))
    mine = [_session_task(client, limited) for _ in range(2)]
    theirs = _session_task(client, other)
    batch = _poll(client, runner, max=3).json["tasks"]
    assert sorted(t["task"]["session_id"] for t in batch) == sorted([mine[0], theirs])
    assert _poll(client, runner).status_code == 204
    done = batch[0] if batch[0]["task"]["session_id"] == mine[0] else batch[1]
    client.post(f"/api/v1/worker/task/{done['task']['id']}/complete", headers=runner,
                json={"lease_token": done["lease"]["token"], "result": {"text": "ok"}})
    assert _poll(client, runner).json["task"]["session_id"] == mine[1]


def test_the_operators_running_limit_applies_unless_the_user_has_their_own(make_client, make_user, runner, db):
    client = make_client(MAX_RUNNING_PER_USER=1)
    capped, free = make_user("capped"), make_user("free")
    with db.orm_write() as s:
        s.execute(update(User).where(User.name == "free").values(max_running=0))  # 0: no limit of their own
    for headers in (capped, capped, free, free):
        _session_task(client, headers)
    claimed = _poll(client, runner, max=4).json["tasks"]
    with db.orm_read() as s:
        owners = [s.get(Task, t["task"]["id"]).user_id for t in claimed]
        ids = {u.name: u.id for u in s.scalars(select(User))}
    assert owners.count(ids["capped"]) == 1 and owners.count(ids["free"]) == 2


def test_an_aged_new_session_goes_before_newer_continue_work(make_client, user, runner, db):
    client = make_client(AGEING_SECONDS=5)
    chat = _session_task(client, user)
    claimed = _poll(client, runner).json
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"}})
    newcomer = _session_task(client, user)
    client.post(f"/api/v1/sessions/{chat}/messages", headers=user, json={"message": "more"})
    # Fresh: continue work first. Queued longer than AGEING_SECONDS: the new session first.
    _set_task(db, _task_of(db, newcomer).id, queued_at=utcnow() - timedelta(seconds=6))
    assert _poll(client, runner).json["task"]["session_id"] == newcomer


def test_without_ageing_continue_work_always_goes_first(make_client, user, runner, db):
    client = make_client(AGEING_SECONDS=0)
    chat = _session_task(client, user)
    claimed = _poll(client, runner).json
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"}})
    newcomer = _session_task(client, user)
    client.post(f"/api/v1/sessions/{chat}/messages", headers=user, json={"message": "more"})
    _set_task(db, _task_of(db, newcomer).id, queued_at=utcnow() - timedelta(hours=1))
    assert _poll(client, runner).json["task"]["session_id"] == chat


def test_over_the_queued_limit_is_429_and_stores_nothing(make_client, user, db):
    client = make_client(MAX_QUEUED_PER_USER=2)
    for _ in range(2):
        _session_task(client, user)
    with db.orm_read() as s:
        before = s.scalar(select(Task.id).order_by(Task.id.desc()).limit(1))
    refused = client.post("/api/v1/sessions", headers=user,
                          json={"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "one more"})
    assert refused.status_code == 429 and refused.json["error"] == "too_many_queued"
    assert int(refused.headers["Retry-After"]) > 0
    with db.orm_read() as s:
        assert s.scalar(select(Task.id).order_by(Task.id.desc()).limit(1)) == before
        assert s.scalar(select(func.count()).select_from(Session)) == 2
        assert s.scalar(select(func.count()).select_from(Interaction)) == 4


# --- the fine-tune reservation ----------------------------------------------------------------------------

BOTH = (f"create:text:{TEXT_MODEL}", f"finetune:text:{TEXT_MODEL}")


def _reserve(db, runners: int) -> None:
    with db.orm_write() as s:
        s.execute(insert(Reservation).values(model_name=TEXT_MODEL, runners=runners, updated_at=utcnow()))


def test_a_reserved_runner_takes_no_inference_but_a_fine_tune_at_once(client, user, runner, db):
    _reserve(db, 1)
    for name in ("pool-1", "pool-2"):  # both seen polling both kinds: the pool has two idle runners
        assert _poll(client, _as(runner, name), *BOTH).status_code == 204
    chats_queued = [_session_task(client, user) for _ in range(2)]
    assert _poll(client, _as(runner, "pool-1"), *BOTH).json["task"]["session_id"] == chats_queued[0]
    assert _poll(client, _as(runner, "pool-2"), *BOTH).status_code == 204  # it is the one kept idle
    created = start_finetune(client, user, [("data.jsonl", chats(12))], params={"max_steps": 1})
    assert _poll(client, _as(runner, "pool-2"), *BOTH).json["task"]["session_id"] == created.json["id"]


def test_without_a_reservation_the_pool_takes_inference(client, user, runner):
    for name in ("pool-1", "pool-2"):
        _poll(client, _as(runner, name), *BOTH)
    chats_queued = [_session_task(client, user) for _ in range(2)]
    got = [_poll(client, _as(runner, name), *BOTH).json["task"]["session_id"] for name in ("pool-1", "pool-2")]
    assert got == chats_queued


def test_a_runner_outside_the_pool_is_not_held_back(client, user, runner, db):
    _reserve(db, 5)
    _session_task(client, user)
    assert _poll(client, _as(runner, "inference-only")).status_code == 200


def test_the_reservation_holds_on_the_complete_and_claim_next_path(client, user, runner, db):
    _reserve(db, 1)
    for name in ("pool-1", "pool-2"):
        _poll(client, _as(runner, name), *BOTH)
    first, second = _session_task(client, user), _session_task(client, user)
    claimed = _poll(client, _as(runner, "pool-1"), *BOTH).json
    assert claimed["task"]["session_id"] == first
    # pool-2 is busy elsewhere now (a fine-tune), so pool-1 finishing its chat is the only idle one left.
    start_finetune(client, user, [("data.jsonl", chats(12))], params={"max_steps": 1})
    assert _poll(client, _as(runner, "pool-2"), *BOTH).json["task"]["mode"] == "finetune"
    done = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=_as(runner, "pool-1"),
                       json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"},
                             "claim_next": True})
    assert done.status_code == 200 and done.json["next"] is None
    with db.orm_read() as s:
        assert s.scalar(select(Task.status).where(Task.session_id == second)) == TaskStatus.QUEUED


def test_a_task_held_for_a_warm_runner_wakes_that_runner_at_once(app, client, user, runner, db):
    import threading
    import time

    session, ref = _adapter_session(client, user, runner)
    client.post("/api/v1/worker/runners", headers=_as(runner, "gpu-warm"),
                json=report(adapters=[ref["sha256"]], slots={"total": 2, "busy": 0}))
    answers: dict[str, Any] = {}

    def wait_as(name: str, warm: tuple[str, ...]) -> None:
        answers[name] = _poll(app.test_client(), _as(runner, name), warm=warm, wait=8)

    waiters = [threading.Thread(target=wait_as, args=("gpu-cold", ())),
               threading.Thread(target=wait_as, args=("gpu-warm", (ref["sha256"],)))]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.5)
    started = time.monotonic()
    client.post(f"/api/v1/sessions/{session}/messages", headers=user, json={"message": "hi"})
    waiters[1].join(10)
    assert answers["gpu-warm"].status_code == 200 and answers["gpu-warm"].json["task"]["session_id"] == session
    assert time.monotonic() - started < 1.0  # woken by the adapter's topic, not by a re-check
    waiters[0].join(10)
    assert answers["gpu-cold"].status_code == 204


def test_fair_shares_take_turns_on_a_single_slot(client, make_user, runner):
    """A one-slot runner holds nothing when it claims, so both users count 0 running: the user served
    longest ago goes first, and the two alternate."""
    big, small = make_user("big"), make_user("small")
    big_sessions = [_session_task(client, big) for _ in range(4)]
    small_sessions = [_session_task(client, small) for _ in range(2)]
    order = []
    for _ in range(4):
        claimed = _poll(client, runner).json
        order.append(claimed["task"]["session_id"])
        client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                    json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok"}})
    assert order == [big_sessions[0], small_sessions[0], big_sessions[1], small_sessions[1]]
