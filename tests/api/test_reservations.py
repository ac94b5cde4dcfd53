"""Fine-tune reservations end to end: runners polling for a model's inference and fine-tuning together
keep the reserved number free for fine-tuning; operators set them (admin API, CLI) and see them."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from helix_api.accounts.auth import create_user
from helix_api.cli.operator import main
from tests.api.test_finetune import chats, start_finetune
from tests.conftest import TEXT_ALIAS, TEXT_MODEL, bearer

HELLO = {"mode": "create", "type": "text", "model_name": TEXT_MODEL, "message": "hello"}
BOTH = [("kind", f"create:text:{TEXT_ALIAS}"), ("kind", f"finetune:text:{TEXT_ALIAS}")]


@pytest.fixture
def admin(db) -> dict[str, str]:
    """Headers of an admin user."""
    with db.orm_write() as s:
        _, key = create_user(s, "root", is_admin=True)
    return bearer(key)


@pytest.fixture
def pool(client, runner) -> list[dict[str, str]]:
    """Two runners polling for both the text model's inference and its fine-tuning, each heard from once."""
    runners = [{**runner, "X-Helix-Runner": name} for name in ("gpu-1", "gpu-2")]
    for headers in runners:
        assert _poll(client, headers).status_code == 204
    return runners


def _poll(client, headers: dict[str, str]):
    return client.get("/api/v1/worker/task", query_string=BOTH, headers=headers)


def _reserve(client, admin, model: str, runners: int):
    response = client.put(f"/api/v1/admin/reservations/{model}", json={"runners": runners}, headers=admin)
    assert response.status_code == 200, response.json
    return response.json


# --- What the claim rule does with one -------------------------------------------------------------

def test_a_reservation_keeps_a_runner_free_for_a_finetune(client, user, admin, pool):
    _reserve(client, admin, TEXT_ALIAS, 1)
    for _ in range(2):
        assert client.post("/api/v1/sessions", json=HELLO, headers=user).status_code == 201
    first = _poll(client, pool[0])
    assert first.status_code == 200 and first.json["task"]["mode"] == "create"  # two idle: one may serve chats
    assert _poll(client, pool[1]).status_code == 204  # the last idle one is kept for fine-tuning
    assert start_finetune(client, user, [("data.jsonl", chats(12))]).status_code == 201
    second = _poll(client, pool[1])
    assert second.status_code == 200 and second.json["task"]["mode"] == "finetune"


def test_without_a_reservation_the_second_runner_takes_inference(client, user, pool):
    for _ in range(2):
        client.post("/api/v1/sessions", json=HELLO, headers=user)
    assert [_poll(client, headers).json["task"]["mode"] for headers in pool] == ["create", "create"]


def test_a_reservation_removed_frees_the_runner_for_inference(client, user, admin, pool):
    _reserve(client, admin, TEXT_MODEL, 1)
    for _ in range(2):
        client.post("/api/v1/sessions", json=HELLO, headers=user)
    assert _poll(client, pool[0]).status_code == 200
    assert _poll(client, pool[1]).status_code == 204
    removed = client.delete(f"/api/v1/admin/reservations/{TEXT_ALIAS}", headers=admin)
    assert removed.status_code == 200 and removed.json == {"model_name": TEXT_MODEL, "runners": 0, "removed": True}
    assert _poll(client, pool[1]).status_code == 200


def test_a_reservation_larger_than_the_pool_is_accepted_and_flagged(client, user, admin, pool):
    body = _reserve(client, admin, TEXT_ALIAS, 3)
    assert (body["model_name"], body["runners"], body["pool_runners"], body["larger_than_pool"]) == (
        TEXT_MODEL, 3, 2, True)
    assert "the 2 runners" in body["warning"]
    listed = client.get("/api/v1/admin/reservations", headers=admin).json["reservations"]
    assert [(r["model_name"], r["runners"], r["pool_runners"], r["larger_than_pool"]) for r in listed] == [
        (TEXT_MODEL, 3, 2, True)]
    overview = client.get("/api/v1/admin/overview", headers=admin).json
    assert [(r["model_name"], r["larger_than_pool"]) for r in overview["reservations"]] == [(TEXT_MODEL, True)]
    assert {r["name"]: r["pool"] for r in overview["runners"]} == {"gpu-1": TEXT_MODEL, "gpu-2": TEXT_MODEL}
    client.post("/api/v1/sessions", json=HELLO, headers=user)
    assert _poll(client, pool[0]).status_code == 204  # every runner of the pool is kept: no inference at all


def test_a_reservation_the_pool_can_honour_is_not_flagged(client, admin, pool):
    body = _reserve(client, admin, TEXT_ALIAS, 2)
    assert (body["pool_runners"], body["larger_than_pool"], body["warning"]) == (2, False, None)


def test_runners_of_one_kind_are_not_in_a_pool(client, runner, admin):
    claim_one = client.get("/api/v1/worker/task", query_string={"model_name": TEXT_MODEL},
                           headers={**runner, "X-Helix-Runner": "chat-only"})
    assert claim_one.status_code == 204
    assert _reserve(client, admin, TEXT_ALIAS, 1)["pool_runners"] == 0
    runners = client.get("/api/v1/admin/runners", headers=admin).json["runners"]
    assert [(r["name"], r["pool"]) for r in runners] == [("chat-only", None)]


# --- Setting and removing one ----------------------------------------------------------------------

def test_zero_removes_a_reservation_and_put_replaces_it(client, admin):
    _reserve(client, admin, TEXT_ALIAS, 1)
    assert _reserve(client, admin, TEXT_MODEL, 2)["runners"] == 2  # the alias and the full name: one model
    assert [r["runners"] for r in client.get("/api/v1/admin/reservations", headers=admin).json["reservations"]] == [2]
    assert _reserve(client, admin, TEXT_ALIAS, 0) == {"model_name": TEXT_MODEL, "runners": 0, "removed": True}
    assert client.get("/api/v1/admin/reservations", headers=admin).json == {"reservations": []}
    again = client.delete(f"/api/v1/admin/reservations/{TEXT_ALIAS}", headers=admin)
    assert again.status_code == 200 and again.json["removed"] is False


@pytest.mark.parametrize("body, field", [({"runners": -1}, "runners"), ({"runners": "2"}, "runners"),
                                         ({}, "runners"), ({"runners": 1, "extra": 1}, "extra")])
def test_a_bad_reservation_is_a_400_naming_the_field_and_changes_nothing(client, admin, body, field):
    _reserve(client, admin, TEXT_ALIAS, 1)
    response = client.put(f"/api/v1/admin/reservations/{TEXT_ALIAS}", json=body, headers=admin)
    assert response.status_code == 400 and response.json["field"] == field, response.json
    assert [r["runners"] for r in client.get("/api/v1/admin/reservations", headers=admin).json["reservations"]] == [1]


def test_reservations_are_for_admins_only(client, user, runner, admin):
    url = f"/api/v1/admin/reservations/{TEXT_ALIAS}"
    for method, path, body in (("get", "/api/v1/admin/reservations", None), ("put", url, {"runners": 1}),
                               ("delete", url, None)):
        call = getattr(client, method)
        assert call(path, json=body).status_code == 401
        assert call(path, json=body, headers=user).status_code == 403
        assert call(path, json=body, headers=runner).status_code == 403
    assert client.get("/api/v1/admin/reservations", headers=admin).json == {"reservations": []}


# --- The operator's command ----------------------------------------------------------------------

@pytest.fixture
def cli(database_url, monkeypatch, tmp_path):
    monkeypatch.setenv("HELIX_DATABASE_URL", database_url)
    monkeypatch.setenv("HELIX_DATA_DIR", str(tmp_path))
    return lambda *args: CliRunner().invoke(main, list(args))


def test_cli_reserves_lists_and_clears(cli, client, admin, pool):
    done = cli("runners", "reserve", TEXT_ALIAS, "3")
    assert done.exit_code == 0, done.output
    assert f"3 runner(s) reserved for fine-tuning {TEXT_MODEL}" in done.stdout
    assert "more than the 2 runners" in done.stderr  # accepted, and said to be larger than the pool
    listed = cli("runners", "reservations")
    assert f"{TEXT_MODEL}  3 reserved of 2 live runner(s)  WARNING" in listed.stdout
    assert [r["runners"] for r in client.get("/api/v1/admin/reservations", headers=admin).json["reservations"]] == [3]
    assert f"pool:     {TEXT_MODEL}" in cli("runners", "list").stdout
    cleared = cli("runners", "reserve", TEXT_ALIAS, "0")
    assert cleared.exit_code == 0 and "no runners reserved" in cleared.stdout
    assert client.get("/api/v1/admin/reservations", headers=admin).json == {"reservations": []}


def test_cli_refuses_a_negative_reservation(cli, client, admin):
    refused = cli("runners", "reserve", TEXT_ALIAS, "-1")
    assert refused.exit_code == 2 and "Invalid value for 'N'" in refused.output and "negative" in refused.output
    assert client.get("/api/v1/admin/reservations", headers=admin).json == {"reservations": []}

