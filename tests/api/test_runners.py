"""Runners seen: recorded as they poll and heartbeat, at most a few writes a minute, listed with what they hold."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from helix_api.models import Runner, utcnow
from helix_api.services import services
from helix_api.tasks import runners
from tests.conftest import IMAGE_MODEL, TEXT_MODEL, claim


def _rows(db) -> list[Runner]:
    with db.orm_read() as s:
        return list(s.scalars(select(Runner).order_by(Runner.name)))


def test_a_polling_runner_is_recorded_with_what_it_serves(client, runner, db):
    assert claim(client, {**runner, "X-Helix-Runner": "gpu-1"}).status_code == 204
    assert claim(client, {**runner, "X-Helix-Runner": "gpu-2"}, model=IMAGE_MODEL, type="image").status_code == 204
    rows = _rows(db)
    assert [(r.name, r.mode.value, r.type.value, r.model_name) for r in rows] == [
        ("gpu-1", "create", "text", TEXT_MODEL), ("gpu-2", "create", "image", IMAGE_MODEL)]
    assert rows[0].runner_token_id is not None


def test_polls_write_the_row_at_most_every_few_seconds(client, runner, db, monkeypatch):
    headers = {**runner, "X-Helix-Runner": "gpu-1"}
    claim(client, headers)
    first = _rows(db)[0].last_seen_at
    claim(client, headers)
    assert _rows(db)[0].last_seen_at == first  # a busy poller costs no write per poll
    monkeypatch.setattr(runners, "WRITE_EVERY_SECONDS", 0.0)
    claim(client, headers)
    assert _rows(db)[0].last_seen_at > first


def test_a_runner_that_asks_for_another_model_is_rewritten_at_once(client, runner, db):
    headers = {**runner, "X-Helix-Runner": "gpu-1"}
    claim(client, headers)
    claim(client, headers, model=IMAGE_MODEL, type="image")
    assert [(r.type.value, r.model_name) for r in _rows(db)] == [("image", IMAGE_MODEL)]


def test_listing_shows_the_task_a_runner_holds_and_heartbeats_count_as_heard_from(
        client, runner, db, task_factory, monkeypatch):
    session = task_factory()
    headers = {**runner, "X-Helix-Runner": "gpu-1"}
    claimed = claim(client, headers).json
    with db.transaction() as conn:
        conn.execute(update(Runner).values(last_seen_at=utcnow() - timedelta(minutes=5)))
        listed = runners.listing(conn)
    assert listed[0]["name"] == "gpu-1" and not listed[0]["alive"]
    assert listed[0]["tasks"] == [{"task_id": claimed["task"]["id"], "session_id": session["id"],
                                   "status": "claimed", "attempt": 1,
                                   "lease_expires_at": listed[0]["tasks"][0]["lease_expires_at"]}]

    monkeypatch.setattr(runners, "WRITE_EVERY_SECONDS", 0.0)
    beat = client.post(f"/api/v1/worker/task/{claimed['task']['id']}/heartbeat", headers=headers,
                       json={"lease_token": claimed["lease"]["token"]})
    assert beat.status_code == 200
    with db.connect() as conn:
        listed = runners.listing(conn)
    assert listed[0]["alive"] and listed[0]["tasks"][0]["status"] == "running"


def test_served_models_are_those_of_runners_heard_from_lately(client, runner, db):
    claim(client, {**runner, "X-Helix-Runner": "gpu-1"})
    claim(client, {**runner, "X-Helix-Runner": "gpu-2"}, model="/models/old", type="text")
    with db.transaction() as conn:
        conn.execute(update(Runner).where(Runner.name == "gpu-2")
                     .values(last_seen_at=utcnow() - timedelta(seconds=runners.ALIVE_SECONDS + 1)))
        assert runners.served_models(conn) == [("create", "text", TEXT_MODEL)]


def test_refreshes_of_many_runners_are_written_together(app, client, runner, db, monkeypatch):
    now = [1000.0]
    with app.app_context():
        registry = services().scheduler.runners
    monkeypatch.setattr(registry, "clock", lambda: now[0])
    names = ["gpu-a", "gpu-b", "gpu-c"]
    for name in names:  # first sightings: written at once
        claim(client, {**runner, "X-Helix-Runner": name})
    long_ago = utcnow() - timedelta(minutes=5)
    with db.transaction() as conn:
        conn.execute(update(Runner).values(last_seen_at=long_ago))
    now[0] += runners.WRITE_EVERY_SECONDS
    for name in names:  # the first refresh is written with its poll; the others wait for the next flush
        claim(client, {**runner, "X-Helix-Runner": name})
    assert [r.last_seen_at > long_ago for r in _rows(db)] == [True, False, False]
    now[0] += runners.WRITE_EVERY_SECONDS
    claim(client, {**runner, "X-Helix-Runner": "gpu-a"})  # one request writes every refresh waiting
    assert all(r.last_seen_at > long_ago for r in _rows(db))
