"""The admin overview: runners seen, queue depth per model, recent failures; for admins only."""

from __future__ import annotations

from helix_api.accounts.auth import create_user
from tests.conftest import IMAGE_MODEL, TEXT_MODEL, bearer, claim


def _admin(db) -> dict[str, str]:
    with db.orm_write() as s:
        _, key = create_user(s, "root", is_admin=True)
    return bearer(key)


def test_overview_is_for_admins_only(client, user, runner, db):
    assert client.get("/api/v1/admin/overview").status_code == 401
    refused = client.get("/api/v1/admin/overview", headers=user)
    assert refused.status_code == 403 and "admin" in refused.json["message"]
    assert client.get("/api/v1/admin/overview", headers=runner).status_code == 403
    assert client.get("/api/v1/admin/overview", headers=_admin(db)).status_code == 200


def test_overview_shows_runners_queues_and_failures(client, user, runner, db, task_factory):
    for _ in range(3):
        task_factory()
    task_factory(type="image", model_name=IMAGE_MODEL, message="a fox")
    headers = {**runner, "X-Helix-Runner": "gpu-1"}
    claimed = claim(client, headers).json
    client.post(f"/api/v1/worker/task/{claimed['task']['id']}/fail", headers=headers,
                json={"lease_token": claimed["lease"]["token"], "error": "CUDA out of memory", "retry": False})
    running = claim(client, headers).json

    body = client.get("/api/v1/admin/overview", headers=_admin(db)).json
    assert [(r["name"], r["model_name"], [t["task_id"] for t in r["tasks"]]) for r in body["runners"]] == [
        ("gpu-1", TEXT_MODEL, [running["task"]["id"]])]
    queues = {(q["type"], q["model_name"]): (q["queued"], q["running"]) for q in body["queues"]}
    assert queues == {("text", TEXT_MODEL): (1, 1), ("image", IMAGE_MODEL): (1, 0)}
    assert [(f["task_id"], f["status"], f["user"], f["runner"]) for f in body["recent_failures"]] == [
        (claimed["task"]["id"], "failed", "alice", "gpu-1")]
    assert body["recent_failures"][0]["error"] == "CUDA out of memory"
