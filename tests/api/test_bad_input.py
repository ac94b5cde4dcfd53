"""Bad input gets a clear 4xx JSON error naming what is wrong, and changes nothing stored."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from helix_api.models import Interaction, Session, Task, TaskEvent
from tests.conftest import TEXT_ALIAS, TEXT_MODEL


def _counts(db) -> tuple[int, ...]:
    with db.orm_read() as s:
        return tuple(s.scalar(select(func.count()).select_from(m)) for m in (Session, Interaction, Task, TaskEvent))


GOOD = {"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "hi"}


@pytest.mark.parametrize("change,status,needle", [
    ({"mode": "train"}, 400, "create (or inference), finetune"),
    ({"type": "video"}, 400, "text, image"),
    ({"model_name": "gpt-17"}, 400, f"'gpt-17'; offered: {TEXT_ALIAS}"),  # the names users type
    ({"model_name": "stabilityai/stable-diffusion-xl-base-1.0"}, 400, "Unknown text model"),
    ({"message": 42}, 400, "'message' must be a string"),
    ({"message": "   "}, 400, "must not be empty"),
    ({"message": None}, 400, "'message' is required"),
    ({"params": [1, 2]}, 400, "'params' must be an object"),
    ({"mode": 3}, 400, "'mode' must be a string"),
    ({"mesage": "typo"}, 400, "Unknown field 'mesage'"),
])
def test_bad_session_bodies(client, user, db, task_factory, change, status, needle):
    task_factory()
    before = _counts(db)
    body = {**GOOD, **change}
    body = {k: v for k, v in body.items() if v is not None}
    response = client.post("/api/v1/sessions", json=body, headers=user)
    assert response.status_code == status
    assert needle in response.json["message"], response.json
    assert response.json["error"] in {"invalid_field", "unknown_mode", "unknown_type", "unknown_model"}
    assert _counts(db) == before


@pytest.mark.parametrize("raw,needle", [
    (b"{not json", "not valid JSON"), (b"[1, 2]", "must be a JSON object"), (b"", "empty"),
    (b"\xff\xfe", "not valid JSON"),
])
def test_malformed_json_is_400(client, user, db, raw, needle):
    before = _counts(db)
    response = client.post("/api/v1/sessions", data=raw, headers={**user, "Content-Type": "application/json"})
    assert response.status_code == 400 and needle in response.json["message"]
    assert _counts(db) == before


def test_body_over_the_limit_is_413(settings, request):
    settings["MAX_CONTENT_LENGTH"] = 2048
    client, user, db = (request.getfixturevalue(n) for n in ("client", "user", "db"))
    before = _counts(db)
    response = client.post("/api/v1/sessions", json={**GOOD, "message": "x" * 5000}, headers=user)
    assert response.status_code == 413 and response.json["error"] == "too_large"
    assert "2048" in response.json["message"]
    assert _counts(db) == before


def test_bad_continue_leaves_session_as_it_was(client, user, task_factory, db):
    session = task_factory()
    before = _counts(db)
    response = client.post(f"/api/v1/sessions/{session['id']}/messages", json={"message": ""}, headers=user)
    assert response.status_code == 400 and _counts(db) == before


@pytest.mark.parametrize("query", ["limit=0", "limit=1000", "limit=ten", "before=-4"])
def test_bad_list_query_is_400(client, user, query):
    response = client.get(f"/api/v1/sessions?{query}", headers=user)
    assert response.status_code == 400 and response.json["error"] == "invalid_field"


def test_unknown_route_and_method_are_json(client, user):
    assert client.get("/api/v1/nope", headers=user).json["error"] == "not_found"
    response = client.delete("/api/v1/sessions", headers=user)
    assert response.status_code == 405 and response.json["error"] == "method_not_allowed"


def test_worker_bodies_name_the_field(client, runner, task_factory):
    task_factory()
    claimed = client.get("/api/v1/worker/task", query_string={"model_name": TEXT_MODEL}, headers=runner).json
    url = f"/api/v1/worker/task/{claimed['task']['id']}"
    response = client.post(f"{url}/complete", json={"lease_token": claimed["lease"]["token"]}, headers=runner)
    assert response.status_code == 400 and response.json["field"] == "result"
    response = client.post(f"{url}/fail", headers=runner,
                           json={"lease_token": claimed["lease"]["token"], "error": "x", "retry": "yes"})
    assert response.status_code == 400 and response.json["field"] == "retry"
    response = client.post(f"{url}/heartbeat", json={"lease_token": 5}, headers=runner)
    assert response.status_code == 400 and response.json["field"] == "lease_token"
