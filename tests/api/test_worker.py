"""The worker API: claim, heartbeat, events, complete, fail, release, and lease fencing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from helix_api.models import Task, TaskEvent, TaskStatus, utcnow
from tests.conftest import IMAGE_MODEL, SEED_CLAIM_URL, TEXT_MODEL, claim


def _claimed(client, runner, task_factory, **overrides):
    session = task_factory(**overrides)
    response = claim(client, runner)
    assert response.status_code == 200, response.json
    return session, response.json["task"], response.json["lease"]["token"]


def _post(client, runner, task_id, action, **body):
    return client.post(f"/api/v1/worker/task/{task_id}/{action}", json=body, headers=runner)


def test_seed_url_claims_verbatim(client, runner, task_factory):
    session = task_factory(message="hello")
    response = client.get(SEED_CLAIM_URL, headers=runner)
    assert response.status_code == 200
    task = response.json["task"]
    assert task["session_id"] == session["id"]
    assert task["mode"] == "create" and task["type"] == "text" and task["model_name"] == TEXT_MODEL
    assert task["input"]["messages"] == [{"role": "user", "content": "hello"}]
    assert task["attempt"] == 1
    assert response.json["lease"]["token"]


@pytest.mark.parametrize("mode,type_", [("CREATE", "TEXT"), ("inference", "text"), ("Create", "tExt")])
def test_mode_and_type_are_case_insensitive(client, runner, task_factory, mode, type_):
    task_factory()
    response = client.get("/api/v1/worker/task", headers=runner,
                          query_string={"mode": mode, "type": type_, "model_name": TEXT_MODEL})
    assert response.status_code == 200


def test_no_matching_work_is_204(client, runner, task_factory):
    task_factory()
    assert claim(client, runner, model=IMAGE_MODEL, type="image").status_code == 204
    response = client.get("/api/v1/worker/task", headers=runner,
                          query_string={"mode": "finetune", "type": "text", "model_name": TEXT_MODEL})
    assert response.status_code == 204 and response.data == b""


def test_a_task_is_claimed_once(client, runner, task_factory):
    task_factory()
    assert claim(client, runner).status_code == 200
    assert claim(client, runner).status_code == 204


def test_claim_records_runner_and_timestamps(client, runner, task_factory, db):
    _, task, _ = _claimed(client, runner, task_factory)
    with db.orm_read() as s:
        row = s.get(Task, task["id"])
    assert row.status == TaskStatus.CLAIMED
    assert row.runner == "test-runner" and row.runner_token_id is not None
    assert row.claimed_at is not None and row.started_at is None and row.lease_expires_at > utcnow()


def test_runner_header_names_the_runner(client, runner, task_factory, db):
    task_factory()
    response = client.get(SEED_CLAIM_URL, headers={**runner, "X-Helix-Runner": "gpu7-1234"})
    with db.orm_read() as s:
        assert s.get(Task, response.json["task"]["id"]).runner == "gpu7-1234"


def test_heartbeat_renews_lease_and_marks_started(client, runner, task_factory, db):
    _, task, token = _claimed(client, runner, task_factory)
    with db.orm_read() as s:
        before = s.get(Task, task["id"]).lease_expires_at
    response = _post(client, runner, task["id"], "heartbeat", lease_token=token)
    assert response.status_code == 200
    assert response.json["cancelled"] is False
    with db.orm_read() as s:
        row = s.get(Task, task["id"])
    assert row.lease_expires_at >= before
    assert row.status == TaskStatus.RUNNING and row.started_at is not None


def test_events_are_stored_once_by_seq(client, runner, task_factory, db, user):
    session, task, token = _claimed(client, runner, task_factory)
    first = [{"seq": 1, "kind": "token", "text": "Hel"}, {"seq": 2, "kind": "token", "text": "lo"}]
    assert _post(client, runner, task["id"], "events", lease_token=token, events=first).json["stored"] == 2
    # A retried post (same seqs) plus one new event: only the new one is taken.
    again = [*first, {"seq": 3, "kind": "progress", "step": 1, "total": 4, "message": "going"}]
    response = _post(client, runner, task["id"], "events", lease_token=token, events=again)
    # A progress event is a row, stored after the text before it: everything up to seq 3 is in SQL.
    assert response.json == {"stored": 1, "last_seq": 3, "durable_seq": 3, "cancelled": False}
    with db.orm_read() as s:
        kinds = list(s.scalars(select(TaskEvent.kind).where(TaskEvent.task_id == task["id"])
                               .order_by(TaskEvent.seq)))
        assert s.get(Task, task["id"]).last_event_seq == 3
    assert kinds == ["state", "state", "progress"]  # tokens are not rows: the reply's text holds them
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["output"] == "Hello"
    assert reply["state"] == "running"
    assert reply["progress"] == {"step": 1, "total": 4, "message": "going"}


def test_complete_stores_result_and_reply(client, runner, task_factory, db, user):
    session, task, token = _claimed(client, runner, task_factory)
    result = {"text": "Hi there", "finish_reason": "stop",
              "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    response = _post(client, runner, task["id"], "complete", lease_token=token, result=result)
    assert response.status_code == 200 and response.json == {"status": "complete"}
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "complete" and reply["output"] == "Hi there" and reply["result"] == result
    with db.orm_read() as s:
        row = s.get(Task, task["id"])
    assert row.status == TaskStatus.COMPLETE and row.finished_at is not None and row.result == result


def test_complete_stores_the_events_it_carries_once_and_before_the_end(client, runner, task_factory, db):
    _, task, token = _claimed(client, runner, task_factory)
    posted = [{"seq": 1, "kind": "token", "text": "Hi"}]
    assert _post(client, runner, task["id"], "events", lease_token=token, events=posted).status_code == 200
    carried = [*posted, {"seq": 2, "kind": "token", "text": " there"}]  # seq 1 again: a retried post
    response = _post(client, runner, task["id"], "complete", lease_token=token, result={"text": "Hi there"},
                     events=carried)
    assert response.status_code == 200
    with db.orm_read() as s:
        rows = list(s.execute(select(TaskEvent.kind, TaskEvent.data).where(TaskEvent.task_id == task["id"])
                              .order_by(TaskEvent.seq)))
    assert [(kind, data.get("state")) for kind, data in rows] == [
        ("state", "queued"), ("state", "running"), ("state", "complete")]
    with db.orm_read() as s:
        assert s.get(Task, task["id"]).interaction.output == "Hi there"


def test_events_of_several_tasks_in_one_request_each_answer_for_themselves(client, runner, task_factory, db, user):
    first, task1, token1 = _claimed(client, runner, task_factory)
    _, task2, _ = _claimed(client, runner, task_factory)
    response = client.post("/api/v1/worker/events", headers=runner, json={"posts": [
        {"task_id": task1["id"], "lease_token": token1, "events": [{"seq": 1, "kind": "token", "text": "Hi"}]},
        {"task_id": task2["id"], "lease_token": "l_stale", "events": [{"seq": 1, "kind": "token", "text": "no"}]},
    ]})
    assert response.status_code == 200, response.json
    ok, refused = response.json["results"]
    assert ok == {"task_id": task1["id"], "stored": 1, "last_seq": 1, "durable_seq": 1, "cancelled": False}
    assert refused["task_id"] == task2["id"] and refused["error"] == "lease_lost"
    reply = client.get(f"/api/v1/sessions/{first['id']}", headers=user).json["interactions"][-1]
    assert reply["output"] == "Hi"
    with db.orm_read() as s:
        assert s.scalar(select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == task2["id"],
                                                                          TaskEvent.kind == "token")) == 0
    bad = client.post("/api/v1/worker/events", headers=runner, json={"posts": [{"task_id": task1["id"]}]})
    assert bad.status_code == 400 and bad.json["field"] == "posts[0].lease_token"


def test_complete_with_bad_events_is_400_and_changes_nothing(client, runner, task_factory, db):
    _, task, token = _claimed(client, runner, task_factory)
    response = _post(client, runner, task["id"], "complete", lease_token=token, result={"text": "x"},
                     events=[{"seq": 1, "kind": "shout"}])
    assert response.status_code == 400 and response.json["field"] == "events[0].kind"
    with db.orm_read() as s:
        assert s.get(Task, task["id"]).status == TaskStatus.CLAIMED


def test_fail_with_retry_requeues_until_attempts_run_out(client, runner, task_factory, db, user):
    session = task_factory()
    statuses = []
    for _ in range(3):
        claimed = claim(client, runner).json
        response = _post(client, runner, claimed["task"]["id"], "fail",
                         lease_token=claimed["lease"]["token"], error="Traceback...\nRuntimeError: boom",
                         retry=True)
        statuses.append(response.json["status"])
    assert statuses == ["queued", "queued", "dead"]
    assert claim(client, runner).status_code == 204
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "error" and "boom" in reply["error"] and "3 attempts" in reply["error"]
    assert reply["task"]["attempt"] == 3


def test_fail_without_retry_fails_for_good(client, runner, task_factory, user):
    session, task, token = _claimed(client, runner, task_factory)
    response = _post(client, runner, task["id"], "fail", lease_token=token, error="bad params", retry=False)
    assert response.json["status"] == "failed"
    assert claim(client, runner).status_code == 204
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "error" and reply["error"] == "bad params"


def test_release_requeues_without_spending_an_attempt(client, runner, task_factory):
    _, task, token = _claimed(client, runner, task_factory)
    assert _post(client, runner, task["id"], "release", lease_token=token).json == {"status": "queued"}
    again = claim(client, runner).json["task"]
    assert again["id"] == task["id"] and again["attempt"] == 1


def test_requeued_attempt_restarts_the_reply(client, runner, task_factory, user):
    session, task, token = _claimed(client, runner, task_factory)
    _post(client, runner, task["id"], "events", lease_token=token,
          events=[{"seq": 1, "kind": "token", "text": "partial"}])
    _post(client, runner, task["id"], "fail", lease_token=token, error="oom", retry=True)
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "queued" and reply["output"] == ""
    second = claim(client, runner).json
    assert second["task"]["attempt"] == 2
    # seq starts again at 1 for the new attempt and is stored.
    response = _post(client, runner, task["id"], "events", lease_token=second["lease"]["token"],
                     events=[{"seq": 1, "kind": "token", "text": "fresh"}])
    assert response.json["stored"] == 1


@pytest.mark.parametrize("action,body", [
    ("heartbeat", {}), ("events", {"events": [{"seq": 1, "kind": "token", "text": "x"}]}),
    ("complete", {"result": {"text": "late"}}), ("fail", {"error": "x", "retry": True}), ("release", {}),
])
def test_wrong_lease_token_is_409_and_changes_nothing(client, runner, task_factory, db, action, body):
    _, task, token = _claimed(client, runner, task_factory)
    response = _post(client, runner, task["id"], action, lease_token="not-the-token", **body)
    assert response.status_code == 409 and response.json["error"] == "lease_lost"
    with db.orm_read() as s:
        row = s.get(Task, task["id"])
        events = s.scalar(select(func.count()).select_from(TaskEvent).where(TaskEvent.task_id == task["id"]))
    assert row.status == TaskStatus.CLAIMED and row.result is None and row.attempt == 1
    assert events == 2  # queued and claimed, nothing from the bad post


def test_expired_lease_is_409_even_before_reaping(client, runner, task_factory, db, app):
    _, task, token = _claimed(client, runner, task_factory)
    with db.orm_write() as s:
        s.execute(update(Task).where(Task.id == task["id"])
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    response = _post(client, runner, task["id"], "complete", lease_token=token, result={"text": "late"})
    assert response.status_code == 409 and "expired" in response.json["message"]


def test_stale_runner_after_requeue_cannot_store_its_result(client, runner, task_factory, db, user):
    session, task, old_token = _claimed(client, runner, task_factory)
    with db.orm_write() as s:
        s.execute(update(Task).where(Task.id == task["id"])
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    second = claim(client, runner).json  # the claim path reaps the expired lease first
    assert second["task"]["id"] == task["id"] and second["task"]["attempt"] == 2
    late = _post(client, runner, task["id"], "complete", lease_token=old_token, result={"text": "stale"})
    assert late.status_code == 409
    _post(client, runner, task["id"], "complete", lease_token=second["lease"]["token"],
          result={"text": "fresh"})
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["output"] == "fresh"


def test_cancelled_task_tells_runner_and_refuses_results(client, runner, task_factory, user):
    session, task, token = _claimed(client, runner, task_factory)
    assert client.post(f"/api/v1/sessions/{session['id']}/cancel", headers=user).status_code == 200
    beat = _post(client, runner, task["id"], "heartbeat", lease_token=token)
    assert beat.status_code == 200 and beat.json == {"cancelled": True, "lease_expires_at": None}
    for action, body in [("events", {"events": [{"seq": 1, "kind": "token", "text": "x"}]}),
                         ("complete", {"result": {"text": "too late"}})]:
        response = _post(client, runner, task["id"], action, lease_token=token, **body)
        assert response.status_code == 409 and response.json["error"] == "task_cancelled"
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "cancelled" and reply["output"] == ""


def test_unknown_task_is_404(client, runner):
    response = _post(client, runner, 999999, "heartbeat", lease_token="x")
    assert response.status_code == 404 and response.json["error"] == "not_found"


@pytest.mark.parametrize("events,needle", [
    ([{"seq": 0, "kind": "token", "text": "x"}], "seq"),
    ([{"seq": 1, "kind": "state", "state": "complete"}], "kind"),
    ([{"seq": 1, "kind": "token"}], "text"),
    ([{"seq": 1, "kind": "progress", "step": "three"}], "step"),
    (["not an object"], "object"),
])
def test_malformed_events_are_400_and_store_nothing(client, runner, task_factory, events, needle):
    _, task, token = _claimed(client, runner, task_factory)
    response = _post(client, runner, task["id"], "events", lease_token=token, events=events)
    assert response.status_code == 400 and needle in response.json["message"]
    ok = _post(client, runner, task["id"], "events", lease_token=token,
               events=[{"seq": 1, "kind": "token", "text": "x"}])
    assert ok.json["stored"] == 1


def test_claim_needs_model_name_and_valid_wait(client, runner):
    response = client.get("/api/v1/worker/task?mode=create&type=text", headers=runner)
    assert response.status_code == 400 and response.json["field"] == "model_name"
    response = claim(client, runner, wait="45")
    assert response.status_code == 400 and "wait" in response.json["message"]
    response = claim(client, runner, mode="train")
    assert response.status_code == 400 and "create" in response.json["message"]


def test_retried_finishing_calls_are_idempotent(client, runner, task_factory):
    # A runner whose first `complete` succeeded but whose answer was lost retries it: same answer.
    _, task, token = _claimed(client, runner, task_factory)
    for _ in range(2):
        response = _post(client, runner, task["id"], "complete", lease_token=token, result={"text": "x"})
        assert response.status_code == 200 and response.json == {"status": "complete"}
    task_factory()
    claimed = claim(client, runner).json
    for _ in range(2):
        response = _post(client, runner, claimed["task"]["id"], "fail", lease_token=claimed["lease"]["token"],
                         error="x", retry=False)
        assert response.status_code == 200 and response.json == {"status": "failed"}
    task_factory()
    claimed = claim(client, runner).json
    for _ in range(2):
        response = _post(client, runner, claimed["task"]["id"], "release", lease_token=claimed["lease"]["token"])
        assert response.status_code == 200
    assert claim(client, runner).json["task"]["attempt"] == 1


def test_result_without_text_keeps_the_streamed_output(client, runner, task_factory, user):
    session, task, token = _claimed(client, runner, task_factory)
    _post(client, runner, task["id"], "events", lease_token=token,
          events=[{"seq": 1, "kind": "token", "text": "so far"}])
    _post(client, runner, task["id"], "complete", lease_token=token, result={"files": []})
    reply = client.get(f"/api/v1/sessions/{session['id']}", headers=user).json["interactions"][-1]
    assert reply["state"] == "complete" and reply["output"] == "so far"


def test_claim_max_takes_up_to_n_tasks_in_queue_order_each_with_its_own_lease(client, runner, task_factory, db):
    sessions = [task_factory(message=f"m{n}")["id"] for n in range(3)]
    response = claim(client, runner, max="2")
    assert response.status_code == 200
    claimed = response.json["tasks"]
    assert [c["task"]["session_id"] for c in claimed] == sessions[:2]
    assert len({c["lease"]["token"] for c in claimed}) == 2
    with db.orm_read() as s:
        rows = {t.session_id: t for t in s.scalars(select(Task))}
    assert [rows[sid].status for sid in sessions] == [TaskStatus.CLAIMED, TaskStatus.CLAIMED, TaskStatus.QUEUED]
    assert [rows[sid].lease_token for sid in sessions[:2]] == [c["lease"]["token"] for c in claimed]
    # Fewer queued than asked for: what there is; then nothing, as the single claim says it.
    assert [c["task"]["session_id"] for c in claim(client, runner, max="5").json["tasks"]] == sessions[2:]
    assert claim(client, runner, max="5").status_code == 204


@pytest.mark.parametrize("value", ["0", "65", "two", "1.5", "-1"])
def test_claim_max_out_of_range_is_400_naming_it(client, runner, value):
    response = claim(client, runner, max=value)
    assert response.status_code == 400 and response.json["field"] == "max"


def _complete_claiming_next(client, runner, task, token):
    return _post(client, runner, task["id"], "complete", lease_token=token, result={"text": "done"},
                 claim_next=True)


def test_complete_can_claim_the_next_task_of_the_same_queue(client, runner, task_factory, db):
    first, task, token = _claimed(client, runner, task_factory)
    task_factory(model_name=IMAGE_MODEL, type="image", message="a cat")  # another queue: not for this runner
    second = task_factory(message="next")
    response = _complete_claiming_next(client, runner, task, token)
    assert response.status_code == 200 and response.json["status"] == "complete"
    following = response.json["next"]
    assert following["task"]["session_id"] == second["id"] and following["task"]["attempt"] == 1
    with db.orm_read() as s:
        row = s.get(Task, following["task"]["id"])
        assert row.status == TaskStatus.CLAIMED and row.lease_token == following["lease"]["token"]
        assert s.get(Task, task["id"]).status == TaskStatus.COMPLETE
    # The lease it came with works like a claimed one, and the queue holds nothing more for this runner.
    assert _complete_claiming_next(client, runner, following["task"], following["lease"]["token"]).json == {
        "status": "complete", "next": None}


def test_a_retried_complete_hands_back_what_it_claimed_and_never_claims_twice(client, runner, task_factory, db):
    _, task, token = _claimed(client, runner, task_factory)
    task_factory(message="next")
    task_factory(message="after that")
    first = _complete_claiming_next(client, runner, task, token).json["next"]
    again = _complete_claiming_next(client, runner, task, token).json["next"]  # the answer was lost: retry
    assert again["task"]["id"] == first["task"]["id"] and again["lease"]["token"] == first["lease"]["token"]
    with db.orm_read() as s:
        assert s.scalar(select(func.count()).select_from(Task).where(Task.status == TaskStatus.CLAIMED)) == 1
    # Once that lease has run out, the retry answers nothing (the task went back to the queue).
    with db.orm_write() as s:
        s.execute(update(Task).where(Task.id == first["task"]["id"])
                  .values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    assert _complete_claiming_next(client, runner, task, token).json == {"status": "complete", "next": None}
    # A complete that claimed nothing, retried, still claims nothing.
    with db.orm_write() as s:
        s.execute(update(Task).where(Task.id == first["task"]["id"]).values(status=TaskStatus.COMPLETE))
    lone = claim(client, runner).json
    assert _complete_claiming_next(client, runner, lone["task"], lone["lease"]["token"]).json["next"] is None
    task_factory(message="late")
    assert _complete_claiming_next(client, runner, lone["task"], lone["lease"]["token"]).json["next"] is None


def test_claim_next_must_be_a_boolean(client, runner, task_factory):
    _, task, token = _claimed(client, runner, task_factory)
    response = _post(client, runner, task["id"], "complete", lease_token=token, result={}, claim_next="yes")
    assert response.status_code == 400 and response.json["field"] == "claim_next"


def test_hung_up_tells_a_waiting_runner_from_a_gone_one_past_descriptor_1024():
    # A node holding a thousand runners' connections hands out descriptors past select()'s limit.
    import fcntl
    import resource
    import socket

    from helix_api.tasks.routes import hung_up

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1600:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server_end, runner_end = socket.socketpair()
    high = socket.socket(fileno=fcntl.fcntl(server_end.fileno(), fcntl.F_DUPFD, 1500))
    try:
        assert high.fileno() >= 1500
        assert hung_up(high) is False  # waiting: sends nothing
        runner_end.close()
        assert hung_up(high) is True
    finally:
        high.close()
        server_end.close()
