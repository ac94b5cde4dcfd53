"""Per-user task limits end to end: the queued limit refuses new work with a 429 storing nothing, the
running limit holds a user's tasks back from runners, and operators set both (admin API and CLI)."""

from __future__ import annotations

from typing import Any

import pytest
from click.testing import CliRunner

from helix_api.accounts.auth import create_user
from helix_api.cli.operator import main
from tests.api.test_finetune import chats, counts, start_finetune
from tests.conftest import IMAGE_ALIAS, TEXT_ALIAS, TEXT_MODEL, bearer, claim

HELLO = {"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "hello"}


@pytest.fixture
def admin(db) -> dict[str, str]:
    """Headers of an admin user."""
    with db.orm_write() as s:
        _, key = create_user(s, "root", is_admin=True)
    return bearer(key)


def _limits(client, admin, name: str, **body: Any):
    response = client.put(f"/api/v1/admin/users/{name}/limits", json=body, headers=admin)
    assert response.status_code == 200, response.json
    return response.json


def _assert_too_many(response) -> None:
    assert response.status_code == 429, response.data
    assert response.json["error"] == "too_many_queued"
    assert int(response.headers["Retry-After"]) > 0


def _answer(client, runner, headers: dict[str, str] | None = None) -> None:
    """Claim the next text task and complete it."""
    claimed = claim(client, {**runner, **(headers or {})}).json
    done = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/complete", headers=runner,
                       json={"lease_token": claimed["lease"]["token"], "result": {"text": "hi"}})
    assert done.status_code == 200, done.json


# --- The queued limit: a 429, and nothing stored ---------------------------------------------------

def test_a_new_session_over_the_queued_limit_is_a_429_storing_nothing(client, user, db, settings, admin):
    _limits(client, admin, "alice", max_queued=1)
    assert client.post("/api/v1/sessions", json=HELLO, headers=user).status_code == 201
    before = counts(db, settings)
    _assert_too_many(client.post("/api/v1/sessions", json=HELLO, headers=user))
    assert counts(db, settings) == before


def test_continuing_a_session_over_the_queued_limit_is_a_429_storing_nothing(client, user, runner, db, settings,
                                                                            admin):
    _limits(client, admin, "alice", max_queued=1)
    first = client.post("/api/v1/sessions", json=HELLO, headers=user).json
    _answer(client, runner)
    assert client.post("/api/v1/sessions", json=HELLO, headers=user).status_code == 201  # at the limit now
    before = counts(db, settings)
    _assert_too_many(client.post(f"/api/v1/sessions/{first['id']}/messages", json={"message": "more"},
                                 headers=user))
    assert counts(db, settings) == before
    # The session is left as it was: answered, and free to continue once there is room.
    session = client.get(f"/api/v1/sessions/{first['id']}", headers=user).json
    assert [i["creator"] for i in session["interactions"]] == ["user", "assistant"]
    _limits(client, admin, "alice", max_queued=2)
    assert client.post(f"/api/v1/sessions/{first['id']}/messages", json={"message": "more"},
                       headers=user).status_code == 201


def test_a_finetune_over_the_queued_limit_is_a_429_storing_nothing(client, user, db, settings, admin):
    _limits(client, admin, "alice", max_queued=1)
    assert client.post("/api/v1/sessions", json=HELLO, headers=user).status_code == 201
    before = counts(db, settings)  # sessions, interactions, tasks, file rows and files on disk
    _assert_too_many(start_finetune(client, user, [("data.jsonl", chats(12))]))
    assert counts(db, settings) == before


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"model": TEXT_ALIAS, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/chat/completions", {"model": TEXT_ALIAS, "stream": True, "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/images/generations", {"model": IMAGE_ALIAS, "prompt": "a fox"})], ids=["chat", "stream", "image"])
def test_openai_over_the_queued_limit_is_an_openai_429_storing_nothing(client, user, db, settings, admin, path, body):
    _limits(client, admin, "alice", max_queued=1)
    assert client.post("/api/v1/sessions", json=HELLO, headers=user).status_code == 201
    before = counts(db, settings)
    response = client.post(path, headers=user, json=body)
    assert response.status_code == 429, response.data
    assert int(response.headers["Retry-After"]) > 0
    assert response.headers["x-should-retry"] == "true"
    error = response.json["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "too_many_queued")
    assert counts(db, settings) == before


@pytest.mark.parametrize("own, accepted", [(None, 2), (1, 1), (3, 3), (0, 5)])
def test_a_users_own_queued_limit_is_honoured_above_and_below_the_default(make_client, db, own, accepted, admin):
    client = make_client(MAX_QUEUED_PER_USER=2)
    with db.orm_write() as s:
        _, key = create_user(s, "bob")
    if own is not None:
        _limits(client, admin, "bob", max_queued=own)
    codes = [client.post("/api/v1/sessions", json=HELLO, headers=bearer(key)).status_code for _ in range(5)]
    assert codes == [201] * accepted + [429] * (5 - accepted)


def test_a_task_that_starts_makes_room_under_the_queued_limit(client, user, runner, admin):
    _limits(client, admin, "alice", max_queued=1)
    assert client.post("/api/v1/sessions", json=HELLO, headers=user).status_code == 201
    _assert_too_many(client.post("/api/v1/sessions", json=HELLO, headers=user))
    assert claim(client, runner).status_code == 200  # running now: no longer queued
    assert client.post("/api/v1/sessions", json=HELLO, headers=user).status_code == 201


# --- The running limit and fair shares -------------------------------------------------------------

def _owners(owner: dict[int, str], response) -> list[str]:
    """Whose tasks a claim answered with: `owner` names each session's user."""
    assert response.status_code == 200, response.data
    tasks = response.json["tasks"] if "tasks" in response.json else [response.json]
    return [owner[t["task"]["session_id"]] for t in tasks]


def test_the_running_limit_holds_a_users_tasks_back_while_others_are_claimed(client, make_user, runner, admin):
    alice, bob = make_user("alice"), make_user("bob")
    _limits(client, admin, "alice", max_running=1)
    owner = {}
    for headers, name in ((alice, "alice"), (alice, "alice"), (bob, "bob")):
        owner[client.post("/api/v1/sessions", json=HELLO, headers=headers).json["id"]] = name
    assert sorted(_owners(owner, claim(client, runner, max=2))) == ["alice", "bob"]
    assert claim(client, runner, max=2).status_code == 204  # alice's second waits for her first to end


def test_a_claim_of_several_takes_no_more_than_the_running_limit(client, make_user, runner, admin):
    alice = make_user("alice")
    _limits(client, admin, "alice", max_running=1)
    for _ in range(3):
        client.post("/api/v1/sessions", json=HELLO, headers=alice)
    first = claim(client, runner, max=2)
    assert first.status_code == 200 and len(first.json["tasks"]) == 1
    assert claim(client, runner, max=2).status_code == 204


def test_fair_shares_alternate_claims_to_the_user_with_fewer_running(client, make_user, runner):
    alice, bob = make_user("alice"), make_user("bob")
    owner = {}
    for headers, name in [(alice, "alice")] * 3 + [(bob, "bob")] * 2:
        owner[client.post("/api/v1/sessions", json=HELLO, headers=headers).json["id"]] = name
    order = [_owners(owner, claim(client, runner))[0] for _ in range(5)]
    assert order == ["alice", "bob", "alice", "bob", "alice"]


# --- Operators set them: the admin API and the CLI -------------------------------------------------

def test_admin_reads_and_sets_a_users_limits(make_client, make_user, admin):
    client = make_client(MAX_QUEUED_PER_USER=7, MAX_RUNNING_PER_USER=0)
    alice = make_user("alice")
    admin = admin
    client.post("/api/v1/sessions", json=HELLO, headers=alice)
    shown = client.get("/api/v1/admin/users/alice/limits", headers=admin).json
    assert shown == {"user": "alice", "max_queued": None, "max_running": None,
                     "defaults": {"max_queued": 7, "max_running": 0},
                     "effective": {"max_queued": 7, "max_running": None}, "queued": 1, "running": 0}
    set_ = _limits(client, admin, "alice", max_running=2)
    assert (set_["max_queued"], set_["max_running"], set_["effective"]) == (
        None, 2, {"max_queued": 7, "max_running": 2})  # a field left out stays as it was
    cleared = _limits(client, admin, "alice", max_running=None, max_queued=0)
    assert (cleared["max_running"], cleared["max_queued"], cleared["effective"]) == (
        None, 0, {"max_queued": None, "max_running": None})


@pytest.mark.parametrize("field", ["max_queued", "max_running"])
def test_a_negative_limit_is_a_400_naming_the_field_and_changes_nothing(client, user, field, admin):
    admin = admin
    _limits(client, admin, "alice", max_queued=3)
    response = client.put("/api/v1/admin/users/alice/limits", json={"max_queued": 5, field: -1}, headers=admin)
    assert response.status_code == 400 and response.json["field"] == field, response.json
    assert client.get("/api/v1/admin/users/alice/limits", headers=admin).json["max_queued"] == 3


def test_user_limits_are_for_admins_and_name_a_user_that_exists(client, user, runner, admin):
    url = "/api/v1/admin/users/alice/limits"
    assert client.get(url).status_code == 401
    assert client.put(url, json={"max_queued": 1}).status_code == 401
    assert client.get(url, headers=user).status_code == 403
    assert client.put(url, json={"max_queued": 1}, headers=user).status_code == 403
    assert client.get(url, headers=runner).status_code == 403
    admin = admin
    assert client.get("/api/v1/admin/users/nobody/limits", headers=admin).status_code == 404
    missing = client.put("/api/v1/admin/users/nobody/limits", json={"max_queued": 1}, headers=admin)
    assert missing.status_code == 404 and "nobody" in missing.json["message"]
    assert client.get(url, headers=admin).json["max_queued"] is None  # the 403s changed nothing


@pytest.fixture
def cli(database_url, monkeypatch, tmp_path):
    monkeypatch.setenv("HELIX_DATABASE_URL", database_url)
    monkeypatch.setenv("HELIX_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("HELIX_MAX_QUEUED_PER_USER", "4")

    def run(*args: str):
        return CliRunner().invoke(main, list(args))
    return run


def test_cli_sets_shows_and_resets_a_users_limits(cli, client, user, admin):
    shown = cli("users", "limits", "alice")
    assert shown.exit_code == 0, shown.output
    assert "queued   0 now; limit 4 (operator default)" in shown.stdout
    assert "running  0 now; no limit (operator default)" in shown.stdout
    set_ = cli("users", "limits", "alice", "--queued", "2", "--running", "1")
    assert set_.exit_code == 0, set_.output
    assert "limit 2 (own)" in set_.stdout and "limit 1 (own)" in set_.stdout
    admin = admin
    assert client.get("/api/v1/admin/users/alice/limits", headers=admin).json["max_queued"] == 2
    reset = cli("users", "limits", "alice", "--queued", "default")
    assert reset.exit_code == 0, reset.output
    body = client.get("/api/v1/admin/users/alice/limits", headers=admin).json
    assert (body["max_queued"], body["max_running"]) == (None, 1)


@pytest.mark.parametrize("option", ["--queued", "--running"])
def test_cli_refuses_a_negative_limit_naming_the_option(cli, client, user, option, admin):
    refused = cli("users", "limits", "alice", option, "-1")
    assert refused.exit_code == 2
    assert f"Invalid value for '{option}'" in refused.output and "negative" in refused.output
    body = client.get("/api/v1/admin/users/alice/limits", headers=admin).json
    assert (body["max_queued"], body["max_running"]) == (None, None)


def test_cli_names_an_unknown_user(cli):
    refused = cli("users", "limits", "nobody", "--queued", "1")
    assert refused.exit_code == 1 and "no user called 'nobody'" in refused.output
