"""Runners say what they are: a report at start and in heartbeats, stored in `runners`, shown to operators."""

from __future__ import annotations

import copy
from datetime import timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from helix_api.accounts.auth import create_user
from helix_api.cli.operator import main
from helix_api.models import Runner, utcnow
from helix_api.tasks import runners
from tests.conftest import TEXT_MODEL, bearer, claim

GIB = 1024**3


def report(**changes: Any) -> dict[str, Any]:
    """A report as runner/profile.py sends it: one GPU, a CPU, two slots, one adapter."""
    body = {
        "hardware": {"gpus": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_total": 80 * GIB,
                               "memory_free": 60 * GIB}],
                     "cpu": {"model": "AMD EPYC 9454", "cores": 16, "memory_total": 128 * GIB,
                             "memory_available": 100 * GIB}},
        "backend": "mistral",
        "kinds": [{"mode": "create", "type": "text", "model_name": TEXT_MODEL}],
        "slots": {"total": 4, "busy": 1},
        "adapters": ["ab" * 32],
        "version": "0.1.0",
    }
    body.update(changes)
    return body


def _admin(db) -> dict[str, str]:
    with db.orm_write() as s:
        _, key = create_user(s, "root", is_admin=True)
    return bearer(key)


def _row(db, name: str) -> Runner:
    with db.orm_read() as s:
        return s.scalars(select(Runner).where(Runner.name == name)).one()


def _post(client, runner, body: Any, name: str = "gpu-1"):
    return client.post("/api/v1/worker/runners", json=body, headers={**runner, "X-Helix-Runner": name})


def test_a_report_is_stored_and_shown_by_the_admin_api(client, runner, db):
    assert _post(client, runner, report()).status_code == 200
    row = _row(db, "gpu-1")
    assert (row.mode.value, row.type.value, row.model_name) == ("create", "text", TEXT_MODEL)  # a new runner's row
    assert (row.backend, row.slots_total, row.slots_busy, row.version) == ("mistral", 4, 1, "0.1.0")
    assert row.hardware["gpus"][0]["memory_free"] == 60 * GIB and row.reported_at is not None

    admin = _admin(db)
    (listed,) = client.get("/api/v1/admin/runners", headers=admin).json["runners"]
    assert listed["name"] == "gpu-1" and listed["alive"]
    assert listed["hardware"]["gpus"][0]["name"] == "NVIDIA H100 80GB HBM3"
    assert listed["hardware"]["cpu"] == {"model": "AMD EPYC 9454", "cores": 16, "memory_total": 128 * GIB,
                                         "memory_available": 100 * GIB}
    assert listed["kinds"] == [{"mode": "create", "type": "text", "model_name": TEXT_MODEL}]
    assert listed["slots"] == {"total": 4, "busy": 1, "free": 3}
    assert listed["adapters"] == ["ab" * 32] and listed["version"] == "0.1.0" and listed["backend"] == "mistral"
    assert listed["last_seen_at"] and listed["seconds_since_seen"] >= 0


def test_the_runners_listing_is_for_admins_only(client, user, runner, db):
    assert client.get("/api/v1/admin/runners").status_code == 401
    assert client.get("/api/v1/admin/runners", headers=user).status_code == 403
    assert client.get("/api/v1/admin/runners", headers=runner).status_code == 403
    assert client.get("/api/v1/admin/runners", headers=_admin(db)).json == {"runners": []}


def test_a_report_updates_the_row_a_poll_made_and_names_kinds_as_claims_do(client, runner, db):
    claim(client, {**runner, "X-Helix-Runner": "gpu-1"})
    inference = report(kinds=[{"mode": "inference", "type": "text", "model_name": TEXT_MODEL},
                              {"mode": "finetune", "type": "text", "model_name": TEXT_MODEL}])
    assert _post(client, runner, inference).status_code == 200
    row = _row(db, "gpu-1")
    assert [k["mode"] for k in row.kinds] == ["create", "finetune"] and row.slots_total == 4


def test_a_runner_that_never_reports_is_listed_as_before(client, runner, db):
    claim(client, {**runner, "X-Helix-Runner": "seed-runner"})
    (listed,) = client.get("/api/v1/admin/runners", headers=_admin(db)).json["runners"]
    assert listed["mode"] == "create" and listed["model_name"] == TEXT_MODEL and listed["alive"]
    assert (listed["hardware"], listed["slots"], listed["version"], listed["reported_at"]) == (None, None, None, None)


def test_a_runner_silent_for_longer_than_a_lease_is_gone(app, client, runner, db):
    _post(client, runner, report())
    silence = runners.gone_after(app.config) + 1
    with db.transaction() as conn:
        conn.execute(update(Runner).values(last_seen_at=utcnow() - timedelta(seconds=silence)))
    (listed,) = client.get("/api/v1/admin/runners", headers=_admin(db)).json["runners"]
    assert not listed["alive"] and listed["slots"]["total"] == 4  # its last report is still shown


def test_gone_after_is_a_lease_but_never_shorter_than_a_long_poll():
    assert runners.gone_after({"LEASE_SECONDS": 30, "MAX_WAIT_SECONDS": 30}) == 30 + runners.WRITE_EVERY_SECONDS
    assert runners.gone_after({"LEASE_SECONDS": 120, "MAX_WAIT_SECONDS": 30}) == 120 + runners.WRITE_EVERY_SECONDS
    assert runners.gone_after({"LEASE_SECONDS": 2, "MAX_WAIT_SECONDS": 30}) == 30 + runners.WRITE_EVERY_SECONDS


def test_a_heartbeat_carries_a_report(client, runner, db, task_factory):
    task_factory()
    headers = {**runner, "X-Helix-Runner": "gpu-1"}
    claimed = claim(client, headers).json
    beat = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/heartbeat", headers=headers,
                       json={"lease_token": claimed["lease"]["token"], "runner": report(slots={"total": 2, "busy": 2})})
    assert beat.status_code == 200 and beat.json["cancelled"] is False
    row = _row(db, "gpu-1")
    assert (row.slots_total, row.slots_busy, row.backend) == (2, 2, "mistral")


def test_reports_in_heartbeats_are_written_at_most_every_few_seconds(client, runner, db, task_factory, monkeypatch):
    task_factory()
    headers = {**runner, "X-Helix-Runner": "gpu-1"}
    claimed = claim(client, headers).json
    url = f"/api/v1/worker/task/{claimed['task']['id']}/heartbeat"
    token = claimed["lease"]["token"]
    client.post(url, headers=headers, json={"lease_token": token, "runner": report(slots={"total": 2, "busy": 1})})
    client.post(url, headers=headers, json={"lease_token": token, "runner": report(slots={"total": 2, "busy": 2})})
    assert _row(db, "gpu-1").slots_busy == 1  # many slots' heartbeats cost one write per interval
    monkeypatch.setattr(runners, "WRITE_EVERY_SECONDS", 0.0)
    client.post(url, headers=headers, json={"lease_token": token, "runner": report(slots={"total": 2, "busy": 2})})
    assert _row(db, "gpu-1").slots_busy == 2


def _nonsense() -> list[tuple[str, dict[str, Any], str]]:
    def gpu(**changes: Any) -> dict[str, Any]:
        body = report()
        body["hardware"]["gpus"][0].update(changes)
        return body

    def cpu(**changes: Any) -> dict[str, Any]:
        body = report()
        body["hardware"]["cpu"].update(changes)
        return body

    many = report()
    many["hardware"]["gpus"] = [dict(report()["hardware"]["gpus"][0], index=i % 8) for i in range(5000)]
    return [
        ("negative memory", gpu(memory_free=-1), "hardware.gpus[0].memory_free"),
        ("free beyond total", gpu(memory_free=81 * GIB), "hardware.gpus[0].memory_free"),
        ("memory as text", gpu(memory_total="80GB"), "hardware.gpus[0].memory_total"),
        ("a huge GPU name", gpu(name="H" * 100_000), "hardware.gpus[0].name"),
        ("thousands of GPUs", many, "hardware.gpus"),
        ("negative cores", cpu(cores=-4), "hardware.cpu.cores"),
        ("RAM as a float", cpu(memory_total=1.5), "hardware.cpu.memory_total"),
        ("available beyond total", cpu(memory_available=129 * GIB), "hardware.cpu.memory_available"),
        ("slots as text", report(slots={"total": "4", "busy": 0}), "slots.total"),
        ("busy beyond total", report(slots={"total": 2, "busy": 3}), "slots.busy"),
        ("no slots", report(slots={"total": 0, "busy": 0}), "slots.total"),
        ("a huge version", report(version="v" * 10_000), "version"),
        ("no kinds", report(kinds=[]), "kinds"),
        ("an unknown mode", report(kinds=[{"mode": "mine", "type": "text", "model_name": "m"}]), "kinds[0].mode"),
        ("adapters as an object", report(adapters={"a": 1}), "adapters"),
        ("an unknown field", report(colour="blue"), "colour"),
        ("hardware as a list", report(hardware=[]), "hardware"),
    ]


@pytest.mark.parametrize(("why", "body", "field"), _nonsense(), ids=[case[0] for case in _nonsense()])
def test_a_nonsense_report_is_refused_naming_the_field_and_the_last_good_one_stays(
        client, runner, db, why, body, field):
    assert _post(client, runner, report()).status_code == 200
    refused = _post(client, runner, body)
    assert refused.status_code == 400, refused.json
    assert refused.json["field"] == field, refused.json
    row = _row(db, "gpu-1")
    assert (row.slots_total, row.version, row.hardware) == (4, "0.1.0", report()["hardware"])


def test_a_nonsense_report_in_a_heartbeat_is_refused_and_the_last_good_one_stays(client, runner, db, task_factory):
    task_factory()
    headers = {**runner, "X-Helix-Runner": "gpu-1"}
    _post(client, runner, report())
    claimed = claim(client, headers).json
    bad = copy.deepcopy(report())
    bad["hardware"]["gpus"][0]["memory_total"] = -80
    beat = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/heartbeat", headers=headers,
                       json={"lease_token": claimed["lease"]["token"], "runner": bad})
    assert beat.status_code == 400 and beat.json["field"] == "runner.hardware.gpus[0].memory_total"
    assert _row(db, "gpu-1").hardware == report()["hardware"]


def test_helix_runners_list_shows_the_report(client, runner, db, database_url, monkeypatch, tmp_path):
    _post(client, runner, report())
    claim(client, {**runner, "X-Helix-Runner": "seed-runner"})
    with db.transaction() as conn:
        conn.execute(update(Runner).where(Runner.name == "seed-runner")
                     .values(last_seen_at=utcnow() - timedelta(hours=1)))
    monkeypatch.setenv("HELIX_DATABASE_URL", database_url)
    monkeypatch.setenv("HELIX_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(main, ["runners", "list"])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "gpu-1  alive" in out and "version 0.1.0" in out and "(backend mistral)" in out
    assert "GPU 0 NVIDIA H100 80GB HBM3 60.0 GiB free of 80.0 GiB" in out
    assert "CPU AMD EPYC 9454 x16, RAM 100.0 GiB free of 128.0 GiB" in out
    assert "1 busy, 3 free of 4" in out and "abababababab" in out
    assert "seed-runner  GONE" in out and "not reported" in out
    listed = CliRunner().invoke(main, ["runners", "list", "--json"])
    assert '"slots_total"' not in listed.output and '"free": 3' in listed.output
