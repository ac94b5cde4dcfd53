"""Usage accounting: a row per attempt's end, GET /api/v1/usage over them, and who may read whose."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import text

from helix_api.accounts.auth import create_user
from tests.conftest import TEXT_ALIAS, TEXT_MODEL, bearer, claim

OTHER_MODEL = "org/other-model"


@pytest.fixture
def settings(settings: dict[str, Any]) -> dict[str, Any]:
    """A second text model, so usage has more than one group."""
    return {**settings, "MODELS": f"text:{OTHER_MODEL}"}


def _admin(db) -> dict[str, str]:
    with db.orm_write() as s:
        _, key = create_user(s, "root", is_admin=True)
    return bearer(key)


def _complete(client, runner, model: str, prompt: int, completion: int) -> dict[str, Any]:
    claimed = claim(client, runner, model=model).json
    usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    done = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                       json={"lease_token": claimed["lease"]["token"], "result": {"text": "ok", "usage": usage}})
    assert done.status_code == 200, done.json
    return claimed


def _sql(db, statement: str) -> list[Any]:
    with db.connect() as conn:
        return list(conn.execute(text(statement)))


def test_usage_totals_equal_the_sum_of_the_tasks_usage(client, user, runner, db, task_factory):
    for model, prompt, completion in ((TEXT_MODEL, 5, 7), (TEXT_MODEL, 3, 11), (OTHER_MODEL, 2, 4)):
        task_factory(model_name=model)
        _complete(client, runner, model, prompt, completion)
    # A failed attempt that is retried, then completes: its runner time is not on the bill.
    task_factory()
    first = claim(client, runner).json
    client.post(f"/api/v1/worker/task/{first['task']['id']}/fail", headers=runner,
                json={"lease_token": first["lease"]["token"], "error": "oom", "retry": True})
    _complete(client, runner, TEXT_MODEL, 1, 1)

    body = client.get("/api/v1/usage", headers=user).json
    (prompt, completion), = _sql(db, "SELECT sum(prompt_tokens), sum(completion_tokens) FROM task_usage")
    assert (body["total"]["prompt_tokens"], body["total"]["completion_tokens"]) == (prompt, completion) == (11, 23)
    results = [r for (r,) in _sql(db, "SELECT result FROM tasks WHERE status = 'complete'")]
    results = [json.loads(r) if isinstance(r, str) else r for r in results]
    assert body["total"]["completion_tokens"] == sum(r["usage"]["completion_tokens"] for r in results)
    assert body["total"]["tasks"] == 4
    by_model = {g["model"]: g for g in body["groups"]}
    # Each model by the name users see: the default's alias, and OTHER_MODEL's hub id (it has no alias).
    assert (by_model[TEXT_ALIAS]["tasks"], by_model[TEXT_ALIAS]["completion_tokens"]) == (3, 19)
    assert (by_model[OTHER_MODEL]["tasks"], by_model[OTHER_MODEL]["total_tokens"]) == (1, 6)
    assert _sql(db, "SELECT outcome, billed FROM task_usage WHERE task_id = :id".replace(
        ":id", str(first["task"]["id"])) + " ORDER BY id") == [("retried", False), ("complete", True)]
    assert body["total"]["unbilled_runner_seconds"] >= 0 and body["total"]["runner_seconds"] >= 0

    by_day = client.get("/api/v1/usage?group_by=day", headers=user).json
    assert len(by_day["groups"]) == 1 and by_day["groups"][0]["completion_tokens"] == 23
    assert by_day["groups"][0]["day"] == by_day["groups"][0]["day"][:10]
    future = client.get("/api/v1/usage?from=2999-01-01", headers=user).json
    assert future["total"]["tasks"] == 0 and future["groups"] == []


def test_a_cancelled_task_is_recorded_and_a_queued_cancel_held_no_runner(client, user, task_factory, db):
    session = task_factory()
    assert client.post(f"/api/v1/sessions/{session['id']}/cancel", headers=user).status_code == 200
    assert _sql(db, "SELECT outcome, billed, runner_seconds FROM task_usage") == [("cancelled", True, 0.0)]
    assert client.get("/api/v1/usage", headers=user).json["total"]["tasks"] == 1


def test_one_user_cannot_read_anothers_usage_but_an_admin_can(client, user, runner, make_user, db, task_factory):
    task_factory()
    _complete(client, runner, TEXT_MODEL, 4, 6)
    bob = make_user("bob")
    assert client.get("/api/v1/usage", headers=bob).json["total"]["completion_tokens"] == 0
    refused = client.get("/api/v1/usage?user=alice", headers=bob)
    assert refused.status_code == 403 and refused.json["error"] == "forbidden"
    assert client.get("/api/v1/usage?user=bob", headers=bob).status_code == 200  # oneself, by name
    admin = _admin(db)
    seen = client.get("/api/v1/usage?user=alice", headers=admin).json
    assert (seen["user"], seen["total"]["completion_tokens"]) == ("alice", 6)
    assert client.get("/api/v1/usage?user=nobody", headers=admin).status_code == 404
    assert client.get("/api/v1/usage", headers=runner).status_code == 403
    assert client.get("/api/v1/usage").status_code == 401


@pytest.mark.parametrize(("query", "field"), [
    ("from=yesterday", "from"), ("to=2026-13-01", "to"), ("group_by=week", "group_by"),
    ("from=2026-12-02&to=2026-12-01", "to"), ("from=" + "1" * 50, "from")])
def test_bad_from_to_or_group_by_is_a_400_naming_the_field(client, user, query, field):
    refused = client.get(f"/api/v1/usage?{query}", headers=user)
    assert refused.status_code == 400, refused.json
    assert refused.json["field"] == field and field in refused.json["message"]


def test_times_with_offsets_and_dates_bound_the_range(client, user, runner, task_factory):
    task_factory()
    _complete(client, runner, TEXT_MODEL, 1, 2)
    assert client.get("/api/v1/usage?from=2000-01-01&to=2999-01-01T00:00:00Z", headers=user).json[
        "total"]["completion_tokens"] == 2
    assert client.get("/api/v1/usage?to=2000-01-01T00:00:00%2B02:00", headers=user).json["total"]["tasks"] == 0
